"""`lora-workbench preflight CONFIG.yaml`: run the real config for a few steps on its longest rows and measure.

    lora-workbench preflight examples/qwen2.5-7b-instruct-qlora.yaml

The data's longest rows (by tokens, after the chat template and the overlength policy) fill every batch, so the
measured peak memory is the run's worst case. The short run is a real `lora-workbench train` subprocess (a fresh
process: its peak is its own), in <runs_dir>/.preflight/. Reported: peak memory (measured and predicted),
real tokens/s, seconds per optimizer step and the ETA of the full run. When it runs out of memory, the
memory estimate proposes the least intrusive change predicted to fit, and a second short run confirms it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config.run_config import ConfigError, RunConfig
from trainer.data.files import DataError
from trainer.metrics_summary import MetricsSummary
from trainer.run_dir import read_metrics, read_status, write_json_atomic

STEPS = 6  # the first step warms up (allocator, kernels) and is not timed
MAX_RETRIES = 2


@dataclass
class Trial:
    """One short run: its config changes, and what it measured (or how it failed)."""

    change: str | None
    ok: bool
    peak_gb: float | None = None  # GPU peak allocated, or process RSS on a CPU machine
    memory_kind: str = "gpu"
    tokens_per_second: float | None = None
    step_seconds: float | None = None
    error: str | None = None
    failure_kind: str | None = None  # status.json's failure.kind of the short run

    @property
    def out_of_memory(self) -> bool:
        return not self.ok and self.failure_kind == "oom"


@dataclass
class PreflightReport:
    longest_tokens: int
    full_steps: int
    predicted_peak_gb: float | None
    trials: list[Trial] = field(default_factory=list)

    @property
    def final(self) -> Trial:
        return self.trials[-1]

    @property
    def eta_seconds(self) -> float | None:
        t = self.final
        return t.step_seconds * self.full_steps if t.ok and t.step_seconds else None

    def lines(self) -> list[str]:
        out = [f"longest rows: {self.longest_tokens} tokens; the full run is {self.full_steps} optimizer steps"]
        for t in self.trials:
            label = t.change or "as configured"
            if t.ok:
                where = "GPU peak allocated" if t.memory_kind == "gpu" else "process RSS (no GPU)"
                out.append(
                    f"{label}: ok, {where} {_num(t.peak_gb, '.2f')} GB, {_num(t.tokens_per_second, '.0f')} tokens/s, "
                    f"{_num(t.step_seconds, '.2f')} s/step"
                )
            else:
                out.append(f"{label}: FAILED: {t.error}")
        if self.predicted_peak_gb is not None:
            out.append(f"predicted peak (memory estimate): {self.predicted_peak_gb:.2f} GB")
        if self.eta_seconds is not None:
            out.append(f"ETA of the full run: {_duration(self.eta_seconds)}")
        if self.final.ok and self.final.change:
            out.append(f"the run fits with: {self.final.change}")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreflightReport:
        trials = [Trial(**t) for t in data.get("trials", [])]
        return cls(data["longest_tokens"], data["full_steps"], data.get("predicted_peak_gb"), trials)

    def to_dict(self) -> dict[str, Any]:
        return {
            "longest_tokens": self.longest_tokens,
            "full_steps": self.full_steps,
            "predicted_peak_gb": self.predicted_peak_gb,
            "eta_seconds": self.eta_seconds,
            "trials": [t.__dict__ for t in self.trials],
        }


def _num(value: float | None, spec: str) -> str:
    return "?" if value is None else format(value, spec)


def _duration(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    return f"{h} h {rest // 60} min" if h else f"{rest // 60} min {rest % 60} s"


def longest_examples(cfg: RunConfig) -> tuple[list[dict[str, Any]], int, int]:
    """(the data's examples, longest first, as the trainer would keep them; longest length; trainable rows)."""
    from trainer.data.cache import cache_dir
    from trainer.data.files import open_source
    from trainer.data.prepare import examples_of, tokenize_source
    from trainer.data.tokenization import KEPT, chat_template_of
    from trainer.model.load import load_tokenizer, model_path

    tokenizer = load_tokenizer(cfg, model_path(cfg))
    template = chat_template_of(tokenizer, cfg.model.chat_template)
    src = open_source(cfg.data.source, cfg.data.subset, cfg.data.split)
    name = src.name
    # the whole file's tokens, from the cache when the Start check or a run of the same data made them
    tokens = tokenize_source(tokenizer, src, cfg.data, template, cache_dir(cfg.output.runs_dir))
    if tokens.problems:
        raise DataError(name, tokens.problems)
    _, located, _ = examples_of(src, cfg.data)  # the rows themselves, for the short runs' data file
    c = tokens.columns
    # dropped rows (over length, nothing trainable) are not trained, so not measured either
    sized = [
        (len(ids), example)
        for (_, example), ids, outcome in zip(located, c["input_ids"], c["outcome"], strict=True)
        if outcome in KEPT
    ]
    if not sized:
        raise DataError(name, ["no trainable rows"])
    sized.sort(key=lambda x: -x[0])
    return [ex for _, ex in sized], sized[0][0], len(sized)


def short_config(cfg: RunConfig, data_file: Path, runs_dir: Path, steps: int) -> RunConfig:
    """The run's own settings, on data_file, for `steps` optimizer steps, saving nothing along the way."""
    from trainer.model.load import model_path

    def with_(section: str, **changes: Any) -> Any:
        return getattr(cfg, section).model_copy(update=changes)

    return cfg.model_copy(
        update={
            "model": with_("model", name_or_path=model_path(cfg)),  # resolved: the tiny model is not rebuilt
            "data": with_("data", source=str(data_file), eval_source=None, val_size=0.0, max_samples=None, columns={}),
            "training": with_(
                "training", max_steps=steps, logging_steps=1, save_steps=10**9, resume_from_checkpoint=None
            ),
            "output": cfg.output.model_copy(update={"runs_dir": str(runs_dir), "run_name": "preflight"}),
        }
    )


def measure(run_path: Path) -> Trial:
    """What one short run measured, from its metrics.jsonl and status.json."""
    status = read_status(run_path) or {}
    if status.get("state") != "completed":
        kind = (status.get("failure") or {}).get("kind")
        return Trial(
            None, False, error=status.get("error") or f"the short run ended {status.get('state')}", failure_kind=kind
        )
    m = MetricsSummary.of(read_metrics(run_path / "metrics.jsonl"))
    return Trial(
        None,
        True,
        peak_gb=m.peak_gb,
        memory_kind=m.memory_kind,
        tokens_per_second=m.tokens_per_second(skip=1, how="median"),  # the first step warms up
        step_seconds=m.step_seconds(),
    )


def run_short(cfg: RunConfig, workdir: Path) -> Trial:
    """Train cfg in a subprocess (`lora-workbench train`), then measure it."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.input.yaml"
    path.write_text(cfg.to_yaml(), encoding="utf-8")
    with open(workdir / "preflight.log", "ab") as log:
        subprocess.run([sys.executable, "-m", "trainer", "train", str(path)], stdout=log, stderr=subprocess.STDOUT)
    runs = [p for p in Path(cfg.output.runs_dir).iterdir() if (p / "status.json").is_file()]
    return measure(max(runs, key=lambda p: p.stat().st_mtime))


def preflight(
    cfg: RunConfig, steps: int = STEPS, runner: Callable[[RunConfig, Path], Trial] = run_short
) -> PreflightReport:
    """Short runs on the longest rows: as configured, then (after running out of memory) with a proposed fix."""
    from trainer.plan.estimate import estimate
    from trainer.plan.memory import GB
    from trainer.plan.schedule import total_optimizer_steps

    steps = max(steps, 3)  # one warm-up step and at least two timed gaps
    examples, longest, rows = longest_examples(cfg)
    world = max(cfg.hardware.num_gpus, 1)
    needed = steps * cfg.training.per_device_batch_size * cfg.training.gradient_accumulation_steps * world
    est = estimate(cfg)
    predicted = est.memory.peak_bytes / GB if est.memory and est.memory.gpu_total else None
    report = PreflightReport(longest, total_optimizer_steps(cfg, rows, world), predicted)
    root = Path(cfg.output.runs_dir) / ".preflight"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root))
    try:
        data = work / "longest.jsonl"
        with open(data, "w", encoding="utf-8") as f:
            for i in range(max(needed, 1)):
                f.write(json.dumps(examples[i % len(examples)]) + "\n")
        candidates = [(None, cfg)]
        tried: set[str] = set()
        while candidates:
            change, current = candidates.pop(0)
            trial = runner(short_config(current, data, work / f"runs{len(report.trials)}", steps), work)
            trial.change = change
            report.trials.append(trial)
            if not trial.out_of_memory or len(report.trials) > MAX_RETRIES:
                break
            fix = next_fix(current, tried)
            if fix is None:
                break
            tried.add(fix[0])
            candidates = [fix]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def next_fix(cfg: RunConfig, tried: set[str]) -> tuple[str, RunConfig] | None:
    """The least intrusive memory-lowering change the estimate predicts to fit this GPU (or, when none is
    predicted to, the one predicted lowest), not tried yet."""
    from trainer.plan.estimate import estimate
    from trainer.plan.memory import variants

    options = [(text, c) for text, c in variants(cfg) if text not in tried]
    if not options:
        return None
    predicted = [(estimate(c).memory, text, c) for text, c in options]
    fitting = [(text, c) for m, text, c in predicted if m.fits]
    return fitting[0] if fitting else min(predicted, key=lambda x: x[0].peak_bytes)[1:]


def preflight_command(config_path: str, steps: int = STEPS, status_dir: str | None = None) -> int:
    from trainer.config.presets import load_config
    from trainer.job_status import JobStatus

    status = JobStatus("preflight", 2, status_dir)
    status.start()
    try:
        status.phase(1, "reading the data and finding its longest rows")
        cfg = load_config(config_path)
        status.phase(2, f"training {steps} steps on the longest rows")
        report = preflight(cfg, steps)
    except (ConfigError, DataError) as e:
        print(str(e), file=sys.stderr)
        status.fail(str(e), exc=e)
        return 1
    print("\n".join(report.lines()))
    if report.final.ok:
        status.finish(report.to_dict())
        return 0
    if status_dir:  # what was tried, for the page
        write_json_atomic(Path(status_dir) / "result.json", report.to_dict())
    status.fail(report.final.error or "the short run failed", kind=report.final.failure_kind)
    return 1
