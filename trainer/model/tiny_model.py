"""The offline tiny model: a ~200k-parameter Llama with its own byte-level BPE tokenizer and chat template.

    lora-workbench make-tiny-model runs/.cache/tiny-model

No hub is reachable on CI or the GPU box, so tests, examples and the UI's embedded default use this model.
Its weights are random; LoRA adapters on top of it still learn the bundled synthetic task.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from trainer.config.paths import PROJECT_ROOT

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 768


def corpus_lines() -> list[str]:
    """All strings of the bundled data, the tokenizer's training text."""
    lines: list[str] = []
    for path in sorted((PROJECT_ROOT / "data").glob("*.json*")):
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x]
        for row in rows:
            lines.extend(_strings(row))
    return lines


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def build_tokenizer():
    """Train a byte-level BPE on the bundled data and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def llama_config(tokenizer: Any, hidden: int = 64, intermediate: int = 192, layers: int = 2) -> Any:
    """A small Llama for the bundled tokenizer (the tiny model's shape by default; benchmarks use larger ones)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,  # every out-feature count a multiple of 32: bitsandbytes' CPU 4-bit kernel
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build and save the tiny model + tokenizer into out_dir (written to a temp dir, then renamed into place)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another directory or remove it first")
    # per process and thread: two runs, or two pages of one server (the estimate of each), may build it at once
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}-{threading.get_ident()}")
    tokenizer = build_tokenizer()
    config = llama_config(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # A wider output layer lets LoRA on the hidden states make confident predictions; at the default init
    # (std 0.02) the logits stay near-uniform and the loss barely moves while accuracy reaches 100%.
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=32
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if out.exists():
            out.rmdir()  # only ever an empty directory here
        tmp.rename(out)
    except OSError:
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp)  # another process finished first; its model is identical (same seed and data)
    return out


def ensure_tiny_model(cache_dir: Path) -> Path:
    """Return the cached tiny model dir, building it once if missing."""
    target = cache_dir / "tiny-model"
    if not (target / "config.json").exists():
        make_tiny_model(target)
    return target
