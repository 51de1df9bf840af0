#!/usr/bin/env python3
"""A whole LoRA training process the way diffusers' example
``examples/text_to_image/train_text_to_image_lora.py`` runs it on a CPU, for the README's
whole-process memory comparison with ``train`` (same model folder, pictures and settings).

    python tools/train_diffusers.py --model DIFFUSERS_FOLDER --data DIR [--resolution 256]
        [--steps 4] [--rank 4] [--threads 2]

What it does, in the example's order: the tokenizer, text encoder, VAE and UNet are loaded with
``from_pretrained`` in float32 (the example's ``weight_dtype`` without mixed precision) and
frozen; a PEFT ``LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian")`` on the UNet's
``to_q``/``to_v`` (our default targets; the example adds ``to_k`` and ``to_out.0``) is added with
``unet.add_adapter``; ``torch.optim.AdamW`` on the LoRA parameters; each step encodes its
pictures with the VAE and its captions with the text encoder (the example caches neither), adds
DDPM noise at a uniform timestep, and takes the MSE of the predicted noise; at the end the LoRA
is saved with ``StableDiffusionPipeline.save_lora_weights``. Pictures: ``DIR/metadata.csv``
(``filename,prompt``), resized (shorter side) and centre-cropped to the resolution.

Prints one JSON line: seconds in all, seconds per step after the first, and the process's peak
resident memory (``ru_maxrss``), loading included.
"""

import argparse
import csv
import json
import os
import resource
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="a diffusers folder")
    p.add_argument("--data", required=True, help="a folder with metadata.csv")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output", default=None, help="where to save the LoRA (default: a temp folder)")
    a = p.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    m = a.model
    noise_scheduler = DDPMScheduler.from_pretrained(m, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(m, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(m, subfolder="text_encoder", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(m, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(m, subfolder="unet", torch_dtype=torch.float32)
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    )
    lora_params = [p_ for p_ in unet.parameters() if p_.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=a.lr)

    with open(os.path.join(a.data, "metadata.csv"), newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))

    def pixels(name):
        image = Image.open(os.path.join(a.data, name)).convert("RGB")
        r = a.resolution
        w, h = image.size
        scale = r / min(w, h)
        image = image.resize((max(r, round(w * scale)), max(r, round(h * scale))), Image.BILINEAR)
        w, h = image.size
        left, top = (w - r) // 2, (h - r) // 2
        image = image.crop((left, top, left + r, top + r))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        return x.permute(2, 0, 1)

    unet.train()
    step_times = []
    for step in range(a.steps):
        t0 = time.perf_counter()
        batch = [rows[(step * a.batch + i) % len(rows)] for i in range(a.batch)]
        pixel_values = torch.stack([pixels(r["filename"]) for r in batch])
        ids = tokenizer(
            [r["prompt"] for r in batch], padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
        model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_times.append(time.perf_counter() - t0)
        print(f"step {step + 1}/{a.steps}: loss {loss.item():.4f}, {step_times[-1]:.2f} s", file=sys.stderr)

    import tempfile

    out = a.output or tempfile.mkdtemp()
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    later = step_times[1:] or step_times
    print(json.dumps({
        "seconds": round(time.perf_counter() - start, 2),
        "seconds_per_step": round(sum(later) / len(later), 3),
        "peak_rss_bytes": peak,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
