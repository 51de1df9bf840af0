#!/usr/bin/env python3
"""Write a model folder in Qwen2.5-0.5B-Instruct's layout and config with random weights, and a
small support-chat data set, so that ``configs/qwen_lora.yaml`` runs unchanged on a model of
that size (the real one cannot be downloaded on our machines). Its answers are noise.

    python tools/make_random_qwen.py          # models/Qwen2.5-0.5B-Instruct/, data/support/train.jsonl

The folder has the files of the hub repository ``Qwen/Qwen2.5-0.5B-Instruct``: ``config.json``
(its values: 24 layers, hidden 896, 14 heads / 2 key-value heads, intermediate 4864, vocabulary
151936, tied embeddings, rope theta 1e6, bf16), ``generation_config.json``, ``model.safetensors``
(bf16, 494 M parameters, about 1 GB: the tied model has no ``lm_head.weight``),
``tokenizer.json``, ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` with the chat
template inside it (as transformers 4 saved it there). The tokenizer is a byte-level BPE of
16,384 tokens trained on text found on this machine, with Qwen's special tokens after it: its ids
all lie below the model's vocabulary, as the real tokenizer's 151,665 do. The weights are
transformers' initialisation (normal, std 0.02) under a fixed seed.

``data/support/train.jsonl``: 240 alpaca records (questions to a shop's support desk and their
answers), built from templates.
Versions: python 3.11, torch 2.15.0, transformers 5.23.0, tokenizers 0.22.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "Qwen2.5-0.5B-Instruct"
DATA = ROOT / "data" / "support"
TEMPLATE = ROOT / "tests" / "fixtures" / "llm" / "templates" / "qwen2.5.jinja"

# Qwen/Qwen2.5-0.5B-Instruct's config.json.
CONFIG = dict(
    architectures=["Qwen2ForCausalLM"],
    attention_dropout=0.0,
    bos_token_id=151643,
    eos_token_id=151645,
    hidden_act="silu",
    hidden_size=896,
    initializer_range=0.02,
    intermediate_size=4864,
    max_position_embeddings=32768,
    max_window_layers=21,
    model_type="qwen2",
    num_attention_heads=14,
    num_hidden_layers=24,
    num_key_value_heads=2,
    rms_norm_eps=1e-06,
    rope_theta=1000000.0,
    sliding_window=32768,
    tie_word_embeddings=True,
    torch_dtype="bfloat16",
    transformers_version="4.43.1",
    use_cache=True,
    use_sliding_window=False,
    vocab_size=151936,
)
GENERATION = dict(bos_token_id=151643, pad_token_id=151643, do_sample=True,
                  eos_token_id=[151645, 151643], repetition_penalty=1.1, temperature=0.7,
                  top_p=0.8, top_k=20, transformers_version="4.37.0")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

PRODUCTS = ["kettle", "desk lamp", "backpack", "phone case", "coffee grinder", "rain jacket",
            "bike light", "yoga mat", "water bottle", "headphones", "notebook", "toaster"]
QUESTIONS = [
    ("Where is my {p}? I ordered it {d} days ago.",
     "I'm sorry your {p} has not arrived yet. Orders usually arrive within five working days; "
     "after {d} days, please send us your order number and we will trace the parcel and, if it "
     "is lost, send a new {p} at no cost."),
    ("Can I return a {p} I bought {d} days ago?",
     "Yes. You can return a {p} within 30 days of delivery, unused and in its box. Start the "
     "return from your account page; the label is free, and the refund reaches your card within "
     "five working days of our receiving it."),
    ("My {p} arrived broken. What should I do?",
     "I'm sorry about that. Please send a photo of the broken {p} and of its box to our support "
     "address with your order number; we will send a replacement the same day, and you do not "
     "need to return the broken one."),
    ("Do you ship the {p} abroad?",
     "We ship the {p} to every country in the European Union and to the United Kingdom. Delivery "
     "abroad takes five to ten working days and costs a flat 9 euros."),
    ("How do I clean my {p}?",
     "Wipe the {p} with a soft damp cloth and a little mild soap, then let it dry. Do not put it "
     "in the dishwasher or use solvents: they damage the finish and void the warranty."),
]


def corpus() -> list[str]:
    """Text for the tokenizer: the repository's docs and Python sources found on this machine."""
    texts = [p.read_text(errors="ignore") for p in ROOT.glob("*.md")]
    texts += [p.read_text(errors="ignore") for p in (ROOT / "tools").glob("*.py")]
    for folder in sys.path:
        for path in sorted(Path(folder).glob("*.py"))[:400] if Path(folder).is_dir() else []:
            texts.append(path.read_text(errors="ignore"))
    texts += [q.format(p=p, d=3) + " " + a.format(p=p, d=3) for q, a in QUESTIONS for p in PRODUCTS]
    return texts


def write_tokenizer() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=16384, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", model_max_length=131072)
    fast.save_pretrained(str(MODEL))
    # Qwen2.5's repository keeps the template inside tokenizer_config.json.
    config_path = MODEL / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEMPLATE.read_text()
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (MODEL / "chat_template.jinja").unlink(missing_ok=True)
    model = json.loads((MODEL / "tokenizer.json").read_text())["model"]
    (MODEL / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (MODEL / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_model() -> None:
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "torch_dtype", "transformers_version")})
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(MODEL / "model.safetensors"), metadata={"format": "pt"})
    (MODEL / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (MODEL / "generation_config.json").write_text(json.dumps(GENERATION, indent=2) + "\n")
    count = sum(t.numel() for t in tensors.values())
    print(f"{MODEL}: {len(tensors)} tensors, {count / 1e6:.1f} M parameters")


def write_data() -> None:
    rng = random.Random(0)
    DATA.mkdir(parents=True, exist_ok=True)
    with open(DATA / "train.jsonl", "w", encoding="utf-8") as f:
        for i in range(240):
            q, a = QUESTIONS[i % len(QUESTIONS)]
            p, d = rng.choice(PRODUCTS), rng.randint(2, 20)
            f.write(json.dumps({"instruction": q.format(p=p, d=d), "input": "",
                                "output": a.format(p=p, d=d)}) + "\n")
    print(f"{DATA / 'train.jsonl'}: 240 records")


def main() -> None:
    torch.set_num_threads(2)
    if MODEL.exists():
        shutil.rmtree(MODEL)
    MODEL.mkdir(parents=True)
    write_tokenizer()
    write_model()
    write_data()


if __name__ == "__main__":
    main()
