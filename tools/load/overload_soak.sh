#!/usr/bin/env bash
# Overload and soak runs of `octserve serve` on the shipped models, driven by `octserve loadgen`,
# with the server's resident memory sampled every second. Prints the BENCHMARKS.md rows.
#
#   bash tools/load/overload_soak.sh overload     # capacity, then 4x capacity for 60 s
#   bash tools/load/overload_soak.sh soak         # capacity, then 70% of it for 10 minutes
#
# One variant (VARIANT, default vanilla) takes the load, so its queue alone bounds the wait.
# Env: OUT (default target/load), SOAK_SECS (600), OVERLOAD_SECS (60), CAPACITY (skip measuring),
# QUEUE_TIMEOUT_US (the server's [batching] queue_timeout_us, default 0 = none).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:?overload or soak}
OUT=${OUT:-target/load}
BIN=target/release/octserve
GRPC=127.0.0.1:50551
mkdir -p "$OUT"
[[ -x $BIN ]] || cargo build --release --locked

# The shipped model with the default batching, plus a queue timeout for the overload run (env
# QUEUE_TIMEOUT_US, default 0 = none): see BENCHMARKS.md "Overload".
cat > "$OUT/$MODE.toml" <<EOF
models = ["$PWD/models/fashion-mnist/manifest.toml"]
[batching]
queue_timeout_us = ${QUEUE_TIMEOUT_US:-0}
EOF
$BIN serve --config "$OUT/$MODE.toml" --grpc-addr $GRPC --metrics-addr 127.0.0.1:9551 \
    > "$OUT/$MODE-server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; kill $SAMPLER 2>/dev/null || true' EXIT
until grep -q "models loaded" "$OUT/$MODE-server.log"; do sleep 0.2; done

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$SERVER/status"; }
loadgen() {
    $BIN loadgen --addr "http://$GRPC" --model fashion-mnist \
        --variant "${VARIANT:-vanilla}" --images models/fashion-mnist/samples --json "$@"
}
json() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))$2)" "$1"; }

if [[ -z ${CAPACITY:-} ]]; then
    # Capacity: closed loop, enough clients to keep every batch full.
    loadgen --concurrency 64 --duration 20 > "$OUT/$MODE-capacity.json"
    CAPACITY=$(json "$OUT/$MODE-capacity.json" "['ok_rps']")
fi
echo "capacity: $CAPACITY req/s"

: > "$OUT/$MODE-rss.tsv"
(while sleep 1; do echo -e "$(date +%s)\t$(rss_kib)"; done >> "$OUT/$MODE-rss.tsv") &
SAMPLER=$!
RSS_START=$(rss_kib)

if [[ $MODE == overload ]]; then
    RATE=$(python3 -c "print(4 * $CAPACITY)")
    # 8192 calls in flight over 32 connections: within the server's 256 streams per connection,
    # so the overload reaches the server's queue (and is refused there) instead of queueing in
    # the client's HTTP/2 connections.
    loadgen --rate "$RATE" --concurrency 8192 --connections 32 --duration "${OVERLOAD_SECS:-60}" \
        > "$OUT/overload.json"
    kill $SAMPLER
    python3 tools/load/summarise.py overload "$OUT/overload.json" "$OUT/overload-rss.tsv" \
        "$CAPACITY" "$RATE" "$RSS_START"
else
    RATE=$(python3 -c "print(0.7 * $CAPACITY)")
    loadgen --rate "$RATE" --concurrency 1024 --duration "${SOAK_SECS:-600}" --window-secs 60 \
        > "$OUT/soak.json"
    kill $SAMPLER
    python3 tools/load/summarise.py soak "$OUT/soak.json" "$OUT/soak-rss.tsv" \
        "$CAPACITY" "$RATE" "$RSS_START"
fi
