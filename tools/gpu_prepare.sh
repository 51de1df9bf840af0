#!/usr/bin/env bash
# Prepares what a session lent a GPU carries to it (DESIGN.md §11), on this machine, before the
# device is started: the `gpu_check` binary built with `--features cuda` (from NVIDIA's PyPI
# wheels, tools/cuda_build_from_wheels.sh: ~20 minutes on 2 cores the first time), stripped and
# compressed; a stub libcurand.so.10; the diffusers wheel for the reference side. Everything
# goes into gpu-carry/ (git-ignored), which the device call names in `carry`:
#
#   tools/gpu_prepare.sh                      # then, with the device tool:
#   run  command: "bash tools/gpu_check.sh"   carry: ["gpu-carry"]   timeout_s: 540
#
# Why the stub: candle links the CUDA random-number library (libcurand.so.10, 130 MB) and
# creates a generator when it opens a device, but training never draws random numbers on the
# device (every draw is made on the CPU and copied, src/train/step.rs), and the PyTorch wheels
# on the GPU machine do not ship it. The stub's generator calls succeed and its generate calls
# fail with an error, so a draw on the device would stop the run instead of reading garbage.
# tools/gpu_check.sh uses a real libcurand.so.10 when the machine has one.
#
# At the end it prints the size of what the device call would carry (the working tree without
# ignored files, plus gpu-carry/) against the 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
carry=gpu-carry
rm -rf "$carry"
mkdir -p "$carry/wheels"

tools/cuda_build_from_wheels.sh gpu_check release
bin=${CARGO_TARGET_DIR:-target-cuda}/release/gpu_check
strip -o "$carry/gpu_check" "$bin"
xz -9 -T2 -f "$carry/gpu_check"

# The stub: every curand function the binary refers to.
syms=$(nm -D --undefined-only "$bin" | awk '{print $2}' | sed 's/@.*//' | grep -E '^curand' | sort -u)
{
    echo '/* A stand-in for libcurand.so.10: see tools/gpu_prepare.sh. */'
    echo 'typedef int curandStatus_t;'
    for s in $syms; do
        case "$s" in
            curandGenerate*) echo "curandStatus_t $s(void) { return 201; /* CURAND_STATUS_LAUNCH_FAILURE */ }" ;;
            curandCreateGenerator*) echo "curandStatus_t $s(void **g) { if (g) *g = (void *)1; return 0; }" ;;
            *) echo "curandStatus_t $s(void) { return 0; }" ;;
        esac
    done
} >"$carry/curand_stub.c"
# The binary asks for the symbols at version `libcurand.so.10`, as NVIDIA's library defines them.
echo 'libcurand.so.10 { global: *; };' >"$carry/curand_stub.map"
gcc -shared -fPIC -O2 -o "$carry/libcurand.so.10" -Wl,-soname,libcurand.so.10 \
    -Wl,--version-script,"$carry/curand_stub.map" "$carry/curand_stub.c"
rm "$carry/curand_stub.c" "$carry/curand_stub.map"

# diffusers (torch, transformers and peft are on the device image).
"$python" -m pip download --no-deps -q -d "$carry/wheels" diffusers==0.42.1 importlib_metadata zipp

tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
extra=$(du -cb "$carry" | tail -1 | cut -f1)
total=$((tree + extra))
printf 'working tree %.1f MiB + %s %.1f MiB = %.1f MiB of the 64 MiB a device call carries\n' \
    "$(echo "$tree / 1048576" | bc -l)" "$carry" "$(echo "$extra / 1048576" | bc -l)" \
    "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -gt $((64 * 1048576)) ]; then
    echo "too large: the device call would not carry it" >&2
    exit 1
fi
