#!/usr/bin/env bash
# Fuzzing the decoders of untrusted input (fuzz/, docs/reliability.md#fuzzing) with cargo-fuzz
# (crates.io, libFuzzer) on the stable toolchain: RUSTC_BOOTSTRAP=1 lets it pass its -Z flags.
#   scripts/fuzz.sh install               cargo-fuzz into ~/.cache/sluice/tools (once per machine)
#   scripts/fuzz.sh list                  the targets
#   scripts/fuzz.sh run [TARGET] [SECS]   fuzz TARGET (default: each in turn) for SECS seconds
#                                         each (default 60), from the committed seeds
#                                         (fuzz/seeds/TARGET); new inputs go to the scratch
#                                         corpus fuzz/corpus/TARGET (not committed); a crash
#                                         stops the run and is left in fuzz/artifacts/TARGET
# No sanitizer (`-s none`): the crate forbids unsafe code, so what there is to find is panics,
# overflows (debug assertions are on) and hangs; it also keeps the build and each run cheap.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${SLUICE_TOOLS:-$HOME/.cache/sluice/tools}
VERSION=0.13.2

install() {
    if [ -x "$TOOLS/bin/cargo-fuzz" ] && "$TOOLS/bin/cargo-fuzz" --version | grep -q "$VERSION"; then
        return 0
    fi
    echo "cargo-fuzz: installing $VERSION into $TOOLS (a few minutes, once)" >&2
    # Its own build directory, not the project's target dir.
    env -u CARGO_TARGET_DIR cargo install --quiet --locked --root "$TOOLS" cargo-fuzz --version "$VERSION" >&2
}

targets() {
    "$TOOLS/bin/cargo-fuzz" list --fuzz-dir fuzz
}

run() {
    local target=$1 secs=$2
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    RUSTC_BOOTSTRAP=1 "$TOOLS/bin/cargo-fuzz" run --fuzz-dir fuzz -s none --debug-assertions \
        --target-dir "${CARGO_TARGET_DIR:-target}/fuzz" "$target" \
        "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$target/"
}

case ${1:-} in
install) install ;;
list) install; targets ;;
run)
    install
    secs=${3:-60}
    if [ -n "${2:-}" ]; then
        run "$2" "$secs"
    else
        for t in $(targets); do run "$t" "$secs"; done
    fi
    ;;
*)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
