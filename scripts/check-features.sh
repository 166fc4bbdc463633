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

# What a feature set leaves out, it must leave out: the Lambda build and the deploy-file
# generator link no broker client they do not use.
for pkg in "charge-payment --no-default-features --features lambda" "deliver-webhook --no-default-features --features lambda" "sluice-infra"; do
    read -r -a args <<<"$pkg"
    if cargo tree -p "${args[@]}" -e normal --prefix none 2>/dev/null | grep -q '^lapin '; then
        echo "features: cargo tree -p $pkg links lapin" >&2
        exit 1
    fi
done
echo "features: the Lambda builds and sluice-infra link no lapin"

# Fault injection is not in a build without the feature: a fault.* key is refused at start,
# naming the key and the feature (the workspace's tests build sluice with it, so this runs apart).
out=$(cargo test --quiet -p sluice --no-default-features --features embedded --lib \
    config::tests::a_fault_key_without_the_feature 2>&1)
if ! grep -q '^test result: ok. 1 passed' <<<"$out"; then
    printf '%s\nfeatures: the fault-key check of a build without `faults` did not pass\n' "$out" >&2
    exit 1
fi
echo "features: a build without \`faults\` refuses fault.* keys at start"
