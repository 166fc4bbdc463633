#!/usr/bin/env bash
# Makes sure the local servers the tests use are up: PostgreSQL (127.0.0.1:5432, database
# `test`), Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672). Starts a stopped one with the
# machine's own service command, or fails naming what is missing.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # name port seconds
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        port_open "$2" && return 0
        sleep 0.1
    done
    echo "services: $1 did not open 127.0.0.1:$2 within $3 s" >&2
    return 1
}

ensure() { # name port start-command...
    local name=$1 port=$2
    shift 2
    if port_open "$port"; then
        echo "services: $name up on 127.0.0.1:$port"
        return 0
    fi
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "services: $name is not running on 127.0.0.1:$port and '$1' is not installed" >&2
        return 1
    fi
    echo "services: starting $name"
    "$@" >/dev/null 2>&1 || true
    wait_port "$name" "$port" 60
    echo "services: $name up on 127.0.0.1:$port"
}

want=${*:-postgres redis rabbitmq}
for svc in $want; do
    case $svc in
    postgres)
        version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1 || true)
        if [ -z "$version" ] && ! port_open 5432; then
            echo "services: PostgreSQL is not running and not installed (/etc/postgresql is empty)" >&2
            exit 1
        fi
        ensure PostgreSQL 5432 pg_ctlcluster --skip-systemctl-redirect "$version" main start
        ;;
    redis)
        ensure Redis 6379 redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
        ;;
    rabbitmq)
        ensure RabbitMQ 5672 rabbitmq-server -detached
        # The port opens before the broker is ready for clients.
        if command -v rabbitmqctl >/dev/null 2>&1; then
            rabbitmqctl await_startup >/dev/null 2>&1 || {
                echo "services: RabbitMQ did not finish starting" >&2
                exit 1
            }
        fi
        ;;
    *)
        echo "services: unknown service $svc (postgres, redis, rabbitmq)" >&2
        exit 2
        ;;
    esac
done
