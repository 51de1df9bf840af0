#!/usr/bin/env python3
"""Write a Stable Diffusion 1.5-architecture checkpoint with random weights, in the single-file
(original LDM) layout of ``v1-5-pruned.safetensors``.

It stands in for the real SD 1.5 file (which cannot be downloaded on our machines) to check that
``configs/cyberpunk_lora.yaml`` and ``configs/guofeng_lora.yaml`` work unchanged on a model of that
size and layout, at a low resolution (``--set resolution=64``). The pictures it would draw are noise.

    python tools/make_random_sd15.py [OUT]   # default models/Stable-diffusion/v1-5-pruned.safetensors
    python tools/make_random_sd15.py OUT --folder DIR   # also the same weights as a diffusers folder

The diffusers folder (``StableDiffusionPipeline.save_pretrained``, fp16, with the bundled CLIP
tokenizer and SD 1.5's DDPM scheduler config) is what ``tools/train_diffusers.py`` trains on, so
that the whole-process memory of ``train`` and of a diffusers + peft run are measured on the same
weights (README, "Memory").

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
    import argparse

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?", default=str(ROOT / "models/Stable-diffusion/v1-5-pruned.safetensors"))
    p.add_argument("--folder", help="also write the weights as a diffusers folder here")
    args = p.parse_args()
    out = Path(args.out)
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
    if args.folder:
        write_folder(parts, Path(args.folder))


def write_folder(parts: SimpleNamespace, folder: Path) -> None:
    """The same weights (fp16) as a diffusers folder, loadable with ``from_pretrained``."""
    import make_fixtures as fx
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=fx.load_tokenizer(fx.CLIP_TOKENIZER_DIR),
        unet=parts.unet,
        scheduler=DDPMScheduler(**fx.SCHEDULER, prediction_type="epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    fx.write_tokenizer_folder(folder / "tokenizer", fx.CLIP_TOKENIZER_DIR)
    print(f"{folder}: diffusers folder")


if __name__ == "__main__":
    main()
