"""Each speed knob's default, measured on the product's default run: the built-in SmolLM2-135M on the persona data.

    python benchmarks/speed_options.py                      # prints the table the help texts and README quote
    python benchmarks/speed_options.py --steps 12 --repeat 3 --threads 1 --out benchmarks/RESULTS.md

Runs `lora-workbench train` on examples/smollm2-persona.yaml (LoRA r 16, all linear layers, batch 8, rows of
the bundled persona data: uneven lengths, as users' data is) once per variant, each a separate process, the
variants interleaved over the repeats: the defaults, then one knob flipped at a time (packing, padding_free,
group_by_length, dataloader_num_workers 2, gradient_checkpointing on). Per variant (median of the repeats): real
(non-pad) tokens/s and CPU seconds per 1,000 real tokens in the training part after the first 3 steps, and the
largest RSS. CPU seconds per token are the figure to read on a shared machine: other work barely moves them,
while it moves wall time a lot (with one thread per process there is no OpenMP spin-waiting to inflate them).
They count the training process only: dataloader workers are processes of their own, so for that row read
tokens/s. Prints, asserts nothing. The built-in model must be cached (`lora-workbench prepare-model builtin:smollm2-135m`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.chat_export import machine_lines, print_and_append  # noqa: E402
from trainer.bench.bench import WARMUP, child_env, run_process  # noqa: E402
from trainer.config.presets import deep_merge  # noqa: E402

VARIANTS: dict[str, dict] = {
    "defaults": {},
    "packing: true": {"training": {"packing": True}},
    "padding_free: true": {"training": {"padding_free": True}},
    "group_by_length: true": {"training": {"group_by_length": True}},
    "dataloader_num_workers: 2": {"training": {"dataloader_num_workers": 2}},
    "gradient_checkpointing: true": {"training": {"gradient_checkpointing": True}},
}


def variant_config(example: Path, override: dict, steps: int, runs: Path) -> dict:
    """The example with one knob flipped, cut to `steps` steps, one metrics line per step, no eval or checkpoint."""
    cfg = yaml.safe_load(example.read_text())
    measured = {
        "training": {"max_steps": steps, "logging_steps": 1, "eval_steps": steps + 1, "save_steps": steps + 1},
        "output": {"runs_dir": str(runs)},
    }
    return deep_merge(deep_merge(cfg, override), measured)


@dataclass
class Result:
    tokens_per_s: float | None = None  # real tokens/s after the warm-up steps
    cpu_per_1k: float | None = None  # the training process's CPU s per 1,000 real tokens in that window
    peak_gb: float | None = None
    first_loss: float | None = None
    error: str | None = None


def run_variant(config: dict, out: Path, threads: int) -> Result:
    """One `lora-workbench train` process, measured over its steps after the warm-up."""
    from trainer.run_dir import read_metrics

    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "trainer", "train", str(out / "config.yaml")]
    code, clock = run_process(argv, out / "stdout.log", child_env(threads), timeout_s=1800)
    runs = list((out / "runs").glob("*/metrics.jsonl"))
    if code != 0 or len(runs) != 1:
        return Result(error=f"exit {code}, see {out / 'stdout.log'}")
    lines = read_metrics(runs[0])
    train = [m for m in lines if m["kind"] == "train"]
    window = train[WARMUP - 1 :]  # tokens_per_second covers the time since the previous train line
    tokens = sum(
        m["tokens_per_second"] * (m["time"] - prev["time"]) for prev, m in zip(window, window[1:], strict=False)
    )
    span = window[-1]["time"] - window[0]["time"]
    cpu = clock.between(window[0]["time"], window[-1]["time"])
    rss = [m["cpu_rss_gb"] for m in lines if m["kind"] == "system" and m.get("cpu_rss_gb")]
    return Result(
        tokens_per_s=tokens / span,
        cpu_per_1k=1000 * cpu / tokens if cpu is not None else None,
        peak_gb=max(rss, default=None),
        first_loss=train[0]["loss"],
    )


def median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def table(results: dict[str, list[Result]]) -> list[str]:
    base_tps = median([m.tokens_per_s for m in results["defaults"]])
    base_cpu = median([m.cpu_per_1k for m in results["defaults"]])
    lines = [
        "| variant | real tokens/s | ÷ defaults | CPU s per 1k real tokens | ÷ defaults | peak RSS GB | loss step 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        errors = [m.error for m in runs if m.error]
        if errors:
            lines.append(f"| {name} | failed: {errors[0]} | | | | | |")
            continue
        tps = median([m.tokens_per_s for m in runs])
        cpu = median([m.cpu_per_1k for m in runs])
        peak = median([m.peak_gb for m in runs])
        loss = median([m.first_loss for m in runs])
        lines.append(
            f"| {name} | {tps:,.0f} | {tps / base_tps:.2f} | {cpu:.2f} | {cpu / base_cpu:.2f} | {peak:.2f} | "
            f"{loss:.4f} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--example", default=str(ROOT / "examples" / "smollm2-persona.yaml"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each training process")
    ap.add_argument("--only", help="comma-separated variant names (defaults always runs)")
    ap.add_argument("--out", help="markdown file to append the dated table to")
    ap.add_argument("--work-dir", help="where the runs go (default: a temporary dir)")
    args = ap.parse_args()
    chosen = [v for v in VARIANTS if v == "defaults" or not args.only or any(o in v for o in args.only.split(","))]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="speed-options-"))
    results: dict[str, list[Result]] = {name: [] for name in chosen}
    for i in range(args.repeat):
        for j, name in enumerate(chosen):
            config = variant_config(Path(args.example), VARIANTS[name], args.steps, work / f"{i}-{j}" / "runs")
            results[name].append(run_variant(config, work / f"{i}-{j}", args.threads))
            print(f"speed_options: {name} run {i + 1}: {results[name][-1]}", flush=True)
    head = [
        f"## Speed options on the default run (`python benchmarks/speed_options.py --steps {args.steps} "
        f"--repeat {args.repeat} --threads {args.threads}`)",
        "",
        *(f"- {line}" for line in machine_lines(args.threads)),
        f"- {Path(args.example).name}, {args.steps} steps, the first {WARMUP} left out; median of {args.repeat} "
        f"interleaved repeats; runs in {work}",
        "",
    ]
    text = "\n".join([*head, *table(results), ""])
    print_and_append(text, args.out)


if __name__ == "__main__":
    main()
