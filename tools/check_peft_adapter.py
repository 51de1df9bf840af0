#!/usr/bin/env python3
"""Loads a PEFT adapter folder written by our code into peft and checks it (not in CI).

    LORA_TRAINER_PEFT_DIR=/tmp/peft cargo test --release --lib llm::peft
    python tools/check_peft_adapter.py /tmp/peft

The folder holds the tiny `llama` fixture's reference LoRA (tests/fixtures/llm/), written by
`llm::peft::PeftAdapter::save`. `PeftModel.from_pretrained` must load it onto the fixture model
with no missing and no unexpected adapter key, and the adapted model's loss on the reference
batch must be the reference's `lora.loss` (what peft computed with the same matrices when the
fixtures were made).

The same folder converts with llama.cpp's converter (checked with the copy in the
`llama-cpp-python` 0.3.36 sdist, run from its `vendor/llama.cpp`):

    PYTHONPATH=gguf-py python convert_lora_to_gguf.py DIR --base tests/fixtures/llm/llama --outfile x.gguf

which writes all 8 adapter tensors.
"""

import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llm"


def main() -> None:
    folder = sys.argv[1]
    base = LlamaForCausalLM.from_pretrained(str(FIXTURES / "llama")).eval()
    model = PeftModel.from_pretrained(base, folder)
    loaded = {k for k, _ in model.named_parameters() if "lora_" in k}
    if len(loaded) != 8:
        raise SystemExit(f"expected 8 adapter matrices, found {len(loaded)}")
    # Every matrix of the file landed on a layer (peft warns about, but does not fail on, keys it
    # could not place): compare values key by key.
    ours = load_file(str(Path(folder) / "adapter_model.safetensors"))
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    missing = sorted(set(state) - set(ours))
    unexpected = sorted(set(ours) - set(state))
    if missing or unexpected:
        raise SystemExit(f"missing {missing}, unexpected {unexpected}")
    for key, value in ours.items():
        if not torch.equal(state[key], value):
            raise SystemExit(f"{key} loaded with other values")
    ref = load_file(str(FIXTURES / "llama.reference.safetensors"))
    with torch.no_grad():
        loss = model(input_ids=ref["ids"], labels=ref["labels"]).loss
    want = ref["lora.loss"].item()
    if abs(loss.item() - want) > 1e-5 * want:
        raise SystemExit(f"loss {loss.item()} against the reference {want}")
    print(f"peft loaded {len(ours)} tensors onto {len(loaded)} adapter matrices, no missing or "
          f"unexpected key; loss {loss.item():.6f} = reference {want:.6f}")


if __name__ == "__main__":
    main()
