#!/usr/bin/env python3
"""Write an SDXL base 1.0-architecture checkpoint with random weights, in the single-file layout
of Stability's ``sd_xl_base_1.0.safetensors`` (``model.diffusion_model.``, ``first_stage_model.``,
``conditioner.embedders.0.transformer.``, ``conditioner.embedders.1.model.`` in OpenCLIP layout).

It stands in for the real file (which cannot be downloaded on our machines) to check that
``configs/sdxl_lora.yaml`` works unchanged on a model of SDXL's size and layout, at a low
resolution (``--set resolution=256``), and to measure the memory and speed of training at that
size. The pictures it would draw are noise.

    python tools/make_random_sdxl.py [OUT]            # default models/Stable-diffusion/sd_xl_base_1.0.safetensors
    python tools/make_random_sdxl.py OUT --folder DIR # also the same weights as a diffusers folder

The diffusers folder (``StableDiffusionXLPipeline.save_pretrained``, fp16, the bundled CLIP
tokenizer as ``tokenizer`` and as ``tokenizer_2`` padding with ``!``, SDXL's Euler scheduler config)
holds the same weights, so that loading both layouts can be compared, and is what a diffusers run
reads.

The shapes are SDXL base 1.0's (its published configs, as ``make_sdxl_fixtures.py`` writes them
into ``tests/fixtures/sdxl-base.shapes.json``: UNet 320/640/1280 with 1/2/10 transformer layers,
CLIP ViT-L/14, OpenCLIP ViT-bigG/14 with projection, the 4-channel VAE at scale 0.13025); the
weights are torch's default initialisation under a fixed seed, stored in fp16 (about 6.9 GB, as the
real file). Each model is built in f32 and halved before the next is built: the script peaks at
about 11 GB. The diffusers -> single-file mapping is ``make_sdxl_fixtures.ldm_single_file`` (proved
there with diffusers' ``from_single_file``); this script checks every written name and shape
against ``sdxl-base.shapes.json``.
Versions: python 3.11, torch 2.15.0, diffusers 0.42.1, transformers 5.23.0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as fx  # noqa: E402
from make_sdxl_fixtures import SCHEDULER, ldm_single_file  # noqa: E402
from make_sdxl_fixtures import SDXL_BASE_TEXT1 as TEXT1  # noqa: E402
from make_sdxl_fixtures import SDXL_BASE_TEXT2 as TEXT2  # noqa: E402
from make_sdxl_fixtures import SDXL_BASE_UNET as UNET  # noqa: E402
from make_sdxl_fixtures import SDXL_BASE_VAE as VAE  # noqa: E402

REPO = fx.ROOT
SHAPES = REPO / "tests" / "fixtures" / "sdxl-base.shapes.json"

def halved(build):
    """Builds a model in f32 (torch's default initialisation) and halves it at once, so that only
    one model is ever held in f32."""
    return build().eval().half()


def main() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=str(REPO / "models/Stable-diffusion/sd_xl_base_1.0.safetensors"))
    p.add_argument("--folder", help="also write the weights as a diffusers folder here")
    args = p.parse_args()
    out = Path(args.out)
    start = time.time()
    torch.manual_seed(1234)
    unet = halved(lambda: UNet2DConditionModel(**UNET))
    vae = halved(lambda: AutoencoderKL(**VAE))
    te1 = halved(lambda: CLIPTextModel(CLIPTextConfig(**TEXT1)))
    te2 = halved(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT2)))
    print(f"built in {time.time() - start:.0f} s")

    tensors = {k: v.contiguous() for k, v in ldm_single_file(unet, vae, te1, te2).items()}
    tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in tensors.items()}
    expected = json.loads(SHAPES.read_text())
    got = {k: list(v.shape) for k, v in tensors.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        shapes = [k for k in expected if k in got and got[k] != expected[k]][:3]
        raise SystemExit(f"check failed: not SDXL base's layout (missing {missing}, extra {extra}, shapes {shapes})")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "pt"})
    del tensors
    print(f"{out}: {len(expected)} tensors, {out.stat().st_size / 1e9:.2f} GB ({time.time() - start:.0f} s)")
    if args.folder:
        write_folder(unet, vae, te1, te2, Path(args.folder))
        print(f"{args.folder}: diffusers folder ({time.time() - start:.0f} s)")


def write_folder(unet, vae, te1, te2, folder: Path) -> None:
    """The same weights (fp16) as a diffusers SDXL folder, loadable with ``from_pretrained``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    extra = ("clip_sample", "sample_max_value", "set_alpha_to_one", "skip_prk_steps")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=fx.load_tokenizer(fx.CLIP_TOKENIZER_DIR),
        tokenizer_2=fx.load_tokenizer(fx.CLIP_TOKENIZER_DIR, pad_token="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k not in extra}),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


if __name__ == "__main__":
    main()
