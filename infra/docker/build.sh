#!/usr/bin/env bash
# Builds one function's container binary and copies it to OUT_DIR/<function>.
#   infra/docker/build.sh <function> <out-dir>
# The Dockerfile's builder stage runs this script, and so does `just image-build <function>`
# outside Docker, so the image's build steps are exercised where no Docker engine runs.
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 <function> <out-dir>" >&2
    exit 2
fi
fn=$1
out=$2
cd "$(dirname "$0")/../.."
if [ ! -f "functions/$fn/sluice.toml" ]; then
    echo "build.sh: no function named $fn under functions/" >&2
    exit 2
fi
# --locked: the image is built from exactly the committed Cargo.lock. Default features: the
# container transports (RabbitMQ, SQS) and the function's stores.
cargo build --release --locked -p "$fn"
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
mkdir -p "$out"
install -m 0755 "$target_dir/release/$fn" "$out/$fn"
echo "build.sh: $out/$fn ($(stat -c %s "$out/$fn") bytes)" >&2
