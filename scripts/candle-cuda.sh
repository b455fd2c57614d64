#!/usr/bin/env bash
# Build the candle CUDA test and the candle training-step bench (feature candle-cuda) on a machine without a
# CUDA toolkit: nvcc, headers and link-time libraries come from PyPI's CUDA 13.0 wheels (installed once into
# target/cuda-deps/), libcuda from a link-time stub (the driver's is used at run time). Output:
# candle-cuda.tar.xz (test-candle, bench-candle_step), to carry to the GPU machine and run there with torch's
# CUDA libraries on LD_LIBRARY_PATH (see README, "Use from candle"). The first build takes ~20 minutes on 2
# cores (candle-kernels compiles its CUDA sources with nvcc); later builds are incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CUDA_DEPS="${CUDA_DEPS:-$ROOT/target/cuda-deps}"
PY="${PYTHON:-python3}"
PYDIR="$CUDA_DEPS/py"
CU="$PYDIR/nvidia/cu13"
HOME_DIR="$CUDA_DEPS/cuda-home"

# CUDA 13.0.x pins: nvcc must not be newer than the GPU machine's driver (580 = CUDA 13.0), because the
# kernels are shipped as PTX that the driver JIT-compiles; PTX from a 13.x>13.0 nvcc would be rejected.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88      # nvcc, ptxas, fatbinary, nvlink
  nvidia-nvvm==13.0.88           # cicc + libdevice (nvcc's front end; nvcc wheel depends on it)
  nvidia-cuda-crt==13.0.88       # include/crt/* (host_config.h, ...)
  nvidia-cuda-runtime==13.0.96   # cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, mma.h, libcudart.so.13
  nvidia-cuda-cccl==13.0.85      # include/cccl (libcu++ / nv/target, used by the fp16/bf16 headers)
  nvidia-cuda-nvrtc==13.0.88     # libnvrtc.so.13 (cudarc's nvrtc feature links it)
  nvidia-cublas==13.0.2.14       # libcublas.so.13, libcublasLt.so.13
  nvidia-curand==10.4.0.35       # libcurand.so.10
)
STAMP="$CUDA_DEPS/.installed-$(printf '%s\n' "${WHEELS[@]%%#*}" | tr -d ' ' | md5sum | cut -c1-12)"

# ---------------------------------------------------------------- 1. CUDA pieces from PyPI (once)
if [ ! -e "$STAMP" ]; then
  echo ">> pip installing CUDA 13.0 wheels into $PYDIR"
  rm -rf "$PYDIR"; mkdir -p "$PYDIR"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-compile --only-binary=:all: \
      --target "$PYDIR" $(printf '%s\n' "${WHEELS[@]%%#*}" | tr -d ' ')
  touch "$STAMP"
fi
"$CU/bin/nvcc" --version | grep -q 'release 13.0' || { echo "nvcc from $CU is broken" >&2; exit 1; }

# ---------------------------------------------------------------- 2. link-time names + stub libcuda
# The wheels ship only versioned sonames (libcublas.so.13); `-lcublas` needs libcublas.so. Link the
# versioned names too, so ld resolves libcublas.so.13 -> libcublasLt.so.13 through $ORIGIN in this dir.
mkdir -p "$HOME_DIR/lib"
for f in "$CU"/lib/*.so*; do ln -sfn "$f" "$HOME_DIR/lib/$(basename "$f")"; done
for l in cublas cublasLt cudart curand nvrtc; do
  real=$(ls "$CU"/lib/lib$l.so.* | head -1); ln -sfn "$real" "$HOME_DIR/lib/lib$l.so"
done
# No wheel carries libcuda (it is the driver). Make a link-time stub with soname libcuda.so.1 that exports
# every driver-API symbol cudarc can reference; at run time the real driver's libcuda.so.1 is used.
CUDARC_SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -1 || true)
if [ ! -e "$HOME_DIR/lib/libcuda.so" ]; then
  if [ -z "$CUDARC_SRC" ]; then cargo fetch -q; \
    CUDARC_SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1); fi
  echo ">> stub libcuda.so from $CUDARC_SRC/src/driver/sys/mod.rs"
  { grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$CUDARC_SRC/src/driver/sys/mod.rs";
    grep -oE '\bCUresult CUDAAPI cu[A-Za-z0-9_]+\(' "$CU/include/cuda.h"; } \
    | grep -oE 'cu[A-Za-z0-9_]+\($' | tr -d '(' | sort -u | sed 's/.*/void &(void) {}/' > "$HOME_DIR/libcuda_stub.c"
  gcc -shared -fPIC -o "$HOME_DIR/lib/libcuda.so" -Wl,-soname,libcuda.so.1 "$HOME_DIR/libcuda_stub.c"
fi

# ---------------------------------------------------------------- 3. build
export PATH="$CU/bin:$PATH"          # cudarc and candle-kernels (cudaforge) run nvcc
export CUDA_HOME="$HOME_DIR"         # cudarc's -L search: $CUDA_HOME/lib (stub libcuda, wheel libraries)
export CUDARC_CUDA_VERSION=13000     # the driver's CUDA API level on the GPU machine
export CUDA_COMPUTE_CAP=90           # candle's kernels for sm_90 (H100/H200), no nvidia-smi needed
export CARGO_TARGET_DIR="$ROOT/target/candle-cuda"
mkdir -p "$CARGO_TARGET_DIR"          # the build's executable list is written there (a fresh clone has none)
cargo build --release -p flash-attn --features candle-cuda --test candle --bench candle_step --message-format=json \
    | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 > "$CARGO_TARGET_DIR/executables.txt"
out="$CARGO_TARGET_DIR/candle-cuda"
rm -rf "$out" && mkdir -p "$out"
cp "$(grep '/deps/candle-' "$CARGO_TARGET_DIR/executables.txt")" "$out/test-candle"
cp "$(grep '/deps/candle_step-' "$CARGO_TARGET_DIR/executables.txt")" "$out/bench-candle_step"
strip "$out"/*
(cd "$CARGO_TARGET_DIR" && tar cf - candle-cuda | xz -T0 -1 > "$ROOT/candle-cuda.tar.xz")
echo "candle-cuda.tar.xz: $(du -h "$ROOT/candle-cuda.tar.xz" | cut -f1); on the GPU machine:"
echo "  tar xJf candle-cuda.tar.xz && LD_LIBRARY_PATH=<torch site-packages>/nvidia/cu13/lib candle-cuda/test-candle --test-threads=1"
