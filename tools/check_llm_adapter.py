#!/usr/bin/env python3
"""Loads an adapter folder `train` wrote (task: llm) with transformers + peft and prints peft's
greedy answers, to compare with ours (not in CI):

    cargo run --release --bin train -- --config configs/demo_llm.yaml
    python tools/check_llm_adapter.py models/demo-llm output/demo_llm/demo_llm "What colour is the sky?"
    cargo run --release --bin chat -- --model models/demo-llm --adapter output/demo_llm/demo_llm \\
        --prompt "What colour is the sky?"

Fails when peft leaves an adapter matrix of the file unused or one of its own unset. Checked
2026-12-07 (torch 2.15.0, transformers 5.23.0, peft 0.21.2): the demo's answers are the same
text on both sides. llama.cpp's converter also takes the folder (56 tensors for the demo):

    PYTHONPATH=gguf-py python convert_lora_to_gguf.py ADAPTER --base BASE --outfile x.gguf
"""

import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    base, adapter, *prompts = sys.argv[1:]
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, adapter).eval()
    saved = load_file(f"{adapter}/adapter_model.safetensors")
    params = dict(model.named_parameters())
    for key, tensor in saved.items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight")
        if name not in params or not torch.equal(params[name].detach(), tensor):
            raise SystemExit(f"{key}: not loaded as written")
    lora = [k for k in params if "lora_" in k]
    if len(lora) != len(saved):
        raise SystemExit(f"peft made {len(lora)} adapter matrices, the file has {len(saved)}")
    print(f"{len(saved)} adapter matrices loaded as written")
    for prompt in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=128, do_sample=False)
        print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main()
