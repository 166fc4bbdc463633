#!/usr/bin/env bash
# moto (PyPI moto[server]): the local emulator of SQS, S3 and CloudFormation, and cfn-lint
# (PyPI), the CloudFormation linter `just infra-check` runs, in the same venv.
#   scripts/moto.sh install   create the venv and install moto and cfn-lint (once per machine)
#   scripts/moto.sh start     start it on a free loopback port; prints `export ...` lines
#   scripts/moto.sh stop      stop the one started from this checkout
# Usage in a shell: eval "$(scripts/moto.sh start)"
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SLUICE_VENV:-$HOME/.cache/sluice/venv}
STATE=.sluice/moto
mkdir -p "$STATE"

# Pinned: a new cfn-lint release adds rules, and a lint that changes its verdict on the same
# template between two runs is noise.
CFN_LINT_VERSION=1.58.0

install() {
    if [ ! -x "$VENV/bin/moto_server" ]; then
        echo "moto: installing moto[server] into $VENV (about 40 s, once)" >&2
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5.1,<6' >&2
    fi
    if ! "$VENV/bin/cfn-lint" --version 2>/dev/null | grep -qF "$CFN_LINT_VERSION"; then
        echo "moto: installing cfn-lint $CFN_LINT_VERSION into $VENV (about 20 s, once)" >&2
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "cfn-lint==$CFN_LINT_VERSION" >&2
    fi
}

start() {
    install
    if [ -f "$STATE/pid" ] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
        port=$(cat "$STATE/port")
    else
        port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
        nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$STATE/moto.log" 2>&1 &
        echo $! >"$STATE/pid"
        echo "$port" >"$STATE/port"
        for ((i = 0; i < 300; i++)); do
            if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/', timeout=1)" 2>/dev/null; then
                break
            fi
            if ! kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
                echo "moto: the server exited; see $STATE/moto.log" >&2
                exit 1
            fi
            sleep 0.1
        done
        echo "moto: up on 127.0.0.1:$port" >&2
    fi
    cat <<ENV
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export SLUICE_TEST_MOTO=http://127.0.0.1:$port
ENV
}

stop() {
    if [ -f "$STATE/pid" ]; then
        kill "$(cat "$STATE/pid")" 2>/dev/null || true
        rm -f "$STATE/pid" "$STATE/port"
    fi
}

case ${1:-} in
install) install ;;
start) start ;;
stop) stop ;;
*)
    echo "usage: scripts/moto.sh install|start|stop" >&2
    exit 2
    ;;
esac
