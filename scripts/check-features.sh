#!/usr/bin/env bash
# Every cargo feature of `sluice` (shared/Cargo.toml) must compile on its own: a function crate
# picks the few it needs, so a feature that only builds next to another is a broken build for
# someone. Checks `cargo check -p sluice` with no feature, with each feature alone (the list is
# read from `cargo metadata`, so a new feature is covered without editing this), and with all
# of them; prints a table (feature, result, seconds) and exits 1 if any combination fails, with
# the compiler's errors of each failure after the table.
#   scripts/check-features.sh
set -euo pipefail
cd "$(dirname "$0")/.."

features=$(cargo metadata --format-version 1 --no-deps | python3 -c '
import json, sys
pkg = next(p for p in json.load(sys.stdin)["packages"] if p["name"] == "sluice")
# `default` is a set of the others, not a feature of its own.
print("\n".join(sorted(f for f in pkg["features"] if f != "default")))
')

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

# name | cargo arguments
combos=("(none)|--no-default-features")
for f in $features; do
    combos+=("$f|--no-default-features --features $f")
done
combos+=("(all)|--all-features")

printf '%-14s %-7s %8s\n' feature result seconds
failed=()
for combo in "${combos[@]}"; do
    name=${combo%%|*}
    read -r -a args <<<"${combo#*|}"
    start=$(date +%s%N)
    if cargo check --quiet -p sluice "${args[@]}" --message-format short >"$logs/$name.log" 2>&1; then
        result=ok
    else
        result=FAILED
        failed+=("$name")
    fi
    seconds=$(awk -v ns=$(($(date +%s%N) - start)) 'BEGIN { printf "%.1f", ns / 1e9 }')
    printf '%-14s %-7s %8s\n' "$name" "$result" "$seconds"
done

if [ ${#failed[@]} -gt 0 ]; then
    for name in "${failed[@]}"; do
        printf '\n==> cargo check -p sluice, feature %s:\n' "$name"
        grep -E '(^|: )error' "$logs/$name.log" | head -40 || tail -40 "$logs/$name.log"
    done
    printf '\nfeatures: %d of %d combinations fail to compile: %s\n' \
        ${#failed[@]} ${#combos[@]} "${failed[*]}"
    exit 1
fi
printf 'features: all %d combinations compile\n' ${#combos[@]}
