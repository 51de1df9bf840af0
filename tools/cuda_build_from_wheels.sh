#!/usr/bin/env bash
# Builds a binary with `--features cuda` on a machine that has no GPU and no CUDA toolkit,
# from NVIDIA's PyPI wheels (CUDA 13.0: nvcc, headers, cuBLAS, cuRAND, NVRTC). The driver
# library (libcuda.so.1) comes from the GPU machine at run time; for linking, this script makes
# a stub of it from the driver functions cudarc references.
#
#   tools/cuda_build_from_wheels.sh [BIN] [PROFILE]       # default: bench release
#
# Environment: CUDA_WHEELS (default /tmp/cuda13) is where the wheels are unpacked;
# CUDA_COMPUTE_CAP (default 90: H100/H200) the GPU generation candle's kernels are built for;
# CARGO_TARGET_DIR (default target-cuda) keeps this build apart from the CPU one. Compiling
# candle's kernels takes ~17 minutes on 2 cores. At the end the script prints the binary's
# path and how to run it where the GPU is (the wheels' libraries must be found there too:
# the nvidia-cublas, nvidia-curand and nvidia-cuda-nvrtc Python packages, or a CUDA install).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:-bench}
profile=${2:-release}
wheels=${CUDA_WHEELS:-/tmp/cuda13}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
python=${PYTHON:-python3}

root=$wheels/nvidia/cu13
if [ ! -x "$root/bin/nvcc" ]; then
    mkdir -p "$wheels/download"
    "$python" -m pip download --no-deps -d "$wheels/download" \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" \
        "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
        "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*"
    for w in "$wheels"/download/*.whl; do
        "$python" -m zipfile -e "$w" "$wheels"
    done
    chmod +x "$root"/bin/* "$root"/nvvm/bin/*
    ln -sfn lib "$root/lib64"
    for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "$root/lib/lib$l.so"; done
    ln -sf libcurand.so.10 "$root/lib/libcurand.so"
fi
export PATH=$root/bin:$PATH CUDA_HOME=$root CUDA_PATH=$root CUDA_ROOT=$root

cargo_profile=(--profile "$profile")
out_dir=$CARGO_TARGET_DIR/$profile
if [ "$profile" = dev ]; then out_dir=$CARGO_TARGET_DIR/debug; fi

# The stub driver library: every cu* function cudarc's compiled code refers to, as an empty
# function in a library named libcuda.so.1. Linking needs it; the real one replaces it at run
# time. The first build compiles cudarc, then fails to link unless the stub is complete.
stub() {
    local syms
    syms=$(for f in "$out_dir"/deps/libcudarc-*.rlib "$out_dir"/deps/libcandle_core-*.rlib; do
        nm -u "$f" 2>/dev/null | awk '{print $2}'
    done | grep -E '^cu[A-Z]' | sort -u || true)
    printf 'void %s(void) {}\n' $syms '__lora_trainer_stub' >"$wheels/libcuda_stub.c"
    gcc -shared -fPIC -o "$root/lib/libcuda.so" -Wl,-soname,libcuda.so.1 "$wheels/libcuda_stub.c"
}
[ -e "$root/lib/libcuda.so" ] || stub
if ! cargo build "${cargo_profile[@]}" --features cuda --bin "$bin"; then
    echo "linking again with a stub libcuda.so made from the symbols cudarc uses" >&2
    stub
    cargo build "${cargo_profile[@]}" --features cuda --bin "$bin"
fi

echo
echo "built: $out_dir/$bin"
echo "run it where the GPU is with the CUDA libraries on the library path, for example:"
echo "  LD_LIBRARY_PATH=\$($python -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], \"cu13\", \"lib\"))') $out_dir/$bin --device cuda ..."
