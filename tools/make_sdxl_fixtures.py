#!/usr/bin/env python3
"""Tiny random SDXL fixtures for the parity tests (issue 15: SDXL through the same trainer).

Writes, under tests/fixtures/:

- tiny-sdxl/unet/config.json, diffusion_pytorch_model.safetensors: a UNet2DConditionModel with
  SDXL's structure at toy size: no attention at the first level, 1/1/2 transformer layers per
  level, linear proj_in/proj_out, `addition_embed_type: "text_time"` (`add_embedding` fed the
  pooled text embedding and the sinusoidal features of six time ids).
- tiny-sdxl/text_encoder/ (CLIPTextModel, quick_gelu, 8 wide) and tiny-sdxl/text_encoder_2/
  (CLIPTextModelWithProjection, gelu, 16 wide, `text_projection` to 16): SDXL's two encoders at
  toy size; their penultimate hidden states joined make the UNet's 24-wide context, and the
  second one's projected pooled output is the UNet's `text_embeds`.
- tiny-sdxl.reference.safetensors: inputs and transformers'/diffusers' outputs: `text.input_ids`,
  `text1.penultimate` and `text2.penultimate` (`hidden_states[-2]`, no final layer norm, as
  SDXL conditions), `text2.last_hidden_state`, `text2.text_embeds`; `step.out` (the UNet on
  `unet.sample`/`unet.timesteps`/`unet.time_ids` conditioned on both encoders as
  StableDiffusionXLPipeline conditions); `unet.sample`,
  `unet.timesteps`, `unet.encoder_hidden_states`, `unet.text_embeds`, `unet.time_ids`,
  `unet.out`, and `unet.hook.<module>` for every top-level module (time_proj, time_embedding,
  add_embedding, conv_in, down_blocks.N, mid_block, up_blocks.N, conv_out).

- tiny-sdxl.layout.json, tiny-sdxl.extra.safetensors: the same model as Stability's single file
  (`model.diffusion_model.`, `conditioner.embedders.0.transformer.`, `conditioner.embedders.1.model.`
  with fused q/k/v and a transposed `text_projection`, `first_stage_model.`), kept as a layout over
  the folder's tensors that the tests assemble (as for tiny-sd1); diffusers' `from_single_file`
  must read it back to the folder's weights.
- sdxl-base.shapes.json: every tensor name and shape of SDXL base 1.0's single file (built from
  its published configs on the meta device), for the config-inference test.

Seeded, one CPU thread: two runs give byte-identical files. Run with a Python that has torch and
diffusers (the versions used are written into the reference's metadata):

    python tools/make_sdxl_fixtures.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import diffusers
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import make_fixtures
from make_fixtures import EOS as EOS_TOKEN
from make_fixtures import TINY_MERGES, write_clip_tokenizer

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
POOLED = 16  # width of the pooled text embedding (1280 in SDXL)
TIME_IDS_DIM = 8  # addition_time_embed_dim (256 in SDXL)
CONTEXT = 24  # cross-attention width (2048 in SDXL: 768 + 1280)


def unet_config() -> dict:
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(4, 8, 16),
        layers_per_block=2,
        norm_num_groups=2,
        cross_attention_dim=CONTEXT,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(1, 2, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_IDS_DIM,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME_IDS_DIM,
    )


VOCAB = 1000  # the tiny CLIP tokenizer's (make_fixtures.py), so the folder is a whole pipeline
EOS = 999  # the tiny vocabulary's end-of-text id (49407 in the real tokenizers)


def text_config(hidden: int, act: str, projection: int | None) -> CLIPTextConfig:
    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=EOS - 1,
        eos_token_id=EOS,
        pad_token_id=1,
        **extra,
    )


def save_text(model, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def text_encoders(ref: dict):
    torch.manual_seed(3)
    te1 = CLIPTextModel(text_config(8, "quick_gelu", None)).eval()
    te2 = CLIPTextModelWithProjection(text_config(CONTEXT - 8, "gelu", POOLED)).eval()
    save_text(te1, ROOT / "tiny-sdxl" / "text_encoder")
    save_text(te2, ROOT / "tiny-sdxl" / "text_encoder_2")
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, EOS - 1, (2, 16), generator=gen)
    ids[:, 0] = EOS - 1
    ids[0, 9], ids[1, 15] = EOS, EOS  # the pooled row is taken at the first EOS
    ids[0, 10:] = 0
    with torch.no_grad():
        out1 = te1(ids, output_hidden_states=True)
        out2 = te2(ids, output_hidden_states=True)
    ref["text.input_ids"] = ids
    ref["text1.penultimate"] = out1.hidden_states[-2]
    ref["text2.penultimate"] = out2.hidden_states[-2]
    ref["text2.last_hidden_state"] = out2.last_hidden_state
    ref["text2.text_embeds"] = out2.text_embeds
    return ids, out1, out2, te1, te2


# SDXL base 1.0's scheduler_config.json: SD's schedule with the keys its file carries.
SCHEDULER = dict(
    make_fixtures.SCHEDULER,
    sample_max_value=1.0,
    set_alpha_to_one=False,
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    skip_prk_steps=True,
)
PROMPT = "a cyberpunk city at night, neon lights"
NEGATIVE = "blurry"


def pipeline_folder(unet, te1, te2, ref: dict) -> None:
    """The rest of a diffusers SDXL folder (tokenizers, VAE, scheduler, model_index.json) and one
    StableDiffusionXLPipeline run on it (DDIM, 2 steps, 32 px, fixed starting latents)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
    )

    folder = ROOT / "tiny-sdxl"
    write_clip_tokenizer(folder / "tokenizer", TINY_MERGES, EOS_TOKEN)
    write_clip_tokenizer(folder / "tokenizer_2", TINY_MERGES, "!")  # SDXL's second pads with `!`
    torch.manual_seed(5)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.13025,  # SDXL's
        force_upcast=True,
    ).eval()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    extra = ("clip_sample", "sample_max_value", "set_alpha_to_one", "skip_prk_steps")
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k not in extra})
    tok1 = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    tok2 = CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for part in ("vae", "scheduler"):
            shutil.rmtree(folder / part, ignore_errors=True)
            shutil.copytree(Path(tmp) / part, folder / part)
        shutil.copy(Path(tmp) / "model_index.json", folder / "model_index.json")
    # SDXL base's file carries keys Euler does not take (left from the DDIM/PNDM configs).
    config = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": diffusers.__version__}
    config.update(SCHEDULER)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # The reference run: DDIM with the folder's scheduler keys as written (SDXL's carry
    # `clip_sample: false` and `set_alpha_to_one: false`; DDIM's defaults differ), as
    # `generate --sampler ddim` reads them.
    pipe.scheduler = DDIMScheduler.from_pretrained(str(folder / "scheduler"))
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn((1, 4, 8, 8), generator=gen)
    with torch.no_grad():
        image = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=32,
            width=32,
            num_inference_steps=2,
            guidance_scale=5.0,
            latents=latents.clone(),
            output_type="pt",
        ).images
    ref["pipeline.latents"] = latents
    ref["pipeline.image"] = image.contiguous()
    # No negative prompt: SDXL's `force_zeros_for_empty_prompt` guides away from zeros (text
    # context and pooled output), as A1111 does for an empty negative prompt.
    with torch.no_grad():
        image = pipe(
            PROMPT,
            height=32,
            width=32,
            num_inference_steps=2,
            guidance_scale=5.0,
            latents=latents.clone(),
            output_type="pt",
        ).images
    ref["pipeline.image_no_negative"] = image.contiguous()
    ref["pipeline.ids1"] = tok1(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ref["pipeline.ids2"] = tok2(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    return vae


def ldm_single_file(unet, vae, te1, te2) -> dict:
    """The pipeline in Stability's single-file layout (`sd_xl_base_1.0.safetensors`):
    `model.diffusion_model.` (LDM UNet names; `add_embedding` is `label_emb.0`),
    `first_stage_model.` (LDM VAE), `conditioner.embedders.0.transformer.text_model.` (CLIP-L in
    Hugging Face layout) and `conditioner.embedders.1.model.` (OpenCLIP: fused q/k/v `in_proj`,
    `text_projection` stored transposed, `logit_scale`). Works on meta tensors too."""
    from make_fixtures import unet_key_to_ldm, vae_key_to_ldm

    out = {}
    cfg = dict(unet.config)
    for k, v in unet.state_dict().items():
        if k.startswith("add_embedding.linear_"):
            ldm = f"label_emb.0.{0 if k.startswith('add_embedding.linear_1.') else 2}.{k.rsplit('.', 1)[1]}"
        else:
            ldm = unet_key_to_ldm(k, cfg)
        out["model.diffusion_model." + ldm] = v
    n_vae = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        ldm = vae_key_to_ldm(k, n_vae)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out["first_stage_model." + ldm] = v
    p1 = "conditioner.embedders.0.transformer.text_model."
    for k, v in te1.state_dict().items():
        out[p1 + k.removeprefix("text_model.")] = v
    out[p1 + "embeddings.position_ids"] = torch.zeros((1, te1.config.max_position_embeddings), dtype=torch.int64, device=v.device)
    te = {k.removeprefix("text_model."): v for k, v in te2.state_dict().items()}
    p = "conditioner.embedders.1.model."
    out[p + "token_embedding.weight"] = te["embeddings.token_embedding.weight"]
    out[p + "positional_embedding"] = te["embeddings.position_embedding.weight"]
    out[p + "ln_final.weight"] = te["final_layer_norm.weight"]
    out[p + "ln_final.bias"] = te["final_layer_norm.bias"]
    out[p + "text_projection"] = te["text_projection.weight"].T.contiguous()
    out[p + "logit_scale"] = torch.tensor(4.6052, device=v.device)
    for n in range(te2.config.num_hidden_layers):
        L, R = f"encoder.layers.{n}.", f"{p}transformer.resblocks.{n}."
        out[R + "attn.in_proj_weight"] = torch.cat([te[L + f"self_attn.{x}_proj.weight"] for x in "qkv"], 0)
        out[R + "attn.in_proj_bias"] = torch.cat([te[L + f"self_attn.{x}_proj.bias"] for x in "qkv"], 0)
        for ours, theirs in (
            ("self_attn.out_proj", "attn.out_proj"),
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ):
            for w in ("weight", "bias"):
                out[f"{R}{theirs}.{w}"] = te[f"{L}{ours}.{w}"]
    return out


def verify_single_file(single: dict) -> None:
    """diffusers' own reader (`from_single_file`, configs from the folder) must read the file
    back to the folder's weights: the layout's mapping is checked by an independent one."""
    from diffusers import StableDiffusionXLPipeline

    folder = ROOT / "tiny-sdxl"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny-sdxl.safetensors"
        save_file({k: v.clone().contiguous() for k, v in single.items()}, str(path))
        a = StableDiffusionXLPipeline.from_pretrained(str(folder))
        b = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        bad = [k for k in sa if k not in sb or not torch.equal(sa[k], sb[k].reshape(sa[k].shape))]
        if bad:
            raise SystemExit(f"from_single_file reads {name} differently: {bad[:3]}")


# SDXL base 1.0's published configs (also what tools/make_random_sdxl.py builds).
SDXL_BASE_UNET = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_BASE_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
SDXL_BASE_TEXT1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       hidden_act="quick_gelu", projection_dim=768)
SDXL_BASE_TEXT2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       hidden_act="gelu", projection_dim=1280)


def sdxl_base_shapes() -> dict:
    """Every tensor name and shape of a single file of SDXL base 1.0's architecture (its
    published configs, built on the meta device: nothing is allocated)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
        vae = AutoencoderKL(**SDXL_BASE_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**SDXL_BASE_TEXT1))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_BASE_TEXT2))
    return {k: list(v.shape) for k, v in sorted(ldm_single_file(unet, vae, te1, te2).items())}


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config()).eval()
    # diffusers zero-initialises some layers (proj_out, conv_out): give every weight a value, so
    # that a weight read wrongly cannot hide.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    folder = ROOT / "tiny-sdxl" / "unet"
    unet.save_pretrained(folder, safe_serialization=True)
    # Keep only what a model card needs: no absolute paths or timestamps.
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    gen = torch.Generator().manual_seed(2)
    sample = torch.randn((2, 4, 16, 16), generator=gen)
    timesteps = torch.tensor([999, 10], dtype=torch.int64)
    ehs = torch.randn((2, 7, CONTEXT), generator=gen)
    text_embeds = torch.randn((2, POOLED), generator=gen)
    # original (h, w), crop (top, left), target (h, w): one sample cropped, one not.
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0], [512.0, 512.0, 64.0, 32.0, 448.0, 448.0]])
    names = ["time_proj", "time_embedding", "add_embedding", "conv_in"]
    names += [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
    names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))] + ["conv_out"]
    hooks, handles = {}, []
    for n in names:
        def hook(_m, _inp, out, n=n):
            hooks[n] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        handles.append(unet.get_submodule(n).register_forward_hook(hook))
    with torch.no_grad():
        out = unet(
            sample,
            timesteps,
            ehs,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
        ).sample
    for h in handles:
        h.remove()
    ref = {
        "unet.sample": sample,
        "unet.timesteps": timesteps,
        "unet.encoder_hidden_states": ehs,
        "unet.text_embeds": text_embeds,
        "unet.time_ids": time_ids,
        "unet.out": out,
    }
    ref.update({f"unet.hook.{n}": t.contiguous() for n, t in hooks.items()})
    ids, out1, out2, te1, te2 = text_encoders(ref)
    # One UNet evaluation conditioned as StableDiffusionXLPipeline conditions: both encoders'
    # penultimate states joined, the second one's projected pooled output, the size numbers.
    context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    with torch.no_grad():
        ref["step.out"] = unet(
            sample,
            timesteps,
            context,
            added_cond_kwargs={"text_embeds": out2.text_embeds, "time_ids": time_ids},
        ).sample
    vae = pipeline_folder(unet, te1, te2, ref)
    # The same weights as Stability's single file, kept as a layout over the folder's files
    # (`tiny-sdxl.layout.json` + `.extra.safetensors`, assembled by the tests as for tiny-sd1).
    make_fixtures.SINGLE_FILE_COMPONENTS = make_fixtures.SINGLE_FILE_COMPONENTS + (
        ("text_encoder_2", "text_encoder_2/model.safetensors"),
    )
    single = {k: v.contiguous() for k, v in ldm_single_file(unet, vae, te1, te2).items()}
    make_fixtures.write_single_file_layout("tiny-sdxl", single, ROOT / "tiny-sdxl")
    verify_single_file(single)
    shapes = sdxl_base_shapes()
    lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items())
    (ROOT / "sdxl-base.shapes.json").write_text("{\n" + lines + "\n}\n")
    print(f"sdxl-base.shapes.json: {len(shapes)} tensors")
    # One key: safetensors writes a metadata map in no fixed order, and the file must not change
    # from run to run.
    import transformers

    versions = f"torch {torch.__version__.split('+')[0]}, diffusers {diffusers.__version__}"
    meta = {"made_with": f"{versions}, transformers {transformers.__version__}"}
    save_file(dict(sorted(ref.items())), ROOT / "tiny-sdxl.reference.safetensors", metadata=meta)
    print(f"wrote {folder.parent} and tiny-sdxl.reference.safetensors")


if __name__ == "__main__":
    main()
