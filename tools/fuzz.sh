#!/usr/bin/env bash
# Runs each cargo-fuzz target (tools/fuzz) for a bounded time, from the committed seed corpus.
#
#   bash tools/fuzz.sh [SECONDS_PER_TARGET]     # default 60
#   FUZZ_TARGETS="headers" bash tools/fuzz.sh 300  # only some targets
#   FUZZ_CODEGEN_UNITS=1 bash tools/fuzz.sh 3600   # slower build, a little faster fuzzing
#
# cargo-fuzz needs nightly rustc flags (-Z sanitizer, coverage passes); on a stable toolchain
# RUSTC_BOOTSTRAP=1 lets rustc accept them. Installs cargo-fuzz if missing.
# All targets are built once (release, in tools/fuzz/target, kept between runs) before any runs.
# New inputs go to target/fuzz-corpus/<target> (the committed seeds stay as they are); a crash
# leaves its input in tools/fuzz/artifacts/<target>/ and fails this script: make it a test.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-60}
TARGETS=${FUZZ_TARGETS:-preprocess requests headers}
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null; then
    echo "== installing cargo-fuzz"
    start=$SECONDS
    cargo install cargo-fuzz --locked
    echo "== installed cargo-fuzz in $((SECONDS - start)) s"
fi

# No sanitizer (stable rustc has none to offer); --codegen-units: cargo-fuzz's default of one per
# crate leaves the second core idle while the big crates (octserve, image) build, at a small cost
# in fuzzing speed. `cargo fuzz run` gets the same options, so it finds the targets built.
OPTIONS=(--fuzz-dir tools/fuzz -s none --codegen-units "${FUZZ_CODEGEN_UNITS:-16}")
echo "== building fuzz targets: $TARGETS"
start=$SECONDS
for target in $TARGETS; do
    cargo fuzz build "${OPTIONS[@]}" "$target"
done
echo "== built in $((SECONDS - start)) s"

mkdir -p target
for target in $TARGETS; do
    echo "== $target: ${SECONDS_PER_TARGET} s"
    # -rss_limit_mb: the decoders must stay within the pixel budget's memory.
    mkdir -p "target/fuzz-corpus/$target"
    status=0
    cargo fuzz run "${OPTIONS[@]}" "$target" \
        "target/fuzz-corpus/$target" "tools/fuzz/corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        2>&1 | tee "target/fuzz-$target.log" \
        | { grep -E "^(#[0-9]+[[:space:]]+(DONE|INITED)|stat::|==|SUMMARY|Done)" || true; } || status=$?
    # A crash, a timeout or running out of memory: libFuzzer's SUMMARY line and a failing exit;
    # a target that does not build: only the failing exit.
    if [ "$status" -ne 0 ] || grep -q "^SUMMARY\|deadly signal\|panicked" "target/fuzz-$target.log"; then
        echo "$target failed (exit $status); see target/fuzz-$target.log" >&2
        exit 1
    fi
done
