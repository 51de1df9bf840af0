#!/usr/bin/env python3
"""Generate the bundled demo dataset: data/demo/ (small "neon wireframe city at night" images and
metadata.csv).

Requirements: Python 3.9+, Pillow >= 9, numpy >= 1.22 (nothing else; no network).

Usage (from the repository root):
    python tools/make_demo_data.py [--out data/demo] [--seed 1234]

Output is deterministic for a given seed (and Pillow's bundled zlib/libjpeg): 24 images, most
128x128, a few 128x96 and 96x128 to exercise non-square resizing and buckets, PNG and JPEG mixed,
each a procedural night city: a dark gradient sky with stars, a glowing perspective grid floor, and
buildings outlined in neon magenta/cyan with lit windows. A third are JPEG, a third 8-bit
palette PNG, a third RGB PNG. metadata.csv (`filename,prompt`, LF line
ends, RFC 4180 quoting) describes each picture from the choices that drew it, so the captions vary
with the pictures; several contain commas inside quotes. The whole folder stays well under 500 KB.
"""

import argparse
import csv
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Supersampling factor: draw large, then downscale with a Lanczos filter for smooth lines.
SUPERSAMPLE = 4

PALETTES = {
    # name: (outline colour A, outline colour B, sky top, sky horizon)
    "magenta and cyan": ((255, 40, 200), (40, 230, 255), (8, 4, 28), (70, 10, 80)),
    "pink and teal": ((255, 90, 160), (30, 220, 190), (5, 10, 30), (60, 20, 70)),
    "violet and electric blue": ((190, 70, 255), (60, 140, 255), (6, 4, 24), (40, 10, 90)),
    "hot pink and lime": ((255, 50, 140), (160, 255, 60), (4, 8, 20), (50, 10, 60)),
}

SIZES = [(128, 128)] * 18 + [(128, 96)] * 3 + [(96, 128)] * 3


def sky(width, height, horizon, top, bottom):
    """Vertical gradient from `top` at the top edge to `bottom` at the horizon, dark below."""
    y = np.arange(height, dtype=np.float32)[:, None, None]
    t = np.clip(y / max(horizon, 1), 0.0, 1.0)
    colours = np.array(top, np.float32) * (1 - t) + np.array(bottom, np.float32) * t
    below = y > horizon
    colours = np.where(below, np.array(bottom, np.float32) * 0.25, colours)
    return np.broadcast_to(colours, (height, width, 3)).copy()


def draw_scene(rng, width, height, palette_name):
    """Draws one city at SUPERSAMPLE x the size; returns (RGB image, caption parts)."""
    a, b, top, bottom = PALETTES[palette_name]
    W, H = width * SUPERSAMPLE, height * SUPERSAMPLE
    horizon = int(H * rng.uniform(0.55, 0.7))
    base = sky(W, H, horizon, top, bottom)
    parts = {}

    # Stars: a sprinkling of small dots in the upper sky.
    stars = rng.choice([0, 12, 30])
    for _ in range(stars):
        x, y = rng.randrange(W), rng.randrange(int(horizon * 0.7))
        v = rng.uniform(120, 255)
        base[y : y + SUPERSAMPLE // 2 + 1, x : x + SUPERSAMPLE // 2 + 1] = v
    parts["stars"] = stars > 0

    glow = Image.new("RGB", (W, H))
    sharp = Image.new("RGB", (W, H))
    gd, sd = ImageDraw.Draw(glow), ImageDraw.Draw(sharp)
    line = max(1, SUPERSAMPLE // 2)

    # A moon, sometimes: painted into the sky so that buildings stand in front of it.
    parts["moon"] = rng.random() < 0.4
    if parts["moon"]:
        r = int(H * rng.uniform(0.06, 0.1))
        cx, cy = rng.randrange(r, W - r), rng.randrange(r, max(r + 1, horizon // 2))
        moon = Image.new("L", (W, H))
        ImageDraw.Draw(moon).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        halo = np.asarray(moon.filter(ImageFilter.GaussianBlur(r // 2)), np.float32) / 255.0
        disk = np.asarray(moon, np.float32)[:, :, None] / 255.0
        base = base * (1 - disk) + disk * np.array((235, 225, 255), np.float32)
        base = base + halo[:, :, None] * np.array((60, 40, 90), np.float32)

    # The perspective grid floor, converging on a vanishing point on the horizon.
    grid = a if rng.random() < 0.5 else b
    parts["grid"] = grid
    vx = W // 2 + rng.randint(-W // 6, W // 6)
    for i in range(-12, 13):
        x_bottom = vx + i * W // 6
        for d in (gd, sd):
            d.line([(vx, horizon), (x_bottom, H)], fill=grid, width=line)
    depth = 1.0
    while depth < 40:
        y = horizon + int((H - horizon) / depth)
        for d in (gd, sd):
            d.line([(0, y), (W, y)], fill=grid, width=line)
        depth *= 1.45

    # Buildings: dark blocks outlined in neon, standing on the horizon, back to front.
    count = rng.choice([5, 8, 12])
    parts["density"] = {5: "sparse", 8: "", 12: "dense"}[count]
    parts["tower"] = False
    for _ in range(count):
        bw = int(W * rng.uniform(0.08, 0.2))
        bh = int(horizon * rng.uniform(0.25, 0.85))
        x0 = rng.randrange(-bw // 2, W - bw // 2)
        y0 = horizon - bh
        colour = a if rng.random() < 0.55 else b
        box = [x0, y0, x0 + bw, horizon]
        base[max(y0, 0) : horizon, max(x0, 0) : max(x0 + bw, 0)] *= 0.15
        sd.rectangle(box, outline=colour, width=line)
        gd.rectangle(box, outline=colour, width=line * 2)
        if bh > horizon * 0.7:
            # A spire on tall towers.
            parts["tower"] = True
            mid = x0 + bw // 2
            for d in (gd, sd):
                d.line([(mid, y0), (mid, y0 - bh // 6)], fill=colour, width=line)
        # Lit windows: a grid of small dots, some on.
        step = 3 * SUPERSAMPLE
        for wy in range(y0 + step, horizon - step, step):
            for wx in range(x0 + step, x0 + bw - step // 2, step):
                if rng.random() < 0.35:
                    lit = (255, 220, 120) if rng.random() < 0.6 else colour
                    sd.rectangle([wx, wy, wx + SUPERSAMPLE, wy + SUPERSAMPLE], fill=lit)

    # Compose: sky, then the blurred glow and the sharp lines added like light.
    blur = np.asarray(glow.filter(ImageFilter.GaussianBlur(3 * SUPERSAMPLE)), np.float32)
    lines = np.asarray(sharp, np.float32)
    mist = rng.random() < 0.3
    parts["haze"] = mist
    out = base + 1.6 * blur + lines
    if mist:
        y = np.arange(H, dtype=np.float32)[:, None, None]
        band = np.exp(-(((y - horizon) / (0.08 * H)) ** 2)) * 70.0
        out = out + band * np.array(grid, np.float32) / 255.0
    out = np.clip(out, 0, 255).astype(np.uint8)
    image = Image.fromarray(out, "RGB").resize((width, height), Image.LANCZOS)
    return image, parts


def caption(rng, palette_name, parts):
    """A caption from the drawing choices; some with commas, some as prose."""
    subject, article = rng.choice(
        [
            ("neon wireframe city at night", "a "),
            ("wireframe skyline at night", "a "),
            ("retro synthwave city at night", "a "),
            ("neon outlined skyscrapers at night", ""),
        ]
    )
    details = [f"{palette_name} neon"]
    details.append("glowing grid floor")
    if parts["density"]:
        details.append(f"{parts['density']} skyline")
    if parts["tower"]:
        details.append("tall tower with a spire")
    if parts["moon"]:
        details.append("pale moon")
    if parts["stars"]:
        details.append("starry sky")
    if parts["haze"]:
        details.append("misty horizon")
    if rng.random() < 0.5:
        # Tag style: comma-separated (quoted in the CSV).
        return ", ".join([subject] + details)
    # Prose style, no commas.
    return f"{article}{subject} with {' and '.join(details[:2])}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo", type=Path)
    parser.add_argument("--seed", default=1234, type=int)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    palettes = list(PALETTES)
    sizes = SIZES[:]
    rng.shuffle(sizes)
    for i, (width, height) in enumerate(sizes, start=1):
        palette = palettes[(i - 1) % len(palettes)]
        image, parts = draw_scene(rng, width, height, palette)
        if i % 3 == 0:
            name = f"city_{i:02d}.jpg"
            image.save(args.out / name, "JPEG", quality=88, optimize=False)
        elif i % 3 == 1:
            # Palette PNGs (also exercise the palette-to-RGB conversion of the loader).
            name = f"city_{i:02d}.png"
            paletted = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            paletted.save(args.out / name, "PNG", optimize=True)
        else:
            name = f"city_{i:02d}.png"
            image.save(args.out / name, "PNG", optimize=True)
        rows.append((name, caption(rng, palette, parts)))

    with open(args.out / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filename", "prompt"])
        writer.writerows(rows)
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"wrote {len(rows)} images and metadata.csv to {args.out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
