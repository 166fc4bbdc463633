#!/usr/bin/env bash
# Prometheus and promtool from Debian's package `prometheus` (the alert rules' unit tests, the
# dashboard's queries, and the integration test that scrapes a worker use them).
#   scripts/prometheus.sh install          install once (apt-get, idempotent); prints promtool's path
#   scripts/prometheus.sh path [promtool|prometheus]
#                                          the path of one binary (installs first when missing)
# The package's service is never started: the tests start their own server on a free port,
# and a daemon on :9090 would sit on the port the workers' telemetry uses in the manifests.
set -euo pipefail

# What Debian 12 ships (2.42); anything older lacks what the rule tests use.
MIN_MAJOR=2
MIN_MINOR=42

version_ok() { # binary
    local v
    v=$("$1" --version 2>&1 | sed -n 's/^[a-z]* *, version \([0-9]*\)\.\([0-9]*\)\..*/\1 \2/p' | head -n1)
    [ -n "$v" ] || return 1
    set -- $v
    [ "$1" -gt "$MIN_MAJOR" ] || { [ "$1" -eq "$MIN_MAJOR" ] && [ "$2" -ge "$MIN_MINOR" ]; }
}

installed() {
    local p
    for b in promtool prometheus; do
        p=$(command -v "$b" 2>/dev/null) || return 1
        version_ok "$p" || return 1
    done
}

install() {
    if installed; then
        return 0
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || {
            echo "prometheus: not root and no sudo: install Debian's package 'prometheus' (apt-get install prometheus)" >&2
            exit 1
        }
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null || {
        echo "prometheus: no apt-get here: install Prometheus >= $MIN_MAJOR.$MIN_MINOR with promtool on PATH" >&2
        exit 1
    }
    echo "prometheus: installing Debian's package 'prometheus' (promtool included; once)" >&2
    # Keep the package's postinst from starting the service (the Debian mechanism: exit 101
    # from policy-rc.d means "not allowed"); only for this install, and only if none exists.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod 755 "$policy"
        made_policy=1
    fi
    local rc=0
    {
        # A fresh machine has no package lists yet; an update is cheap next to the install.
        "${sudo[@]}" apt-get update -qq >&2 &&
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends prometheus >&2
    } || rc=$?
    if [ "$made_policy" -eq 1 ]; then
        "${sudo[@]}" rm -f "$policy"
    fi
    [ "$rc" -eq 0 ] || exit "$rc"
    # Nor at the next boot, on a machine that runs systemd.
    if command -v systemctl >/dev/null; then
        "${sudo[@]}" systemctl disable --quiet prometheus.service 2>/dev/null || true
    fi
    installed || {
        echo "prometheus: installed, but promtool/prometheus $MIN_MAJOR.$MIN_MINOR or later is not on PATH" >&2
        exit 1
    }
}

case ${1:-} in
install)
    install
    command -v promtool
    ;;
path)
    install
    command -v "${2:-promtool}"
    ;;
*)
    echo "usage: scripts/prometheus.sh install | path [promtool|prometheus]" >&2
    exit 2
    ;;
esac
