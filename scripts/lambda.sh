#!/usr/bin/env bash
# cargo-lambda (PyPI `cargo-lambda`, a prebuilt binary; it pulls `ziglang`): the local Lambda
# Runtime API emulator and the Lambda packager. Installed into the venv scripts/moto.sh uses.
#   scripts/lambda.sh install              install cargo-lambda (once per machine, about 15 s)
#   scripts/lambda.sh watch [PORT]         the Runtime API emulator only (`--only-lambda-apis`):
#                                          no rebuild; run the prebuilt binary against it with
#                                          AWS_LAMBDA_RUNTIME_API=127.0.0.1:PORT/.rt
#   scripts/lambda.sh invoke FN FILE [PORT] invoke FN with the event in FILE through the emulator
#   scripts/lambda.sh cargo-lambda ARGS... any other `cargo lambda` command (build, ...)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SLUICE_VENV:-$HOME/.cache/sluice/venv}
PORT_DEFAULT=9000

install() {
    if [ -x "$VENV/bin/cargo-lambda" ]; then
        return 0
    fi
    if [ ! -x "$VENV/bin/python3" ]; then
        python3 -m venv "$VENV"
    fi
    echo "cargo-lambda: installing into $VENV (about 15 s, once)" >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check 'cargo-lambda>=1.8,<2' >&2
}

# `cargo lambda` with the venv on PATH (zig comes with it).
cl() {
    install
    PATH="$VENV/bin:$PATH" "$VENV/bin/cargo-lambda" lambda "$@"
}

case ${1:-} in
install) install ;;
watch)
    # Listens on loopback only (the default is all interfaces); runs until stopped.
    cl watch --only-lambda-apis --invoke-address 127.0.0.1 --invoke-port "${2:-$PORT_DEFAULT}"
    ;;
invoke)
    [ $# -ge 3 ] || { echo "usage: scripts/lambda.sh invoke FN EVENT.json [PORT]" >&2; exit 2; }
    # Long flags only: `-A` means two things in `cargo lambda invoke`.
    cl invoke "$2" --data-file "$3" --invoke-address 127.0.0.1 --invoke-port "${4:-$PORT_DEFAULT}" --output-format json
    ;;
cargo-lambda)
    shift
    cl "$@"
    ;;
*)
    echo "usage: scripts/lambda.sh install|watch [PORT]|invoke FN FILE [PORT]|cargo-lambda ARGS..." >&2
    exit 2
    ;;
esac
