"""The measures of `lora-workbench bench` and how they are reported: per-run measures and their medians, MFU,
the markdown table with the workbench/reference ratios, and the dated section appended to RESULTS.md."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

GB = 1024**3
# Dense bf16 tensor-core peaks (TFLOP/s) by device-name substring, first match wins.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4)]
PEAK_BF16_TFLOPS += [("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0)]
VARIANTS = {
    "a": "(a) plain TRL",
    "b": "(b) workbench, TRL settings",
    "c": "(c) workbench defaults",
    "d": "(d) defaults + packing",  # only while the defaults do not pack
}


@dataclass
class Measure:
    wall_s: float | None = None  # training part
    cpu_s: float | None = None  # CPU time of the training process in that part
    step_s: float | None = None  # mean optimizer step after warm-up
    tokens_per_s: float | None = None  # real tokens, after warm-up
    peak_gb: float | None = None
    first_loss: float | None = None
    predicted_gb: float | None = None  # the workbench's memory estimate, when it writes one
    error: str | None = None


def summarize(t0: float, times: list[float], tokens: list[float], warmup: int) -> tuple[float, float, float]:
    """(wall, mean step time, tokens/s) from step-end times and cumulative real tokens; warm-up steps left out."""
    if not times:
        raise ValueError("no steps were logged")
    times, tokens = [t0, *times], [0.0, *tokens]
    w = min(warmup, len(times) - 2)
    span = times[-1] - times[w]
    return times[-1] - t0, span / (len(times) - 1 - w), (tokens[-1] - tokens[w]) / span


def ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def flops_per_token(n_matmul: int, n_lora: int, layers: int, attn_width: int, seq: float) -> float:
    """4·N + 6·N_lora + 12·L·d_attn·s_eff (see the module docstring)."""
    return 4 * n_matmul + 6 * n_lora + 12 * layers * attn_width * seq


def mfu(tokens_per_s: float | None, flops: float | None, peak: float | None) -> float | None:
    return tokens_per_s * flops / peak if tokens_per_s and flops and peak else None


def peak_flops(device: str) -> float | None:
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS if key in device), None)


def median_measure(runs: list[Measure]) -> Measure:
    """Per-field median of repeated runs (failed runs left out; all failed: the first error)."""
    ok = [m for m in runs if m.error is None]
    if not ok:
        return runs[0]

    def med(field: str) -> float | None:
        values = [getattr(m, field) for m in ok if getattr(m, field) is not None]
        return statistics.median(values) if values else None

    return Measure(
        **{f: med(f) for f in ("wall_s", "cpu_s", "step_s", "tokens_per_s", "peak_gb", "first_loss", "predicted_gb")}
    )


# ----------------------------------------------------------------------------------------------- the table


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _pct(x: float | None, minus: float = 0.0) -> float | None:
    return None if x is None else 100 * (x - minus)


def table_rows(case: str, runs: dict[str, Measure], flops: float | None, peak: float | None) -> list[str]:
    """One markdown row per variant, with the ratios to (a)."""
    a, rows = runs["a"], []
    for key, m in runs.items():
        if m.error:
            rows.append(f"| {case} | {VARIANTS[key]} | failed: {m.error} |" + " |" * 10)
            continue
        cells = [
            case,
            VARIANTS[key],
            _num(m.tokens_per_s, ",.0f"),
            _num(m.step_s and m.step_s * 1000, ".1f"),
            _num(m.wall_s, ".2f"),
            _num(m.cpu_s, ".2f"),
            _num(m.peak_gb, ".3f"),
            _num(_pct(mfu(m.tokens_per_s, flops, peak)), ".1f"),
            _num(ratio(m.tokens_per_s, a.tokens_per_s), ".2f"),
            _num(ratio(m.wall_s, a.wall_s), ".3f"),
            _num(ratio(m.cpu_s, a.cpu_s), ".3f"),
            _num(m.first_loss, ".4f"),
            _num(_pct(ratio(m.predicted_gb, m.peak_gb), 1.0), "+.0f"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


TABLE_HEAD = (
    "| case | run | real tokens/s | step ms | train s | train CPU s | peak GB | MFU % | tokens/s ÷ (a) "
    "| train s ÷ (a) | CPU s ÷ (a) | loss step 1 | mem. estimate error % |\n|" + "---|" * 13
)


def findings(results: list[tuple[str, dict[str, Measure]]]) -> list[str]:
    """The done-when numbers over the cases: (b)/(a) training wall time, (c)/(a) (and (d)/(a)) real tokens/s."""
    lines = []
    for key, field, what in (
        ("b", "wall_s", "training wall time"),
        ("b", "cpu_s", "training CPU time"),
        ("c", "tokens_per_s", "real tokens/s"),
        ("d", "tokens_per_s", "real tokens/s"),
    ):
        values = [ratio(getattr(r[key], field), getattr(r["a"], field)) for _, r in results if key in r]
        values = [v for v in values if v is not None]
        if values:
            lines.append(
                f"({key})/(a) {what}: median {statistics.median(values):.3f}, "
                f"range {min(values):.3f} to {max(values):.3f} over {len(values)} cases"
            )
    return lines


def machine(threads: int) -> list[str]:
    import platform

    import peft
    import psutil
    import torch
    import transformers
    import trl

    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")
    gpu = "no GPU"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / GB:.0f} GiB), CUDA {torch.version.cuda}"
    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception:  # noqa: BLE001 (a broken install should not stop the report)
        bnb = "n/a"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores ({threads} threads used), "
        f"{psutil.virtual_memory().total / GB:.0f} GiB RAM; {gpu}; load average at start {load}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, peft {peft.__version__}, bitsandbytes {bnb}",
    ]


def report(title: str, env_lines: list[str], notes: list[str], results: list, peak: float | None) -> str:
    body = [f"## {title}", "", *env_lines, *[f"- {n}" for n in notes], "", TABLE_HEAD]
    for name, runs, flops in results:
        body += table_rows(name, runs, flops, peak)
    body += ["", *[f"- {line}" for line in findings([(n, r) for n, r, _ in results])], ""]
    return "\n".join(body) + "\n"


RESULTS_HEADER = """# Benchmarks: the workbench against plain TRL

Written by `lora-workbench bench` (trainer/bench/bench.py; the reference is benchmarks/reference_trl.py). Each dated
section is one run of it; earlier ones are kept. Per case: (a) plain TRL SFTTrainer, (b) `lora-workbench train`
with (a)'s exact settings, (c) `lora-workbench train` with its defaults, (d) (c) with packing on (only while the
defaults do not pack); same data, model, adapter (r 16, alpha 32, dropout 0.05, q/k/v/o/gate/up/down), batch,
accumulation, steps and seed.

- real tokens/s and step ms: after the first 3 steps; real = non-padding tokens
- train s: the training part only, from just before trainer.train() to the last logged step (one per step)
- train CPU s: the training process's CPU seconds (all threads) in that window, sampled from outside
- peak GB: torch.cuda.max_memory_allocated on a GPU; on a CPU the largest RSS sampled at the logged steps
- MFU (GPU only): real tokens/s × (4·N + 6·N_lora + 12·L·d_attn·s_eff) / the GPU's dense bf16 peak; N: weights
  of the base's matmuls (lm_head included), N_lora: adapter weights, L: layers, d_attn: heads × head_dim,
  s_eff = Σℓ²/Σℓ over the rows' token counts ℓ; recomputation and 4-bit dequantization not counted
- loss step 1: equal in (a) and (b) when both train the same tokens from the same initialisation
- mem. estimate error: (predicted − measured) / measured peak, when the run writes a prediction
"""
