#!/usr/bin/env bash
# Checks every deployment file, in seconds, with the tools of the real thing:
#   1. `sluice-infra check`: the generated files match the functions' sluice.toml (no drift);
#   2. cfn-lint (PyPI, pinned in scripts/moto.sh) on every template under infra/aws/;
#   3. each template deployed into a moto server of its own (CloudFormation emulation), the
#      function templates in full (Lambda, mapping, role included, with a placeholder zip:
#      moto stores the function but never runs it);
#   4. scripts/k8s-check.sh, when it exists (its last line: `k8s: K manifests valid`);
#   5. the Prometheus rules (infra/prometheus/alerts.yml): `promtool check rules`, and
#      `promtool test rules` on the unit tests in infra/prometheus/tests/ (synthetic series,
#      which alerts fire and which do not); the Grafana dashboard's queries parsed, then run
#      (with the Argo Rollouts AnalysisTemplates' queries) on a real Prometheus scraping
#      synthetic contract series (scripts/grafana-queries.py).
#      Prometheus and promtool are Debian's package, installed by scripts/prometheus.sh.
# The last line is the summary: `infra: N templates linted, M resources deployed, K manifests
# valid, R rules valid, T rule test files passed, Q dashboard queries answered`.
# M counts the resources moto reports as created (with a physical id); what moto accepts
# without creating (alarms, bucket policy, lifecycle) is listed in docs/deploy.md.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SLUICE_VENV:-$HOME/.cache/sluice/venv}
scripts/moto.sh install
promtool=$(scripts/prometheus.sh install)

# 1. Drift. Built here so the recipe works on its own; cheap when already built.
cargo build --quiet -p sluice-infra
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
"$target_dir/debug/sluice-infra" check >&2

# 5, started now: the dashboard queries on a Prometheus of their own mostly wait for scrapes
# (about 10 s), which overlaps the linting and deploys below.
work=$(mktemp -d)
# The venv's python: it has PyYAML (cfn-lint's), for the AnalysisTemplates' queries.
"$VENV/bin/python" scripts/grafana-queries.py selftest >"$work/grafana.out" 2>&1 &
grafana_pid=$!

# 3. Deploy into a moto of our own (started first, it boots while cfn-lint runs), never one a developer or `just test` is using, and never
#    real AWS: every AWS variable points at it.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto_pid=$!
trap 'kill $moto_pid $grafana_pid 2>/dev/null || true; rm -rf "$work"' EXIT
# 2. Lint while moto starts: one cfn-lint process for all templates (its start-up is most of
#    the cost).
templates=(infra/aws/*.json infra/aws/*.yaml)
"$VENV/bin/cfn-lint" -- "${templates[@]}" >&2
linted=${#templates[@]}

export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_REGION=us-east-1 \
    AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
unset AWS_PROFILE AWS_ENDPOINT_URL_SQS AWS_ENDPOINT_URL_S3 AWS_ENDPOINT_URL_CLOUDFORMATION
for ((i = 0; i < 600; i++)); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/', timeout=1)" 2>/dev/null; then
        break
    fi
    kill -0 $moto_pid 2>/dev/null || { cat "$work/moto.log" >&2; exit 1; }
    sleep 0.1
done

# The function templates want a code zip in S3; moto checks that the object exists, not what
# it holds, so a placeholder keeps this independent of `just package`.
"$VENV/bin/python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1], "w").writestr("bootstrap", "placeholder")' "$work/bootstrap.zip"

deployed=0
for t in "${templates[@]}"; do
    stack=infra-check-$(basename "${t%.*}")
    args=(--stack "$stack" --template "$t")
    if [[ $t == *.json ]]; then
        # TrafficShifting=None: moto creates no Lambda alias (a reference to one resolves to
        # nothing, so the mapping on the alias fails) and no CodeDeploy resources; the staged
        # resources are checked by cfn-lint above, and docs/deploy.md lists what moto does.
        args+=(--code-zip "$work/bootstrap.zip" --param TrafficShifting=None)
    fi
    "$VENV/bin/python" scripts/cfn-deploy.py "${args[@]}" >"$work/$stack.json"
    n=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["resources"]))' "$work/$stack.json")
    echo "infra: $t -> $n resources on moto" >&2
    deployed=$((deployed + n))
done

# 4. Kubernetes manifests, when that check exists.
manifests=0
if [ -x scripts/k8s-check.sh ] || [ -f scripts/k8s-check.sh ]; then
    k8s_out=$(bash scripts/k8s-check.sh)
    last=$(tail -n 1 <<<"$k8s_out")
    if [[ $last =~ ^k8s:\ ([0-9]+)\ manifests\ valid ]]; then
        manifests=${BASH_REMATCH[1]}
    else
        echo "infra: scripts/k8s-check.sh ended with \"$last\", expected \"k8s: K manifests valid\"" >&2
        exit 1
    fi
fi

# 5. Alert rules and their unit tests, then the dashboard.
rules_out=$("$promtool" check rules infra/prometheus/alerts.yml 2>&1) || { echo "$rules_out" >&2; exit 1; }
echo "$rules_out" >&2
rules=$(sed -n 's/^ *SUCCESS: \([0-9]*\) rules found$/\1/p' <<<"$rules_out")
rule_tests=(infra/prometheus/tests/*.yml)
"$promtool" test rules "${rule_tests[@]}" >&2
# The rule tests must be able to fail: with the fast burn's 5-minute window widened to 30
# minutes, the alert no longer resets minutes after a fix, and burn-rate-fast.yml must say so.
mutant=$work/rules-self-check
mkdir -p "$mutant/tests"
sed 's/ratio_rate5m{function="charge-payment"} > 0.0144$/ratio_rate30m{function="charge-payment"} > 0.0144/' \
    infra/prometheus/alerts.yml >"$mutant/alerts.yml"
cp infra/prometheus/tests/burn-rate-fast.yml "$mutant/tests/"
if cmp -s "$mutant/alerts.yml" infra/prometheus/alerts.yml; then
    echo "infra: rule self-check: the edit did not apply (alerts.yml layout changed?)" >&2
    exit 1
fi
if "$promtool" test rules "$mutant/tests/burn-rate-fast.yml" >/dev/null 2>&1; then
    echo "infra: rule self-check failed: burn-rate-fast.yml passed with the fast burn's short window widened" >&2
    exit 1
fi
echo "infra: rule self-check: a widened short window fails burn-rate-fast.yml" >&2
python3 scripts/grafana-queries.py check >&2
if ! wait $grafana_pid; then
    cat "$work/grafana.out" >&2
    echo "infra: dashboard queries failed on Prometheus (above)" >&2
    exit 1
fi
grafana_pid=
last=$(tail -n 1 "$work/grafana.out")
tail -n 2 "$work/grafana.out" >&2
queries=$(sed -n 's/^grafana: \([0-9]*\) of [0-9]* queries answered.*/\1/p' <<<"$last")

echo "infra: $linted templates linted, $deployed resources deployed, $manifests manifests valid, $rules rules valid, ${#rule_tests[@]} rule test files passed, $queries dashboard queries answered"
