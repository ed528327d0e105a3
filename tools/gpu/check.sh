#!/usr/bin/env bash
# GPU check for octserve, run ON the GPU machine (it has the NVIDIA driver, nvcc and PyTorch, but
# no Rust). The binary is built elsewhere with tools/gpu/build_cuda.sh and carried along with tools/.
#
#   bash tools/gpu/check.sh             # real run (needs a GPU); results in $OUT/gpu_results.jsonl
#   bash tools/gpu/check.sh --dry-run   # print what would run; needs no GPU
#
# Knobs: OCTSERVE_BIN (default target-cuda/release/octserve), OUT (default ./gpu-out),
#        ITERS (default 20), BATCHES (default "1 8 64"), PER_CMD_TIMEOUT (default 120 s).
# Budget: about 2-3 minutes on an H100/H200 (octserve on CPU fallback: a bit more).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
BIN="${OCTSERVE_BIN:-$ROOT/target-cuda/release/octserve}"
OUT="${OUT:-$ROOT/gpu-out}"
ITERS="${ITERS:-20}"
BATCHES="${BATCHES:-1 8 64}"
PER_CMD_TIMEOUT="${PER_CMD_TIMEOUT:-120}"
RESULTS="$OUT/gpu_results.jsonl"
FAILS=0
export RUST_BACKTRACE=0   # an error is one line, not a backtrace that floods the output tail

say() { echo "== $*" >&2; }
# run CMD...: execute (or only print, in dry-run mode) one command.
run() {
    if [[ $DRY == 1 ]]; then printf '+ %s\n' "$*"; else printf '+ %s\n' "$*" >&2; "$@"; fi
}
# tag SOURCE DEVICE: add {"source","device"} to each JSON line on stdin, append to $RESULTS, echo.
tag() {
    python3 -c '
import json, sys
src, dev, path = sys.argv[1:4]
with open(path, "a") as f:
    for line in sys.stdin:
        line = line.strip()
        if not line.startswith("{"):
            print(line, file=sys.stderr); continue
        d = {"source": src, "device": dev, **json.loads(line)}
        f.write(json.dumps(d) + "\n"); print(json.dumps(d))
' "$1" "$2" "$RESULTS"
}

mkdir -p "$OUT"
if [[ $DRY == 0 ]]; then
    : > "$RESULTS"
    exec > >(tee "$OUT/check.log") 2>&1   # the whole log comes back with the results
fi

# --- 0. Library path for the binary ----------------------------------------------------------
# The binary was linked (dynamically) against libcublas.so.13, libcublasLt.so.13, libcurand.so.10,
# libcudart.so.13 and the driver's libcuda.so.1. The driver library is on the system path; the
# others come from the PyTorch environment's NVIDIA wheels (nvidia/cu13/lib, nvidia/<pkg>/lib).
TORCH_NV_LIBS="$(python3 -c '
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = []
for p in nvidia.__path__:          # namespace package: possibly several roots
    dirs += glob.glob(os.path.join(p, "cu13", "lib")) + sorted(glob.glob(os.path.join(p, "*", "lib")))
print(":".join(dict.fromkeys(d for d in dirs if os.path.isdir(d))))
' 2>/dev/null || true)"
LIBPATH="$TORCH_NV_LIBS"
# Also: the driver's folder (mounted read-only at /usr/local/nvidia on these machines) and the lib
# dirs of the system toolkit that owns nvcc, in case the torch env lacks one (e.g. libcurand).
NVCC_PATH="$(command -v nvcc || true)"
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib \
         ${NVCC_PATH:+"$(dirname "$NVCC_PATH")/../lib64" "$(dirname "$NVCC_PATH")/../lib"}; do
    if [[ -d "$d" ]]; then LIBPATH="${LIBPATH:+$LIBPATH:}$(cd "$d" && pwd)"; fi
done
if [[ $DRY == 1 && -d "$ROOT/.cuda-toolkit/cuda-home/lib64" ]]; then
    # Dry run on the build machine: the wheel libs and the libcuda STUB let `--help` start.
    LIBPATH="${LIBPATH:+$LIBPATH:}$ROOT/.cuda-toolkit/cuda-home/lib64:$ROOT/.cuda-toolkit/cuda-home/lib64/stubs"
fi
export LD_LIBRARY_PATH="${LIBPATH}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"


# --- 1. The machine ---------------------------------------------------------------------------
say "GPU"
run nvidia-smi || true
run nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv || true
say "glibc: $(ldd --version | head -1)"
say "binary: $BIN"
[[ -f "$BIN" && ! -x "$BIN" ]] && chmod +x "$BIN" 2>/dev/null || true   # in case a copy lost the bit
if [[ ! -x "$BIN" ]]; then
    echo "error: $BIN not found (build it with tools/gpu/build_cuda.sh and carry it)" >&2
    [[ $DRY == 1 ]] || exit 1
fi
LDD="$(ldd "$BIN" 2>&1 || true)"   # captured: `ldd | grep -q` can fail under pipefail (SIGPIPE)
grep -E 'cuda|cublas|curand|nvrtc|cudnn|not found' <<< "$LDD" >&2 || true
if grep -q 'not found' <<< "$LDD" && [[ $DRY == 0 ]]; then
    echo "error: unresolved libraries (see above): is this PyTorch built for CUDA 13 (nvidia/cu13/lib)?" >&2
    exit 1
fi

# --- 2. Smoke test ----------------------------------------------------------------------------
say "smoke test"
SMOKE="$(run timeout "$PER_CMD_TIMEOUT" "$BIN" inspect --arch oct-resnet50 --alpha 0.5 --json)"
if (( ${#SMOKE} > 160 )); then echo "${SMOKE:0:160}..."; else echo "$SMOKE"; fi

BENCH_HELP="$("$BIN" bench --help 2>&1 || true)"

# --- 3. Parity: the GPU's logits vs the plain candle network on the CPU -------------------------
# Same weights (drawn once on the CPU) and input; f32 must give the same top-1 and logits within
# 1e-3 (absolute, and also reported relative to the largest logit); f16 is reported, not judged.
say "parity: cuda vs the CPU f32 reference"
if grep -q -- '--parity' <<< "$BENCH_HELP"; then
    for spec in "resnet50" "oct-resnet50 --alpha 0.5"; do
        for dt in f32 f16; do
            # shellcheck disable=SC2086  # $spec is deliberately split into arguments
            if [[ $DRY == 1 ]]; then
                run "$BIN" bench --arch $spec --batch-size 8 --iters 1 --device cuda --dtype "$dt" \
                    --parity --json "| tag parity cuda >> $RESULTS"
                continue
            fi
            LINE="$(run timeout "$PER_CMD_TIMEOUT" "$BIN" bench --arch $spec --batch-size 8 \
                --iters 1 --device cuda --dtype "$dt" --parity --json | tag parity cuda)" \
                || { say "FAILED: parity $spec $dt"; FAILS=$((FAILS + 1)); continue; }
            echo "$LINE"
            if ! python3 -c '
import json, sys
p = json.loads(sys.argv[1])["parity"]
diff, top1, n = p["max_abs_diff"], p["top1_equal"], p["images"]
rel = diff / max(1.0, p["max_abs_logit"])
ok = top1 == n and diff <= 1e-3
verdict = "PASS" if ok else ("FAIL" if sys.argv[2] == "f32" else "reported (f16 is not judged)")
print(f"   max |diff| {diff:.3e} (relative {rel:.2e}), top-1 {top1}/{n}: {verdict}")
sys.exit(0 if ok or sys.argv[2] != "f32" else 1)
' "$LINE" "$dt"; then
                say "FAILED: parity $spec $dt"; FAILS=$((FAILS + 1))
            fi
        done
    done
else
    say "TODO: this binary's 'octserve bench' has no --parity flag (builds before it): parity skipped"
fi

# --- 4. octserve bench ------------------------------------------------------------------------
if grep -q -- '--device' <<< "$BENCH_HELP"; then
    DEVICE_ARGS=(--device cuda); DEV=cuda
else
    # TODO(octserve): this binary's `octserve bench` has no --device flag, so this measures the
    # CPU path of the CUDA build. Builds from 3ad0815 on have the flag (detected above).
    DEVICE_ARGS=(); DEV=cpu
    say "TODO: 'octserve bench' has no --device flag: running the CPU bench instead"
fi
# Half precision only where bench has --dtype and runs on the GPU (f16 on the CPU is slow).
DTYPES=(f32)
if [[ $DEV == cuda ]] && grep -q -- '--dtype' <<< "$BENCH_HELP"; then DTYPES=(f32 f16); fi
say "octserve bench on $DEV, dtypes ${DTYPES[*]}"
for spec in "resnet50" "oct-resnet50 --alpha 0.5"; do
    for dt in "${DTYPES[@]}"; do
        DT_ARGS=(); [[ ${#DTYPES[@]} == 1 && $dt == f32 ]] || DT_ARGS=(--dtype "$dt")
        for b in $BATCHES; do
            # shellcheck disable=SC2086  # $spec is deliberately split into arguments
            if [[ $DRY == 1 ]]; then
                run "$BIN" bench --arch $spec --batch-size "$b" --iters "$ITERS" --json \
                    "${DEVICE_ARGS[@]}" "${DT_ARGS[@]}" "| tag octserve $DEV >> $RESULTS"
            else
                run timeout "$PER_CMD_TIMEOUT" "$BIN" bench --arch $spec --batch-size "$b" \
                    --iters "$ITERS" --json "${DEVICE_ARGS[@]}" "${DT_ARGS[@]}" \
                    | tag octserve "$DEV" || { say "FAILED: bench $spec $dt batch $b"; FAILS=$((FAILS + 1)); }
            fi
        done
    done
done

# --- 5. PyTorch peer on the same GPU ------------------------------------------------------------
# Same nets (tools/reference/octnets.py: torchvision resnet50 and d-li14's oct-resnet50), eval
# mode, cudnn.benchmark, f32 and f16, median of $ITERS timed iterations after warm-up, each
# iteration bracketed by torch.cuda.synchronize(). PEER_DEVICE / PEER_SIZE exist for a CPU smoke run.
PEER_PY="$(cat <<'PY'
import json, os, statistics, sys, time
import torch
sys.path.insert(0, os.path.join(os.environ["ROOT"], "tools", "reference"))
from octnets import build

dev = torch.device(os.environ.get("PEER_DEVICE", "cuda"))
size = int(os.environ.get("PEER_SIZE", "224"))
iters = int(os.environ["ITERS"])
batches = [int(b) for b in os.environ["BATCHES"].split()]
dtypes = os.environ.get("PEER_DTYPES", "f32 f16").split()
torch.backends.cudnn.benchmark = True
name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
for arch, alpha in (("resnet50", 0.0), ("oct-resnet50", 0.5)):
    for dt in dtypes:
        dtype = {"f32": torch.float32, "f16": torch.float16}[dt]
        torch.manual_seed(0)
        model = build(arch, alpha=alpha if arch.startswith("oct-") else 0.5).eval().to(dev, dtype)
        for b in batches:
            x = torch.randn(b, 3, size, size, device=dev, dtype=dtype)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            times = []
            with torch.inference_mode():
                for _ in range(5):                      # warm-up (cudnn.benchmark autotunes here)
                    model(x)
                sync()
                for _ in range(iters):
                    t0 = time.perf_counter(); model(x); sync()
                    times.append((time.perf_counter() - t0) * 1e3)
            times.sort()
            p50 = statistics.median(times)
            print(json.dumps({
                "arch": arch, "alpha": alpha, "input_size": size, "batch_size": b, "dtype": dt,
                "iters": iters, "latency_ms_p50": p50,
                "latency_ms_p90": times[min(len(times) - 1, int(0.9 * len(times)))],
                "images_per_sec": b / (p50 / 1e3), "gpu": name,
                "peak_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
                "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
            }), flush=True)
        del model
PY
)"
say "PyTorch peer benchmark"
export ROOT ITERS BATCHES
if [[ $DRY == 1 ]]; then
    run python3 - "<<PY (resnet50 + oct-resnet50, f32+f16, batches $BATCHES, $ITERS iters) | tag pytorch cuda >> $RESULTS"
    python3 -c 'import ast, sys; ast.parse(sys.stdin.read())' <<< "$PEER_PY" && say "peer script: syntax OK"
else
    printf '+ python3 - <<PY (peer benchmark)\n' >&2
    timeout 300 python3 - <<< "$PEER_PY" | tag pytorch "${PEER_DEVICE:-cuda}" || { say "FAILED: PyTorch peer benchmark"; FAILS=$((FAILS + 1)); }
fi

say "done: $( [[ $DRY == 1 ]] && echo 'dry run, nothing written' || echo "$(wc -l < "$RESULTS") result lines in $RESULTS")"
if (( FAILS > 0 )); then say "$FAILS step(s) FAILED"; exit 1; fi
