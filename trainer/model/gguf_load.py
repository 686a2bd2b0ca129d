"""Reading a GGUF file into a transformers model, as transformers' GGUF loader does, with the file parsed once.

with parsed_once(path):
    model, tokenizer = load_gguf(path)   # the built-in model's conversion; an exported GGUF's check
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_PATCHING = threading.Lock()


@contextmanager
def parsed_once(path: Path) -> Iterator[None]:
    """Inside, `gguf.GGUFReader(path)` answers with one parse of the file and `gguf.get_tensor_name_map` from a memo.

    transformers' GGUF loader parses the file for the config, again for the tokenizer and again for the tensors
    (each parse walks the 49k-entry vocabulary: about 5 s for SmolLM2 on one core) and rebuilds llama.cpp's tensor
    name map for every tensor (8 s in all). Both are looked up on the `gguf` module when called, so one parse and
    one map serve the whole load; where a transformers release reads them otherwise, it parses as before."""
    import gguf

    with _PATCHING:  # one load at a time patches the module (a job is one thread; a caller may not be)
        real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
        target, parsed = os.path.realpath(path), real_reader(str(path))

        def reader(p: Any, mode: str = "r") -> Any:
            return parsed if mode == "r" and os.path.realpath(p) == target else real_reader(p, mode)

        try:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(real_map)
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def load_gguf(path: Path) -> tuple[Any, Any]:
    """The GGUF dequantized into a transformers model (fp32) and its tokenizer, as transformers' loader reads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(  # GGUF holds no pickles; use_safetensors keeps any fallback off
        str(path.parent), gguf_file=path.name, dtype=torch.float32, use_safetensors=True
    )
    return model.eval(), tokenizer
