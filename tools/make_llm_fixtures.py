#!/usr/bin/env python3
"""Tiny random causal language models of each architecture the LLM task reads, with
transformers' outputs on them, for the Rust parity tests (issue 16).

    python tools/make_llm_fixtures.py     # writes tests/fixtures/llm/**

Per architecture, `tests/fixtures/llm/<name>/` is the model folder as `save_pretrained` writes it
(`config.json`, `model.safetensors`, `generation_config.json`; `qwen2` also a tiny Qwen2.5-style
tokenizer with its chat template, see `write_tokenizer`) and `tests/fixtures/llm/<name>.
reference.safetensors` holds, for a batch of two 10-token rows (`ids`, int64) whose first tokens
are prompt (`labels` -100 there): `logits` `[2, 10, vocab]`, `loss` (transformers' causal-LM loss:
shifted by one, mean over the labelled tokens), and, with a PEFT LoRA (r=4, alpha=8, on
`q_proj` and `v_proj`, both matrices random so that every gradient is non-zero), `lora.loss` and
each adapter matrix under its PEFT key (`base_model.model.model.layers.0.self_attn.q_proj.
lora_A.weight`) with its gradient under `grad.<key>`.

`tests/fixtures/llm/templates/`: the chat templates of Qwen2.5-Instruct, Qwen3, Llama 3.1-Instruct
and Mistral-Nemo-Instruct-2407 as the models' `tokenizer_config.json` hold them (copied from
llama.cpp's `models/templates/`, which fetches them from the model repositories; the copy in the
`llama-cpp-python` 0.3.36 sdist), and `cases.json`: conversations with transformers'
`apply_chat_template(..., tokenize=False)` rendering of each under each template (with and
without `add_generation_prompt`; Llama's `date_string` fixed to "26 Jul 2024"), for the Rust
renderer's tests.

The architectures and what each one exercises:
- `llama`: grouped-query attention (4 heads, 2 key/value heads), Llama 3's rope scaling (its
  original length of 512 puts the 8-wide heads' four frequencies in all three of its bands:
  kept, blended, divided), untied embeddings;
- `qwen2`: q/k/v biases, tied embeddings, rope theta 1e6;
- `qwen3`: per-head RMSNorm on q and k, a head width (16) that is not hidden / heads, tied;
- `mistral`: Mistral's config (sliding window longer than the rows), untied.

transformers 5 writes `rope_parameters`; transformers 4's `rope_theta`/`rope_scaling` keys are
tested on config text in the Rust unit tests. Seeded, one thread: a second run writes the same
bytes with the same versions (python 3.11, torch 2.15.0, transformers 5.23.0, peft 0.21.2).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llm"
VOCAB = 320  # the tiny byte-level BPE's: 256 bytes, 3 special tokens, 61 merges
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)


def models():
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    llama3_rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                       high_freq_factor=4.0, original_max_position_embeddings=512)
    return {
        "llama": (LlamaForCausalLM, LlamaConfig(**COMMON, rope_parameters=llama3_rope, tie_word_embeddings=False)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON, rope_parameters=dict(rope_type="default", rope_theta=1e6),
                                                tie_word_embeddings=True)),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=1e6),
                                                tie_word_embeddings=True, attention_bias=False)),
        "mistral": (MistralForCausalLM, MistralConfig(**COMMON, sliding_window=4096, tie_word_embeddings=False,
                                                      rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    }


def randomize(model, seed: int) -> None:
    """Normal weights of a scale that keeps activations of order one (the default 0.02 makes
    every logit nearly equal, which would hide mistakes), norms around 1, biases small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


TEMPLATES = {
    # name: (bos_token, eos_token)
    "qwen2.5": (None, "<|im_end|>"),
    "qwen3": (None, "<|im_end|>"),
    "llama-3.1": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral-nemo": ("<s>", "</s>"),
    # Ours, without whitespace control: checks trim_blocks and lstrip_blocks.
    "blocks": (None, None),
}
CONVERSATIONS = [
    ([("user", "What is 2+2?"), ("assistant", "4")], False),
    ([("system", "You answer in French."), ("user", "Hello"), ("assistant", "Bonjour"),
      ("user", "  Thank you\n\nvery much  "), ("assistant", "De rien. ✓")], False),
    ([("user", "Write a haiku about rain.")], True),
    ([("system", "Be brief."), ("user", "Why is the sky blue?")], True),
    ([("user", "a"), ("assistant", "b"), ("user", "c")], True),
]


CORPUS = [
    "What is 2+2? 4. Hello, bonjour, de rien. Thank you very much.",
    "Write a haiku about rain. Why is the sky blue? Be brief. You answer in French.",
    "the quick brown fox jumps over the lazy dog; the rain in Spain stays mainly in the plain",
]


def write_tokenizer(folder: Path) -> None:
    """A Qwen2.5-style tokenizer for the `qwen2` model: byte-level BPE trained on a few lines to
    the model's vocabulary, `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as special tokens,
    Qwen2.5-Instruct's chat template; saved by transformers' `save_pretrained`, so the folder
    has the files (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`) a real model's has.
    `tokens.json`: transformers' ids of each conversation's rendering."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = (ROOT / "templates" / "qwen2.5.jinja").read_text()
    fast.save_pretrained(str(folder))
    reread = AutoTokenizer.from_pretrained(str(folder))
    cases = []
    for turns, generation in CONVERSATIONS:
        messages = [{"role": r, "content": c} for r, c in turns]
        text = reread.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        cases.append({"text": text, "ids": reread(text, add_special_tokens=False).input_ids})
    (folder / "tokens.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")


def chat_template_cases() -> None:
    """Each template's rendering of each conversation by transformers, into cases.json."""
    import json

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    folder = ROOT / "templates"
    cases = []
    for name, (bos, eos) in TEMPLATES.items():
        template = (folder / f"{name}.jinja").read_text()
        specials = [t for t in (bos, eos) if t]
        vocab = {"<unk>": 0, **{t: i + 1 for i, t in enumerate(specials)}}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                      bos_token=bos, eos_token=eos, unk_token="<unk>")
        tok.chat_template = template
        for turns, generation in CONVERSATIONS:
            messages = [{"role": r, "content": c} for r, c in turns]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                           date_string="26 Jul 2024")
            cases.append({"template": name, "bos_token": bos, "eos_token": eos, "messages": messages,
                          "add_generation_prompt": generation, "text": text})
    (folder / "cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    print(f"templates: {len(cases)} renderings")


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    # The templates are inputs (copied), not outputs: keep them.
    for path in ROOT.glob("*"):
        if path.name != "templates":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    ROOT.mkdir(parents=True, exist_ok=True)
    chat_template_cases()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 10), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, :6] = -100
    for seed, (name, (cls, config)) in enumerate(models().items()):
        torch.manual_seed(seed)
        model = cls(config).eval()
        randomize(model, 100 + seed)
        model.save_pretrained(str(ROOT / name), safe_serialization=True)
        if name == "qwen2":
            write_tokenizer(ROOT / name)
        ref = {"ids": ids, "labels": labels}
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
        ref["logits"] = out.logits.contiguous()
        ref["loss"] = out.loss.reshape(1)

        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj"]))
        gen_lora = torch.Generator().manual_seed(200 + seed)
        lora = {k: p for k, p in peft_model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for p in lora.values():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen_lora))
        out = peft_model(input_ids=ids, labels=labels)
        out.loss.backward()
        ref["lora.loss"] = out.loss.detach().reshape(1)
        for key, p in lora.items():
            peft_key = key.replace(".default", "")
            ref[peft_key] = p.detach().clone()
            ref["grad." + peft_key] = p.grad.detach().clone()
        meta = {"made_with": f"torch {torch.__version__.split('+')[0]}, transformers {__import__('transformers').__version__}, peft {__import__('peft').__version__}"}
        save_file(dict(sorted(ref.items())), str(ROOT / f"{name}.reference.safetensors"), metadata=meta)
        print(f"{name}: loss {ref['loss'].item():.4f}, lora loss {ref['lora.loss'].item():.4f}, {len(lora)} adapter matrices")


if __name__ == "__main__":
    main()
