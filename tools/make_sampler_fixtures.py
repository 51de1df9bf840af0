#!/usr/bin/env python3
"""Record diffusers' sampler trajectories for the Rust sampler tests.

Writes ``tests/fixtures/samplers/trajectories.safetensors``: for every case (sampler x scheduler
config x number of steps), diffusers' own scheduler is driven with a deterministic fake model

    model_output(x, t) = 0.8 * x + (0.1 + t / 2000) * pattern

(x being what ``scale_model_input`` returns, t the scheduler's timestep as a float), starting from
``x_T * init_noise_sigma``. The Euler ancestral sampler draws its per-step noise through
``randn_tensor``; the script replaces that function by one that hands out recorded noise, so the Rust
side can feed the very same noise. Stored per case ``<case>.timesteps`` (f64, what the model is
called with), ``<case>.trajectory`` ([steps, *shape], the sample after each step) and, for Euler
ancestral, ``<case>.noise`` ([steps, *shape]); shared ``x_T`` and ``pattern``. The header metadata
``cases`` (JSON) gives each case's sampler, steps and the scheduler config JSON the scheduler was
built from with ``from_config`` (so keys missing from the config take the class's defaults, as in a
pipeline that swaps schedulers), plus ``init_noise_sigma``.

Samplers: DDIM (eta 0), Euler ancestral, DPM++ 2M (DPMSolverMultistepScheduler with solver_order 2,
algorithm_type dpmsolver++, solver_type midpoint, lower_order_final True — the defaults).

Also writes ``tests/fixtures/samplers/pipeline_tiny_sd1.safetensors``: diffusers'
``StableDiffusionPipeline`` on ``tests/fixtures/tiny-sd1`` (64x64, CFG 7.5, prompt and negative prompt
in the metadata) with each sampler from the given unit starting latents ``latents`` (and, for Euler
ancestral, the recorded step noise ``euler_a.noise``): the decoded ``<sampler>.image`` ([1, 3, 64, 64],
[-1, 1], before the 0..1 rescale) and the final ``<sampler>.latents``. That checks the whole loop:
text encoding, guidance, model-input scaling, decoding.

Usage: ``/work/venv/bin/python tools/make_sampler_fixtures.py`` (CPU, a few seconds; seeded, byte
identical on a second run). Versions used: python 3.11, torch 2.15.0, diffusers 0.42.1, numpy 2.4.6.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import safetensors.torch  # noqa: E402

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_module  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "samplers" / "trajectories.safetensors"
PIPELINE_OUT = ROOT / "tests" / "fixtures" / "samplers" / "pipeline_tiny_sd1.safetensors"
TINY_SD1 = ROOT / "tests" / "fixtures" / "tiny-sd1"
PIPELINE = {"prompt": "a red cube on a table", "negative_prompt": "blurry", "steps": 5, "cfg": 7.5,
            "width": 64, "height": 64}
SHAPE = (1, 4, 4, 4)

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

# Scheduler configs as models ship them. Keys a config lacks take the sampler class's defaults.
CONFIGS = {
    # stable-diffusion-v1-5's scheduler/scheduler_config.json (PNDMScheduler): no timestep_spacing.
    "sd15": {"_class_name": "PNDMScheduler", **SD, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "trained_betas": None, "clip_sample": False},
    # What diffusers 0.42 writes for a DDPMScheduler (our tiny fixtures): explicit `leading`.
    "ddpm_leading": {"_class_name": "DDPMScheduler", **SD, "clip_sample": False, "prediction_type": "epsilon",
                     "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None},
    # SD 2.x 768-v style.
    "trailing_v": {"_class_name": "DDIMScheduler", **SD, "prediction_type": "v_prediction",
                   "timestep_spacing": "trailing", "set_alpha_to_one": False, "clip_sample": False},
    "linspace": {"_class_name": "EulerDiscreteScheduler", **SD, "timestep_spacing": "linspace"},
    # Zero terminal SNR with v prediction (the "fixed" schedule of arXiv:2305.08891).
    "zero_snr_v": {**SD, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                   "timestep_spacing": "trailing"},
    # Nothing but the betas: DDIM's clip_sample and set_alpha_to_one defaults (both True) apply.
    "bare": {**SD},
}

SAMPLERS = {
    "ddim": DDIMScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}

STEPS = [1, 3, 7, 20]


def save_sorted(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors with a reproducible header: the library writes ``__metadata__`` from a hash map,
    so its key order changes from run to run; sort it (the same fix as make_fixtures.py)."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    fixed = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | dict(entries)
    hb = json.dumps(fixed, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + n :])


class RecordedNoise:
    """Stands in for diffusers' randn_tensor inside the Euler ancestral module."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self.drawn: list[torch.Tensor] = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        noise = torch.randn(shape, generator=self.generator, dtype=torch.float32)
        self.drawn.append(noise.clone())
        return noise.to(dtype or torch.float32)


def fake_model(x: torch.Tensor, t: float, pattern: torch.Tensor) -> torch.Tensor:
    return 0.8 * x + (0.1 + t / 2000.0) * pattern


def run_case(sampler: str, config: dict, steps: int, x_t: torch.Tensor, pattern: torch.Tensor, seed: int):
    scheduler = SAMPLERS[sampler].from_config(config)
    scheduler.set_timesteps(steps)
    noise = RecordedNoise(torch.Generator().manual_seed(seed))
    original = euler_module.randn_tensor
    euler_module.randn_tensor = noise
    try:
        sample = x_t * scheduler.init_noise_sigma
        trajectory = []
        timesteps = []
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, t)
            out = fake_model(model_input, float(t), pattern)
            sample = scheduler.step(out, t, sample).prev_sample
            trajectory.append(sample.clone())
            timesteps.append(float(t))
    finally:
        euler_module.randn_tensor = original
    result = {
        "timesteps": torch.tensor(timesteps, dtype=torch.float64),
        "trajectory": torch.cat(trajectory, 0).contiguous(),
    }
    if sampler == "euler_a":
        if len(noise.drawn) != steps:
            raise SystemExit(f"fixture check failed: {len(noise.drawn)} noise draws for {steps} steps")
        result["noise"] = torch.cat(noise.drawn, 0).contiguous()
    init_sigma = scheduler.init_noise_sigma
    init_sigma = float(init_sigma.item() if torch.is_tensor(init_sigma) else init_sigma)
    return result, init_sigma


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1234)
    x_t = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    pattern = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
    tensors = {"x_T": x_t, "pattern": pattern}
    cases = {}
    seed = 100
    for sampler in SAMPLERS:
        for config_name, config in CONFIGS.items():
            for steps in STEPS:
                seed += 1
                name = f"{sampler}.{config_name}.{steps}"
                result, init_sigma = run_case(sampler, config, steps, x_t, pattern, seed)
                for key, value in result.items():
                    tensors[f"{name}.{key}"] = value
                traj = result["trajectory"]
                if not torch.isfinite(traj).all():
                    raise SystemExit(f"fixture check failed: {name} has non-finite values")
                cases[name] = {
                    "sampler": sampler,
                    "steps": steps,
                    "config": json.dumps(config, sort_keys=True),
                    "init_noise_sigma": init_sigma,
                }
    metadata = {
        "cases": json.dumps(cases, sort_keys=True),
        "fake_model": "0.8 * x + (0.1 + t / 2000) * pattern",
        "versions": json.dumps({"torch": torch.__version__, "diffusers": diffusers.__version__,
                                "numpy": np.__version__}),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_sorted(dict(sorted(tensors.items())), OUT, metadata)
    print(f"wrote {OUT.relative_to(ROOT)}: {len(cases)} cases, {OUT.stat().st_size} bytes")


def pipeline_references() -> None:
    """diffusers' whole text-to-image loop on the tiny model, for each sampler."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_SD1), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(77)
    latents = torch.randn((1, 4, 16, 16), generator=gen, dtype=torch.float32)
    tensors = {"latents": latents}
    for sampler, cls in SAMPLERS.items():
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        noise = RecordedNoise(torch.Generator().manual_seed(5))
        original = euler_module.randn_tensor
        euler_module.randn_tensor = noise
        try:
            out = pipe(PIPELINE["prompt"], negative_prompt=PIPELINE["negative_prompt"],
                       num_inference_steps=PIPELINE["steps"], guidance_scale=PIPELINE["cfg"],
                       width=PIPELINE["width"], height=PIPELINE["height"], latents=latents.clone(),
                       output_type="latent").images
        finally:
            euler_module.randn_tensor = original
        image = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample
        tensors[f"{sampler}.latents"] = out.detach().contiguous()
        tensors[f"{sampler}.image"] = image.detach().contiguous()
        if sampler == "euler_a":
            tensors["euler_a.noise"] = torch.cat(noise.drawn, 0).contiguous()
        if not torch.isfinite(image).all():
            raise SystemExit(f"fixture check failed: {sampler} pipeline image is not finite")
    metadata = {"pipeline": json.dumps(PIPELINE, sort_keys=True),
                "versions": json.dumps({"torch": torch.__version__, "diffusers": diffusers.__version__})}
    save_sorted(dict(sorted(tensors.items())), PIPELINE_OUT, metadata)
    print(f"wrote {PIPELINE_OUT.relative_to(ROOT)}: {PIPELINE_OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
    pipeline_references()
