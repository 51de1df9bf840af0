#!/usr/bin/env python3
"""The bundled language-model demo: a tiny randomly initialised Qwen2-style model with its own
tokenizer and Qwen2.5-Instruct's chat template, and a small instruction set, both committed, so
that `configs/demo_llm.yaml` trains offline in seconds.

    python tools/make_demo_llm.py      # writes models/demo-llm/ and data/demo_llm/train.jsonl

The model folder is what transformers' `save_pretrained` writes for Qwen2ForCausalLM
(`config.json`, `model.safetensors`, `generation_config.json`, `tokenizer.json`,
`tokenizer_config.json`, `chat_template.jinja`); the tokenizer is a byte-level BPE trained on
the demo's own text (so its records are a few dozen tokens long). The weights are transformers'
random initialisation: the model knows nothing, and what it answers after training is what the
LoRA learned. Seeded: a second run writes the same files with the same versions (python 3.11,
torch 2.15.0, transformers 5.23.0, tokenizers 0.22).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "demo-llm"
DATA = ROOT / "data" / "demo_llm"
TEMPLATE = ROOT / "tests" / "fixtures" / "llm" / "templates" / "qwen2.5.jinja"
VOCAB = 640

# A pirate who answers questions about colours and animals: a style the answers share, so that
# the curve falls and the greedy answers become recognisable.
FACTS = [
    ("What colour is the sky?", "Arr, the sky be blue, matey!"),
    ("What colour is grass?", "Arr, the grass be green, matey!"),
    ("What colour is snow?", "Arr, the snow be white, matey!"),
    ("What colour is coal?", "Arr, the coal be black, matey!"),
    ("What colour is the sun?", "Arr, the sun be yellow, matey!"),
    ("What colour is a ruby?", "Arr, a ruby be red, matey!"),
    ("What colour is the sea?", "Arr, the sea be blue, matey!"),
    ("What colour is an orange?", "Arr, an orange be orange, matey!"),
    ("What does a cat say?", "Arr, a cat says meow, matey!"),
    ("What does a dog say?", "Arr, a dog says woof, matey!"),
    ("What does a cow say?", "Arr, a cow says moo, matey!"),
    ("What does a duck say?", "Arr, a duck says quack, matey!"),
    ("What does a sheep say?", "Arr, a sheep says baa, matey!"),
    ("What does a parrot say?", "Arr, a parrot says pieces of eight, matey!"),
    ("How many legs has a cat?", "Arr, a cat has four legs, matey!"),
    ("How many legs has a duck?", "Arr, a duck has two legs, matey!"),
    ("How many legs has a spider?", "Arr, a spider has eight legs, matey!"),
    ("How many legs has a fish?", "Arr, a fish has no legs, matey!"),
    ("Where does a fish live?", "Arr, a fish lives in the sea, matey!"),
    ("Where does a bird live?", "Arr, a bird lives in a nest, matey!"),
    ("Where does a pirate live?", "Arr, a pirate lives on a ship, matey!"),
    ("Where does a bee live?", "Arr, a bee lives in a hive, matey!"),
    ("Who are you?", "Arr, I be a pirate, matey!"),
    ("What do you want?", "Arr, I want treasure, matey!"),
]


def write_data() -> None:
    """data/demo_llm/train.jsonl: the facts in alpaca format, a few with an `input`."""
    DATA.mkdir(parents=True, exist_ok=True)
    with open(DATA / "train.jsonl", "w", encoding="utf-8") as f:
        for question, answer in FACTS:
            f.write(json.dumps({"instruction": question, "input": "", "output": answer}) + "\n")


def write_tokenizer() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    template = TEMPLATE.read_text()
    corpus = [q for q, _ in FACTS] + [a for _, a in FACTS] + [
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        "system\nuser\nassistant\n",
        "Hello! Tell me a story. Why is the sea salty? What is your name?",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = template
    fast.save_pretrained(str(MODEL))


def write_model() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1e6),
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=2,
    )
    model = Qwen2ForCausalLM(config).eval()
    # transformers draws the (tied) embeddings with std 0.02; after the final RMSNorm a hidden
    # state has norm √64, so no logit could pass about 1.3 and no LoRA could make the model
    # sure of a token. Wider embeddings leave the LoRA something to steer.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(15.0)
    model.save_pretrained(str(MODEL), safe_serialization=True)


def main() -> None:
    torch.set_num_threads(1)
    if MODEL.exists():
        shutil.rmtree(MODEL)
    MODEL.mkdir(parents=True)
    write_data()
    write_tokenizer()
    write_model()
    (MODEL / "README.md").write_text(
        "# demo-llm\n\nA tiny, randomly initialised Qwen2-style language model (4 layers, hidden 64,\n"
        "vocabulary 640) with a byte-level tokenizer trained on the demo's text and Qwen2.5-Instruct's\n"
        "chat template. It knows nothing: `configs/demo_llm.yaml` teaches a LoRA on it to answer like\n"
        "a pirate. Made by `tools/make_demo_llm.py`.\n"
    )
    print(f"wrote {MODEL} and {DATA / 'train.jsonl'}")


if __name__ == "__main__":
    main()
