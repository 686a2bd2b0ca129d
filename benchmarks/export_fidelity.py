"""Export fidelity on the built-in real model: how far each export moves the logits (float noise), against how far a
deliberately broken merge moves them (a real bug), to place trainer/export/merge.py's TOLERANCE between the two.

    LORA_WORKBENCH_CACHE=~/.cache/lora-workbench-tests python benchmarks/export_fidelity.py
    python benchmarks/export_fidelity.py --steps 8 --lr 3e-3 --threads 2
    python benchmarks/export_fidelity.py --adapter lora=runs/<id>/adapter --adapter qlora=runs/<id>/adapter

Trains LoRA, DoRA and QLoRA (4-bit NF4) adapters of builtin:smollm2-135m for a few steps at a high learning rate
(so the adapter really moves the logits), or takes given adapter dirs; exports each with `run_export` to fp32, fp16
and bf16 (16bit merge, and for QLoRA also `dequantized`), and prints per export the max |logit diff| against
base + adapter (the check's own number), that relative to the largest reference logit, the mean diff and greedy
agreement, on the fidelity check's own prompts. Per adapter it prints the same for broken merges (adapter dropped,
adapter scaled by 2, computed in fp32 without saving). For QLoRA it also prints the drift of each 16bit-merge export
against the 4-bit base + adapter the run trained with. Measures and prints; asserts nothing. Training and export
logs go to <tmp>/bench.log. The built-in model must be cached already (`lora-workbench prepare-model
builtin:smollm2-135m`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.chat_export import machine_lines  # noqa: E402  the same machine and library lines

METHODS = ("lora", "dora", "qlora")
DTYPES = ("fp32", "fp16", "bf16")


def train_adapter(method: str, args: argparse.Namespace, runs: Path) -> Path:
    """A short, high-learning-rate run of the built-in model; returns its adapter dir."""
    from trainer.run.train import run_training

    cfg: dict[str, Any] = {
        "recipe": "qlora" if method == "qlora" else "lora",
        "model_preset": "smollm2",
        "adapter": {"method": "dora" if method == "dora" else "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        "data": {"source": str(args.data), "max_length": 96, "max_samples": args.steps * 4},
        "training": {
            "max_steps": args.steps,
            "learning_rate": args.lr,
            "per_device_batch_size": 4,
            "logging_steps": 1,
            "save_steps": 1000,
        },
        "output": {"runs_dir": str(runs), "run_name": f"fidelity-{method}"},
    }
    path = runs.parent / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before = set(runs.iterdir()) if runs.is_dir() else set()
    if run_training(str(path)) != 0:
        raise SystemExit(f"training {method} from {path} failed; see {runs.parent / 'bench.log'}")
    (run,) = [p for p in set(runs.iterdir()) - before if p.is_dir() and not p.name.startswith(".")]
    return run / "adapter"


def references(adapter: Path, inputs: list[Any]) -> dict[str, list[Any]]:
    """fp32 logits of base + adapter (the 16bit check's reference on a CPU), of the base alone, of the adapter
    scaled by 2, and for a 4-bit run the 4-bit base + adapter (the dequantized check's reference)."""
    from trainer.chat.adapter_source import read_adapter
    from trainer.export.merge import ExportRequest, forward_logits, load_unmerged

    source = read_adapter(adapter)
    req = ExportRequest(adapter=adapter, out=adapter.parent / "unused", dtype="fp32")
    model, _ = load_unmerged(source, req, cuda=False)
    refs = {"adapter": forward_logits(model, inputs)}
    with model.disable_adapter():
        refs["dropped"] = forward_logits(model, inputs)
    for m in model.modules():
        if isinstance(getattr(m, "scaling", None), dict):
            m.scaling = {k: 2 * v for k, v in m.scaling.items()}
    refs["scaled x2"] = forward_logits(model, inputs)
    del model
    if source.quantization != "none":
        model, _ = load_unmerged(source, ExportRequest(adapter=adapter, out=req.out, merge_into="dequantized"), False)
        refs["4bit"] = forward_logits(model, inputs)
        with model.disable_adapter():
            refs["4bit base"] = forward_logits(model, inputs)
        del model
    return refs


def scale_of(reference: list[Any]) -> float:
    """max |reference logit|, floored at 1, as trainer.export.merge.compare scales its tolerance."""
    return max(max(float(r.abs().max()) for r in reference), 1.0)


def row(label: str, f: dict[str, Any], scale: float, verdict: str = "") -> str:
    return (
        f"| {label} | {f['max_abs_logit_diff']:.3g} | {f['max_abs_logit_diff'] / scale:.2e} | "
        f"{f['mean_abs_logit_diff']:.3g} | {f['greedy_agreement']:.1%} | {verdict} |"
    )


def export_one(adapter: Path, out: Path, dtype: str, merge_into: str) -> tuple[dict[str, Any], str, bool]:
    """run_export as `lora-workbench export` runs it; returns (its fidelity numbers, verdict, export kept)."""
    from trainer.export.job import run_export
    from trainer.export.merge import ExportError, ExportRequest

    req = ExportRequest(adapter=adapter, out=out, dtype=dtype, merge_into=merge_into, overwrite=True)
    try:
        f = run_export(req)["fidelity"]
    except ExportError as e:
        if e.report is None:
            raise
        f = e.report["fidelity"]
    return f, f"{'passed' if f['passed'] else 'FAILED'} (tol {f['tolerance']:.3g})", f["passed"]


def exported_logits(out: Path, inputs: list[Any]) -> list[Any]:
    from transformers import AutoModelForCausalLM

    from trainer.export.merge import forward_logits

    model = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True)
    logits = forward_logits(model, inputs)
    del model
    return logits


def measure(method: str, adapter: Path, tmp: Path, inputs: list[Any]) -> tuple[list[str], list[str]]:
    """Table rows for one adapter: its exports and broken merges, and (QLoRA) the drift against the 4-bit run."""
    from trainer.export.merge import compare

    refs = references(adapter, inputs)
    scale = scale_of(refs["adapter"])
    rows = [f"| **{method}** (max \\|logit\\| {scale:.3g}) | | | | | |"]
    drift = []
    merges = ("16bit", "dequantized") if "4bit" in refs else ("16bit",)
    scale4 = scale_of(refs["4bit"]) if "4bit" in refs else scale
    for merge in merges:
        ref_scale = scale4 if merge == "dequantized" else scale
        for dtype in DTYPES:
            out = tmp / "exports" / f"{method}-{merge}-{dtype}"
            f, verdict, kept = export_one(adapter, out, dtype, merge)
            rows.append(row(f"{merge} merge, {dtype}", f, ref_scale, verdict))
            if kept and merge == "16bit" and "4bit" in refs:
                d = compare(refs["4bit"], exported_logits(out, inputs), "fp32")
                drift.append(row(f"{method} 16bit merge, {dtype} vs 4-bit base + adapter", d, scale4))
            shutil.rmtree(out, ignore_errors=True)
    for bug in ("dropped", "scaled x2"):
        rows.append(
            row(f"broken: adapter {bug} (fp32, vs base + adapter)", compare(refs["adapter"], refs[bug], "fp32"), scale)
        )
    if "4bit" in refs:
        drift.append(
            row("fp32 base + adapter vs 4-bit base + adapter", compare(refs["4bit"], refs["adapter"], "fp32"), scale4)
        )
        drift.append(
            row("fp32 base vs 4-bit base (no adapter)", compare(refs["4bit base"], refs["dropped"], "fp32"), scale4)
        )
    return rows, drift


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", action="append", default=[], metavar="METHOD=DIR", help="reuse (lora|dora|qlora)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=8, help="training steps of each adapter")
    ap.add_argument("--lr", type=float, default=3e-3, help="high on purpose: the adapter must move the logits")
    ap.add_argument("--data", type=Path, default=ROOT / "data/persona_train.jsonl", help="training rows")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    args = ap.parse_args()
    given = {m: Path(d).resolve() for m, d in (a.split("=", 1) for a in args.adapter)}
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(args.threads)
    from trainer.chat.adapter_source import read_adapter
    from trainer.export.merge import PROMPTS, TOLERANCE, ExportRequest, load_tokenizer_for, prompt_inputs

    tmp = Path(tempfile.mkdtemp(prefix="lwb-export-fidelity-"))
    log = tmp / "bench.log"
    rows, drift, t0 = [], [], time.perf_counter()
    with open(log, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        for method in args.methods:
            adapter = given.get(method) or train_adapter(method, args, tmp / "runs")
            source = read_adapter(adapter)
            inputs = prompt_inputs(load_tokenizer_for(source, ExportRequest(adapter=adapter, out=tmp / "unused")))
            r, d = measure(method, adapter, tmp, inputs)
            rows += r
            drift += d
    positions = sum(int(ids.shape[1]) for ids in inputs)
    trained = (
        "given adapters"
        if set(args.methods) <= set(given)
        else (f"trained {args.steps} steps at lr {args.lr:g}, batch 4, r 16, alpha 32 on {args.data.name}")
    )
    head = "| export | max \\|Δlogit\\| | relative to max \\|logit\\| | mean \\|Δlogit\\| | greedy agree | check |"
    print(f"(training and export logs: {log}; {time.perf_counter() - t0:.0f} s)\n")
    print(
        "\n".join(
            [
                "## Export fidelity on builtin:smollm2-135m (`benchmarks/export_fidelity.py`)",
                "",
                *machine_lines(args.threads),
                f"Adapters: {trained}. Fidelity prompts: trainer.export.merge.PROMPTS ({len(PROMPTS)} prompts, {positions} "
                f"positions, teacher-forced). Current TOLERANCE: {TOLERANCE}.",
                "",
                head,
                "|---|---|---|---|---|---|",
                *rows,
                "",
                "QLoRA drift: the exported 16-bit merge against the 4-bit base + adapter the run trained with.",
                "",
                head,
                "|---|---|---|---|---|---|",
                *drift,
                "",
            ]
        )
    )


if __name__ == "__main__":
    main()
