#!/usr/bin/env python3
"""Generate ``models/demo-sd/``: the tiny random Stable-Diffusion-1-style model for the offline demo.

A diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``) as ``StableDiffusionPipeline.save_pretrained`` writes it, with

* the real bundled CLIP tokenizer (a copy of ``models/clip-tokenizer/``, so run
  ``tools/make_fixtures.py`` first if that folder is missing) and therefore a text encoder with the
  real vocabulary (49408) but a tiny hidden size;
* a UNet small enough that one training step at 64x64 px (8x8 latents), batch 2, is a fraction of
  a second on 2 CPU cores even in a naive implementation (the FLOP count is printed and recorded);
* a VAE with Stable Diffusion's downsampling factor 8 (4 blocks);
* a DDPM ``scaled_linear`` (0.00085 -> 0.012, 1000 steps, epsilon) scheduler.

Weights are random (seeded) and stored in float16 to keep the folder small; loaders cast them to
float32. It proves the pipeline, not the art: images it generates are noise.

Usage: ``python tools/make_demo_model.py`` (see tools/README.md for the venv). Running it twice
gives byte-identical files. Versions used: see tools/make_fixtures.py (same environment).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures as fx  # noqa: E402  (shares the seeded init, scheduler and helpers)
import torch  # noqa: E402

DEMO_DIR = fx.ROOT / "models" / "demo-sd"
SEED = 7

UNET = dict(
    sample_size=8,  # latent size of a 64 px image
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64, 64],
    layers_per_block=2,
    attention_head_dim=8,  # = number of heads (diffusers naming)
    cross_attention_dim=32,
    norm_num_groups=32,
    use_linear_projection=False,
)
VAE = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 32, 32, 32],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


def build():
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**UNET)
    fx.randomize_(unet, SEED * 1000 + 1)
    vae = AutoencoderKL(**VAE)
    fx.randomize_(vae, SEED * 1000 + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
    fx.randomize_(text_encoder, SEED * 1000 + 3)
    tokenizer = fx.load_tokenizer(fx.CLIP_TOKENIZER_DIR)
    scheduler = DDPMScheduler(**fx.SCHEDULER, prediction_type="epsilon")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def training_step(pipe, resolution: int, batch: int) -> dict:
    """One diffusers-style training step (all parameters trainable, the worst case): encode images,
    add noise, predict it, MSE, backward. Returns its FLOPs and wall time."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(0)
    images = torch.rand((batch, 3, resolution, resolution), generator=gen) * 2 - 1
    ids = torch.tensor(fx.encode(pipe.tokenizer, ["a photo of a cat", "neon city at night"][:batch]))
    with FlopCounterMode(display=False) as counter:
        start = time.perf_counter()
        with torch.no_grad():
            latents = pipe.vae.encode(images).latent_dist.sample(generator=gen) * pipe.vae.config.scaling_factor
            cond = pipe.text_encoder(ids).last_hidden_state
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noisy = pipe.scheduler.add_noise(latents, noise, t)
        pred = pipe.unet(noisy, t, cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        elapsed = time.perf_counter() - start
    pipe.unet.zero_grad(set_to_none=True)
    fx.check(torch.isfinite(loss).item(), "training loss is not finite")
    return {"flops": counter.get_total_flops(), "seconds": elapsed, "latent": list(latents.shape)}


def write_readme(pipe, step64: dict, step128: dict) -> None:
    def params(m):
        return sum(p.numel() for p in m.parameters())

    files = sorted(p for p in DEMO_DIR.rglob("*") if p.is_file() and p.name != "README.md")
    rows = "\n".join(f"| `{p.relative_to(DEMO_DIR)}` | {p.stat().st_size:,} |" for p in files)
    total = sum(p.stat().st_size for p in files)
    text = f"""# demo-sd: a tiny random Stable Diffusion 1.x-style model

Generated by `tools/make_demo_model.py` (seed {SEED}) — regenerate, don't edit. **Random weights:
it proves the training pipeline end to end, offline; the images it makes are noise.**

- diffusers folder as `StableDiffusionPipeline.save_pretrained` writes it (diffusers
  {fx.versions()["diffusers"]}, transformers {fx.versions()["transformers"]}).
- **Weights are float16** (`*.safetensors` under the default names, not a `fp16` variant) to keep
  the folder small; load them into float32 (`from_pretrained(..., torch_dtype=torch.float32)` in
  diffusers; our loader casts). `text_encoder/config.json` says `"dtype": "float16"` for that reason.
- `tokenizer/` is a copy of `models/clip-tokenizer/` (the real CLIP BPE, 49408 tokens, pad =
  `<|endoftext|>`, 77 positions), so captions tokenize exactly as for real SD 1.x models (the files are byte-identical, so git
  stores them once).
- scheduler: `DDPMScheduler`, `scaled_linear` 0.00085 → 0.012, 1000 steps, `epsilon`.

| component | configuration | parameters |
|---|---|---:|
| UNet | SD1 layout: CrossAttnDown, CrossAttnDown, Down / Up, CrossAttnUp, CrossAttnUp; `block_out_channels` {UNET["block_out_channels"]}, 2 layers per block, 8 heads (`attention_head_dim` 8), `cross_attention_dim` {UNET["cross_attention_dim"]}, conv `proj_in`/`proj_out`, GroupNorm 32 | {params(pipe.unet):,} |
| VAE | 4 blocks {VAE["block_out_channels"]}, 1 layer per block: downsampling factor 8, latent 4 channels, `scaling_factor` 0.18215 | {params(pipe.vae):,} |
| text encoder | CLIP, vocab 49408, hidden {TEXT["hidden_size"]}, {TEXT["num_attention_heads"]} heads of 16, {TEXT["num_hidden_layers"]} layers, intermediate {TEXT["intermediate_size"]}, quick_gelu, 77 positions | {params(pipe.text_encoder):,} |

Cost of one training step (VAE encode + text encoder + UNet forward and backward with every
UNet parameter trainable, batch 2), counted by `torch.utils.flop_counter`:

| resolution | latent | GFLOP |
|---|---|---:|
| 64 px | {step64["latent"]} | {step64["flops"] / 1e9:.2f} |
| 128 px | {step128["latent"]} | {step128["flops"] / 1e9:.2f} |

At the ~20 GFLOP/s a naive implementation reaches on 2 CPU cores (DESIGN.md §7), the 64 px step is
about 50 ms of arithmetic (less with cached latents and LoRA-only gradients); 128 px about 0.2 s.

| file | bytes |
|---|---:|
{rows}

Total {total:,} bytes.
"""
    (DEMO_DIR / "README.md").write_text(text, encoding="utf-8")


def main() -> None:
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    fx.check((fx.CLIP_TOKENIZER_DIR / "vocab.json").exists(), "models/clip-tokenizer is missing: run tools/make_fixtures.py first")

    pipe = build()
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    fp32 = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "vae", "text_encoder")}
    pipe.to(torch.float16)
    pipe.save_pretrained(str(DEMO_DIR), safe_serialization=True)
    fx.write_tokenizer_folder(DEMO_DIR / "tokenizer", fx.CLIP_TOKENIZER_DIR)

    # load it back the way users do and check every weight is the f32 one rounded to f16
    loaded = StableDiffusionPipeline.from_pretrained(str(DEMO_DIR), torch_dtype=torch.float32, local_files_only=True)
    for comp, ref in fp32.items():
        sd = getattr(loaded, comp).state_dict()
        fx.check(set(sd) == set(ref), f"demo {comp}: key sets differ")
        for k, v in ref.items():
            fx.check(sd[k].dtype == torch.float32, f"demo {comp}.{k} not loaded as f32")
            fx.check(torch.equal(sd[k], v.half().float()), f"demo {comp}.{k} differs")
    fx.check(len(loaded.tokenizer) == 49408 and loaded.tokenizer.pad_token_id == 49407, "demo tokenizer")
    fx.check(2 ** (len(loaded.vae.config.block_out_channels) - 1) == 8, "VAE downsampling factor 8")

    step64 = training_step(loaded, 64, 2)
    step128 = training_step(loaded, 128, 2)
    fx.check(step64["latent"] == [2, 4, 8, 8], f"64 px gives latents {step64['latent']}")
    print(f"training step, batch 2: 64 px {step64['flops'] / 1e9:.2f} GFLOP ({step64['seconds']:.2f} s here, 1 thread), "
          f"128 px {step128['flops'] / 1e9:.2f} GFLOP ({step128['seconds']:.2f} s)")

    # the whole inference pipeline runs too (2 denoising steps at 64 px)
    loaded.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = loaded(
            "a photo of a cat", height=64, width=64, num_inference_steps=2,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images
    fx.check(image.shape == (1, 64, 64, 3), f"pipeline output shape {image.shape}")

    write_readme(loaded, step64, step128)
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    index = json.loads((DEMO_DIR / "model_index.json").read_text())
    print(f"models/demo-sd: {total / 2**20:.2f} MiB, components {sorted(k for k, v in index.items() if isinstance(v, list) and v[0])}")


if __name__ == "__main__":
    main()
