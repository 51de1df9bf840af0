#!/usr/bin/env python3
"""Record the optimizer, gradient-clipping and learning-rate-schedule references of src/train/.

Writes (paths relative to the repository root), all small:

* ``tests/fixtures/train/optimizers.safetensors`` + ``optimizers.json``  parameter trajectories of
  torch.optim.AdamW, torch.optim.SGD, lion_pytorch.Lion and bitsandbytes.optim.AdamW8bit: two
  parameter groups with their own learning rate and weight decay, a learning rate that changes
  every step, and a parameter whose gradient is absent (``p.grad = None``) for some steps. The
  gradients come from a seeded test loss evaluated at the reference optimizer's own parameters;
  they are recorded, and the Rust tests feed the same gradients to our optimizers.
* ``tests/fixtures/train/clip_grad_norm.safetensors`` + ``clip_grad_norm.json``  inputs and outputs of
  ``torch.nn.utils.clip_grad_norm_``.
* ``tests/fixtures/train/lr_schedules.safetensors`` + ``lr_schedules.json``  the learning rate of two
  parameter groups at every step of diffusers' ``get_scheduler`` for every schedule we offer.
* ``tests/fixtures/train/README.md``  what each file holds (generated).

Package versions used to generate the committed files (also written to the README and to each
json file): python 3.11, torch 2.15.0 (run on the CPU), diffusers 0.42.1, bitsandbytes 0.50.2 (its CPU
8-bit optimizer), lion-pytorch 0.2.5, safetensors 0.8.0, numpy 2.4.6.

bitsandbytes and lion-pytorch are not in tools/requirements.txt; install them beside it:
``pip install bitsandbytes==0.50.2 lion-pytorch==0.2.5`` (``--no-deps`` keeps the torch you have).

Everything is seeded and runs on one CPU thread; a second run gives byte-identical files.
Usage: ``python tools/make_train_references.py`` (from anywhere).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import platform
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "train"

try:
    import bitsandbytes as bnb
    import lion_pytorch
except ImportError as e:  # pragma: no cover - message for the person running the script
    sys.exit(
        f"{e}: install the reference optimizers first: "
        "pip install --no-deps bitsandbytes==0.50.2 lion-pytorch==0.2.5"
    )

from diffusers.optimization import get_scheduler  # noqa: E402

STEPS = 20


def versions() -> dict[str, str]:
    import diffusers
    import numpy
    import safetensors

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "bitsandbytes": bnb.__version__,
        "lion-pytorch": importlib.metadata.version("lion-pytorch"),
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
    }


# ---------------------------------------------------------------------------------------------
# optimizer trajectories


def test_loss(params: dict[str, torch.Tensor], targets, scales) -> torch.Tensor:
    """A separable quadratic with per-element curvature spread over four decades (so that the
    moments of one 256-element block span a wide range, as real gradients do) plus a coupling term."""
    loss = torch.zeros((), dtype=torch.float32)
    for name, p in params.items():
        loss = loss + (scales[name] * (p - targets[name]) ** 2).sum()
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    return loss + 0.1 * torch.tanh(flat).sum() ** 2 / flat.numel()


def record_case(case: str, spec: dict, make_optimizer, seed: int, steps: int, tensors: dict) -> dict:
    """Runs the reference optimizer for `steps` steps and records init, grads, lrs and params."""
    gen = torch.Generator().manual_seed(seed)
    params: dict[str, torch.nn.Parameter] = {}
    targets, scales = {}, {}
    for group in spec["groups"]:
        for name, shape in group["params"].items():
            params[name] = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.5)
            targets[name] = torch.randn(shape, generator=gen)
            scales[name] = 10.0 ** (torch.rand(shape, generator=gen) * 4.0 - 3.0)
    param_groups = [
        {"params": [params[n] for n in g["params"]], "lr": g["lr"], "weight_decay": g["weight_decay"]}
        for g in spec["groups"]
    ]
    opt = make_optimizer(param_groups)
    for name, p in params.items():
        tensors[f"{case}.init.{name}"] = p.detach().clone()
    for step in range(steps):
        # a learning rate that changes every step (warm-up then decay), per group
        factor = min(1.0, (step + 1) / 5) * (1.0 - step / (2 * steps))
        lrs = [g["lr"] * factor for g in spec["groups"]]
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        tensors[f"{case}.lr.{step:02}"] = torch.tensor(lrs, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        loss = test_loss(params, targets, scales)
        loss.backward()
        noise = torch.Generator().manual_seed(seed * 1000 + step)
        for name, p in params.items():
            if step in spec.get("no_grad_steps", {}).get(name, []):
                p.grad = None  # torch skips the parameter in this step
                continue
            p.grad.add_(torch.randn(p.shape, generator=noise) * p.grad.abs().mean())
            tensors[f"{case}.grad.{step:02}.{name}"] = p.grad.detach().clone()
        opt.step()
        for name, p in params.items():
            tensors[f"{case}.param.{step:02}.{name}"] = p.detach().clone()
    return {**spec, "steps": steps, "seed": seed}


# bitsandbytes' CPU 8-bit update, re-enacted from its own building blocks (its maps, its
# dequantize op, the f32 update of `_optimizer_update_8bit_blockwise_cpu`) so that the rounding of
# the re-quantization can be swapped. With bitsandbytes' own quantize op it must reproduce the
# recorded bitsandbytes trajectory (checked below); with exact nearest rounding (ties to the
# smaller code) plus the sign rule of bitsandbytes' CUDA kernel (a first-moment code of the other
# sign moves one step towards the value's sign) it is the reference our AdamW8bit is held to.
# (bitsandbytes' CPU quantizer does not round to the nearest code for values below ~1e-5 of the
# block's absmax: 0 becomes code 131 = 2.1e-5 in the signed map, code 7 = 1.6e-5 in the unsigned.)

BLOCK = 256


def quantize_bnb(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.bitsandbytes.quantize_blockwise(x.contiguous(), code, BLOCK)


def quantize_nearest(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    signed = bool(code[0] < 0)
    zero_code = int((code == 0).nonzero()[0])
    out = torch.empty(x.numel(), dtype=torch.uint8)
    absmax = torch.empty((x.numel() + BLOCK - 1) // BLOCK, dtype=torch.float32)
    for b, start in enumerate(range(0, x.numel(), BLOCK)):
        block = x[start:start + BLOCK]
        a = block.abs().max()
        absmax[b] = a
        if a == 0:
            out[start:start + BLOCK] = zero_code
            continue
        normed = block / a
        idx = (normed[:, None] - code[None, :]).abs().argmin(dim=1)  # first minimum: ties go low
        if signed:
            flip = torch.signbit(code[idx]) != torch.signbit(normed)
            idx = torch.where(flip & (normed > 0), idx + 1, torch.where(flip, idx - 1, idx))
        out[start:start + BLOCK] = idx.to(torch.uint8)
    return out, absmax


def replay_8bit(case: dict, tensors: dict, name: str, quantize) -> tuple[list[torch.Tensor], dict]:
    """Re-enacts bitsandbytes' CPU AdamW8bit for one 8-bit parameter on the recorded gradients."""
    group_index = next(i for i, g in enumerate(case["groups"]) if name in g["params"])
    wd = case["groups"][group_index]["weight_decay"]
    beta1, beta2 = case["betas"]
    eps = case["eps"]
    qmap1 = bnb.functional.create_dynamic_map(signed=True)
    qmap2 = bnb.functional.create_dynamic_map(signed=False)
    p = tensors[f"adamw8bit.init.{name}"].clone().reshape(-1)
    n = p.numel()
    blocks = (n + BLOCK - 1) // BLOCK
    state1, absmax1 = torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks)
    state2, absmax2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks)
    step = 0
    params = []
    for k in range(case["steps"]):
        grad = tensors.get(f"adamw8bit.grad.{k:02}.{name}")
        lr = tensors[f"adamw8bit.lr.{k:02}"][group_index].item()
        if grad is not None:
            step += 1
            m = torch.ops.bitsandbytes.dequantize_blockwise(state1, absmax1, qmap1, BLOCK, torch.float32)
            v = torch.ops.bitsandbytes.dequantize_blockwise(state2, absmax2, qmap2, BLOCK, torch.float32)
            g = grad.reshape(-1).float()
            m.mul_(beta1).add_(g, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            correction1 = 1.0 - beta1**step
            correction2 = math.sqrt(1.0 - beta2**step)
            denom = (v.sqrt() / correction2).add_(eps)
            if wd > 0.0:
                p.mul_(1.0 - lr * wd)
            p.addcdiv_(m, denom, value=-lr / correction1)
            state1, absmax1 = quantize(m, qmap1)
            state2, absmax2 = quantize(v, qmap2)
        params.append(p.clone())
    state = {"exp_avg.codes": state1, "exp_avg.absmax": absmax1,
             "exp_avg_sq.codes": state2, "exp_avg_sq.absmax": absmax2}
    return params, state


def record_nearest_rounding(case: dict, tensors: dict) -> dict:
    names = [n for g in case["groups"] for n, shape in g["params"].items() if math.prod(shape) >= 4096]
    worst_reenacted, worst_nearest = 0.0, 0.0
    for name in names:
        reenacted, _ = replay_8bit(case, tensors, name, quantize_bnb)
        nearest, state = replay_8bit(case, tensors, name, quantize_nearest)
        for k in range(case["steps"]):
            recorded = tensors[f"adamw8bit.param.{k:02}.{name}"].reshape(-1)
            worst_reenacted = max(worst_reenacted, (reenacted[k] - recorded).abs().max().item())
            worst_nearest = max(worst_nearest, (nearest[k] - recorded).abs().max().item())
            shape = tensors[f"adamw8bit.init.{name}"].shape
            tensors[f"adamw8bit.nearest.param.{k:02}.{name}"] = nearest[k].reshape(shape)
        for key, t in state.items():
            tensors[f"adamw8bit.nearest.state.{name}.{key}"] = t
    if worst_reenacted > 1e-6:
        sys.exit(f"fixture check failed: the re-enacted 8-bit update is {worst_reenacted} off bitsandbytes")
    return {
        "params": names,
        "max_abs_diff_reenacted_vs_bitsandbytes": worst_reenacted,
        "max_abs_diff_nearest_vs_bitsandbytes": worst_nearest,
    }


def optimizer_references() -> None:
    two_groups = {
        "groups": [
            {"name": "unet", "lr": 1e-2, "weight_decay": 1e-2, "params": {"unet.a": [16, 12], "unet.b": [12]}},
            {"name": "text_encoder", "lr": 5e-3, "weight_decay": 0.1, "params": {"te.c": [8, 6]}},
        ],
        "no_grad_steps": {"te.c": [3, 4, 5, 6, 7]},
    }
    cases = {}
    tensors: dict[str, torch.Tensor] = {}

    spec = {**two_groups, "optimizer": "AdamW", "reference": "torch.optim.AdamW",
            "betas": [0.9, 0.999], "eps": 1e-8}
    cases["adamw"] = record_case(
        "adamw", spec, lambda g: torch.optim.AdamW(g, betas=(0.9, 0.999), eps=1e-8, foreach=False), 1, STEPS, tensors
    )

    spec = {
        "groups": [{"name": "unet", "lr": 3e-2, "weight_decay": 0.0, "params": {"w": [10, 7]}}],
        "optimizer": "AdamW", "reference": "torch.optim.AdamW", "betas": [0.8, 0.95], "eps": 1e-3,
    }
    cases["adamw_betas"] = record_case(
        "adamw_betas", spec, lambda g: torch.optim.AdamW(g, betas=(0.8, 0.95), eps=1e-3, foreach=False), 2, STEPS,
        tensors,
    )

    spec = {**two_groups, "optimizer": "Lion", "reference": "lion_pytorch.Lion", "betas": [0.9, 0.99]}
    cases["lion"] = record_case(
        "lion", spec, lambda g: lion_pytorch.Lion(g, betas=(0.9, 0.99)), 3, STEPS, tensors
    )

    spec = {**two_groups, "optimizer": "SGD", "reference": "torch.optim.SGD", "momentum": 0.0, "nesterov": False}
    cases["sgd"] = record_case("sgd", spec, lambda g: torch.optim.SGD(g, momentum=0.0, foreach=False), 4, STEPS, tensors)

    spec = {**two_groups, "optimizer": "SGD", "reference": "torch.optim.SGD", "momentum": 0.9, "nesterov": True}
    cases["sgd_nesterov"] = record_case(
        "sgd_nesterov", spec, lambda g: torch.optim.SGD(g, momentum=0.9, nesterov=True, foreach=False), 5, STEPS,
        tensors,
    )

    # bitsandbytes keeps tensors below min_8bit_size (4096 elements) in 32-bit state: `b` shows
    # that path, `w` (4160 = 16.25 blocks of 256: a partial last block) and `v` (exactly 4096) the
    # 8-bit one.
    spec = {
        "groups": [
            {"name": "unet", "lr": 1e-2, "weight_decay": 1e-2, "params": {"w": [65, 64], "b": [65]}},
            {"name": "text_encoder", "lr": 5e-3, "weight_decay": 0.1, "params": {"v": [64, 64]}},
        ],
        "no_grad_steps": {"v": [3, 4, 5]},
        "optimizer": "AdamW8bit", "reference": "bitsandbytes.optim.AdamW8bit (CPU)",
        "betas": [0.9, 0.999], "eps": 1e-8, "min_8bit_size": 4096,
    }
    cases["adamw8bit"] = record_case(
        "adamw8bit", spec, lambda g: bnb.optim.AdamW8bit(g, betas=(0.9, 0.999), eps=1e-8), 6, STEPS, tensors
    )
    # the quantization maps bitsandbytes used (signed for m, unsigned for v)
    tensors["adamw8bit.qmap.signed"] = bnb.functional.create_dynamic_map(signed=True)
    tensors["adamw8bit.qmap.unsigned"] = bnb.functional.create_dynamic_map(signed=False)
    cases["adamw8bit"]["nearest_rounding"] = record_nearest_rounding(cases["adamw8bit"], tensors)

    write(OUT / "optimizers.safetensors", tensors)
    write_json(OUT / "optimizers.json", {"versions": versions(), "cases": cases})


# ---------------------------------------------------------------------------------------------
# gradient clipping


def clip_references() -> None:
    gen = torch.Generator().manual_seed(7)
    shapes = [[16, 12], [12], [8, 6], [300]]
    cases = {"above": 1.0, "below": 1e3, "tiny_max": 1e-3}
    tensors, meta = {}, {}
    for case, max_norm in cases.items():
        grads = [torch.randn(s, generator=gen) * (0.1 + i) for i, s in enumerate(shapes)]
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        total = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        for i, (g, p) in enumerate(zip(grads, params)):
            tensors[f"{case}.grad.{i}"] = g
            tensors[f"{case}.clipped.{i}"] = p.grad.detach().clone()
        tensors[f"{case}.total_norm"] = total.detach().clone().reshape(1)
        meta[case] = {"max_norm": max_norm, "grads": len(shapes)}
    write(OUT / "clip_grad_norm.safetensors", tensors)
    write_json(OUT / "clip_grad_norm.json", {"versions": versions(), "cases": meta,
                                             "reference": "torch.nn.utils.clip_grad_norm_ (norm_type 2)"})


# ---------------------------------------------------------------------------------------------
# learning-rate schedules


SCHEDULES = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


def schedule_references() -> None:
    settings = [
        {"name": "w10", "total_steps": 100, "warmup_steps": 10, "num_cycles": 3, "power": 2.0},
        {"name": "w0", "total_steps": 100, "warmup_steps": 0, "num_cycles": 1, "power": 1.0},
        {"name": "short", "total_steps": 7, "warmup_steps": 3, "num_cycles": 2, "power": 0.5},
    ]
    base_lr = 1e-3
    group_lrs = [1e-3, 5e-4]
    recorded_steps = 111  # 0..=110: past the end too (polynomial holds lr_end there)
    tensors, meta = {}, []
    for s in settings:
        for kind in SCHEDULES:
            params = [torch.nn.Parameter(torch.zeros(1)) for _ in group_lrs]
            opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, group_lrs)], lr=base_lr)
            sched = get_scheduler(
                kind, opt, num_warmup_steps=s["warmup_steps"], num_training_steps=s["total_steps"],
                num_cycles=s["num_cycles"], power=s["power"],
            )
            rows = []
            for _ in range(recorded_steps):
                rows.append([g["lr"] for g in opt.param_groups])
                opt.step()
                sched.step()
            tensors[f"{s['name']}.{kind}"] = torch.tensor(rows, dtype=torch.float64).T.contiguous()
        meta.append(s)
    write(OUT / "lr_schedules.safetensors", tensors)
    write_json(OUT / "lr_schedules.json", {
        "versions": versions(), "settings": meta, "schedules": SCHEDULES, "base_lr": base_lr,
        "group_lrs": group_lrs, "recorded_steps": recorded_steps,
        "reference": "diffusers.optimization.get_scheduler (LambdaLR); row g = param group g, column k = "
                     "the lr used by optimizer step k",
    })


# ---------------------------------------------------------------------------------------------


def write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path))


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def readme() -> None:
    rows = []
    for f in sorted(OUT.iterdir()):
        if f.name == "README.md":
            continue
        digest = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        rows.append(f"| `{f.name}` | {f.stat().st_size} | `{digest}` |")
    v = versions()
    text = f"""# Training references (optimizers, gradient clipping, LR schedules)

Generated by `tools/make_train_references.py` — do not edit by hand, regenerate instead:

```sh
.venv/bin/pip install --no-deps bitsandbytes==0.50.2 lion-pytorch==0.2.5   # beside tools/requirements.txt
.venv/bin/python tools/make_train_references.py                            # a few seconds
```

Versions: {", ".join(f"{k} {val}" for k, val in v.items())}. Seeded, one CPU thread; a second run
gives byte-identical files.

- `optimizers.safetensors` / `.json`: per case (`adamw`, `adamw_betas`, `lion`, `sgd`, `sgd_nesterov`,
  `adamw8bit`): `<case>.init.<param>`, `<case>.grad.<step>.<param>` (absent = `p.grad is None` that
  step), `<case>.lr.<step>` (f64, one per group), `<case>.param.<step>.<param>` (after the step).
  The json names the reference implementation, groups, weight decays and hyperparameters.
  `adamw8bit.qmap.{{signed,unsigned}}` are bitsandbytes' dynamic quantization maps. References:
  torch.optim.AdamW / SGD (`foreach=False`), lion_pytorch.Lion, bitsandbytes.optim.AdamW8bit on CPU.
  `adamw8bit.nearest.param.<step>.<param>` and `adamw8bit.nearest.state.<param>.<moment>.{{codes,absmax}}`
  (the 8-bit parameters `w`, `v` only): bitsandbytes' CPU 8-bit update re-enacted from its own
  building blocks with exact nearest rounding of the codes (plus the sign rule of its CUDA kernel)
  instead of its CPU quantizer, which rounds values below ~1e-5 of a block's absmax to larger codes.
  The script checks that the re-enactment with bitsandbytes' own quantizer reproduces the recorded
  bitsandbytes trajectory (≤ 1e-6); `optimizers.json` gives both distances.
- `clip_grad_norm.safetensors` / `.json`: `<case>.grad.<i>`, `<case>.clipped.<i>`, `<case>.total_norm`
  from `torch.nn.utils.clip_grad_norm_`.
- `lr_schedules.safetensors` / `.json`: `<setting>.<schedule>` is `[groups, 111]` f64: the lr of each
  param group used by optimizer step k = 0..=110, from diffusers' `get_scheduler` (base lr 1e-3,
  group lrs 1e-3 and 5e-4).

| file | bytes | sha256 (first 16) |
|---|---|---|
""" + "\n".join(rows) + "\n"
    (OUT / "README.md").write_text(text)


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    optimizer_references()
    clip_references()
    schedule_references()
    readme()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
