#!/usr/bin/env bash
# Build `octserve` with the `cuda` feature on a machine WITHOUT a GPU and WITHOUT a system CUDA
# toolkit, from PyPI wheels only. The binary lands in target-cuda/release/octserve (a target dir of
# its own, so the CPU builds in target/ are left alone) and is then copied to a GPU machine
# (see tools/gpu/README.md and tools/gpu/check.sh).
#
# Usage:   bash tools/gpu/build_cuda.sh [extra cargo args, e.g. --features cudnn]
# On a shared 2-core box:   CARGO_BUILD_JOBS=1 nice -n 19 bash tools/gpu/build_cuda.sh
#
# Idempotent: the wheels are installed once into .cuda-toolkit/venv (gitignored); the CUDA_HOME
# layout and the libcuda stub are re-made on every run (cheap); cargo then builds incrementally.
#
# Environment knobs (all optional):
#   CUDA_COMPUTE_CAP   GPU architecture the kernels are compiled for (default 90 = H100/H200).
#   CUDA_TOOLKIT_DIR   where the wheels and the CUDA_HOME layout go (default <repo>/.cuda-toolkit).
#   PYTHON             interpreter used to create the venv (default python3).
#   CARGO_BUILD_JOBS   rustc parallelism; also used for nvcc parallelism (CUDAFORGE_THREADS).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOOLKIT_DIR="${CUDA_TOOLKIT_DIR:-$ROOT/.cuda-toolkit}"
VENV="$TOOLKIT_DIR/venv"
PYTHON="${PYTHON:-python3}"
TARGET_DIR="$ROOT/target-cuda"

# --- 1. The pinned CUDA 13.0 wheels --------------------------------------------------------------
# Why 13.0.x: the GPU machines' driver is 580 (CUDA 13.0). candle hands PTX to the driver at run
# time, and PTX written by a newer nvcc/NVVM can carry a PTX ISA version that driver refuses.
# Why the two extra pins: the `cuda-toolkit[nvcc]` extra pulls nvidia-cuda-nvcc==13.0.88, whose
# own dependencies nvidia-cuda-crt and nvidia-nvvm are UNPINNED, so pip picks the newest (13.5.x
# at the time of writing: an NVVM (cicc) newer than the nvcc driving it). Pin them to the 13.0 line
# exactly as `cuda-toolkit[all]==13.0.2` does.
# Why cccl: candle's kernels include cuda_fp16.h, which includes <nv/target> from CCCL (libcu++);
# nvcc looks for it in include/cccl, which only the nvidia-cuda-cccl wheel provides.
PIP_SPECS=(
    'cuda-toolkit[nvcc,cudart,cublas,curand,nvrtc,cccl]==13.0.2'
    'nvidia-cuda-crt==13.0.88.*'
    'nvidia-nvvm==13.0.88.*'
)
# cuDNN only when asked for (`--features cudnn`). cudarc 0.19 accepts cuDNN 9.10 or 9.21 only
# (it reads CUDNN_MAJOR/MINOR from cudnn_version.h and panics on others), so pin 9.21.
WANT_CUDNN=0
for a in "$@"; do if [[ "$a" == *cudnn* ]]; then WANT_CUDNN=1; fi; done
if [[ $WANT_CUDNN == 1 ]]; then PIP_SPECS+=('nvidia-cudnn-cu13==9.21.*'); fi

# A stamp of the spec list makes the install step idempotent (and redone if the pins change).
STAMP="$VENV/.octserve-cuda-specs"
WANT_STAMP="$(printf '%s\n' "${PIP_SPECS[@]}")"
if [[ ! -x "$VENV/bin/python" ]]; then
    echo ">> creating venv $VENV (isolated: the system site-packages hold torch's own CUDA stack)"
    mkdir -p "$TOOLKIT_DIR"
    "$PYTHON" -m venv "$VENV"
fi
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT_STAMP" ]]; then
    echo ">> installing CUDA wheels (~1.2 GB installed): ${PIP_SPECS[*]}"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir "${PIP_SPECS[@]}"
    printf '%s' "$WANT_STAMP" > "$STAMP"
else
    echo ">> CUDA wheels already installed in $VENV"
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CU="$SITE/nvidia/cu13"       # the 13.x wheels share this prefix: bin/ include/ lib/ nvvm/
[[ -x "$CU/bin/nvcc" ]] || { echo "error: $CU/bin/nvcc missing after install" >&2; exit 1; }

# --- 2. A CUDA_HOME layout made of symlinks ----------------------------------------------------
# cudarc's build script adds -L $CUDA_HOME/lib64 and $CUDA_HOME/lib64/stubs; cudaforge (used by
# candle-kernels) finds $CUDA_HOME/bin/nvcc. The wheels have no such tree, so make one.
CUDA_HOME="$TOOLKIT_DIR/cuda-home"
rm -rf "$CUDA_HOME"
mkdir -p "$CUDA_HOME/lib64/stubs"
ln -s "$CU/bin" "$CUDA_HOME/bin"
ln -s "$CU/include" "$CUDA_HOME/include"
ln -s "$CU/nvvm" "$CUDA_HOME/nvvm"
# The wheels ship only versioned sonames (libcublas.so.13, ...), but `-lcublas` needs the
# unversioned libcublas.so: link both names. The binary still records the soname (libcublas.so.13).
link_libs() {  # link_libs DIR: every lib*.so* / lib*.a of DIR into lib64/, plus unversioned names
    local f base
    for f in "$1"/lib*.so* "$1"/lib*.a; do
        [[ -e "$f" ]] || continue
        base="$(basename "$f")"
        ln -sf "$f" "$CUDA_HOME/lib64/$base"
        if [[ "$base" == *.so.* ]]; then ln -sf "$f" "$CUDA_HOME/lib64/${base%%.so.*}.so"; fi
    done
}
link_libs "$CU/lib"
if [[ $WANT_CUDNN == 1 ]]; then
    link_libs "$SITE/nvidia/cudnn/lib"   # libcudnn.so.9 -> lib64/libcudnn.so for -lcudnn
fi

# --- 3. A link-time stub for libcuda.so -------------------------------------------------------
# libcuda is the DRIVER library (it comes with the NVIDIA driver, not with the toolkit wheels), yet
# cudarc links -lcuda. For linking we only need a shared object with soname libcuda.so.1 that
# exports the cu* symbols: the binary then records NEEDED libcuda.so.1, and on the GPU machine the
# real driver's libcuda.so.1 is loaded instead. The symbol list is the union of every `cu*` function
# cudarc declares (its driver/sys/mod.rs) and every cu* function in the wheel's cuda.h after
# preprocessing (which applies the `#define cuFoo cuFoo_v2` ABI renames).
# Every stub returns CUDA_ERROR_NO_DEVICE (100), so if the stub is ever loaded by mistake, candle
# reports an error instead of crashing; cuGetErrorString/Name return a message saying so.
STUB_DIR="$CUDA_HOME/lib64/stubs"
STUB_C="$TOOLKIT_DIR/libcuda_stub.c"
CUDARC_SYS="$(cd "$ROOT" && cargo metadata --format-version 1 --features cuda 2>/dev/null \
    | "$VENV/bin/python" -c '
import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(os.path.join(os.path.dirname(p["manifest_path"]), "src/driver/sys/mod.rs")); break
')" || CUDARC_SYS=""
{
    if [[ -n "$CUDARC_SYS" && -f "$CUDARC_SYS" ]]; then
        grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC_SYS" | sed 's/^pub unsafe fn //'
    else
        echo "warning: cudarc sources not found; stubbing cuda.h symbols only" >&2
    fi
    echo '#include <cuda.h>' | gcc -E -I "$CU/include" -x c - \
        | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | sed 's/[[:space:](]//g'
} | sort -u | grep -vE '^(cuGetErrorString|cuGetErrorName)$' > "$TOOLKIT_DIR/libcuda_stub.syms"
{
    echo '/* Generated by tools/gpu/build_cuda.sh: link-time stand-in for the driver library. */'
    echo 'typedef int CUresult;'
    echo 'static const char msg[] = "libcuda stub from tools/gpu/build_cuda.sh: no NVIDIA driver loaded";'
    echo 'CUresult cuGetErrorString(int e, const char **s) { (void)e; if (s) *s = msg; return 0; }'
    echo 'CUresult cuGetErrorName(int e, const char **s) { (void)e; if (s) *s = "CUDA_ERROR_STUB_LIBCUDA"; return 0; }'
    sed 's/.*/CUresult &(void) { return 100; }/' "$TOOLKIT_DIR/libcuda_stub.syms"
} > "$STUB_C"
gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$STUB_DIR/libcuda.so" "$STUB_C"
ln -sf libcuda.so "$STUB_DIR/libcuda.so.1"   # only so the binary can be started on a CPU box
echo ">> libcuda stub: $(wc -l < "$TOOLKIT_DIR/libcuda_stub.syms") + 2 symbols -> $STUB_DIR/libcuda.so"

# --- 4. Environment for the build scripts of cudarc and candle-kernels --------------------------
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export NVCC="$CUDA_HOME/bin/nvcc"
# No nvidia-smi here, so cudaforge cannot detect the GPU: say which one the kernels are for.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# cudarc would otherwise parse `nvcc --version`; being explicit avoids surprises.
export CUDARC_CUDA_VERSION=13000
# candle-kernels emits a bare `-lcudart` and relies on someone else's -L; make it always resolvable.
export LIBRARY_PATH="$CUDA_HOME/lib64:$STUB_DIR${LIBRARY_PATH:+:$LIBRARY_PATH}"
if [[ $WANT_CUDNN == 1 ]]; then
    # cudarc reads the cuDNN version from $CUDNN_PATH/include/cudnn_version.h.
    export CUDNN_PATH="$SITE/nvidia/cudnn"
fi
# nvcc compiles candle's ~20 kernel files in a rayon pool; keep it to the cargo job budget.
if [[ -n "${CARGO_BUILD_JOBS:-}" ]]; then export CUDAFORGE_THREADS="$CARGO_BUILD_JOBS"; fi
echo ">> nvcc: $("$NVCC" --version | tail -2 | head -1)"
echo ">> CUDA_HOME=$CUDA_HOME CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION"

# --- 5. Build ---------------------------------------------------------------------------------
cd "$ROOT"
START=$(date +%s)
cargo build --release --features cuda --target-dir "$TARGET_DIR" "$@"
END=$(date +%s)

BIN="$TARGET_DIR/release/octserve"
echo ">> build took $((END - START)) s"
echo ">> binary: $BIN ($(stat -c %s "$BIN") bytes, $(du -h "$BIN" | cut -f1))"
echo ">> needs at run time (DT_NEEDED):"
readelf -d "$BIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/   \1/p'
