#!/usr/bin/env python3
"""Loads an adapter folder `train` wrote (task: llm) with vLLM's own LoRA loader, the steps
`vllm serve --lora-modules name=DIR` takes before serving it (not in CI):
`PEFTHelper.from_local_dir`, `validate_legal`, then `LoRAModel.from_local_checkpoint` with the
modules vLLM's Llama/Qwen2/Qwen3/Mistral models accept (their `packed_modules_mapping` unpacked:
q/k/v/o, gate/up/down). Fails when vLLM refuses the config or finds an unexpected module, or
when it loads a different number of LoRA layers than the file holds.

vLLM serves on a GPU, but its loader runs on the CPU; on a machine without one, its Python
sources and the modules they import are enough:

    pip download vllm --no-deps -d /tmp/vllm && cd /tmp/vllm && unzip -q vllm-*.whl 'vllm/*'
    pip install --target /tmp/vllm/deps pyzmq aiohttp pybase64 cachetools cbor2 msgspec \\
        cloudpickle uvloop py-cpuinfo prometheus_client llguidance xgrammar einops
    PYTHONPATH=/tmp/vllm/deps:/tmp/vllm python tools/check_vllm_adapter.py ADAPTER MODEL

Checked 2026-12-07 with vLLM 0.34.0: the demo adapter (all-linear, 28 layers) and the Qwen
example's (q_proj/v_proj, 48 layers) load with every layer.
"""

import json
import os
import sys

import torch
from safetensors import safe_open

import vllm.lora.lora_model as lora_model
from vllm.config.lora import LoRAConfig
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper

# The CUDA wheel pins host memory for the copy to the GPU; without a GPU, pinning fails. It
# moves the same tensors, so the check turns it off.
lora_model.PIN_MEMORY = False

# vLLM's decoder models fuse q/k/v and gate/up; the loader expects the unpacked names.
EXPECTED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def main() -> None:
    adapter, model = sys.argv[1:3]
    config = json.load(open(os.path.join(model, "config.json")))
    helper = PEFTHelper.from_local_dir(adapter, config.get("max_position_embeddings"))
    helper.validate_legal(LoRAConfig(max_lora_rank=max(helper.r, 8)))
    lora = LoRAModel.from_local_checkpoint(
        adapter,
        EXPECTED,
        peft_helper=helper,
        device="cpu",
        dtype=torch.float32,
        model_vocab_size=config["vocab_size"],
    )
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
        in_file = len(list(f.keys())) // 2
    loaded = lora.loras
    print(f"vLLM: r={helper.r}, alpha={helper.lora_alpha}, {len(loaded)} LoRA layers loaded")
    for name in sorted(loaded)[:3]:
        layer = loaded[name]
        print(f"  {name}: A {tuple(layer.lora_a.shape)}, B {tuple(layer.lora_b.shape)}")
    if len(loaded) != in_file:
        sys.exit(f"the file holds {in_file} LoRA layers, vLLM loaded {len(loaded)}")


if __name__ == "__main__":
    main()
