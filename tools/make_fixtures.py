#!/usr/bin/env python3
"""Generate the reference fixtures the Rust tests compare against.

Writes (paths relative to the repository root):

* ``models/clip-tokenizer/``  the real CLIP BPE tokenizer (49408 tokens), built from the BPE merges file
  shipped in the PyPI package ``open_clip_torch`` exactly as OpenAI CLIP builds its vocabulary.
* ``tests/fixtures/tokenizer_cases.json``  transformers' ``CLIPTokenizer`` ids for tricky captions.
* ``tests/fixtures/tiny-sd1/`` and ``tiny-sd2/``  tiny random diffusers pipelines (folder layout),
  ``tiny-sd{1,2}.safetensors`` the same weights in the original single-file (LDM) layout,
  ``tiny-sd{1,2}.yaml`` the LDM inference configs, ``tiny-sd1.ckpt`` (torch pickle),
  ``tiny-sd{1,2}.reference.safetensors`` inputs and reference outputs.
* ``tests/fixtures/noise_schedules.safetensors``  ``alphas_cumprod`` of diffusers' DDPM schedules.
* ``tests/fixtures/README.md``  the inventory (generated from the files themselves).

Everything is seeded and computed on one CPU thread; running the script twice gives byte-identical
files. The single files are made by our own diffusers->LDM mapping and then proved by loading them
back with diffusers' ``from_single_file`` (offline) and comparing every tensor with the folder.

Usage: ``python tools/make_fixtures.py`` (from anywhere; see tools/README.md for the venv).

Package versions used to generate the committed files (also stored in each reference file's
metadata and in tests/fixtures/README.md):
    python 3.11, torch 2.15.0 (CPU), diffusers 0.42.1, transformers 5.23.0, tokenizers 0.23.3,
    safetensors 0.8.0, numpy 2.4.6, open_clip_torch 3.3.0, accelerate 1.15.0, PyYAML 6.0.3
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CLIP_TOKENIZER_DIR = ROOT / "models" / "clip-tokenizer"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77
# merges kept by the tiny tokenizer: 256 byte tokens + 256 byte</w> tokens + 486 merges + 2 specials = 1000
TINY_MERGES = 486

PROMPTS = [
    "a photo of an astronaut riding a horse",
    "a cyberpunk city at night, neon lights, (rain:1.2), it's wet",
]
UNET_TIMESTEPS = [10, 700]
NOISE_TIMESTEPS = [37, 999]


# --------------------------------------------------------------------------------------------------
# utilities
# --------------------------------------------------------------------------------------------------


def versions() -> dict:
    import accelerate
    import diffusers
    import safetensors
    import tokenizers
    import transformers

    try:
        import open_clip

        oc = open_clip.__version__
    except Exception:  # pragma: no cover - only for the record
        oc = "missing"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "accelerate": accelerate.__version__,
        "PyYAML": yaml.__version__,
        "open_clip_torch": oc,
    }


def name_seed(base: int, name: str) -> int:
    """A stable seed for one tensor, independent of iteration order."""
    digest = hashlib.sha256(f"{base}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def randn(seed: int, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def randomize_(module: torch.nn.Module, base_seed: int) -> None:
    """Replace every parameter with seeded random values so no tensor is trivial (no 1/0 norms,
    no zero biases): a loader that drops or swaps a tensor then changes the outputs.

    weights (>= 2-D, incl. embeddings): N(0, 1/fan_in); 1-D weights (norms): 1 + 0.1 N; biases: 0.05 N.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            g = randn(name_seed(base_seed, name), p.shape)
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(g / fan_in**0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * g)
            else:
                p.copy_(0.05 * g)


def contiguous(sd: dict) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def save_st(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors file with a reproducible header: the library writes ``__metadata__`` from a hash
    map, so its key order (and the file's bytes) changes from run to run; sort it."""
    import safetensors.torch

    data = safetensors.torch.save(tensors, metadata=metadata)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    fixed = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | dict(entries)
    hb = json.dumps(fixed, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + data[8 + n :])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj, indent=2) -> None:
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise SystemExit(f"fixture check failed: {msg}")


# --------------------------------------------------------------------------------------------------
# CLIP tokenizer
# --------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict:
    """OpenAI CLIP's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_merges() -> list[str]:
    """The 48894 merges OpenAI CLIP uses, from the BPE file shipped in open_clip_torch."""
    import open_clip.tokenizer as oct

    path = Path(oct.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a header; same slice as CLIP's SimpleTokenizer
    check(len(merges) == 48894, f"expected 48894 merges, got {len(merges)}")
    return merges


def write_clip_tokenizer(out: Path, n_merges: int | None, pad_token: str) -> None:
    """vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json and tokenizer.json.

    Vocabulary order is OpenAI's: 256 byte tokens, the same 256 with ``</w>``, one token per merge,
    then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    from transformers import CLIPTokenizer

    merges = clip_merges()
    if n_merges is not None:
        merges = merges[:n_merges]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    check(len(set(vocab)) == len(vocab), "duplicate vocabulary entries")

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_json(out / "vocab.json", {t: i for i, t in enumerate(vocab)}, indent=None)
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    write_json(
        out / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": BOS,
            "do_lower_case": True,
            "eos_token": EOS,
            "errors": "replace",
            "model_max_length": MAX_LENGTH,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": EOS,
        },
    )
    write_json(
        out / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS},
    )
    # tokenizer.json = transformers' fast tokenizer built from exactly these vocab/merges files
    tok = CLIPTokenizer.from_pretrained(str(out))
    tok.backend_tokenizer.save(str(out / "tokenizer.json"), pretty=False)

    check(len(tok) == len(vocab), f"tokenizer size {len(tok)} != {len(vocab)}")
    check(tok.bos_token_id == len(vocab) - 2 and tok.eos_token_id == len(vocab) - 1, "special token ids")


def load_tokenizer(path: Path, pad_token: str | None = None):
    from transformers import CLIPTokenizer

    kwargs = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer.from_pretrained(str(path), **kwargs)


def encode(tok, texts) -> list[list[int]]:
    return tok(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids


TOKENIZER_CASES = [
    "a photo of an astronaut riding a horse on the moon",
    "café crème, naïve résumé, Ångström, 東京の夜景, 한국어, 🚀🌃✨ neon",
    "e\u0301cole (decomposed accent: NFC turns it into école)",
    "Hello, world! What?! ... -- a-b_c/d\\e; x:y {z} <w> @#$%^&*+=~`|",
    "(neon:1.2), [ink], ((masterpiece)), {best quality}, (blurry:0.8), <lora:cyberpunk_v1:0.8>",
    "  multiple   spaces\n\nnew\nlines\tand\t\ttabs  ",
    "UPPER CASE and MiXeD CaSe Words",
    "1girl, 2 cats, 1024x768, 3.14159, 2024-01-31, 100%",
    "it's a dog's life, I'm sure they'll've done it, don't we'd ITS 'quoted'",
    "",
    "tom &amp; jerry &lt;3 (html entities are not unescaped by transformers)",
    "a very long caption: "
    + ", ".join(
        f"{adj} {noun}"
        for adj, noun in zip(
            ["red", "blue", "green", "tiny", "huge", "ancient", "shiny", "dark", "misty", "golden"] * 4,
            ["castle", "river", "forest", "robot", "dragon", "city", "mountain", "ship", "garden", "tower"] * 4,
        )
    ),
    "before <|endoftext|> after <|startoftext|> end",
    "masterpiece,best quality,1girl,solo,long_hair,looking_at_viewer,smile",
]


def write_tokenizer_cases(path: Path) -> list[dict]:
    sd1 = load_tokenizer(CLIP_TOKENIZER_DIR)
    sd2 = load_tokenizer(CLIP_TOKENIZER_DIR, pad_token="!")
    check(sd1.pad_token_id == 49407 and sd2.pad_token_id == 0, "pad ids")

    # the same ids must come out when transformers builds the tokenizer from vocab.json + merges.txt only
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(CLIP_TOKENIZER_DIR / f, Path(tmp) / f)
        slow_path = load_tokenizer(Path(tmp))
        check(encode(slow_path, TOKENIZER_CASES) == encode(sd1, TOKENIZER_CASES), "tokenizer.json vs vocab/merges")

    # and OpenAI's own tokenizer (open_clip's SimpleTokenizer) agrees on the plain cases
    import open_clip

    simple = open_clip.SimpleTokenizer()
    for text in (TOKENIZER_CASES[0], TOKENIZER_CASES[6], TOKENIZER_CASES[7], TOKENIZER_CASES[8]):
        theirs = simple(text)[0].tolist()
        ours = encode(sd1, [text])[0]
        n = ours.index(49407) + 1
        check(theirs[:n] == ours[:n], f"open_clip disagrees on {text!r}: {theirs[:n]} vs {ours[:n]}")

    cases = []
    ids1 = encode(sd1, TOKENIZER_CASES)
    ids2 = encode(sd2, TOKENIZER_CASES)
    for text, a, b in zip(TOKENIZER_CASES, ids1, ids2):
        check(len(a) == MAX_LENGTH and len(b) == MAX_LENGTH, "length 77")
        check(a[0] == 49406 and 49407 in a, "bos/eos")
        cases.append({"text": text, "sd1": a, "sd2": b})
    long_case = cases[11]
    check(long_case["sd1"][-1] == 49407 and 49407 not in long_case["sd1"][1:-1], "long caption must be truncated")
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i, c in enumerate(cases):
            f.write("  " + json.dumps(c, ensure_ascii=False) + ("," if i + 1 < len(cases) else "") + "\n")
        f.write("]\n")
    return cases


# --------------------------------------------------------------------------------------------------
# tiny model configurations
# --------------------------------------------------------------------------------------------------

VARIANTS = {
    "tiny-sd1": {
        "seed": 1,
        "unet": dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            block_out_channels=[32, 32, 32],
            layers_per_block=2,
            attention_head_dim=8,  # diffusers reads this as the NUMBER of heads (8 heads everywhere)
            cross_attention_dim=64,
            norm_num_groups=32,
            use_linear_projection=False,
            upcast_attention=False,
        ),
        "vae": dict(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
            block_out_channels=[32, 32, 32],
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            scaling_factor=0.18215,
        ),
        "text": dict(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=1,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=64,
            bos_token_id=998,
            eos_token_id=999,
            pad_token_id=999,
        ),
        "pad_token": EOS,
        "text_layout": "hf_clip",
        "prediction_type": "epsilon",
        "fp16_variant": True,
        "ckpt": True,
    },
    "tiny-sd2": {
        "seed": 2,
        "unet": dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            block_out_channels=[32, 32, 32, 64],
            layers_per_block=1,
            attention_head_dim=[2, 2, 2, 4],  # number of heads per block: 16 channels per head everywhere
            cross_attention_dim=128,
            norm_num_groups=32,
            use_linear_projection=True,
            upcast_attention=True,
        ),
        "vae": dict(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[32, 64],
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            scaling_factor=0.18215,
        ),
        "text": dict(
            vocab_size=1000,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            projection_dim=64,
            bos_token_id=998,
            eos_token_id=999,
            pad_token_id=0,
        ),
        "pad_token": "!",
        "text_layout": "openclip",
        "prediction_type": "v_prediction",
        "openclip_projection_dim": 64,
        "fp16_variant": False,
        "ckpt": False,
    },
}

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def build_pipeline(variant: dict, tokenizer):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    seed = variant["seed"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**variant["unet"])
    randomize_(unet, seed * 1000 + 1)
    vae = AutoencoderKL(**variant["vae"])
    randomize_(vae, seed * 1000 + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**variant["text"]))
    randomize_(text_encoder, seed * 1000 + 3)
    scheduler = DDPMScheduler(**SCHEDULER, prediction_type=variant["prediction_type"])
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for m in (unet, vae, text_encoder):
        m.eval()
    return pipe


# --------------------------------------------------------------------------------------------------
# diffusers -> LDM single-file mapping (our own; diffusers only implements the other direction)
# --------------------------------------------------------------------------------------------------

RESNET_TO_LDM = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]


def _resnet_rest(rest: str) -> str:
    for a, b in RESNET_TO_LDM:
        if rest.startswith(a):
            return b + rest[len(a) :]
    raise KeyError(f"unknown resnet tensor {rest}")


def unet_key_to_ldm(key: str, cfg: dict) -> str:
    """One diffusers UNet2DConditionModel key -> its LDM ``openaimodel.UNetModel`` key."""
    lpb = cfg["layers_per_block"]
    renamed = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
    }
    for prefix, target in renamed.items():
        if key.startswith(prefix):
            return target + key[len(prefix) :]
    m = re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key)
    if m:
        return f"middle_block.{2 * int(m[1])}.{_resnet_rest(m[2])}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"input_blocks.{(lpb + 1) * i + j + 1}.0.{_resnet_rest(rest)}"
        if kind == "attentions":
            return f"input_blocks.{(lpb + 1) * i + j + 1}.1.{rest}"
        check(rest.startswith("conv."), f"downsampler tensor {key}")
        return f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.{rest[len('conv.'):]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"output_blocks.{(lpb + 1) * i + j}.0.{_resnet_rest(rest)}"
        if kind == "attentions":
            return f"output_blocks.{(lpb + 1) * i + j}.1.{rest}"
        has_attn = cfg["up_block_types"][i].startswith("CrossAttn")
        return f"output_blocks.{(lpb + 1) * i + lpb}.{2 if has_attn else 1}.{rest}"
    raise KeyError(f"no LDM name for UNet tensor {key}")


def vae_key_to_ldm(key: str, n_blocks: int) -> str:
    """One diffusers AutoencoderKL key -> its LDM ``AutoencoderKL`` key (without ``first_stage_model.``)."""
    for side in ("encoder", "decoder"):
        for a, b in (("conv_norm_out.", "norm_out."), ("conv_in.", "conv_in."), ("conv_out.", "conv_out.")):
            if key.startswith(f"{side}.{a}"):
                return f"{side}.{b}" + key[len(side) + 1 + len(a) :]
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key

    def res(rest):
        return rest.replace("conv_shortcut.", "nin_shortcut.")

    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)", key)
    if m:
        i, rest = int(m[1]), m[4]
        if m[3] is not None:
            return f"encoder.down.{i}.block.{m[3]}.{res(rest)}"
        return f"encoder.down.{i}.downsample.{rest}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", key)
    if m:
        i, rest = n_blocks - 1 - int(m[1]), m[4]
        if m[3] is not None:
            return f"decoder.up.{i}.block.{m[3]}.{res(rest)}"
        return f"decoder.up.{i}.upsample.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{res(m[3])}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key)
    if m:
        name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
        return f"{m[1]}.mid.attn_1.{name}.{m[3]}"
    raise KeyError(f"no LDM name for VAE tensor {key}")


def check_ldm_unet_structure(single: dict) -> None:
    """diffusers' loader accepts an upsampler at either ``output_blocks.N.1`` or ``.2``, so loading
    the file back cannot catch that mistake; LDM's layout is fixed: each output block is
    (ResBlock, [SpatialTransformer], [Upsample]), each input block (ResBlock, [SpatialTransformer])
    or (Downsample,)."""
    parts: dict = {}
    for k in single:
        m = re.match(r"model\.diffusion_model\.(input|output)_blocks\.(\d+)\.(\d+)\.(.+)", k)
        if m:
            parts.setdefault((m[1], int(m[2])), {}).setdefault(int(m[3]), set()).add(m[4])
    for (side, n), subs in sorted(parts.items()):
        kinds = []
        for idx in sorted(subs):
            names = subs[idx]
            if any(x.startswith("transformer_blocks.") for x in names):
                kinds.append("attn")
            elif names <= {"conv.weight", "conv.bias"}:
                kinds.append("up")
            elif names <= {"op.weight", "op.bias"}:
                kinds.append("down")
            elif any(x.startswith("in_layers.") for x in names):
                kinds.append("res")
            else:
                kinds.append("?")
        if side == "input" and n == 0:
            check(sorted(subs) == [0] and subs[0] <= {"weight", "bias"}, "input_blocks.0.0 must be conv_in")
            continue
        if side == "input":
            allowed = [["res"], ["res", "attn"], ["down"]]
        else:
            allowed = [["res"], ["res", "attn"], ["res", "up"], ["res", "attn", "up"]]
        check(sorted(subs) == list(range(len(subs))) and kinds in allowed, f"{side}_blocks.{n} has the layout {dict(zip(sorted(subs), kinds))}")


def ldm_schedule_buffers() -> dict:
    """The DDPM buffers real LDM checkpoints carry (computed in float64 as ldm.models.diffusion.ddpm
    does, stored float32). Loaders ignore them; they are here so ours learns to ignore them too."""
    n, start, end = 1000, 0.00085, 0.012
    betas = (torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2).numpy()
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    bufs = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    out = {k: torch.tensor(v, dtype=torch.float32) for k, v in bufs.items()}
    out["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
    out["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return out


def to_single_file(pipe, variant: dict) -> dict:
    """The whole pipeline in the original Stable Diffusion checkpoint layout."""
    out = {}
    unet_cfg = dict(pipe.unet.config)
    for k, v in pipe.unet.state_dict().items():
        out["model.diffusion_model." + unet_key_to_ldm(k, unet_cfg)] = v
    check(len(out) == len(pipe.unet.state_dict()), "two UNet tensors mapped to the same LDM key")
    n_vae = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        ldm = vae_key_to_ldm(k, n_vae)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's VAE attention projections are 1x1 convs [C, C, 1, 1]
        check("first_stage_model." + ldm not in out, f"two VAE tensors mapped to {ldm}")
        out["first_stage_model." + ldm] = v

    te = pipe.text_encoder.state_dict()
    tcfg = pipe.text_encoder.config
    # transformers >= 5 saves CLIPTextModel without the `text_model.` prefix; LDM files have it
    te = {k.removeprefix("text_model."): v for k, v in te.items()}
    if variant["text_layout"] == "hf_clip":  # SD1: HF CLIP names under cond_stage_model.transformer.text_model.
        for k, v in te.items():
            out["cond_stage_model.transformer.text_model." + k] = v
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
            tcfg.max_position_embeddings, dtype=torch.int64
        )[None]
    else:  # SD2 ("openclip"): OpenCLIP names under cond_stage_model.model.
        p = "cond_stage_model.model."
        out[p + "token_embedding.weight"] = te["embeddings.token_embedding.weight"]
        out[p + "positional_embedding"] = te["embeddings.position_embedding.weight"]
        out[p + "ln_final.weight"] = te["final_layer_norm.weight"]
        out[p + "ln_final.bias"] = te["final_layer_norm.bias"]
        layers = {}
        for n in range(tcfg.num_hidden_layers):
            L = f"encoder.layers.{n}."
            layers[n] = {
                "ln_1.weight": te[L + "layer_norm1.weight"],
                "ln_1.bias": te[L + "layer_norm1.bias"],
                "attn.in_proj_weight": torch.cat([te[L + f"self_attn.{x}_proj.weight"] for x in "qkv"], 0),
                "attn.in_proj_bias": torch.cat([te[L + f"self_attn.{x}_proj.bias"] for x in "qkv"], 0),
                "attn.out_proj.weight": te[L + "self_attn.out_proj.weight"],
                "attn.out_proj.bias": te[L + "self_attn.out_proj.bias"],
                "ln_2.weight": te[L + "layer_norm2.weight"],
                "ln_2.bias": te[L + "layer_norm2.bias"],
                "mlp.c_fc.weight": te[L + "mlp.fc1.weight"],
                "mlp.c_fc.bias": te[L + "mlp.fc1.bias"],
                "mlp.c_proj.weight": te[L + "mlp.fc2.weight"],
                "mlp.c_proj.bias": te[L + "mlp.fc2.bias"],
            }
        # SD2 conditions on the penultimate OpenCLIP layer: real files carry one more resblock than
        # diffusers' text encoder has (24 vs 23). Reproduce that with one extra random resblock.
        extra = tcfg.num_hidden_layers
        layers[extra] = {
            k: randn(name_seed(variant["seed"], f"openclip.extra.{k}"), v.shape) * (
                1.0 / v.shape[1] ** 0.5 if v.ndim == 2 else 0.05
            )
            + (1.0 if k.startswith("ln_") and k.endswith("weight") else 0.0)
            for k, v in layers[0].items()
        }
        for n, tensors in layers.items():
            for k, v in tensors.items():
                out[f"{p}transformer.resblocks.{n}.{k}"] = v
        w = tcfg.hidden_size
        out[p + "text_projection"] = randn(name_seed(variant["seed"], "openclip.text_projection"), (w, variant["openclip_projection_dim"])) / w**0.5
        out[p + "logit_scale"] = torch.tensor(float(np.log(1 / 0.07)), dtype=torch.float32)

    out.update(ldm_schedule_buffers())
    check_ldm_unet_structure(out)
    return contiguous(out)


SINGLE_FILE_COMPONENTS = (
    ("unet", "unet/diffusion_pytorch_model.safetensors"),
    ("vae", "vae/diffusion_pytorch_model.safetensors"),
    ("text_encoder", "text_encoder/model.safetensors"),
)


def single_file_layout(single: dict, folder: Path) -> tuple[dict, dict]:
    """How the single file is made of the folder's tensors, so that the tests assemble it instead
    of the repository carrying both (the GPU check carries the working tree under 64 MiB).

    Found by value, not by the key mapping above (so the tests still check our loader's mapping
    against an independent one): each single-file tensor is a folder tensor with the same
    elements (reshaped: the VAE attention's 1x1 convolutions), or the rows of several stacked
    (OpenCLIP's fused q/k/v), or else an extra (the LDM schedule buffers, ``position_ids``, the
    SD2 tower's extra layer and projection), stored in ``<name>.extra.safetensors``. Returns the
    layout (``tensors``: ``[key, shape, [[component, folder key], ...]]`` sorted by key,
    component ``extra`` for extras) and the extras."""
    from safetensors.torch import load_file

    def digest(t: torch.Tensor) -> tuple:
        return (str(t.dtype), t.numel(), hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest())

    by_value: dict = {}
    for component, file in SINGLE_FILE_COMPONENTS:
        for k, v in load_file(str(folder / file)).items():
            by_value.setdefault(digest(v), (component, k))
    entries, extras = [], {}
    for key, t in sorted(single.items()):
        found = by_value.get(digest(t))
        if found is None and t.ndim >= 1 and t.shape[0] % 3 == 0 and "in_proj" in key:
            parts = [by_value.get(digest(p)) for p in t.chunk(3, 0)]
            found = parts if all(parts) else None
        elif found is not None:
            found = [found]
        if found is None:
            extras[key] = t
            found = [("extra", key)]
        entries.append([key, list(t.shape), [list(f) for f in found]])
    return {"metadata": {"format": "pt"}, "tensors": entries}, extras


def assemble_single_file(layout: dict, folder: Path, extras: dict) -> dict:
    """The single file from its layout, as the Rust test support does it (``src/fixtures.rs``)."""
    from safetensors.torch import load_file

    sources = {c: load_file(str(folder / f)) for c, f in SINGLE_FILE_COMPONENTS} | {"extra": extras}
    out = {}
    for key, shape, parts in layout["tensors"]:
        ts = [sources[c][k] for c, k in parts]
        out[key] = (torch.cat(ts, 0) if len(ts) > 1 else ts[0]).reshape(shape).contiguous()
    return out


def write_single_file_layout(name: str, single: dict, folder: Path) -> None:
    layout, extras = single_file_layout(single, folder)
    assembled = assemble_single_file(layout, folder, extras)
    check(
        set(assembled) == set(single)
        and all(assembled[k].dtype == single[k].dtype and torch.equal(assembled[k], single[k]) for k in single),
        f"{name}: the single file assembled from its layout differs",
    )
    # One tensor a line: readable diffs.
    lines = ",\n".join("  " + json.dumps(e) for e in layout["tensors"])
    text = f'{{"metadata": {json.dumps(layout["metadata"])}, "tensors": [\n{lines}\n]}}\n'
    (FIXTURES / f"{name}.layout.json").write_text(text, encoding="utf-8")
    save_st(contiguous(extras), FIXTURES / f"{name}.extra.safetensors", metadata={"format": "pt"})
    print(f"  {name}.layout.json: {len(layout['tensors'])} tensors, {len(extras)} extras")


def ldm_yaml(name: str, variant: dict) -> str:
    u, v, t = variant["unet"], variant["vae"], variant["text"]
    mc = u["block_out_channels"][0]
    mult = [c // mc for c in u["block_out_channels"]]
    # attention_resolutions lists the downsampling factors (1, 2, 4, ...) whose level has attention
    attn_res = [2**i for i, bt in enumerate(u["down_block_types"]) if bt.startswith("CrossAttn")][::-1]
    vc = v["block_out_channels"][0]
    unet_params = {
        "use_checkpoint": True,
        "image_size": 32,
        "in_channels": u["in_channels"],
        "out_channels": u["out_channels"],
        "model_channels": mc,
        "attention_resolutions": attn_res,
        "num_res_blocks": u["layers_per_block"],
        "channel_mult": mult,
    }
    if isinstance(u["attention_head_dim"], int):
        unet_params["num_heads"] = u["attention_head_dim"]
    else:
        head_channels = {c // h for c, h in zip(u["block_out_channels"], u["attention_head_dim"])}
        check(len(head_channels) == 1, "SD2-style configs need the same head width in every block")
        unet_params["num_head_channels"] = head_channels.pop()
    unet_params.update(
        {
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": u["cross_attention_dim"],
        }
    )
    if u["use_linear_projection"]:
        unet_params["use_linear_in_transformer"] = True
    unet_params["legacy"] = False

    params = {
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": 1000,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": 8,
        "channels": 4,
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": v["scaling_factor"],
        "use_ema": False,
    }
    if variant["prediction_type"] == "v_prediction":
        params["parameterization"] = "v"
    params["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params}
    params["first_stage_config"] = {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": v["latent_channels"],
            "monitor": "val/rec_loss",
            "ddconfig": {
                "double_z": True,
                "z_channels": v["latent_channels"],
                "resolution": 256,
                "in_channels": v["in_channels"],
                "out_ch": v["out_channels"],
                "ch": vc,
                "ch_mult": [c // vc for c in v["block_out_channels"]],
                "num_res_blocks": v["layers_per_block"],
                "attn_resolutions": [],
                "dropout": 0.0,
            },
            "lossconfig": {"target": "torch.nn.Identity"},
        },
    }
    openclip = variant["text_layout"] == "openclip"
    if not openclip:
        params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    else:
        params["cond_stage_config"] = {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": "penultimate"},
        }
    doc = {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}
    text_note = (
        f"CLIP text model: hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, "
        f"{t['num_attention_heads']} head(s) of 64, {t['hidden_act']}, intermediate {t['intermediate_size']}, vocab {t['vocab_size']}"
    )
    if openclip:
        text_note += f" (the file holds {t['num_hidden_layers'] + 1} OpenCLIP resblocks; the last is unused)"
    header = (
        f"# LDM inference config for {name}.safetensors (a tiny random test model, not for images).\n"
        f"# Made by tools/make_fixtures.py in the layout of stable-diffusion's "
        f"{'v2-inference-v.yaml' if openclip else 'v1-inference.yaml'}.\n"
        f"# The text encoder's size is not recorded here (as in the real files): {text_note}.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)


# --------------------------------------------------------------------------------------------------
# verification with diffusers' own loaders
# --------------------------------------------------------------------------------------------------


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    check(set(sa) == set(sb), f"{what}: key sets differ: {sorted(set(sa) ^ set(sb))[:10]}")
    for k in sa:
        check(sa[k].device.type != "meta" and sb[k].device.type != "meta", f"{what}: {k} was never loaded")
        check(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{what}: tensor {k} differs")


def verify_single_file(name: str, folder: Path, single: Path, yaml_path: Path, reference: dict) -> None:
    """Load the single file back through diffusers and compare every tensor with the folder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    ref_pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe = StableDiffusionPipeline.from_single_file(
        str(single),
        original_config=str(yaml_path),
        config=str(folder),
        local_files_only=True,
    )
    for comp in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(ref_pipe, comp), getattr(pipe, comp), f"{single.name} pipeline {comp}")
    # per-model loaders, config from the folder
    unet = UNet2DConditionModel.from_single_file(str(single), config=str(folder), subfolder="unet", local_files_only=True)
    assert_same_state(ref_pipe.unet, unet, f"{single.name} UNet2DConditionModel")
    vae = AutoencoderKL.from_single_file(str(single), config=str(folder), subfolder="vae", local_files_only=True)
    assert_same_state(ref_pipe.vae, vae, f"{single.name} AutoencoderKL")
    # the UNet and VAE built from the yaml alone compute the same outputs as the folder's
    unet_y = UNet2DConditionModel.from_single_file(str(single), original_config=str(yaml_path), local_files_only=True)
    cfg_y, cfg_f = dict(unet_y.config), dict(ref_pipe.unet.config)
    for key in ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
                "use_linear_projection", "in_channels", "out_channels"):
        check(list_or(cfg_y[key]) == list_or(cfg_f[key]), f"{yaml_path.name}: unet {key} {cfg_y[key]} != {cfg_f[key]}")
    check(list_or(heads(cfg_y)) == list_or(heads(cfg_f)), f"{yaml_path.name}: heads {heads(cfg_y)} != {heads(cfg_f)}")
    with torch.no_grad():
        out = unet_y(reference["unet.sample"], reference["unet.timesteps"], reference["unet.encoder_hidden_states"]).sample
    check(torch.allclose(out, reference["unet.out"], rtol=0, atol=1e-6), f"{yaml_path.name}: yaml-built UNet output")
    vae_y = AutoencoderKL.from_single_file(str(single), original_config=str(yaml_path), local_files_only=True)
    check(list(vae_y.config.block_out_channels) == list(ref_pipe.vae.config.block_out_channels), "vae channels from yaml")
    assert_same_state(ref_pipe.vae, vae_y, f"{yaml_path.name} AutoencoderKL")
    print(f"  {single.name}: diffusers from_single_file reproduces every tensor of {folder.name}/")


def list_or(x):
    return list(x) if isinstance(x, (list, tuple)) else x


def heads(cfg: dict):
    h = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
    n = len(cfg["block_out_channels"])
    return [h] * n if isinstance(h, int) else list(h)


def verify_openclip(single: dict, variant: dict, reference: dict) -> None:
    """Run the SD2 file's text tower with OpenCLIP's own TextTransformer, as SD2's
    FrozenOpenCLIPEmbedder(layer="penultimate") does: every resblock but the last, then ln_final.
    It must equal diffusers' 3-layer CLIPTextModel output (text.last_hidden_state)."""
    from open_clip.transformer import TextTransformer

    t = variant["text"]
    p = "cond_stage_model.model."
    tower = TextTransformer(
        context_length=t["max_position_embeddings"],
        vocab_size=t["vocab_size"],
        width=t["hidden_size"],
        heads=t["num_attention_heads"],
        layers=t["num_hidden_layers"] + 1,
        mlp_ratio=t["intermediate_size"] / t["hidden_size"],
        output_dim=variant["openclip_projection_dim"],
        act_layer=torch.nn.GELU,
    ).eval()
    sd = {k[len(p) :]: v for k, v in single.items() if k.startswith(p) and k != p + "logit_scale"}
    tower.load_state_dict(sd, strict=True)
    ids = reference["text.input_ids"]
    with torch.no_grad():
        x = tower.token_embedding(ids) + tower.positional_embedding
        for block in tower.transformer.resblocks[:-1]:
            x = block(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)
    err = (x - reference["text.last_hidden_state"]).abs().max().item()
    check(err < 1e-5, f"OpenCLIP penultimate output differs from diffusers' text encoder by {err}")
    print(f"  OpenCLIP TextTransformer (penultimate layer) on the single file matches text.last_hidden_state (max diff {err:.1e})")


def verify_fp16_variant(folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    half = StableDiffusionPipeline.from_pretrained(str(folder), variant="fp16", torch_dtype=torch.float16, local_files_only=True)
    for comp in ("unet", "vae", "text_encoder"):
        sr, sh = getattr(ref, comp).state_dict(), getattr(half, comp).state_dict()
        check(set(sr) == set(sh), f"fp16 {comp} keys")
        for k in sr:
            if sr[k].is_floating_point():
                check(sh[k].dtype == torch.float16 and torch.equal(sr[k].half(), sh[k]), f"fp16 {comp}.{k}")
    print(f"  {folder.name}: fp16 variant loads with variant='fp16' and equals the fp32 weights rounded")


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------


def make_reference(pipe, variant: dict) -> dict:
    seed = variant["seed"]
    ref = {}
    # text encoder
    ids = torch.tensor(encode(pipe.tokenizer, PROMPTS), dtype=torch.int64)
    with torch.no_grad():
        te = pipe.text_encoder(ids, output_hidden_states=True)
        check(len(te.hidden_states) == variant["text"]["num_hidden_layers"] + 1, "hidden_states = embeddings + layers")
        ref["text.input_ids"] = ids
        ref["text.last_hidden_state"] = te.last_hidden_state
        ref["text.clip_skip_2"] = pipe.text_encoder.final_layer_norm(te.hidden_states[-2])
        ref["text.pooler_output"] = te.pooler_output
        check(
            torch.allclose(pipe.text_encoder.final_layer_norm(te.hidden_states[-1]), te.last_hidden_state, atol=0, rtol=0),
            "last_hidden_state = final_layer_norm(hidden_states[-1])",
        )

    # UNet, with the output of every top-level module
    gen = torch.Generator().manual_seed(seed * 100 + 1)
    sample = torch.randn((2, 4, 16, 16), generator=gen)
    timesteps = torch.tensor(UNET_TIMESTEPS, dtype=torch.int64)
    ehs = ref["text.last_hidden_state"].clone()
    hooks, handles = {}, []
    unet = pipe.unet
    names = ["time_proj", "time_embedding", "conv_in"]
    names += [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
    names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))] + ["conv_out"]
    for n in names:
        mod = unet.get_submodule(n)

        def hook(_m, _inp, out, n=n):
            hooks[n] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        out = unet(sample, timesteps, ehs).sample
    for h in handles:
        h.remove()
    ref["unet.sample"] = sample
    ref["unet.timesteps"] = timesteps
    ref["unet.encoder_hidden_states"] = ehs
    ref["unet.out"] = out
    for n in names:
        ref[f"unet.hook.{n}"] = hooks[n]
    check(torch.equal(hooks["conv_out"], out), "conv_out hook is the UNet output")

    # VAE: a smooth pattern plus noise in [-1, 1]
    gen = torch.Generator().manual_seed(seed * 100 + 2)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    pattern = torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), xx * yy])[None]
    image = (0.8 * pattern + 0.2 * torch.rand((1, 3, 32, 32), generator=gen) * 2 - 0.2).clamp(-1, 1)
    with torch.no_grad():
        dist = pipe.vae.encode(image).latent_dist
        decoded = pipe.vae.decode(dist.mean).sample
    ref["vae.image"] = image
    ref["vae.latent_mean"] = dist.mean
    ref["vae.latent_logvar"] = dist.logvar
    check(dist.logvar.min().item() > -29 and dist.logvar.max().item() < 19, "logvar near diffusers' clamp")
    ref["vae.decoded"] = decoded

    # noise schedule
    from diffusers.training_utils import compute_snr

    sched = pipe.scheduler
    gen = torch.Generator().manual_seed(seed * 100 + 3)
    x0 = torch.randn((2, 4, 8, 8), generator=gen)
    noise = torch.randn((2, 4, 8, 8), generator=gen)
    t = torch.tensor(NOISE_TIMESTEPS, dtype=torch.int64)
    ref["noise.x0"] = x0
    ref["noise.noise"] = noise
    ref["noise.timesteps"] = t
    ref["noise.noisy"] = sched.add_noise(x0, noise, t)
    ref["noise.velocity"] = sched.get_velocity(x0, noise, t)
    ref["noise.snr"] = compute_snr(sched, t)
    ref["noise.alphas_cumprod"] = sched.alphas_cumprod.to(torch.float32)
    for k, v in ref.items():
        check(torch.isfinite(v.float()).all().item(), f"reference {k} is not finite")
    return contiguous(ref)


def write_noise_schedules(path: Path) -> dict:
    from diffusers import DDPMScheduler

    configs = {
        "alphas_cumprod.linear": dict(beta_schedule="linear"),
        "alphas_cumprod.scaled_linear": dict(beta_schedule="scaled_linear"),
        "alphas_cumprod.squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
        "alphas_cumprod.scaled_linear.zero_snr": dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True),
        "alphas_cumprod.scaled_linear.sd": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        "alphas_cumprod.scaled_linear.sd.zero_snr": dict(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
        ),
    }
    tensors, full = {}, {}
    for name, kw in configs.items():
        s = DDPMScheduler(num_train_timesteps=1000, **kw)
        tensors[name] = s.alphas_cumprod.to(torch.float32).contiguous()
        full[name] = {k: s.config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "rescale_betas_zero_snr")}
    save_st(tensors, path, metadata={"configs": json.dumps(full, sort_keys=True), "versions": json.dumps(versions(), sort_keys=True)})
    return full


# --------------------------------------------------------------------------------------------------
# writing one variant
# --------------------------------------------------------------------------------------------------


def write_tokenizer_folder(dst: Path, src: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def save_fp16_variant(folder: Path) -> None:
    """``*.fp16.safetensors`` beside the fp32 files, as ``save_pretrained(variant="fp16")`` names them."""
    for comp, fname in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        sd = load_file(str(folder / comp / f"{fname}.safetensors"))
        half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
        save_st(half, folder / comp / f"{fname}.fp16.safetensors", metadata={"format": "pt"})


def make_variant(name: str, variant: dict, tiny_tok_dir: Path) -> dict:
    print(f"{name}:")
    folder = FIXTURES / name
    if folder.exists():
        shutil.rmtree(folder)
    tokenizer = load_tokenizer(tiny_tok_dir, pad_token=variant["pad_token"])
    pipe = build_pipeline(variant, tokenizer)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # our own tokenizer files (vocab.json + merges.txt + tokenizer.json + configs), pad token per variant
    tok_dst = folder / "tokenizer"
    write_tokenizer_folder(tok_dst, tiny_tok_dir)
    if variant["pad_token"] != EOS:
        for f in ("tokenizer_config.json", "special_tokens_map.json"):
            cfg = json.loads((tok_dst / f).read_text())
            cfg["pad_token"] = variant["pad_token"]
            write_json(tok_dst / f, cfg)
    if variant["fp16_variant"]:
        save_fp16_variant(folder)

    # reload the folder exactly as users would and compute the references from it
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    for comp in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(pipe, comp), getattr(loaded, comp), f"{name} folder round trip {comp}")
    check(loaded.tokenizer.pad_token == variant["pad_token"], "tokenizer pad token")
    check(encode(loaded.tokenizer, PROMPTS) == encode(tokenizer, PROMPTS), "folder tokenizer ids")
    ref = make_reference(loaded, variant)
    meta = {"prompts": json.dumps(PROMPTS, ensure_ascii=False), "versions": json.dumps(versions(), sort_keys=True)}
    save_st(ref, FIXTURES / f"{name}.reference.safetensors", metadata=meta)

    single = to_single_file(loaded, variant)
    # The single file itself is not kept: the tests assemble it from the folder and its layout.
    single_path = Path(tempfile.mkdtemp()) / f"{name}.safetensors"
    save_st(single, single_path, metadata={"format": "pt"})
    write_single_file_layout(name, single, folder)
    yaml_path = FIXTURES / f"{name}.yaml"
    yaml_path.write_text(ldm_yaml(name, variant), encoding="utf-8")
    verify_single_file(name, folder, single_path, yaml_path, ref)
    if variant["text_layout"] == "openclip":
        verify_openclip(single, variant, ref)
    if variant["ckpt"]:
        ckpt_path = FIXTURES / f"{name}.ckpt"
        torch.save({"global_step": 0, "state_dict": contiguous(single)}, str(ckpt_path))
        verify_single_file(name, folder, ckpt_path, yaml_path, ref)
        loaded_ckpt = torch.load(str(ckpt_path), weights_only=True)["state_dict"]
        check(set(loaded_ckpt) == set(single) and all(torch.equal(loaded_ckpt[k], single[k]) for k in single), "ckpt == safetensors")
    if variant["fp16_variant"]:
        verify_fp16_variant(folder)
    return {"reference": ref, "single": single, "unet_params": sum(p.numel() for p in loaded.unet.parameters())}


# --------------------------------------------------------------------------------------------------
# README (generated from the files, so it cannot drift)
# --------------------------------------------------------------------------------------------------


def fmt_shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def dtype_name(t: torch.Tensor) -> str:
    return {torch.float32: "f32", torch.float16: "f16", torch.int64: "i64", torch.int32: "i32"}[t.dtype]


README_TEMPLATE = r'''# Test fixtures

Generated by `tools/make_fixtures.py` — do not edit by hand, regenerate instead (this README is
generated too, from the files themselves):

```sh
python3 -m venv .venv && .venv/bin/pip install -r tools/requirements.txt   # once, see tools/README.md
.venv/bin/python tools/make_fixtures.py                                     # ~30 s on 1 CPU core
```

Everything is seeded and computed on one CPU thread; two runs give byte-identical files (checked:
the sha256 column below does not change). The script also rewrites `models/clip-tokenizer/`.

## Deviations from `fixture-contract.md` (read this first)

1. **Channel widths are smaller than the contract's table, and the total is ~{{TOTAL_MIB}} MiB, not 4 MB.**
   The contract's block/attention structure is kept exactly (sd1: CrossAttnDown ×2 + Down, 2 layers
   per block, `attention_head_dim` 8 as an int; sd2: CrossAttnDown ×3 + Down, 1 layer per block,
   per-block head list, linear projections, upcast), but `block_out_channels` is `[32, 32, 32]`
   (sd1) and `[32, 32, 32, 64]` (sd2) instead of `[32, 64, 64]` / `[32, 64, 64, 64]`. With the
   contract's widths the fixtures would be ~80 MB. 4 MB is not reachable with this structure at all:
   GroupNorm(32) forces ≥ 32 channels, diffusers' GEGLU feed-forward is fixed at 4×, so the smallest
   sd1 UNet with this block layout is 0.83 M parameters (3.3 MB in f32), and sd1 is stored 2.5 times
   (folder, `.ckpt`, fp16 variant; the single files are assembled by the tests, see below). Coverage kept on purpose: a down-path resnet with a
   `conv_shortcut` (sd2 level 3, 32→64), VAE `conv_shortcut`/`nin_shortcut` (sd2 VAE, 32→64), a VAE
   with 2 layers per block (sd2) and one with 1 (sd1), VAE downsampling 4 (sd1) and 2 (sd2),
   cross-attention widths ≠ channel widths (k/v projections are not square), several heads.
2. **sd2 heads are `[2, 2, 2, 4]`** (16 channels per head in every block, so the LDM yaml can say
   `num_head_channels: 16`; diffusers turns that back into exactly this list).
3. **Tiny tokenizer: 486 merges** (not ~450) so that the vocabulary is exactly 1000
   (`<|startoftext|>` = 998, `<|endoftext|>` = 999).
4. Extra reference tensors beyond the contract: `unet.hook.time_proj` (the sinusoidal timestep
   features, handy to debug `flip_sin_to_cos`/`freq_shift`). `unet.encoder_hidden_states` is the
   same data as `text.last_hidden_state` (so the UNet test can stand alone).
5. `noise_schedules.safetensors`: "default betas" is read literally (DDPMScheduler's defaults
   0.0001 → 0.02) for `linear`, `scaled_linear`, `squaredcos_cap_v2` and
   `scaled_linear.zero_snr`; two extra entries, `alphas_cumprod.scaled_linear.sd` and
   `alphas_cumprod.scaled_linear.sd.zero_snr`, use Stable Diffusion's 0.00085 → 0.012. The exact
   scheduler arguments of every tensor are in the file's metadata `configs` (JSON).
6. `tiny-sd1.ckpt` is `{"global_step": 0, "state_dict": {...}}` (real checkpoints carry such
   extra top-level entries; a reader must pick `state_dict` and ignore the rest).

## Things the Rust side must not assume (learned while making these)

- **Do not tell SD1 from SD2 by the cross-attention width 1024** for these files: tiny-sd2 has 128.
  (diffusers itself classifies tiny-sd2's single file as "v1": it looks for a 1024-wide
  `input_blocks.2.1.transformer_blocks.0.attn2.to_k`; harmless here because the config comes from
  the yaml/folder.) Robust signals: `cond_stage_model.model.` (OpenCLIP) keys
  vs `cond_stage_model.transformer.`; 2-D (linear) vs 4-D (1×1 conv) `proj_in` weights.
- The single-file layout does not record the number of CLIP heads: use hidden/64 (true for every
  real SD text encoder and for both tiny ones).
- The folder text encoders are saved by transformers 5, **without** the `text_model.` prefix
  (`embeddings.token_embedding.weight`, `encoder.layers.0.self_attn.q_proj.weight`, ...); the SD1
  single file has it (`cond_stage_model.transformer.text_model.embeddings...`). Neither folder file
  holds `position_ids` (a non-persistent buffer in transformers 5); the SD1 single file does.
- tiny-sd2's single file holds one more OpenCLIP resblock than the diffusers text encoder has
  (4 vs 3), exactly like real SD2 files (24 vs 23): SD2 conditions on the penultimate layer.
  diffusers drops it in two ways: `SD_2_TEXT_ENCODER_KEYS_TO_IGNORE` hard-codes `resblocks.23.*`
  and `text_projection`, and any converted key the model does not have (here `encoder.layers.3.*`)
  is skipped silently by `load_model_dict_into_meta`. A loader should take `num_hidden_layers`
  from the config / from the resblock count minus one and ignore the last resblock.
- `attention_head_dim` in the UNet configs is the **number of heads** (diffusers naming bug):
  sd1 `8` = 8 heads in every block (4 or 8 channels each); sd2 `[2, 2, 2, 4]` = heads per down
  block; up blocks use the list reversed, the mid block uses the last entry.
- LDM's VAE attention projections are 1×1 convs `[C, C, 1, 1]` in the single file
  (`first_stage_model.{encoder,decoder}.mid.attn_1.{q,k,v,proj_out}.weight`), linear `[C, C]` in
  the folder (`mid_block.attentions.0.{to_q,to_k,to_v,to_out.0}.weight`).
- OpenCLIP's fused `attn.in_proj_weight` is `[3W, W]` = q, k, v stacked along dim 0 (the same for
  `in_proj_bias` `[3W]`); `text_projection` is `[W, E]` (used as `x @ P`, the transpose of a linear
  weight) — diffusers splits `in_proj` by `text_projection.shape[0]`.
- Single files also carry tensors every loader must ignore (see the tables below): the LDM DDPM
  buffers (computed in float64, stored f32, so `alphas_cumprod` differs from diffusers' float32
  computation in the last bits), `model_ema.decay` (0-dim f32), `model_ema.num_updates` (0-dim
  i32), `position_ids` (i64), and for SD2 `text_projection`, `logit_scale` (0-dim) and the unused
  last resblock.

## How it was made and proved

- Models: diffusers `UNet2DConditionModel`, `AutoencoderKL`, transformers `CLIPTextModel`,
  diffusers `DDPMScheduler`, wrapped in a `StableDiffusionPipeline` (no safety checker) and saved
  with `save_pretrained` (safetensors). Every parameter is then replaced by seeded random values
  (no tensor is trivial: norm weights are 1 + 0.1·N, biases 0.05·N, other weights N/√fan_in), so a
  loader that drops, swaps or transposes a tensor changes the outputs.
- Single files: written by our own diffusers → LDM mapping (diffusers only has the other
  direction), then **loaded back with diffusers 0.42.1, offline**:
  `StableDiffusionPipeline.from_single_file(file, original_config=<yaml>, config=<folder>)`,
  `UNet2DConditionModel/AutoencoderKL.from_single_file(file, config=<folder>, subfolder=...)`, and
  `from_single_file(file, original_config=<yaml>)` (config built from the yaml alone). Every tensor
  of every component equals the folder's bit for bit; the yaml-built UNet gives the same output.
  The same for `tiny-sd1.ckpt`. The SD2 text tower of the single file is also run through
  OpenCLIP's own `TextTransformer` (all resblocks but the last, then `ln_final`, as SD2's
  `FrozenOpenCLIPEmbedder(layer="penultimate")`) and equals `text.last_hidden_state` exactly.
- fp16 variant (tiny-sd1 only): `*.fp16.safetensors` beside the f32 files, loaded by
  `from_pretrained(folder, variant="fp16")`; each tensor is the f32 one rounded to f16.
- References are computed from the pipeline *reloaded from the folder*, in float32 on CPU.
- Also checked once from Rust (a throwaway probe, not committed, not re-run by the script):
  the `tokenizers` crate 0.23 (`fancy-regex`) on `models/clip-tokenizer/tokenizer.json` reproduces
  every `sd1` case of `tokenizer_cases.json` (padding/truncation to 77 done by hand); candle 0.11.1
  reads `tiny-sd1.ckpt` and its 706 readable tensors equal `tiny-sd1.safetensors`; candle's
  `MmapedSafetensors` loads every tensor of the safetensors files (incl. the fp16 variant).

## Files

| file | bytes | sha256 (first 16) |
|---|---:|---|
{{FILES}}

Total: {{TOTAL}} bytes.

Bundled tokenizer (not under tests/, used by the demo model and by users):

| file | bytes | sha256 (first 16) |
|---|---:|---|
{{TOKENIZER_FILES}}

## The bundled CLIP tokenizer (`models/clip-tokenizer/`)

Built from `bpe_simple_vocab_16e6.txt.gz` shipped in the PyPI package `open_clip_torch`, exactly as
OpenAI CLIP builds its vocabulary: the file's lines 1..48894 are the merges; the vocabulary is the
256 byte characters (GPT-2's byte→unicode table, in that order), the same 256 with `</w>`, one token
per merge (in merge order), then `<|startoftext|>` (49406) and `<|endoftext|>` (49407): 49408 tokens.
`merges.txt` has the header line `#version: 0.2` like the Hugging Face files. `tokenizer_config.json`
/ `special_tokens_map.json` follow SD1's tokenizer: pad = unk = eos = `<|endoftext|>`,
`model_max_length` 77, lower case. `tokenizer.json` is transformers' fast tokenizer built from
these files and saved (normalizer: NFC, `\s+` → one space, lowercase; pre-tokenizer: CLIP's regex
split, then byte-level; BPE with `</w>` end-of-word suffix; post-processor adds bos/eos).
Checked: transformers gives identical ids from `tokenizer.json` and from `vocab.json`+`merges.txt`
alone; OpenAI's own tokenizer (open_clip's `SimpleTokenizer`) gives the same ids on the plain cases
("a photo of an astronaut riding a horse" → `49406 320 1125 539 550 18376 6765 320 4558 49407`).

### `tokenizer_cases.json`

A JSON list of {{N_CASES}} objects `{"text": str, "sd1": [77 ints], "sd2": [77 ints]}`: the `input_ids`
of transformers' `CLIPTokenizer.from_pretrained("models/clip-tokenizer")` with
`padding="max_length", max_length=77, truncation=True`; `sd1` pads with `<|endoftext|>` (49407),
`sd2` with `!` (id 0, as SD2's tokenizer: `from_pretrained(..., pad_token="!")`). Cases: plain
caption, Unicode (accents, a decomposed accent that NFC composes, CJK, Hangul, emoji),
punctuation, A1111 weight syntax, multiple spaces/newlines/tabs, upper case, numbers,
apostrophes, the empty string, HTML entities (transformers does **not** unescape them, OpenAI's
tokenizer would), a caption far longer than 77 tokens (truncated to bos + 75 tokens + eos), and a
text containing `<|endoftext|>` / `<|startoftext|>` literally (transformers matches them as the
special tokens 49407 / 49406). Transformers' behaviour is the reference, not OpenAI's
(`ftfy`/`html.unescape` differences).

## Tiny models

Two variants, each a diffusers folder `tests/fixtures/<name>/` (`model_index.json`, `unet/`,
`vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), the layout of its single file
(`<name>.layout.json` and `<name>.extra.safetensors`, below), its LDM yaml `<name>.yaml`, and
`<name>.reference.safetensors`; tiny-sd1 also has `tiny-sd1.ckpt` and the
fp16 variant files.

Tokenizer of both (`<name>/tokenizer/`): the real CLIP BPE truncated to its first 486 merges —
vocabulary 1000 (512 byte tokens + 486 merges + `<|startoftext|>` 998 + `<|endoftext|>` 999), same
five files as the bundled one; tiny-sd1 pads with `<|endoftext|>` (999), tiny-sd2 with `!` (0)
(`pad_token` in `tokenizer_config.json` and `special_tokens_map.json`). Text-encoder configs use
`bos_token_id` 998, `eos_token_id` 999 (pooling takes the first eos position).

Scheduler of both: `DDPMScheduler` {{SCHEDULER}}; `prediction_type` `epsilon` (sd1) /
`v_prediction` (sd2).

| | tiny-sd1 | tiny-sd2 |
|---|---|---|
| UNet blocks | CrossAttnDown, CrossAttnDown, Down / Up, CrossAttnUp, CrossAttnUp | CrossAttnDown ×3, Down / Up, CrossAttnUp ×3 |
| block_out_channels | [32, 32, 32] | [32, 32, 32, 64] |
| layers_per_block | 2 | 1 |
| attention_head_dim (= heads) | 8 (int) | [2, 2, 2, 4] |
| use_linear_projection / upcast_attention | false / false | true / true |
| cross_attention_dim | 64 | 128 |
| UNet parameters | {{SD1_UNET_PARAMS}} | {{SD2_UNET_PARAMS}} |
| text encoder | hidden 64, 1 head, 3 layers, quick_gelu, intermediate 128, 77 positions, vocab 1000 | hidden 128, 2 heads, 3 layers (4 OpenCLIP resblocks in the single file), gelu, intermediate 256 |
| VAE | [32, 32, 32], 1 layer per block, downsampling 4, latent 4 | [32, 64], 2 layers per block, downsampling 2, latent 4 |
| VAE scaling_factor | 0.18215 | 0.18215 |
| prediction | epsilon | v_prediction |

Exact constructor arguments (the configs in the folders hold diffusers' full configs):

tiny-sd1:
```json
{{SD1_CONFIG}}
```
tiny-sd2:
```json
{{SD2_CONFIG}}
```

### Single-file layout (`<name>.safetensors`, `tiny-sd1.ckpt`)

UNet under `model.diffusion_model.` (LDM `openaimodel.UNetModel` names, mapping as in DESIGN.md §3,
L = layers_per_block: sd1 L = 2 → `input_blocks.0..8`, `output_blocks.0..8`; sd2 L = 1 →
`input_blocks.0..7`, `output_blocks.0..7`; upsamplers at `output_blocks.{(L+1)i+L}.{1|2}.conv`, `2`
where that up block has attentions), VAE under `first_stage_model.` (`encoder.down.i.block.j`,
`decoder.up.(N-1-i)`, `mid.block_1/2`, `mid.attn_1`, `nin_shortcut`, `norm_out`), text encoder under
`cond_stage_model.transformer.text_model.` (sd1, Hugging Face CLIP names) or
`cond_stage_model.model.` (sd2, OpenCLIP: `token_embedding.weight`, `positional_embedding`,
`transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2,
mlp.c_fc, mlp.c_proj}`, `ln_final`). The `.ckpt` is the same dict saved with `torch.save` (zip
format), f32, with 0-dim tensors and i64/i32 tensors included. candle 0.11.1's
`pickle::read_pth_tensor_info(path, false, Some("state_dict"))` reads it; it prints
`skipping: ... unsupported storage type IntStorage` for `model_ema.num_updates` (i32) and goes on
— real SD 1.x `.ckpt` files carry the same tensor.

The single files are not committed: they hold the folders' tensors again, renamed, fused or
reshaped. `<name>.layout.json` lists each tensor of the file (key, shape, and the folder tensors
it is made of: `[[component, key], ...]`, several for OpenCLIP's fused q/k/v, stacked along the
first axis), found by value rather than by the key mapping, so the tests still check our loader's
mapping against an independent one; `<name>.extra.safetensors` holds what no folder file has
(`component` `extra`). The tests assemble `<name>.safetensors`, byte for byte the file this script
verifies with diffusers' `from_single_file`, with its `<name>.yaml` beside it, into the system's
temporary folder (`src/fixtures.rs`, `lora_trainer::fixtures::path("tiny-sd1.safetensors")`).

Tensors in the single files other than the UNet/VAE/CLIP-layer weights (everything a loader must
either use or skip):

tiny-sd1:

| key | dtype | shape |
|---|---|---|
{{SD1_EXTRAS}}

tiny-sd2 (resblocks 1–3 have the same tensors as resblock 0; resblock 3 is the unused one):

| key | dtype | shape |
|---|---|---|
{{SD2_EXTRAS}}

### LDM yaml (`<name>.yaml`)

The inference config A1111 expects beside a checkpoint, in the layout of stable-diffusion's
`v1-inference.yaml` (sd1: `num_heads: 8`, conv `proj_in`) and `v2-inference-v.yaml` (sd2:
`num_head_channels: 16`, `use_linear_in_transformer: true`, `parameterization: v`,
`FrozenOpenCLIPEmbedder` with `layer: penultimate`). `model_channels` × `channel_mult` =
`block_out_channels`; `attention_resolutions` lists the downsampling factors (1, 2, 4, ...) of the
levels that have attention; `first_stage_config.params.ddconfig` holds the VAE (`ch`, `ch_mult`,
`num_res_blocks`). Like the real files, the yaml does not describe the text encoder's size (a
comment line does); `upcast_attention` cannot be expressed in it.

## Reference tensors (`<name>.reference.safetensors`)

Metadata: `prompts` (JSON list of the two prompts), `versions` (JSON of package versions).
Prompts:

{{PROMPTS}}

All float tensors are f32; B = 2 except the VAE (B = 1).

| name | dtype | tiny-sd1 shape | tiny-sd2 shape |
|---|---|---|---|
{{REFERENCE_TABLE}}

Meaning:

- `text.input_ids`: the variant's own tokenizer (from its folder) on the two prompts,
  `padding="max_length", max_length=77, truncation=True` (sd2 pads with 0).
- `text.last_hidden_state`: `CLIPTextModel(input_ids).last_hidden_state` = `final_layer_norm` of
  the last layer. For tiny-sd2 this *is* SD2's "penultimate" conditioning, because the folder
  model has one layer less than the single file's OpenCLIP tower.
- `text.clip_skip_2`: `final_layer_norm(hidden_states[-2])`, where `hidden_states` = (embeddings,
  layer 1, ..., layer N) (checked: N + 1 entries, and `final_layer_norm(hidden_states[-1])` equals
  `last_hidden_state` exactly) — kohya/A1111 `clip_skip = 2`.
- `text.pooler_output`: `last_hidden_state` at the first `eos_token_id` (999) position of each row.
- `unet.sample` (randn), `unet.timesteps` = {{UNET_TIMESTEPS}}, `unet.encoder_hidden_states`
  (= `text.last_hidden_state`), `unet.out` = `unet(sample, timesteps, encoder_hidden_states).sample`.
- `unet.hook.<module>`: the output of that top-level module during that same call (for
  `down_blocks.N` the hidden states, the first element of the returned tuple):
  `time_proj` [2, 32] (sinusoidal features), `time_embedding` [2, 128], `conv_in`, every
  `down_blocks.N`, `mid_block`, every `up_blocks.N`, `conv_out` (= `unet.out`).
- `vae.image` in [-1, 1]; `vae.latent_mean`, `vae.latent_logvar` = the encoder's
  `DiagonalGaussianDistribution` `mean` and `logvar` (diffusers clamps logvar to [-30, 20]; no
  value is near the clamp); `vae.decoded` = `vae.decode(latent_mean).sample` (no scaling factor
  applied anywhere).
- `noise.x0`, `noise.noise` (randn [2, 4, 8, 8]), `noise.timesteps` = {{NOISE_TIMESTEPS}}
  (999 is the last step), `noise.noisy` = `scheduler.add_noise(x0, noise, t)`, `noise.velocity` =
  `scheduler.get_velocity(x0, noise, t)`, `noise.snr` = `diffusers.training_utils.compute_snr`,
  `noise.alphas_cumprod` [1000] = `scheduler.alphas_cumprod` (float32 as diffusers computes it).
  Both variants use the same betas, so only the random inputs differ.

Suggested tolerances (DESIGN.md §6): max |diff| ≤ 1e-4 × max|reference| for one module, ≤ 1e-3 ×
max|reference| for a whole UNet; the text encoder and noise tensors should match to ~1e-5.

## `noise_schedules.safetensors`

`alphas_cumprod.*` [1000] f32 from `DDPMScheduler(num_train_timesteps=1000, ...)`; metadata
`configs` has each tensor's scheduler arguments:

| tensor | scheduler arguments |
|---|---|
{{SCHEDULES}}

(`rescale_betas_zero_snr` makes the last `alphas_cumprod` exactly 0.)

## Package versions

| package | version |
|---|---|
{{VERSIONS}}
'''


def write_readme(results: dict, schedules: dict, cases: list) -> None:
    files = sorted(p for p in FIXTURES.rglob("*") if p.is_file() and p.name != "README.md")
    rows = []
    total = 0
    for p in files:
        size = p.stat().st_size
        total += size
        rows.append(f"| `{p.relative_to(FIXTURES)}` | {size:,} | `{sha256_file(p)[:16]}` |")
    tok_rows = []
    for p in sorted(CLIP_TOKENIZER_DIR.iterdir()):
        tok_rows.append(f"| `models/clip-tokenizer/{p.name}` | {p.stat().st_size:,} | `{sha256_file(p)[:16]}` |")

    r1, r2 = results["tiny-sd1"]["reference"], results["tiny-sd2"]["reference"]
    ref_rows = []
    for k in list(r2) + [k for k in r1 if k not in r2]:
        t = r2.get(k, r1.get(k))
        a, b = r1.get(k), r2.get(k)
        ref_rows.append(f"| `{k}` | {dtype_name(t)} | {fmt_shape(a) if a is not None else '-'} | {fmt_shape(b) if b is not None else '-'} |")

    def extras(single: dict) -> str:
        keep = [k for k in single if not k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.encoder", "cond_stage_model.model.transformer."))]
        keep += [k for k in single if re.match(r"cond_stage_model\.model\.transformer\.resblocks\.0\.", k)]
        return "\n".join(f"| `{k}` | {dtype_name(single[k])} | {fmt_shape(single[k])} |" for k in keep)

    text = README_TEMPLATE
    subs = {
        "{{FILES}}": "\n".join(rows),
        "{{TOTAL}}": f"{total:,}",
        "{{TOTAL_MIB}}": f"{total / 2**20:.0f}",
        "{{SD1_UNET_PARAMS}}": f"{results['tiny-sd1']['unet_params']:,}",
        "{{SD2_UNET_PARAMS}}": f"{results['tiny-sd2']['unet_params']:,}",
        "{{TOKENIZER_FILES}}": "\n".join(tok_rows),
        "{{REFERENCE_TABLE}}": "\n".join(ref_rows),
        "{{SD1_EXTRAS}}": extras(results["tiny-sd1"]["single"]),
        "{{SD2_EXTRAS}}": extras(results["tiny-sd2"]["single"]),
        "{{SD1_CONFIG}}": json.dumps({k: VARIANTS["tiny-sd1"][k] for k in ("unet", "vae", "text")}, indent=1),
        "{{SD2_CONFIG}}": json.dumps({k: VARIANTS["tiny-sd2"][k] for k in ("unet", "vae", "text")}, indent=1),
        "{{SCHEDULER}}": json.dumps(SCHEDULER),
        "{{SCHEDULES}}": "\n".join(f"| `{k}` | `{json.dumps(v, sort_keys=True)}` |" for k, v in schedules.items()),
        "{{VERSIONS}}": "\n".join(f"| {k} | {v} |" for k, v in versions().items()),
        "{{PROMPTS}}": "\n".join(f"{i}. `{p}`" for i, p in enumerate(PROMPTS)),
        "{{N_CASES}}": str(len(cases)),
        "{{UNET_TIMESTEPS}}": str(UNET_TIMESTEPS),
        "{{NOISE_TIMESTEPS}}": str(NOISE_TIMESTEPS),
    }
    for k, v in subs.items():
        text = text.replace(k, v)
    check("{{" not in text, "unfilled README placeholder")
    (FIXTURES / "README.md").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------------


def main() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    FIXTURES.mkdir(parents=True, exist_ok=True)

    print("models/clip-tokenizer (49408 tokens)")
    write_clip_tokenizer(CLIP_TOKENIZER_DIR, None, EOS)
    cases = write_tokenizer_cases(FIXTURES / "tokenizer_cases.json")
    print(f"  tokenizer_cases.json: {len(cases)} cases")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny_tok = Path(tmp) / "tiny-tokenizer"
        write_clip_tokenizer(tiny_tok, TINY_MERGES, EOS)
        for name, variant in VARIANTS.items():
            results[name] = make_variant(name, variant, tiny_tok)

    schedules = write_noise_schedules(FIXTURES / "noise_schedules.safetensors")
    write_readme(results, schedules, cases)
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"done: tests/fixtures holds {total / 2**20:.2f} MiB")


if __name__ == "__main__":
    sys.exit(main())
