#!/usr/bin/env python3
"""Generate the fixtures `auto_label`'s tests compare against (tests/fixtures/clip/).

Writes (paths relative to the repository root):

* ``tests/fixtures/clip/tiny-clip/``  a tiny random ``CLIPModel`` saved by transformers
  (``config.json``, ``model.safetensors``), its ``preprocessor_config.json`` (shortest edge 32,
  crop 32) and a tiny CLIP BPE tokenizer (the real merges truncated, vocabulary 1000).
* ``tests/fixtures/clip/tiny-blip/``  a tiny random ``BlipForConditionalGeneration`` (image 32 px),
  its ``preprocessor_config.json`` and a tiny BERT WordPiece tokenizer (64 tokens, ``[DEC]`` = 62).
* ``tests/fixtures/clip/images/*.png``  three synthetic pictures of different shapes.
* ``tests/fixtures/clip/reference.safetensors``  what transformers computes from them:
  - ``clip.pixel_values``          tiny CLIP's processor output for every image, ``[N, 3, 32, 32]``
  - ``clip.input_ids``             ``CLIPTokenizer`` ids of ``PHRASES`` (padded to 77)
  - ``clip.text_embeds``/``clip.image_embeds``   ``CLIPModel(...)`` outputs (normalised)
  - ``clip.text_features``/``clip.image_features``  ``get_text_features``/``get_image_features``
  - ``clip.logits_per_image``      ``[N, len(PHRASES)]``
  - ``default224.<image>.crop``    default ``CLIPImageProcessor()`` (short side 224, crop 224):
    the uint8 picture after resize + centre crop, every 4th row and column, ``[56, 56, 3]``
  - ``default224.<image>.row``/``.column``   the full middle row / column of that crop (uint8)
  - ``default224.<image>.resized`` the size after the resize, ``[height, width]`` (int64)
  - ``default224.<image>.pixel_values``      the final normalised tensor, every 8th pixel
  - ``blip.pixel_values``          tiny BLIP's processor output (resize to 32 x 32, no crop)
  - ``blip.prefix``/``blip.logits`` decoder logits for a fixed id prefix on image 0
  - ``blip.generated``             greedy ``generate(max_new_tokens=BLIP_NEW_TOKENS)`` ids, padded
    with -1; the decoded texts are in the metadata (``blip.captions``, JSON)
* ``tests/fixtures/clip/README.md``  what is here and how it was made.

Everything is seeded and computed on one CPU thread; two runs give byte-identical files.
Usage: ``python tools/make_clip_fixtures.py`` (the venv of tools/README.md; needs open_clip_torch
for the CLIP merges, as make_fixtures.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import (  # noqa: E402
    TINY_MERGES,
    check,
    randomize_,
    save_st,
    sha256_file,
    versions,
    write_clip_tokenizer,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "clip"

PHRASES = [
    "neon-lit city street at night",
    "a portrait of a woman, soft light",
    "ink wash painting",
    "product shot on a white background",
    "Anime Key Visual!!",
    # longer than 75 tokens: the tokenizer truncates, the pooled output sits on the kept EOS
    "cyberpunk " * 40,
]
# (name, width, height): a landscape smaller than 224 on its short side (upscaled at 224), a
# portrait, and a picture larger than 224 (downscaled), all downscaled to 32 for the tiny models.
IMAGES = [("landscape", 300, 200), ("portrait", 150, 260), ("large", 333, 250)]
BLIP_NEW_TOKENS = 12
BLIP_PREFIX = [62, 10, 11, 12]


def picture(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients, sharp-edged shapes and a band of noise: every part of a resampling
    filter (flat areas, edges, high frequencies) shows in the output."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.zeros((height, width, 3))
    img[..., 0] = 255 * x / (width - 1)
    img[..., 1] = 255 * y / (height - 1)
    img[..., 2] = 127 + 120 * np.sin(x / 7.0) * np.cos(y / 11.0)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 20), rng.integers(0, height - 20)
        w, h = rng.integers(5, 60), rng.integers(5, 60)
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3)
    band = slice(height // 3, height // 3 + 12)
    img[band] = rng.integers(0, 256, img[band].shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_images() -> list[Image.Image]:
    folder = OUT / "images"
    folder.mkdir(parents=True)
    images = []
    for seed, (name, width, height) in enumerate(IMAGES):
        Image.fromarray(picture(width, height, seed)).save(folder / f"{name}.png", optimize=True)
        # what the Rust side reads: the file, decoded again
        images.append(Image.open(folder / f"{name}.png").convert("RGB"))
    return images


# --------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------


def make_clip(images: list[Image.Image]) -> dict:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = OUT / "tiny-clip"
    write_clip_tokenizer(folder, TINY_MERGES, pad_token="<|endoftext|>")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    config = CLIPConfig(
        text_config=dict(
            vocab_size=1000,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=998,
            eos_token_id=999,
            pad_token_id=999,
        ),
        # another width, activation and head size than the text tower: a mix-up shows
        vision_config=dict(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            hidden_act="gelu",
        ),
        projection_dim=12,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    randomize_(model, 6001)
    with torch.no_grad():
        model.logit_scale.fill_(2.6592)
    model.save_pretrained(str(folder))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(str(folder))

    reloaded = CLIPModel.from_pretrained(str(folder)).eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        check(k == k2 and torch.equal(a, b), f"tiny CLIP reload changed {k}")

    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    ids = tokenizer(PHRASES, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = reloaded(input_ids=ids, pixel_values=pixel_values)
        text_features = reloaded.get_text_features(input_ids=ids).pooler_output
        image_features = reloaded.get_image_features(pixel_values=pixel_values).pooler_output
    check(
        torch.allclose(out.text_embeds, text_features / text_features.norm(dim=-1, keepdim=True), atol=1e-6),
        "text_embeds are the normalised text features",
    )
    return {
        "clip.pixel_values": pixel_values,
        "clip.input_ids": ids.to(torch.int64),
        "clip.text_embeds": out.text_embeds,
        "clip.image_embeds": out.image_embeds,
        "clip.text_features": text_features,
        "clip.image_features": image_features,
        "clip.logits_per_image": out.logits_per_image,
    }


def default_224(images: list[Image.Image]) -> dict:
    """The default processor's geometry and pixels (what openai/clip-vit-large-patch14 uses)."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import SizeDict

    processor = CLIPImageProcessor()
    check(processor.size == {"shortest_edge": 224} and processor.resample == 3, "default processor changed")
    out = {}
    for (name, _, _), image in zip(IMAGES, images):
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        resized = processor.resize(tensor, size=SizeDict(shortest_edge=224), resample=processor.resample)
        crop = processor.center_crop(resized, size=SizeDict(height=224, width=224))
        check(crop.dtype == torch.uint8, "the resize works on uint8 pixels")
        full = processor(images=image, return_tensors="pt")["pixel_values"][0]
        mean = torch.tensor(processor.image_mean).view(3, 1, 1)
        std = torch.tensor(processor.image_std).view(3, 1, 1)
        check(torch.allclose(full, (crop.float() / 255 - mean) / std, atol=1e-5), "normalisation")
        hwc = crop.permute(1, 2, 0).contiguous()
        out[f"default224.{name}.crop"] = hwc[::4, ::4].contiguous()
        out[f"default224.{name}.row"] = hwc[112].contiguous()
        out[f"default224.{name}.column"] = hwc[:, 112].contiguous()
        out[f"default224.{name}.resized"] = torch.tensor(list(resized.shape[-2:]), dtype=torch.int64)
        out[f"default224.{name}.pixel_values"] = full[:, ::8, ::8].contiguous()
    return out


# --------------------------------------------------------------------------------------------------
# BLIP
# --------------------------------------------------------------------------------------------------

BLIP_WORDS = [
    "a", "photo", "of", "city", "street", "at", "night", "neon", "woman", "portrait",
    "painting", "ink", "car", "red", "blue", "with", "and", "the", "on", "in",
    "building", "light", "##s", "##ing", "##ed", "sky", "cat", "dog", "tree", "table",
    "white", "black", "girl", "man", "view", "close", "up", "shot", ".", ",",
    "there", "is", "an", "image", "art", "anime", "style", "arafed", "wall", "sign",
    "rain", "road", "glow", "old", "young", "small", "large",
]


def write_blip_tokenizer(folder: Path):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BLIP_WORDS + ["[DEC]", "[ENC]"]
    check(len(vocab) == 64 and vocab.index("[DEC]") == 62, f"BLIP vocabulary has {len(vocab)} tokens")
    tok = BertTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        do_lower_case=True,
        bos_token="[DEC]",
        additional_special_tokens=["[ENC]"],
    )
    tok.save_pretrained(str(folder))
    check(tok.convert_tokens_to_ids("[DEC]") == 62 and len(tok) == 64, "[DEC] id, vocabulary size")
    check(tok("a photo of the city")["input_ids"] == [2, 5, 6, 7, 22, 8, 3], "WordPiece ids")
    return tok


def make_blip(images: list[Image.Image]) -> tuple[dict, dict]:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor

    folder = OUT / "tiny-blip"
    folder.mkdir(parents=True)
    tok = write_blip_tokenizer(folder)
    config = BlipConfig(
        text_config=dict(
            vocab_size=64,
            hidden_size=16,
            encoder_hidden_size=24,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=40,
            bos_token_id=62,
            sep_token_id=3,
            pad_token_id=0,
            eos_token_id=3,
        ),
        vision_config=dict(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
        image_text_hidden_size=16,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    randomize_(model, 6002)
    model.save_pretrained(str(folder))
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(str(folder))
    reloaded = BlipForConditionalGeneration.from_pretrained(str(folder)).eval()

    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    prefix = torch.tensor([BLIP_PREFIX])
    with torch.no_grad():
        image_embeds = reloaded.vision_model(pixel_values=pixel_values[:1])[0]
        logits = reloaded.text_decoder(
            input_ids=prefix, encoder_hidden_states=image_embeds, return_dict=True
        ).logits
        generated = reloaded.generate(
            pixel_values=pixel_values, max_new_tokens=BLIP_NEW_TOKENS, num_beams=1, do_sample=False
        )
    captions = [tok.decode(row, skip_special_tokens=True) for row in generated]
    padded = torch.full((generated.shape[0], BLIP_NEW_TOKENS + 1), -1, dtype=torch.int64)
    padded[:, : generated.shape[1]] = generated
    return (
        {
            "blip.pixel_values": pixel_values,
            "blip.prefix": prefix.to(torch.int64),
            "blip.logits": logits,
            "blip.generated": padded,
        },
        {"blip.captions": json.dumps(captions)},
    )


# --------------------------------------------------------------------------------------------------


def write_readme(files: list[Path], meta: dict) -> None:
    rows = "\n".join(
        f"| `{p.relative_to(OUT)}` | {p.stat().st_size} | `{sha256_file(p)[:16]}` |" for p in files
    )
    text = f"""# auto_label fixtures

Generated by `tools/make_clip_fixtures.py` — do not edit by hand, regenerate instead (this
README is generated too). Seeded, one CPU thread; two runs give byte-identical files.

- `tiny-clip/`: a random `CLIPModel` (text 16 wide, vision 24 wide with GELU, projection 12,
  image 32 px in 8 px patches) saved by transformers, with the truncated CLIP tokenizer
  (vocabulary 1000: `<|startoftext|>` 998, `<|endoftext|>` 999) and a `CLIPImageProcessor`
  config with shortest edge 32 and crop 32.
- `tiny-blip/`: a random `BlipForConditionalGeneration` (vision 24 wide, text decoder 16 wide,
  vocabulary 64 with `[DEC]` = 62 as BOS and `[SEP]` = 3 as end), saved by transformers 5, which
  leaves out the tied LM-head weight (`text_decoder.cls.predictions.decoder.weight` = the word
  embeddings); a BERT WordPiece tokenizer; a `BlipImageProcessor` resizing to 32 x 32.
- `images/`: synthetic pictures (gradients, sharp rectangles, a band of noise) of three shapes.
- `reference.safetensors`: transformers' outputs for them; the tensor list is in the script's
  docstring, the metadata holds the package versions and BLIP's decoded captions.

Processor references are computed with transformers 5's default `CLIPImageProcessor`, which runs
torchvision's `resize(uint8, BICUBIC, antialias=True)` on the uint8 picture (not PIL's resize).

Versions: {json.dumps(json.loads(meta["versions"]), sort_keys=True)}

| file | bytes | sha256 (first 16) |
|---|---|---|
{rows}
"""
    (OUT / "README.md").write_text(text, encoding="utf-8")


def main() -> None:
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    images = write_images()
    reference = make_clip(images)
    reference.update(default_224(images))
    blip, blip_meta = make_blip(images)
    reference.update(blip)
    meta = {"versions": json.dumps(versions(), sort_keys=True), "phrases": json.dumps(PHRASES)}
    meta.update(blip_meta)
    reference = {k: v.detach().contiguous() for k, v in sorted(reference.items())}
    save_st(reference, OUT / "reference.safetensors", metadata=meta)
    files = sorted(p for p in OUT.rglob("*") if p.is_file() and p.name != "README.md")
    total = sum(p.stat().st_size for p in files)
    check(total < 700_000, f"fixtures are {total} bytes; keep them well under 1 MB")
    write_readme(files, meta)
    print(f"wrote {len(files)} files, {total} bytes, under {OUT}")


if __name__ == "__main__":
    main()
