#!/usr/bin/env bash
# Runs each cargo-fuzz target (tools/fuzz) for a bounded time, from the committed seed corpus.
#
#   bash tools/fuzz.sh [SECONDS_PER_TARGET]     # default 60
#
# cargo-fuzz needs nightly rustc flags (-Z sanitizer, coverage passes); this machine has only a
# stable toolchain, so RUSTC_BOOTSTRAP=1 lets stable accept them. Needs `cargo install cargo-fuzz`.
# New inputs go to target/fuzz-corpus/<target> (the committed seeds stay as they are); a crash
# leaves its input in tools/fuzz/artifacts/<target>/ and fails this script: make it a test.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-60}
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

for target in preprocess requests; do
    echo "== $target: ${SECONDS_PER_TARGET} s"
    # -rss_limit_mb: the decoders must stay within the pixel budget's memory.
    mkdir -p "target/fuzz-corpus/$target"
    cargo fuzz run --fuzz-dir tools/fuzz -s none "$target" \
        "target/fuzz-corpus/$target" "tools/fuzz/corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        2>&1 | tee "target/fuzz-$target.log" | grep -E "^(#[0-9]+ +(DONE|INITED)|stat::|==|SUMMARY|Done)" || true
    if grep -q "^SUMMARY\|deadly signal\|panicked" "target/fuzz-$target.log"; then
        echo "$target found a crash; see target/fuzz-$target.log" >&2
        exit 1
    fi
done
