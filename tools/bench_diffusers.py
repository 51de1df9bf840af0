#!/usr/bin/env python3
"""Reference side of `cargo run --release --bin bench -- --reference PYTHON`.

diffusers + peft on the shapes the Rust bench uses: UNet2DConditionModel from SD 1.5's config
(or SDXL base's, or the bundled demo model's) with random init; for SDXL a random pooled text
embedding and the size ids (resolution, resolution, 0, 0, resolution, resolution) as
`added_cond_kwargs`; peft LoraConfig(r, alpha=r, target to_q/to_v),
cached-latent setting (random latents and text context, no VAE or text encoder), DDPM noise,
MSE on epsilon, torch.optim.AdamW on the LoRA parameters, torch.set_num_threads(2) by default.
On CUDA (`--device cuda`), `--mixed-precision bf16|fp16` puts the frozen weights in half
precision as diffusers' training scripts do (LoRA parameters in float32), and the peak GPU memory
is torch.cuda.max_memory_reserved(); attention is diffusers' default (PyTorch SDPA).
Prints a human line per step on stderr and one JSON line on stdout (read by the bench binary).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import report, timed_steps  # noqa: E402

SD15 = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}


SDXL = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def unet_config(preset):
    if preset == "sd15":
        return dict(SD15)
    if preset == "sdxl":
        return dict(SDXL)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "models", "demo-sd", "unet", "config.json")) as f:
        config = json.load(f)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", choices=["sd15", "sdxl", "tiny"], default="sd15")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                   help="dtype of the frozen weights (diffusers' training scripts' weight_dtype); "
                        "the LoRA parameters stay float32")
    a = p.parse_args()

    import torch
    import diffusers
    import peft
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    config = unet_config(a.preset)
    device = torch.device(a.device)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.mixed_precision]
    cuda = device.type == "cuda"
    unet = UNet2DConditionModel.from_config(config)
    unet.requires_grad_(False)
    unet.to(device, dtype=dtype)
    unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_v"]))
    # As diffusers' train_text_to_image_lora.py: the trainable parameters in float32.
    for p_ in unet.parameters():
        if p_.requires_grad:
            p_.data = p_.data.float()
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)

    side = a.resolution // 8
    latents = torch.randn(a.batch, config["in_channels"], side, side).to(device)
    context = torch.randn(a.batch, a.tokens, config["cross_attention_dim"]).to(device, dtype)
    added = None
    if config.get("addition_embed_type") == "text_time":
        width = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        ids = torch.tensor([[a.resolution, a.resolution, 0, 0, a.resolution, a.resolution]] * a.batch)
        added = {"text_embeds": torch.randn(a.batch, width).to(device, dtype),
                 "time_ids": ids.to(device, dtype)}
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (a.batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        pred = unet(noisy.to(dtype), t, context, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = (lambda: torch.cuda.synchronize(device)) if cuda else None
    times, loss = timed_steps(step, a.warmup, a.steps, sync)
    report(times, loss, n_params,
           f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
           f"peft {peft.__version__}, {a.threads} threads"
           + (f", {torch.cuda.get_device_name(device)}, attention "
              f"{type(unet.attn_processors[next(iter(unet.attn_processors))]).__name__}"
              if cuda else ""),
           torch.cuda.max_memory_reserved(device) if cuda else None)


if __name__ == "__main__":
    main()
