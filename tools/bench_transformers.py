#!/usr/bin/env python3
"""Reference side of `cargo run --release --bin bench -- --preset llm --reference PYTHON`.

transformers + peft on the shapes the Rust bench uses: a causal LM from a `config.json` (by
default Qwen2.5-0.5B-Instruct's, given inline by the bench) with transformers' random init;
peft LoraConfig(r, lora_alpha=2r, target q_proj/v_proj); random token ids `[batch, seq]`, every
position labelled (`labels = input_ids`: transformers' shifted causal-LM loss over all tokens);
torch.optim.AdamW on the LoRA parameters; torch.set_num_threads(2) by default. With
`--mixed-precision bf16|fp16` the model's weights are in that dtype (the LoRA parameters in
float32), as peft's recipes load a model with `torch_dtype=torch.bfloat16`.
Prints a human line per step on stderr and one JSON line on stdout (read by the bench binary).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import report, timed_steps  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="a config.json's text")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    a = p.parse_args()

    import torch
    import transformers
    import peft
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.mixed_precision]
    cuda = device.type == "cuda"
    values = json.loads(a.config)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank,
                                             target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    for p_ in model.parameters():
        if p_.requires_grad:
            p_.data = p_.data.float()
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, config.vocab_size, (a.batch, a.seq), generator=gen).to(device)
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = (lambda: torch.cuda.synchronize(device)) if cuda else None
    times, loss = timed_steps(step, a.warmup, a.steps, sync)
    report(times, loss, n_params,
           f"torch {torch.__version__}, transformers {transformers.__version__}, "
           f"peft {peft.__version__}, {a.threads} threads, attention "
           f"{model.config._attn_implementation}"
           + (f", {torch.cuda.get_device_name(device)}" if cuda else ""),
           torch.cuda.max_memory_reserved(device) if cuda else None)


if __name__ == "__main__":
    main()
