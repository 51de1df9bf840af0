#!/usr/bin/env python3
"""Benchmark (not a test): auto_label's images per second on the CPU, side by side with
transformers' CLIP doing the same work on the same pictures and machine.

What is timed, on both sides, is the captioning phase: decode each picture, preprocess it
(CLIPImageProcessor), run the vision tower + projection in batches, and score the vocabulary
(one matmul against the phrase embeddings). Model loading and embedding the vocabulary are
timed separately (auto_label caches the latter on disk; here its cache is disabled).

The model is ``openai/clip-vit-large-patch14`` when it is in the Hugging Face cache; otherwise a
CLIPModel of exactly that architecture with random weights is written to a temporary folder
(same FLOPs, same speed; captions are meaningless) with the bundled tokenizer
``models/clip-tokenizer``. ``--model tests/fixtures/clip/tiny-clip`` gives a quick smoke run.

Usage (from the repository root, the venv of tools/README.md):
    cargo build --release --bin auto_label
    .venv/bin/python tools/bench_auto_label.py [--images DIR | --count 32] [--batch-size 8]
        [--threads N] [--model ID_OR_DIR] [--binary target/release/auto_label]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
LABELS = ROOT / "tools" / "labels"
DEFAULT_MODEL = "openai/clip-vit-large-patch14"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def vocabulary() -> list[str]:
    phrases = []
    for path in sorted(LABELS.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                phrases.append(" ".join(line.split()))
    return phrases


def synthetic_images(folder: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(768, 512), (512, 768), (640, 640), (1024, 683)]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], axis=-1).astype(np.uint8)
        img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:04d}.jpg", quality=90)


def resolve_model(spec: str, workdir: Path) -> tuple[Path, str]:
    """A local CLIP folder for `spec`: the folder itself, the hub cache snapshot, or (for the
    default id when it is not downloaded) a random model of the same architecture."""
    path = Path(spec)
    if path.is_dir():
        return path, f"{spec} (local folder)"
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec, local_files_only=True))
        return folder, f"{spec} (Hugging Face cache)"
    except Exception:
        if spec != DEFAULT_MODEL:
            raise SystemExit(f"{spec} is neither a folder nor in the Hugging Face cache")
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = workdir / "random-clip-vit-large-patch14"
    config = CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                         num_hidden_layers=12, projection_dim=768, eos_token_id=49407),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                           num_hidden_layers=24, patch_size=14, image_size=224, projection_dim=768),
        projection_dim=768,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(folder))
    CLIPImageProcessor().save_pretrained(str(folder))
    for f in (ROOT / "models" / "clip-tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder, f"random weights with {DEFAULT_MODEL}'s architecture (not downloaded)"


def bench_transformers(folder: Path, images: list[Path], phrases: list[str], batch: int) -> dict:
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    t0 = time.perf_counter()
    model = CLIPModel.from_pretrained(str(folder)).eval()
    processor = CLIPImageProcessor.from_pretrained(str(folder))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    load = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.no_grad():
        text = []
        for i in range(0, len(phrases), 64):
            ids = tokenizer(phrases[i : i + 64], padding="max_length", max_length=77,
                            truncation=True, return_tensors="pt")
            f = model.get_text_features(input_ids=ids["input_ids"]).pooler_output
            text.append(f / f.norm(dim=-1, keepdim=True))
        text = torch.cat(text)
    vocab_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            pictures = [Image.open(p).convert("RGB") for p in images[i : i + batch]]
            pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
            f = model.get_image_features(pixel_values=pixels).pooler_output
            f = f / f.norm(dim=-1, keepdim=True)
            scores = f @ text.T
            scores.argmax(dim=-1)
    caption_time = time.perf_counter() - t0
    return {"load_s": load, "vocab_s": vocab_time, "caption_s": caption_time,
            "images_per_s": len(images) / caption_time}


def bench_rust(binary: Path, folder: Path, image_dir: Path, batch: int, threads: int) -> dict:
    out_csv = image_dir.parent / "bench_metadata.csv"
    if out_csv.exists():
        out_csv.unlink()
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [str(binary), "--input", str(image_dir), "--output", str(out_csv), "--model", str(folder),
           "--device", "cpu", "--batch-size", str(batch), "--no-cache"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"auto_label failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    match = re.search(r"captioned (\d+) image\(s\) in ([\d.]+) s \(([\d.]+) images/s\)", proc.stdout)
    if not match:
        raise SystemExit(f"no throughput line in auto_label's output:\n{proc.stdout}")
    return {"wall_s": wall, "caption_s": float(match.group(2)), "images_per_s": float(match.group(3))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="folder of pictures (default: synthetic ones)")
    parser.add_argument("--count", type=int, default=32, help="synthetic pictures to make")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--binary", type=Path, default=ROOT / "target" / "release" / "auto_label")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if not args.binary.is_file():
        raise SystemExit(f"{args.binary} not found; run `cargo build --release --bin auto_label` first")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image_dir = work / "images"
        image_dir.mkdir()
        if args.images:
            for p in sorted(args.images.iterdir()):
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    shutil.copy(p, image_dir / p.name)
        else:
            synthetic_images(image_dir, args.count)
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        folder, described = resolve_model(args.model, work)
        phrases = vocabulary()
        print(f"model: {described}")
        print(f"{len(images)} pictures, {len(phrases)} phrases, batch {args.batch_size}, "
              f"{args.threads} threads, torch {torch.__version__}")
        py = bench_transformers(folder, images, phrases, args.batch_size)
        rs = bench_rust(args.binary, folder, image_dir, args.batch_size, args.threads)
        print()
        print(f"{'':28}{'images/s':>10}{'captioning s':>14}")
        print(f"{'transformers (PyTorch)':28}{py['images_per_s']:>10.2f}{py['caption_s']:>14.1f}")
        print(f"{'auto_label (candle)':28}{rs['images_per_s']:>10.2f}{rs['caption_s']:>14.1f}")
        print()
        print(f"transformers: load {py['load_s']:.1f} s, vocabulary {py['vocab_s']:.1f} s; "
              f"auto_label: whole run {rs['wall_s']:.1f} s (load + vocabulary + captioning)")
        print(json.dumps({"transformers": py, "auto_label": rs, "model": described,
                          "pictures": len(images), "batch": args.batch_size, "threads": args.threads}))


if __name__ == "__main__":
    sys.exit(main())
