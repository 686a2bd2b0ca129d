"""One reader computes a run's figures (trainer/metrics_summary.py): the Runs tab, the Train tab's monitor, the
pre-flight and the bench agree on loss, throughput and peak memory because they all fold the same lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.views.monitor import RunWatch
from app.views.runs_index import SummaryCache, summarize
from trainer.bench.bench import workbench_measure
from trainer.jobs.registry import COLUMNS, Job
from trainer.metrics_summary import MetricsSummary
from trainer.plan.preflight import measure


def lines_of(gpu: bool) -> list[dict[str, Any]]:
    mem = "gpu_mem_peak_gb" if gpu else "cpu_rss_gb"
    out: list[dict[str, Any]] = [
        {"step": 0, "time": 100.0, "kind": "event", "event": "start", "world_size": 1},
        {"step": 0, "time": 100.0, "kind": "event", "event": "memory_estimate", "predicted_peak_gb": 1.5},
        {"step": 0, "time": 100.5, "kind": "event", "event": "future_event", "unknown_key": [1, 2]},
    ]
    for step in range(1, 5):  # 2 s a step; the first is a slow warm-up
        tps = 10.0 if step == 1 else 100.0 + step
        out.append(
            {"step": step, "time": 100.0 + 2 * step, "kind": "train", "loss": 4.0 / step, "tokens_per_second": tps}
        )
        out.append({"step": step, "time": 100.0 + 2 * step, "kind": "system", mem: [1.0, 3.0, 2.0, 2.5][step - 1]})
    out.append({"step": 4, "time": 109.0, "kind": "eval", "eval_loss": 0.9})
    return out


def write_run(path: Path, lines: list[dict[str, Any]], state: str = "completed") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    status = {"state": state, "step": 4, "max_steps": 4, "started_at": 99.0, "ended_at": 110.0}
    (path / "status.json").write_text(json.dumps(status))
    return path


@pytest.mark.parametrize("gpu", [True, False])
def test_the_figures_of_a_run(gpu: bool) -> None:
    m = MetricsSummary.of(lines_of(gpu))
    assert (m.first_loss, m.last_loss, m.last_eval_loss) == (4.0, 1.0, 0.9)
    assert (m.peak_gb, m.memory_kind, m.predicted_peak_gb) == (3.0, "gpu" if gpu else "cpu", 1.5)
    assert m.tokens_per_second() == pytest.approx((10 + 102 + 103 + 104) / 4)
    assert m.tokens_per_second(skip=1, how="median") == 103.0  # without the warm-up step
    assert m.step_seconds() == 2.0
    assert m.events["start"] == 100.0 and "future_event" in m.events
    assert m.brief() == f"103 tokens/s · peak 3.00 GB {'GPU' if gpu else 'RAM'}"
    assert MetricsSummary().brief() == ""


def test_every_reader_gives_the_same_figures(tmp_path: Path) -> None:
    lines = lines_of(gpu=True)
    run = write_run(tmp_path / "runs" / "20260101-000000-a", lines)
    row = summarize(run)
    trial = measure(run)
    watch = RunWatch(run)
    watch.poll()
    bench = workbench_measure(tmp_path / "runs", 0, tmp_path / "log", warmup=1)
    assert row.peak_mem_gb == trial.peak_gb == watch.summary.peak_gb == bench.peak_gb == 3.0
    assert row.mem_kind == trial.memory_kind == "gpu"
    assert trial.tokens_per_second == 103.0 and trial.step_seconds == 2.0
    assert (row.train_loss, row.eval_loss, row.predicted_gb) == (1.0, 0.9, 1.5)
    assert bench.predicted_gb == 1.5 and bench.first_loss == 4.0


def test_the_incremental_summary_equals_a_fresh_read(tmp_path: Path) -> None:
    """The Runs tab's cache folds appended lines into its summary; a rewritten file starts it over."""
    lines = lines_of(gpu=False)
    run = write_run(tmp_path / "r1", lines[:4], state="running")
    job = Job(**{f: None for f in COLUMNS} | {"id": "r1", "kind": "train", "state": "running", "run_dir": str(run)})
    cache = SummaryCache()
    assert cache.get(job).train_loss == 4.0
    with open(run / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines[4:])
    assert cache.get(job) == summarize(run)
    assert cache.get(job).train_loss == 1.0
    write_run(run, [{"step": 1, "time": 200.0, "kind": "train", "loss": 7.0, "tokens_per_second": 5.0}] * 3, "running")
    assert cache.get(job).train_loss == 7.0 and cache.get(job).peak_mem_gb is None  # nothing of the old file kept
