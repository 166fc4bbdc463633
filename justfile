# Sluice workflows. `just` lists them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# The main job: charge-payment on the embedded queue, 10,000 messages (`just demo --json` for a JSON summary).
demo *args:
    cargo build --release --quiet -p charge-payment
    cargo run --release --quiet -p sluice-tests --bin demo -- {{args}}

# Everything CI checks: format, lints, unit tests, conformance suites on every backend, functions, end-to-end.
test: lint
    #!/usr/bin/env bash
    set -euo pipefail
    scripts/services.sh postgres redis rabbitmq
    eval "$(scripts/moto.sh start)"
    trap 'scripts/moto.sh stop' EXIT
    cargo build --workspace --bins
    cargo nextest run --workspace --no-fail-fast
    cargo test --doc --workspace --quiet

# Benchmarks against a baseline in the same run: `just bench stores [--json]`.
bench what *args:
    #!/usr/bin/env bash
    set -euo pipefail
    scripts/services.sh postgres redis rabbitmq >&2
    eval "$(scripts/moto.sh start)"
    trap 'scripts/moto.sh stop' EXIT
    cargo build --release --quiet -p sluice-tests --bin bench
    cargo run --release --quiet -p sluice-tests --bin bench -- {{what}} {{args}}

# Start the local servers (PostgreSQL, Redis, RabbitMQ) and moto; prints the AWS variables to export.
emulators:
    scripts/services.sh postgres redis rabbitmq
    scripts/moto.sh start

# Format check and clippy with warnings as errors.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Format the code.
fmt:
    cargo fmt --all

# Run a function's CLI, e.g. `just fn charge-payment stats`.
fn name *args:
    cargo run --quiet -p {{name}} -- {{args}}
