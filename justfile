# Sluice workflows. `just` lists them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# The function is a release build with the embedded queue only; the driver (tests/demo) a debug build.
# (`just --list` shows the line right above a recipe, so the description comes last.)
# The main job: charge-payment on the embedded queue, 10,000 messages (`just demo --json` for a JSON summary); `just demo workflow [--json]`: 1,000 orders through workflows/order.toml.
demo *args:
    #!/usr/bin/env bash
    set -euo pipefail
    set -- {{args}}
    if [ "${1:-}" = workflow ]; then
        shift
        # order-steps with the embedded queue only and fault injection (the orders carry it).
        cargo build --release --quiet -p order-steps --no-default-features --features faults
        target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
        exec cargo run --quiet -p sluice-demo --bin workflow-demo -- --function-bin "$target/release/order-steps" "$@"
    fi
    # charge-payment's cargo features for the demo: the embedded queue only, and fault
    # injection (the demo makes 0.2% of handler calls panic: fault.panic_rate).
    features=(--no-default-features --features faults)
    cargo build --release --quiet -p charge-payment "${features[@]}"
    target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    cargo run --quiet -p sluice-demo --bin demo -- --function-bin "$target/release/charge-payment" {{args}}

# Everything CI checks: the docs' links, format, lints, unit tests, conformance suites on every backend, functions, end-to-end.
test: lint
    #!/usr/bin/env bash
    set -euo pipefail
    # The module checker's own test: it finds a cycle in a synthetic tree, none in an acyclic one.
    scripts/check-modules.py --self-test
    scripts/services.sh postgres redis rabbitmq
    eval "$(scripts/moto.sh start)"
    trap 'scripts/moto.sh stop' EXIT
    # cargo-lambda (PyPI) for tests/tests/it/cargo_lambda.rs; seconds, once per machine.
    scripts/lambda.sh install
    cargo build --workspace --bins
    # The Lambda flavour (no lapin), for tests/tests/it/lambda_mode.rs and local_esm.rs, with
    # `otlp` for traces.rs's Lambda spans (the shipped zips leave it out): built for an explicit
    # target so it lands beside the host binaries, not over them.
    cargo build -p charge-payment -p deliver-webhook --no-default-features --features lambda,faults,otlp --target x86_64-unknown-linux-gnu
    # The API reference builds without a warning (every public item documented, links resolve).
    RUSTDOCFLAGS="-D warnings" cargo doc --quiet -p sluice --no-deps --all-features
    # Doc tests and the deploy files first: the last lines CI reads are nextest's summary.
    cargo test --doc --workspace --quiet
    scripts/infra-check.sh
    # sluice with no feature, with each feature alone and with all: each combination compiles.
    scripts/check-features.sh
    # The fuzz targets' seeds and regressions run in nextest (fuzz_seeds::*). Fuzzing itself
    # needs an instrumented build of its own (cold: 12 min of CPU, docs/reliability.md), too costly for every
    # CI run: SLUICE_FUZZ_SECONDS=5 just test adds a short run of each target.
    if [ -n "${SLUICE_FUZZ_SECONDS:-}" ]; then scripts/fuzz.sh run "" "$SLUICE_FUZZ_SECONDS"; fi
    cargo nextest run --workspace --no-fail-fast

# Benchmarks against a baseline in the same run: `just bench stores [--json]`, `just bench rabbitmq [--json]` (docs/rabbitmq.md), `just bench lambda [--runs N] [--json]` (cold start, docs/lambda.md).
bench what *args:
    #!/usr/bin/env bash
    set -euo pipefail
    scripts/services.sh postgres redis rabbitmq >&2
    if [ "{{what}}" = lambda ]; then
        # Cold start: process start -> first /next, Sluice's charge-payment against a bare
        # lambda_runtime handler, both release builds, through the Runtime API stub.
        eval "$(scripts/moto.sh start)"
        trap 'scripts/moto.sh stop' EXIT
        # The packaged build (`cargo lambda build --profile lambda`, as `just package` zips it).
        just package >&2
        cargo build --release --quiet -p sluice-bench --bin bare-lambda --bin lambda-bench
        exec cargo run --release --quiet -p sluice-bench --bin lambda-bench -- {{args}}
    fi
    if [ "{{what}}" = stores ]; then
        eval "$(scripts/moto.sh start)"
        trap 'scripts/moto.sh stop' EXIT
    fi
    cargo build --release --quiet -p sluice-bench --bin bench
    cargo run --release --quiet -p sluice-bench --bin bench -- {{what}} {{args}}

# Fuzz the decoders of untrusted input (fuzz/, docs/reliability.md#fuzzing): `just fuzz` (every target, 60 s each), `just fuzz amqp_headers 300`; installs cargo-fuzz once.
fuzz target="" seconds="60":
    scripts/fuzz.sh run "{{target}}" {{seconds}}

# Start the local servers (PostgreSQL, Redis, RabbitMQ) and moto, install cargo-lambda; prints the AWS variables to export.
emulators:
    scripts/services.sh postgres redis rabbitmq
    scripts/lambda.sh install
    scripts/moto.sh start

# A function in Lambda mode fed by a local SQS event source mapping on moto (tests/src/bin/local-esm.rs), e.g. `just local-lambda charge-payment --drain`.
local-lambda fn *args:
    #!/usr/bin/env bash
    set -euo pipefail
    eval "$(scripts/moto.sh start)"
    cargo build --quiet -p {{fn}} --no-default-features --features lambda --target x86_64-unknown-linux-gnu
    cargo build --quiet -p sluice-tests --bin local-esm
    export SLUICE__TRANSPORT__KIND=sqs SLUICE__TRANSPORT__URL=${SLUICE__TRANSPORT__URL:-{{fn}}}
    # Creates the queue and its DLQ with the redrive policy if they do not exist.
    cargo run --quiet -p {{fn}} -- provision >&2
    cargo run --quiet -p sluice-tests --bin local-esm -- --function {{fn}} --queue "$SLUICE__TRANSPORT__URL" {{args}}

# Lambda zips (`bootstrap`) of every function under target/lambda/, with sizes: `just package` (x86_64) or `just package arm64` (needs the arm64 standard library, not installable here).
package arch="x86_64":
    #!/usr/bin/env bash
    set -euo pipefail
    scripts/lambda.sh install
    target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    flag=$([ "{{arch}}" = arm64 ] && echo --arm64 || echo --x86-64)
    printf '%-18s %-8s %12s %12s\n' function arch binary zip
    # Every function under functions/, a new one (`just new-function`) included.
    for dir in functions/*/; do
        fn=$(basename "$dir")
        [ -f "$dir/Cargo.toml" ] || continue
        # The size-first `lambda` profile (Cargo.toml, docs/lambda.md "Package").
        scripts/lambda.sh cargo-lambda build --profile lambda $flag --no-default-features --features lambda -p $fn --output-format zip --lambda-dir "$target_dir/lambda" >&2
        zip="$target_dir/lambda/$fn/bootstrap.zip"
        bin=$(python3 -c 'import sys,zipfile; print(zipfile.ZipFile(sys.argv[1]).getinfo("bootstrap").file_size)' "$zip")
        printf '%-18s %-8s %12s %12s\n' $fn {{arch}} "$bin" "$(stat -c %s "$zip")"
    done

# Chaos run (docs/reliability.md "Chaos"): charge-payment exactly-once under worker SIGKILLs, broker and store cuts and a store outage, then a table (`--json`: one object); exits 1 if anything was lost or charged twice, e.g. `just chaos rabbitmq --messages 20000 --workers 3 --duration 60`.
chaos transport="embedded" *args:
    #!/usr/bin/env bash
    set -euo pipefail
    scripts/services.sh postgres rabbitmq >&2
    if [ "{{transport}}" = sqs ]; then
        eval "$(scripts/moto.sh start)"
    fi
    # Debug builds, as `just test` makes them: the harness finds charge-payment beside itself.
    cargo build --quiet -p charge-payment -p sluice-chaos
    target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    "$target/debug/chaos" {{transport}} {{args}}

# Incident drill (docs/runbook.md "Incidents"): `just drill partition|auth|exhaustion` reproduces the incident with charge-payment on RabbitMQ and PostgreSQL, runs the runbook's commands, recovers and checks nothing was lost.
drill which:
    #!/usr/bin/env bash
    set -euo pipefail
    scripts/services.sh postgres rabbitmq >&2
    cargo build --quiet -p charge-payment -p sluice-chaos
    target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    "$target/debug/drill" {{which}}

# Soak (docs/reliability.md "Soak"): one charge-payment worker on RabbitMQ under steady load with connection cuts for N minutes (default 30), RSS / fds / sockets sampled from /proc, the memory slope in KB/min; e.g. `just soak 30`.
soak minutes="30" *args:
    #!/usr/bin/env bash
    set -euo pipefail
    scripts/services.sh postgres rabbitmq >&2
    cargo build --quiet -p charge-payment -p sluice-chaos
    target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    "$target/debug/soak" {{minutes}} {{args}}

# Deploy files: drift against each sluice.toml, cfn-lint on every template, a deploy of each into moto, the k8s manifests, promtool check/test rules, the dashboard's queries on Prometheus; last line `infra: N templates linted, M resources deployed, K manifests valid, R rules valid, T rule test files passed, Q dashboard queries answered`.
infra-check:
    scripts/infra-check.sh

# (Re)write the deploy files under infra/ from each function's sluice.toml (docs/deploy.md).
infra-generate:
    cargo run --quiet -p sluice-infra -- generate

# A new function: functions/NAME/ (Cargo.toml, sluice.toml, src/main.rs) and its deploy files, then the next commands; `just new-function thumbnail [--transport embedded|rabbitmq|sqs] [--store sqlite|postgres|redis|s3|none]` (README "Writing a function").
new-function name *args:
    @cargo run --quiet -p sluice-infra -- new "{{name}}" {{args}}

# Relative links (and #anchors) in README.md and docs/*.md resolve, format check, clippy with warnings as errors, and shared/src's module rules (no import cycle, no file over 800 lines).
lint:
    scripts/check-links.py
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
    scripts/check-modules.py

# Format the code.
fmt:
    cargo fmt --all

# Run a function's CLI, e.g. `just fn charge-payment stats`.
fn name *args:
    cargo run --quiet -p {{name}} -- {{args}}

# A function's container binary, built by the Dockerfile's own build script outside Docker (infra/docker/build.sh), into target/image/<fn>/; docs/deploy.md "Build the image".
image-build fn:
    #!/usr/bin/env bash
    set -euo pipefail
    target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    infra/docker/build.sh {{fn}} "$target/image/{{fn}}"
    ls -l "$target/image/{{fn}}/{{fn}}"
