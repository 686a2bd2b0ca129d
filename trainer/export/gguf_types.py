"""The GGUF types an export can write, and what each needs on this machine (checked before any model loads)."""

from __future__ import annotations

import os
from pathlib import Path

from trainer.export.llama_cpp import BUILD_HINT, find_quantizer
from trainer.model.builtin_models import cache_root

CONVERTER_QUANTS = ("f16", "bf16", "q8_0")  # written by convert_hf_to_gguf.py itself
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")  # need llama.cpp's compiled llama-quantize


def gguf_problems(quant: str, push_to_hub: str | None, cache: Path | None = None) -> list[str]:
    """What --format gguf cannot do here, before any model loads (cache: where build-llama-cpp put llama.cpp;
    default the one of a run in ./runs)."""
    problems = []
    if quant not in CONVERTER_QUANTS + K_QUANTS:
        problems.append(f"--quant: {quant!r} is not one of {', '.join(CONVERTER_QUANTS + K_QUANTS)}")
    elif quant in K_QUANTS and (chosen := os.environ.get("LLAMA_QUANTIZE")) and find_quantizer(Path()) is None:
        problems.append(f"--quant {quant}: $LLAMA_QUANTIZE={chosen} is not an executable file (unset it or fix it)")
    elif quant in K_QUANTS and find_quantizer(cache or cache_root("runs")) is None:
        problems.append(
            f"--quant {quant}: needs llama.cpp's compiled llama-quantize: {BUILD_HINT}; "
            f"without it use {', '.join(CONVERTER_QUANTS)}"
        )
    if push_to_hub:
        problems.append("--push-to-hub: not done for --format gguf yet; upload the directory with `hf upload`")
    return problems
