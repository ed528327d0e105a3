#!/usr/bin/env bash
# Train the shipped Fashion-MNIST models (CPU, PyTorch), then write the manifest.
#
#   nohup bash tools/train/train_all.sh > tools/train/runs/train_all.log 2>&1 &
#
# Every run is resumable (tools/train/runs/<name>/last.pt); a finished run (result.json
# present) is skipped, so re-running this script continues where it stopped.
# Epoch budget: 16 epochs for every run (the same recipe, so the alpha ablation compares like
# with like); ~150-450 s/epoch per run at one torch thread on a shared 2-core CPU. Override
# with EPOCHS_MAIN (resnet20, alpha 0.5) / EPOCHS_EXTRA (alpha 0.25, 0.75).
# PARALLEL=1 trains one run at a time; the default 2 trains two side by side (one core each),
# which on 2 cores finishes a pair in about the time of one run.
set -euo pipefail
cd "$(dirname "$0")/../.."

EPOCHS_MAIN=${EPOCHS_MAIN:-16}    # resnet20, oct-resnet20 a=0.5
EPOCHS_EXTRA=${EPOCHS_EXTRA:-16}  # oct-resnet20 a=0.25, a=0.75
NICE=${NICE:-15}
PARALLEL=${PARALLEL:-2}
OUT=models/fashion-mnist
RUNS=tools/train/runs
mkdir -p "$OUT" "$RUNS"

train() {  # name arch alpha epochs
    local name=$1 arch=$2 alpha=$3 epochs=$4
    if [[ -f $RUNS/$name/result.json && -f $OUT/$name.safetensors ]]; then
        echo "== $name: already done ($RUNS/$name/result.json)"
        return
    fi
    echo "== $name: $arch alpha $alpha, $epochs epochs ($(date -Is))"
    nice -n "$NICE" python3 tools/train/train.py --arch "$arch" --alpha "$alpha" \
        --epochs "$epochs" --out "$OUT/$name.safetensors" --run-dir "$RUNS/$name" --seed 0
}

pair() {  # two "train" argument lists, run side by side when PARALLEL > 1
    if (( PARALLEL > 1 )); then
        train $1 & local first=$!
        train $2
        wait "$first"
    else
        train $1
        train $2
    fi
}

python3 tools/train/make_samples.py
pair "resnet20 resnet20 0.0 $EPOCHS_MAIN" "oct-resnet20-a0.50 oct-resnet20 0.5 $EPOCHS_MAIN"
pair "oct-resnet20-a0.25 oct-resnet20 0.25 $EPOCHS_EXTRA" "oct-resnet20-a0.75 oct-resnet20 0.75 $EPOCHS_EXTRA"
python3 tools/train/write_manifest.py
echo "== all done ($(date -Is))"
