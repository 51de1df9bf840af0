#!/usr/bin/env bash
# What a session lent a GPU runs first (DESIGN.md §11), on the GPU machine, from the repository
# root of the carried working tree, after tools/gpu_prepare.sh ran here:
#
#   run  command: "bash tools/gpu_check.sh"   carry: ["gpu-carry"]   timeout_s: 540
#
# It writes into $OUT (what comes back): gpu_check.json (every check and figure, written after
# each section, so a run cut short keeps what it measured), gpu_check.log (the binary's own
# summary), machine.txt (nvidia-smi, the Python packages, the libraries the binary found) and
# exit.txt. The sections, in order (src/bench/device_check.rs): the tiny SD1 fixture's UNet,
# text encoder and VAE on CUDA in f32 and bf16 against diffusers' outputs; three trainer steps
# on CUDA against the same steps on the CPU; the demo trained on CUDA in bf16 and on the CPU;
# the step benchmark at SD 1.5, 512 px, batch 4, bf16, with and without gradient
# checkpointing, diffusers + peft beside it. Budget: under 8 minutes on an H100.
set -u
out=${OUT:-/tmp/gpu-check-out}
mkdir -p "$out"
work=/tmp/gpu-check
mkdir -p "$work/lib" "$work/py"

{
    echo "== nvidia-smi"; nvidia-smi 2>&1
    echo "== python"; python3 -c 'import sys, torch, transformers, peft; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("transformers", transformers.__version__, "peft", peft.__version__)' 2>&1
} >"$out/machine.txt"

if ! xz -dc gpu-carry/gpu_check.xz >"$work/gpu_check" 2>>"$out/machine.txt"; then
    echo "no gpu-carry/gpu_check.xz: run tools/gpu_prepare.sh first and carry gpu-carry" | tee -a "$out/machine.txt"
    echo 2 >"$out/exit.txt"
    exit 2
fi
chmod +x "$work/gpu_check"

# CUDA 13 libraries: the ones of the machine's PyTorch wheels, else a system CUDA.
nv=$(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null || true)
# (Only CUDA folders: a system library folder ahead of Python's own breaks its extensions.)
paths="$nv:/usr/local/cuda/lib64"
if ! (IFS=:; for d in $paths /usr/lib/x86_64-linux-gnu; do [ -e "$d/libcurand.so.10" ] && exit 0; done; exit 1); then
    cp gpu-carry/libcurand.so.10 "$work/lib/"
    echo "== libcurand.so.10: the stub (no real one on this machine)" >>"$out/machine.txt"
fi
export LD_LIBRARY_PATH="$paths:$work/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{ echo "== ldd"; ldd "$work/gpu_check"; } >>"$out/machine.txt" 2>&1

# diffusers for the reference side (torch, transformers and peft are on the image).
reference=()
if python3 -m pip install -q --no-deps --target "$work/py" gpu-carry/wheels/*.whl >>"$out/machine.txt" 2>&1 &&
    PYTHONPATH="$work/py" python3 -c 'import diffusers' >>"$out/machine.txt" 2>&1; then
    export PYTHONPATH="$work/py${PYTHONPATH:+:$PYTHONPATH}"
    reference=(--reference python3)
else
    echo "== diffusers cannot be imported: the bench runs without its reference side" >>"$out/machine.txt"
fi

timeout 450 "$work/gpu_check" --device cuda --mixed-precision bf16 --out "$out/run" \
    "${reference[@]}" "$@" >"$out/gpu_check.log" 2>&1
code=$?
echo "$code" >"$out/exit.txt"
cp "$out/run/gpu_check.json" "$out/" 2>/dev/null || true
# The runs' own outputs (LoRA files, states, TensorBoard logs) stay on the machine; the report
# holds the figures.
rm -rf "$out/run"
tail -40 "$out/gpu_check.log"
exit "$code"
