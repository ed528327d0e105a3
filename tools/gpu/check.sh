#!/usr/bin/env bash
# GPU check for octserve, run ON the GPU machine (it has the NVIDIA driver and PyTorch, but no
# Rust). The binary is built elsewhere with tools/gpu/build_cuda.sh and carried along with tools/.
#
#   bash tools/gpu/check.sh          # every check; exit 0 only if every one ran and passed
#   bash tools/gpu/check.sh --plan   # print the steps and their commands; checks nothing, exit 2
#
# What it checks, on one GPU:
#   1. a GPU is visible (nvidia-smi) and the binary's libraries resolve;
#   2. the binary starts and its `bench` has --device, --dtype and --parity;
#   3. parity: resnet50 and oct-resnet50 (alpha 0.5), batch 8, on cuda against the plain CPU f32
#      network: f32 must have max |diff| <= 1e-3 and every top-1 equal; f16 is run and reported;
#   4. octserve bench: both nets, f32 and f16, batches $BATCHES, on cuda; every report must give
#      peak_source "cuda-mempool" and peak_bytes >= analytic_peak_bytes > 0;
#   5. the PyTorch peer: the same nets on the same GPU with cuDNN (cudnn.benchmark), same batches
#      and dtypes, latency and activation peak;
#   6. the summary: every (net, dtype, batch) present for both octserve and PyTorch, the peak
#      growing with the batch, octave/vanilla latency and peak ratios per batch.
# Any step that fails or cannot run is listed at the end, and the exit status is 1. Without a
# GPU every step fails, loudly, and the exit status is 1.
#
# Knobs: OCTSERVE_BIN (default target-cuda/release/octserve), OUT (default ./gpu-out),
#        ITERS (default 20), BATCHES (default "1 8 64"), PER_CMD_TIMEOUT (default 120 s; the
#        PyTorch peer, all of it one command: PEER_TIMEOUT, default 240 s),
#        BUDGET_S (default 540 s: the whole run; a step that would start after it fails).
#        PEER_DEVICE / PEER_SIZE run the PyTorch peer elsewhere (a smoke run; it then fails the
#        GPU check, since it did not measure the GPU).
set -uo pipefail   # no -e: every step runs and its failure is recorded

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PLAN=0
case "${1:-}" in
    --plan) PLAN=1 ;;
    "") ;;
    *) echo "usage: bash tools/gpu/check.sh [--plan]" >&2; exit 2 ;;
esac
BIN="${OCTSERVE_BIN:-$ROOT/target-cuda/release/octserve}"
OUT="${OUT:-$ROOT/gpu-out}"
ITERS="${ITERS:-20}"
BATCHES="${BATCHES:-1 8 64}"
PER_CMD_TIMEOUT="${PER_CMD_TIMEOUT:-120}"
PEER_TIMEOUT="${PEER_TIMEOUT:-240}"
BUDGET_S="${BUDGET_S:-540}"
PEER_DEVICE="${PEER_DEVICE:-cuda}"
RESULTS="$OUT/gpu_results.jsonl"
NETS=("resnet50" "oct-resnet50 --alpha 0.5")
DTYPES=(f32 f16)
export RUST_BACKTRACE=0   # an error is one line, not a backtrace that floods the output tail

if [[ $PLAN == 1 ]]; then
    cat <<EOF
1. nvidia-smi; nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
   ldd $BIN   (no library "not found")
2. $BIN bench --help   (lists --device, --dtype, --parity)
   $BIN inspect --arch oct-resnet50 --alpha 0.5 --json
EOF
    for spec in "${NETS[@]}"; do for dt in "${DTYPES[@]}"; do
        echo "3. $BIN bench --arch $spec --batch-size 8 --iters 1 --device cuda --dtype $dt --parity --json"
    done; done
    for spec in "${NETS[@]}"; do for dt in "${DTYPES[@]}"; do for b in $BATCHES; do
        echo "4. $BIN bench --arch $spec --batch-size $b --iters $ITERS --device cuda --dtype $dt --json"
    done; done; done
    echo "5. python3 (PyTorch peer: resnet50 + oct-resnet50, ${DTYPES[*]}, batches $BATCHES, $ITERS iters, on $PEER_DEVICE)"
    echo "6. summary of $RESULTS -> $OUT/summary.txt, $OUT/summary.json"
    echo "plan only: nothing was checked" >&2
    exit 2
fi

mkdir -p "$OUT"
: > "$RESULTS"
exec > >(tee "$OUT/check.log") 2>&1   # the whole log comes back with the results
TEE_PID=$!
# finish STATUS: let tee write the last lines before the script exits.
finish() {
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    exit "$1"
}
DEADLINE=$(( $(date +%s) + BUDGET_S ))
FAILED=()

say() { echo "== $*"; }
fail() { FAILED+=("$*"); echo "!! FAILED: $*"; }
# limited CMD...: run one command under the per-command limit, cut to what is left of the budget.
limited() {
    local left=$(( DEADLINE - $(date +%s) ))
    if (( left <= 0 )); then echo "not run: the ${BUDGET_S} s budget is spent: $*" >&2; return 124; fi
    printf '+ %s\n' "$*" >&2
    timeout "$(( left < PER_CMD_TIMEOUT ? left : PER_CMD_TIMEOUT ))" "$@"
}
# tag SOURCE: add {"source"} to each JSON line on stdin, append it to $RESULTS and echo it; fails
# unless at least one JSON line came.
tag() {
    python3 -c '
import json, sys
src, path = sys.argv[1:3]
n = 0
with open(path, "a") as f:
    for line in sys.stdin:
        line = line.strip()
        if not line.startswith("{"):
            print(line, file=sys.stderr); continue
        d = {"source": src, **json.loads(line)}
        f.write(json.dumps(d) + "\n"); print(json.dumps(d)); n += 1
sys.exit(0 if n else 1)
' "$1" "$RESULTS"
}

# --- 0. Library path for the binary ----------------------------------------------------------
# The binary is linked against libcublas.so.13, libcublasLt.so.13, libcurand.so.10 and the
# driver's libcuda.so.1. The driver library is on the system path; the others come from the
# PyTorch environment's NVIDIA wheels (nvidia/cu13/lib, nvidia/<pkg>/lib).
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
# Also the driver's folder (mounted at /usr/local/nvidia on some machines) and the lib dirs of a
# system toolkit that owns nvcc, in case the torch env lacks a library (e.g. libcurand).
NVCC_PATH="$(command -v nvcc || true)"
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib \
         ${NVCC_PATH:+"$(dirname "$NVCC_PATH")/../lib64" "$(dirname "$NVCC_PATH")/../lib"}; do
    if [[ -d "$d" ]]; then LIBPATH="${LIBPATH:+$LIBPATH:}$(cd "$d" && pwd)"; fi
done
export LD_LIBRARY_PATH="${LIBPATH}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# --- 1. The machine and the binary -------------------------------------------------------------
say "1. GPU"
nvidia-smi || true
GPU="$(nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>&1)"
if [[ $? -eq 0 && -n "$GPU" ]]; then echo "$GPU"; else fail "no NVIDIA GPU visible (nvidia-smi: ${GPU:-no output})"; fi
say "glibc: $(ldd --version | head -1)"
say "binary: $BIN"
if [[ -f "$BIN" && ! -x "$BIN" ]]; then chmod +x "$BIN" 2>/dev/null || true; fi   # a copy lost the bit
if [[ ! -x "$BIN" ]]; then
    fail "binary $BIN not found (build it with tools/gpu/build_cuda.sh and carry it)"
else
    LDD="$(ldd "$BIN" 2>&1 || true)"   # captured: `ldd | grep -q` can fail under pipefail (SIGPIPE)
    grep -E 'cuda|cublas|curand|nvrtc|cudnn|not found' <<< "$LDD" || true
    if grep -q 'not found' <<< "$LDD"; then
        fail "unresolved libraries of the binary (above): is PyTorch built for CUDA 13 (nvidia/cu13/lib)?"
    fi
fi

# --- 2. The binary starts and has the flags this check relies on ------------------------------
say "2. binary"
BENCH_HELP="$(limited "$BIN" bench --help 2>&1)"
if [[ $? -ne 0 ]]; then
    fail "'octserve bench --help' did not run: $(tail -1 <<< "$BENCH_HELP")"
else
    for flag in --device --dtype --parity; do
        grep -q -- "$flag" <<< "$BENCH_HELP" || fail "'octserve bench' has no $flag flag: rebuild the binary"
    done
fi
SMOKE="$(limited "$BIN" inspect --arch oct-resnet50 --alpha 0.5 --json)"
if [[ $? -eq 0 ]] && python3 -c 'import json, sys; json.loads(sys.argv[1])' "$SMOKE" 2>/dev/null; then
    echo "${SMOKE:0:160}..."
else
    fail "smoke test 'octserve inspect --json' (above)"
fi

# --- 3. Parity: the GPU's logits vs the plain candle network on the CPU -------------------------
# Same weights (drawn once on the CPU) and input; f32 must give the same top-1 and logits within
# 1e-3 (absolute, and also shown relative to the largest logit); f16 is reported, not judged.
say "3. parity: cuda vs the CPU f32 reference"
for spec in "${NETS[@]}"; do
    for dt in "${DTYPES[@]}"; do
        # shellcheck disable=SC2086  # $spec is deliberately split into arguments
        LINE="$(limited "$BIN" bench --arch $spec --batch-size 8 --iters 1 --device cuda \
            --dtype "$dt" --parity --json | tag parity)" \
            || { fail "parity $spec $dt did not run"; continue; }
        echo "$LINE"
        python3 -c '
import json, sys
p = json.loads(sys.argv[1])["parity"]
diff, top1, n = p["max_abs_diff"], p["top1_equal"], p["images"]
rel = diff / max(1.0, p["max_abs_logit"])
ok = top1 == n and diff <= 1e-3
verdict = "PASS" if ok else ("FAIL" if sys.argv[2] == "f32" else "reported (f16 is not judged)")
print(f"   max |diff| {diff:.3e} (relative {rel:.2e}), top-1 {top1}/{n}: {verdict}")
sys.exit(0 if ok or sys.argv[2] != "f32" else 1)
' "$LINE" "$dt" || fail "parity $spec $dt: outside max |diff| <= 1e-3 with every top-1 equal"
    done
done

# --- 4. octserve bench on the GPU ----------------------------------------------------------------
say "4. octserve bench on cuda: ${DTYPES[*]}, batches $BATCHES"
for spec in "${NETS[@]}"; do
    for dt in "${DTYPES[@]}"; do
        for b in $BATCHES; do
            # shellcheck disable=SC2086  # $spec is deliberately split into arguments
            LINE="$(limited "$BIN" bench --arch $spec --batch-size "$b" --iters "$ITERS" \
                --device cuda --dtype "$dt" --json | tag octserve)" \
                || { fail "bench $spec $dt batch $b did not run"; continue; }
            echo "$LINE"
            python3 -c '
import json, sys
r = json.loads(sys.argv[1])
problems = []
device, source = r.get("device"), r.get("peak_source")
if not str(device).startswith("cuda"):
    problems.append(f"ran on {device}, not cuda")
if source != "cuda-mempool":
    problems.append(f"peak_source {source!r}, not the memory pool watermark")
peak, floor = r.get("peak_bytes", 0), r.get("analytic_peak_bytes", 0)
if not (floor > 0 and peak >= floor):
    problems.append(f"peak_bytes {peak} below the analytic floor {floor}")
for p in problems:
    print("   " + p)
sys.exit(1 if problems else 0)
' "$LINE" || fail "bench $spec $dt batch $b: its peak-memory figure is not a device peak (above)"
        done
    done
done

# --- 5. PyTorch peer on the same GPU ------------------------------------------------------------
# Same nets (tools/reference/octnets.py: torchvision resnet50 and d-li14's oct-resnet50), eval
# mode, cuDNN with cudnn.benchmark, f32 and f16, median of $ITERS timed passes after 5 warm-up
# passes, each bracketed by torch.cuda.synchronize(). The activation peak is measured as
# octserve's: one more pass, the allocator's peak above what was allocated before it.
cat > "$OUT/peer.py" <<'PY'
import json, os, statistics, sys, time
import torch
sys.path.insert(0, os.path.join(os.environ["ROOT"], "tools", "reference"))
from octnets import build

dev = torch.device(os.environ["PEER_DEVICE"])
if dev.type == "cuda":
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device")
    if not torch.backends.cudnn.is_available():
        sys.exit("torch has no cuDNN")
size = int(os.environ.get("PEER_SIZE", "224"))
iters = int(os.environ["ITERS"])
batches = [int(b) for b in os.environ["BATCHES"].split()]
dtypes = os.environ["PEER_DTYPES"].split()
torch.backends.cudnn.benchmark = True
cuda = dev.type == "cuda"
name = torch.cuda.get_device_name(dev) if cuda else "cpu"
sync = torch.cuda.synchronize if cuda else (lambda: None)
for arch, alpha in (("resnet50", 0.0), ("oct-resnet50", 0.5)):
    for dt in dtypes:
        dtype = {"f32": torch.float32, "f16": torch.float16}[dt]
        torch.manual_seed(0)
        model = build(arch, alpha=alpha if arch.startswith("oct-") else 0.5).eval().to(dev, dtype)
        for b in batches:
            x = torch.randn(b, 3, size, size, device=dev, dtype=dtype)
            times = []
            with torch.inference_mode():
                for _ in range(5):                      # warm-up (cudnn.benchmark autotunes here)
                    model(x)
                sync()
                for _ in range(iters):
                    t0 = time.perf_counter(); model(x); sync()
                    times.append((time.perf_counter() - t0) * 1e3)
                peak = None
                if cuda:
                    base = torch.cuda.memory_allocated(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                    model(x); sync()
                    peak = torch.cuda.max_memory_allocated(dev) - base
            times.sort()
            p50 = statistics.median(times)
            print(json.dumps({
                "arch": arch, "alpha": alpha, "device": str(dev), "input_size": size,
                "batch_size": b, "dtype": dt, "iters": iters, "latency_ms_p50": p50,
                "latency_ms_p90": times[min(len(times) - 1, int(0.9 * len(times)))],
                "images_per_sec": b / (p50 / 1e3), "gpu": name, "peak_bytes": peak,
                "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if cuda else None,
            }), flush=True)
        del model
PY
say "5. PyTorch peer on $PEER_DEVICE"
PEER_DTYPES="${DTYPES[*]}"
export ROOT ITERS BATCHES PEER_DEVICE PEER_DTYPES
PER_CMD_TIMEOUT="$PEER_TIMEOUT" limited python3 "$OUT/peer.py" | tag pytorch \
    || fail "PyTorch peer benchmark did not run (above)"
[[ $PEER_DEVICE == cuda ]] || fail "PyTorch peer ran on $PEER_DEVICE, not on the GPU"

# --- 6. Summary: every cell present, peaks growing with the batch, octave/vanilla ratios --------
say "6. summary"
python3 - "$RESULTS" "$OUT" "$BATCHES" "${DTYPES[*]}" <<'PY' || fail "summary: results missing or implausible (above)"
import json, os, sys
path, out, batches, dtypes = sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3].split()], sys.argv[4].split()
rows = [json.loads(l) for l in open(path)]
nets = ("resnet50", "oct-resnet50")
cell = {}
for r in rows:
    if r["source"] in ("octserve", "pytorch"):
        cell[(r["source"], r["arch"], r["dtype"], r["batch_size"])] = r
problems, table = [], []
for src in ("octserve", "pytorch"):
    for net in nets:
        for dt in dtypes:
            for b in batches:
                if (src, net, dt, b) not in cell:
                    problems.append(f"no {src} result for {net} {dt} batch {b}")
            peaks = [cell[(src, net, dt, b)].get("peak_bytes") for b in batches if (src, net, dt, b) in cell]
            if src == "octserve" and len(peaks) == len(batches) and peaks != sorted(set(peaks)):
                problems.append(f"octserve {net} {dt}: peak not growing with the batch: {peaks}")
def get(src, net, dt, b, key):
    r = cell.get((src, net, dt, b))
    return None if r is None or r.get(key) is None else r[key]
def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b
fmt = lambda v, f: "-" if v is None else format(v, f)
lines = [f"{'dtype':5} {'batch':>5} | {'octserve ms (van/oct)':>21} {'oct/van':>7} | {'pytorch ms (van/oct)':>20} {'oct/van':>7} | "
         f"{'octserve peak MB (van/oct)':>26} {'oct/van':>7} | {'pytorch peak MB (van/oct)':>25} {'oct/van':>7}"]
summary = []
for dt in dtypes:
    for b in batches:
        s = {"dtype": dt, "batch_size": b}
        for src in ("octserve", "pytorch"):
            for key, short in (("latency_ms_p50", "ms"), ("peak_bytes", "peak_bytes")):
                v, o = get(src, "resnet50", dt, b, key), get(src, "oct-resnet50", dt, b, key)
                s[f"{src}_{short}_vanilla"], s[f"{src}_{short}_octave"] = v, o
                s[f"{src}_{short}_octave_over_vanilla"] = ratio(o, v)
        summary.append(s)
        mb = lambda v: None if v is None else v / 1e6
        lines.append(
            f"{dt:5} {b:>5} | {fmt(s['octserve_ms_vanilla'], '9.2f')} / {fmt(s['octserve_ms_octave'], '9.2f')} {fmt(s['octserve_ms_octave_over_vanilla'], '7.3f')} | "
            f"{fmt(s['pytorch_ms_vanilla'], '8.2f')} / {fmt(s['pytorch_ms_octave'], '9.2f')} {fmt(s['pytorch_ms_octave_over_vanilla'], '7.3f')} | "
            f"{fmt(mb(s['octserve_peak_bytes_vanilla']), '12.1f')} / {fmt(mb(s['octserve_peak_bytes_octave']), '11.1f')} {fmt(s['octserve_peak_bytes_octave_over_vanilla'], '7.3f')} | "
            f"{fmt(mb(s['pytorch_peak_bytes_vanilla']), '11.1f')} / {fmt(mb(s['pytorch_peak_bytes_octave']), '11.1f')} {fmt(s['pytorch_peak_bytes_octave_over_vanilla'], '7.3f')}")
text = "\n".join(lines)
print(text)
open(os.path.join(out, "summary.txt"), "w").write(text + "\n")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
for p in problems:
    print("   " + p)
sys.exit(1 if problems else 0)
PY

say "done: $(wc -l < "$RESULTS") result lines in $RESULTS"
if (( ${#FAILED[@]} > 0 )); then
    say "${#FAILED[@]} check(s) FAILED:"
    printf '   - %s\n' "${FAILED[@]}"
    finish 1
fi
say "every check passed"
finish 0
