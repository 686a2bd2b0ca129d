"""The Runs tab's data: one summary row per run, config diffs between runs, and adapter zips.

Summaries of finished runs are cached by the size and mtime of their files, so listing a hundred runs
re-reads only the ones that changed.
"""

from __future__ import annotations

import os
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trainer.jobs.registry import Job
from trainer.metrics_reader import MetricsTail
from trainer.metrics_summary import MetricsSummary
from trainer.run_dir import FINAL_STATES, file_stamp, read_metrics, status_or_reason

COLUMNS = [
    "run",
    "name",
    "model",
    "method",
    "state",
    "steps",
    "train loss",
    "eval loss",
    "duration",
    "peak memory (GB)",
    "predicted GPU peak (GB)",
    "tokens/s",
]


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    name: str
    model: str
    method: str
    state: str
    step: int
    max_steps: int
    train_loss: float | None
    eval_loss: float | None
    duration_s: float | None
    peak_mem_gb: float | None
    mem_kind: str  # "gpu" or "cpu": what peak_mem_gb measured
    tokens_per_second: float | None
    predicted_gb: float | None = None  # the memory estimate written when the run started

    def row(self) -> list[Any]:
        steps = f"{self.step}/{self.max_steps}" if self.max_steps else str(self.step)
        duration = f"{self.duration_s:.0f}s" if self.duration_s is not None else ""
        peak = f"{self.peak_mem_gb:.3f} ({self.mem_kind})" if self.peak_mem_gb is not None else ""
        return [
            self.run_id,
            self.name,
            self.model,
            self.method,
            self.state,
            steps,
            _round(self.train_loss),
            _round(self.eval_loss),
            duration,
            peak,
            _round(self.predicted_gb, 3),
            _round(self.tokens_per_second, 1),
        ]


def _round(value: float | None, digits: int = 4) -> float | str:
    return "" if value is None else round(value, digits)


def read_config(run_path: Path) -> dict[str, Any]:
    """A run's config.yaml as a dict for display, {} when it is missing or not a YAML mapping."""
    try:
        data = yaml.safe_load((run_path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError, RecursionError):  # ValueError: not UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def config_section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of a config read for display; {} when it is missing or not a mapping."""
    section = cfg.get(name)
    return section if isinstance(section, dict) else {}


def method_label(cfg: dict[str, Any]) -> str:
    """'lora r16', 'qlora r16 (4bit nf4)', ... from a config dict."""
    adapter, quant = config_section(cfg, "adapter"), config_section(cfg, "quantization")
    method, mode = adapter.get("method", "lora"), quant.get("mode", "none")
    label = f"{'q' + method if mode == '4bit' and method == 'lora' else method} r{adapter.get('r', '?')}"
    if mode == "4bit":
        label += f" (4bit {quant.get('quant_type', 'nf4')})"
    elif mode == "8bit":
        label += " (8bit)"
    return label


def summarize(run_path: Path, name: str | None = None, metrics: MetricsSummary | None = None) -> RunSummary:
    """One run's row; metrics: its lines' summary when the caller already has it (default: read the file)."""
    status = status_or_reason(run_path)
    cfg = read_config(run_path)
    m = MetricsSummary.of(read_metrics(run_path / "metrics.jsonl")) if metrics is None else metrics
    started, ended = status.get("started_at"), status.get("ended_at")
    return RunSummary(
        run_id=run_path.name,
        name=name or str(config_section(cfg, "output").get("run_name") or ""),
        model=str(config_section(cfg, "model").get("name_or_path", "")),
        method=method_label(cfg),
        state=status.get("state", "unknown"),
        step=int(status.get("step") or 0),
        max_steps=int(status.get("max_steps") or 0),
        train_loss=m.last_loss,
        eval_loss=m.last_eval_loss,
        duration_s=(ended - started) if started and ended else None,
        peak_mem_gb=m.peak_gb,
        mem_kind=m.memory_kind,
        tokens_per_second=m.tokens_per_second(),
        predicted_gb=m.predicted_peak_gb,
    )


class SummaryCache:
    """summarize() per run, recomputed only when status.json or metrics.jsonl changed (or the name did); a
    growing metrics.jsonl is read from where the last read stopped, so a long run's refresh parses only its
    new lines."""

    def __init__(self):
        self._cache: dict[Path, tuple[tuple, RunSummary]] = {}
        self._tails: dict[Path, tuple[MetricsTail, MetricsSummary]] = {}
        self._lock = threading.Lock()

    def get(self, job: Job) -> RunSummary:
        path = Path(job.run_dir)
        stamps = [file_stamp(path / f) for f in ("status.json", "metrics.jsonl", "config.yaml")]
        key = (job.name, *stamps)
        with self._lock:
            hit = self._cache.get(path)
            if hit and hit[0] == key:
                return hit[1]
            tail, metrics = self._tails.get(path) or (None, MetricsSummary())
            if tail is None or (stamps[1] or (0, 0, 0))[2] < tail.offset:  # new, or the file was replaced
                tail, metrics = MetricsTail(path / "metrics.jsonl"), MetricsSummary()
            generation = tail.generation
            new = tail.poll()  # an edited file is read again from its start too
            if tail.generation != generation:
                metrics, new = MetricsSummary(), tail.lines
            for line in new:
                metrics.add(line)
            self._tails[path] = (tail, metrics)
            summary = summarize(path, job.name, metrics)
            self._cache[path] = (key, summary)
            if summary.state in FINAL_STATES:  # it will not grow: keep its row, not its lines
                del self._tails[path]
        return summary


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'adapter': {'r': 8}} -> {'adapter.r': 8}; lists and other leaves stay whole."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def config_diff(configs: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """Rows [field, value in run 1, value in run 2, ...] for the fields whose values differ between runs."""
    flat = {run: flatten(cfg) for run, cfg in configs.items()}
    fields = sorted(set().union(*(f.keys() for f in flat.values()))) if flat else []
    rows = []
    for f in fields:
        values = [flat[run].get(f, "(unset)") for run in configs]
        if any(v != values[0] for v in values[1:]):
            rows.append([f, *(_show(v) for v in values)])
    return rows


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@dataclass(frozen=True)
class AdapterZip:
    path: Path
    skipped: list[str]  # entries left out (symlinks, special files), relative to adapter/


def adapter_zip(run_path: Path, out_dir: Path) -> AdapterZip:
    """<out_dir>/<run_id>-adapter.zip of the regular files that really lie in the run's adapter/ (made fresh each
    time). Symlinks are skipped, not followed: a link to a secret must not end up in a download."""
    adapter = run_path / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{run_path.name} has no saved adapter (adapter/adapter_config.json is missing)")
    if adapter.is_symlink():
        raise FileNotFoundError(f"{run_path.name}/adapter is a symlink: only an adapter saved in the run is zipped")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{run_path.name}-adapter.zip"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{out.name}.", suffix=".tmp")  # one per caller: no clash
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            skipped = _zip_tree(z, adapter)
        os.replace(tmp, out)  # a download in progress never sees a half-written zip
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return AdapterZip(out, skipped)


def _zip_tree(z: zipfile.ZipFile, root: Path) -> list[str]:
    """Write root's regular files into z; returns what was left out (symlinks, sockets, fifos)."""
    skipped = []
    for top, dirs, files in os.walk(root):  # does not descend into symlinked dirs
        for name in sorted(dirs + files):
            path = Path(top) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                skipped.append(rel)
            elif path.is_file():
                z.write(path, rel)
    return sorted(skipped)


def zip_adapter(run_path: Path, out_dir: Path) -> Path:
    """adapter_zip's file, for callers that do not report what was skipped."""
    return adapter_zip(run_path, out_dir).path


def loss_curves(run_path: Path) -> dict[str, list[Any]]:
    """Train and eval loss of one run, for overlaying runs (whole file: runs are compared on demand)."""
    lines = read_metrics(run_path / "metrics.jsonl")
    train = [m for m in lines if m["kind"] == "train" and "loss" in m]
    evals = [m for m in lines if m["kind"] == "eval" and "eval_loss" in m]
    return {
        "step": [m["step"] for m in train],
        "loss": [m["loss"] for m in train],
        "eval_step": [m["step"] for m in evals],
        "eval_loss": [m["eval_loss"] for m in evals],
    }
