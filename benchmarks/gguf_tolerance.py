"""GGUF export tolerance on the built-in real model: how far each GGUF type moves the logits (rounding noise), against
how far a broken export moves them (a real bug), to place trainer/export/gguf.py's GGUF_TOLERANCE between the two.

    LORA_WORKBENCH_CACHE=~/.cache/lora-workbench-tests python benchmarks/gguf_tolerance.py --adapter runs/<id>/adapter
    python benchmarks/gguf_tolerance.py --adapter DIR --quants f16 q8_0 q4_k_m   # one type or a few

By default every GGUF type: f16, bf16, q8_0 and, where llama-quantize is built (`lora-workbench build-llama-cpp`),
the k-quants q6_k, q5_k_m, q4_k_m (each quantized from the f16 GGUF, as the export does; "s to write" counts that f16 conversion in the first).

Takes a trained adapter of builtin:smollm2-135m, writes three fp32 checkpoints (base + adapter merged, the base alone
= adapter dropped, the adapter merged at twice its scale), converts each with llama.cpp's converter to each GGUF type
(trainer/export/llama_cpp.py; k-quants through llama-quantize) and prints, per GGUF, max |logit diff| against the unmerged
fp32 base + adapter on the export check's prompts, that relative to the largest reference logit (the number
GGUF_TOLERANCE bounds), the mean diff and greedy agreement. Measures and prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.chat_export import machine_lines  # noqa: E402  the same machine and library lines
from benchmarks.export_fidelity import row, scale_of  # noqa: E402


def checkpoints(adapter: Path, tmp: Path) -> tuple[dict[str, Path], list[Any], Any]:
    """fp32 checkpoints (merged, dropped, scaled x2), the reference logits and the tokenizer."""
    from trainer.chat.adapter_source import read_adapter
    from trainer.export.merge import ExportRequest, forward_logits, load_tokenizer_for, load_unmerged, prompt_inputs

    source = read_adapter(adapter)
    req = ExportRequest(adapter=adapter, out=tmp / "unused", dtype="fp32")
    tokenizer = load_tokenizer_for(source, req)
    dirs = {}
    for case in ("merged", "scaled x2"):
        model, _ = load_unmerged(source, req, cuda=False)
        if case == "merged":
            reference = forward_logits(model, prompt_inputs(tokenizer))
        else:
            for m in model.modules():
                if isinstance(getattr(m, "scaling", None), dict):
                    m.scaling = {k: 2 * v for k, v in m.scaling.items()}
        dirs[case] = tmp / case.replace(" ", "-")
        model.merge_and_unload().save_pretrained(dirs[case])
        tokenizer.save_pretrained(dirs[case])
        del model
    dirs["dropped"] = Path(source.base)  # the base checkpoint itself, as if the adapter never reached the GGUF
    return dirs, reference, tokenizer


def gguf_of(converter: Path, cache: Path, model_dir: Path, out: Path, quant: str) -> Path:
    """The converter's GGUF of model_dir, or for a k-quant llama-quantize's of its f16 GGUF (kept for the next)."""
    from trainer.export.gguf_types import CONVERTER_QUANTS
    from trainer.export.llama_cpp import convert, quantize

    if quant in CONVERTER_QUANTS:
        convert(converter, model_dir, out, quant, log=lambda _: None)
        return out
    f16 = out.with_name(out.name.split(".")[0] + ".f16-source.gguf")
    if not f16.is_file():
        convert(converter, model_dir, f16, "f16", log=lambda _: None)
    quantize(f16, out, quant, cache, log=lambda _: None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, required=True, help="an adapter of builtin:smollm2-135m")
    ap.add_argument(
        "--quants", nargs="+", help="GGUF types (default: all; the k-quants where llama-quantize is built)"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from trainer.export.fidelity import compare, forward_logits, prompt_inputs
    from trainer.export.gguf import GGUF_TOLERANCE
    from trainer.export.gguf_types import CONVERTER_QUANTS, K_QUANTS
    from trainer.export.llama_cpp import ensure_converter, find_quantizer
    from trainer.model.builtin_models import cache_root
    from trainer.model.gguf_load import load_gguf

    cache = cache_root("runs")
    quantizer = find_quantizer(cache)
    quants = args.quants or [*CONVERTER_QUANTS, *(reversed(K_QUANTS) if quantizer else ())]
    tmp = Path(tempfile.mkdtemp(prefix="lwb-gguf-tolerance-"))
    log, rows, t0 = tmp / "bench.log", [], time.perf_counter()
    with open(log, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        converter = ensure_converter(cache)
        dirs, reference, tokenizer = checkpoints(args.adapter.resolve(), tmp)
        scale = scale_of(reference)
        for quant in quants:
            for case, model_dir in dirs.items():
                t = time.perf_counter()
                gguf = gguf_of(converter, cache, model_dir, tmp / f"{case.replace(' ', '-')}.{quant}.gguf", quant)
                seconds = time.perf_counter() - t
                model, _ = load_gguf(gguf)
                f = compare(reference, forward_logits(model, prompt_inputs(tokenizer)), "fp32")
                del model
                label = f"{quant}, {case}" if case == "merged" else f"{quant}, broken: adapter {case}"
                rows.append(row(label, f, scale, f"{gguf.stat().st_size / 1e6:.0f} MB, {seconds:.0f} s to write"))
                gguf.unlink()
        for source in tmp.glob("*.f16-source.gguf"):
            source.unlink()
    print(f"(logs: {log}; {time.perf_counter() - t0:.0f} s)\n")
    print("## GGUF export tolerance on builtin:smollm2-135m (`benchmarks/gguf_tolerance.py`)\n")
    print("\n".join(machine_lines(args.threads)))
    print(f"Adapter: {args.adapter}. Reference: fp32 base + adapter, unmerged; max |logit| {scale:.3g}.")
    print(f"llama-quantize: {quantizer or 'not built (no k-quant rows)'}. Current GGUF_TOLERANCE: {GGUF_TOLERANCE}.\n")
    print("| GGUF | max \\|Δlogit\\| | relative to max \\|logit\\| | mean \\|Δlogit\\| | greedy agree | file |")
    print("|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
