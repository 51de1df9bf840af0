#!/usr/bin/env python3
"""Write a Stable Diffusion 1.5-architecture checkpoint with random weights, in the single-file
(original LDM) layout of ``v1-5-pruned.safetensors``.

It stands in for the real SD 1.5 file (which cannot be downloaded on our machines) to check that
``configs/cyberpunk_lora.yaml`` and ``configs/guofeng_lora.yaml`` work unchanged on a model of that
size and layout, at a low resolution (``--set resolution=64``). The pictures it would draw are noise.

    python tools/make_random_sd15.py [OUT]   # default models/Stable-diffusion/v1-5-pruned.safetensors

The shapes are SD 1.5's (diffusers' ``stable-diffusion-v1-5`` configs: UNet 320/640/1280/1280,
CLIP ViT-L/14 text encoder, the 4-channel VAE); the weights are torch's default initialisation under a
fixed seed; the tensors are fp16 (about 2 GB). The diffusers -> LDM key mapping is the one
``tools/make_fixtures.py`` uses (and proves with diffusers' ``from_single_file``).
Versions: python 3.11, torch 2.15.0, diffusers 0.42.1, transformers 5.23.0.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import ROOT, save_st, to_single_file  # noqa: E402

UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    norm_num_groups=32,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    sample_size=512,
)
TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)


def main() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models/Stable-diffusion/v1-5-pruned.safetensors"
    torch.manual_seed(1234)
    parts = SimpleNamespace(
        unet=UNet2DConditionModel(**UNET).eval(),
        vae=AutoencoderKL(**VAE).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)).eval(),
    )
    tensors = to_single_file(parts, {"text_layout": "hf_clip", "seed": 1234})
    tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_st(tensors, out)
    print(f"{out}: {len(tensors)} tensors, {out.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
