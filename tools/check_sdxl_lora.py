#!/usr/bin/env python3
"""Check an SDXL LoRA written by `train` against diffusers (not run in CI).

Without FILE, trains one first: `train` on the tiny SDXL folder (`tests/fixtures/tiny-sdxl`) with
the demo pictures at 64 px, `target_modules: kohya` (every attention/MLP linear of the UNet's
transformer blocks and of both text encoders) with `conv_lora` (kohya's LoCon: the resnets'
convolutions, time-embedding projections and shortcuts, the down- and upsamplers),
`train_text_encoder: true`, 4 steps.

Then `StableDiffusionXLPipeline.load_lora_weights(FILE)` on the tiny SDXL folder (diffusers
converts kohya's SDXL names itself: `lora_unet_input_blocks_…`, `lora_te1_…`, `lora_te2_…`), and
after `fuse_lora` every weight that changed, in the UNet and both text encoders, must equal
`W + (alpha/rank)·up·down` of exactly one module of the file (matched by value, so a module placed
on the wrong layer fails), and every module whose delta is not zero must have been placed. A
module with a zero delta is listed, not failed: the first text encoder's last layer learns
nothing, since SDXL conditions on its penultimate layer.

Usage (from the repository root; needs torch, diffusers, transformers, peft, safetensors):

    python tools/check_sdxl_lora.py [FILE]

Exit status 0 when everything passes, 1 otherwise.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-sdxl"


def train(out: Path) -> Path:
    config = out / "config.yaml"
    config.write_text(
        f"train_data_dir: {ROOT / 'data/demo'}\nmetadata_path: {ROOT / 'data/demo/metadata.csv'}\n"
        f"base_model: {FIXTURE}\nresolution: 64\nbatch_size: 2\nmax_train_steps: 4\n"
        f"learning_rate: 1e-2\ntrain_text_encoder: true\ntarget_modules: kohya\nconv_lora: true\n"
        f"output_dir: {out / 'run'}\noutput_name: xl\ndevice: cpu\n"
    )
    subprocess.run(
        ["cargo", "run", "--release", "--quiet", "--bin", "train", "--", "--config", str(config)],
        cwd=ROOT,
        check=True,
    )
    return out / "run" / "xl.safetensors"


def deltas(path: Path) -> dict:
    modules: dict = {}
    for key, value in load_file(str(path)).items():
        name, part = key.split(".", 1)
        modules.setdefault(name, {})[part] = value.float()
    out = {}
    for name, m in modules.items():
        down, up = m["lora_down.weight"], m["lora_up.weight"]
        scale = m["alpha"] / down.shape[0]
        out[name] = (up.flatten(1) @ down.flatten(1)) * scale
    return out


def main() -> int:
    from diffusers import StableDiffusionXLPipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else train(Path(tmp))
        pipe = StableDiffusionXLPipeline.from_pretrained(str(FIXTURE))
        parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
        before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in parts.items()}
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(components=list(parts))
        pipe.unload_lora_weights()
        expected = deltas(path)
    failures, placed = [], set()
    for name, model in parts.items():
        after = model.state_dict()
        changed = [k for k in before[name] if k in after and not torch.equal(before[name][k], after[k])]
        for key in changed:
            # Convolutions compare as [out, in·k·k], as the deltas are computed.
            delta = (after[key] - before[name][key]).float().flatten(1)
            hits = [
                m for m, d in expected.items()
                if d.shape == delta.shape and torch.allclose(d, delta, atol=1e-4, rtol=1e-3)
            ]
            if len(hits) == 1:
                placed.add(hits[0])
            else:
                failures.append(f"{name}.{key}: changed by {len(hits)} modules' deltas")
        print(f"{name}: {len(changed)} weights changed")
    zero = sorted(m for m, d in expected.items() if not d.any())
    missing = sorted(set(expected) - placed - set(zero))
    failures += [f"{m}: not placed on any layer" for m in missing]
    print(f"{len(expected)} modules: {len(placed)} placed by value, {len(zero)} with a zero delta")
    for m in zero:
        print(f"  zero delta: {m}")
    for f in failures:
        print(f"FAIL {f}")
    print("PASS" if not failures else f"{len(failures)} failure(s)")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
