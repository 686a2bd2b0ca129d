"""What a run's metrics lines add up to, folded one line at a time: the one place a run's figures are computed.

The Runs tab's rows (app/views/runs_index), the Train tab's progress line (app/views/monitor), the pre-flight's short runs
(plan/preflight) and the bench (bench/bench) all take their losses, peak memory, throughput and the memory
estimate from a MetricsSummary, so "peak memory" means the same everywhere: the largest GPU peak the run's system
lines report, or the process's largest RSS on a machine without one. Lines come from MetricsTail (already checked
against the contract: unknown keys are ignored here, as everywhere).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainPoint:
    time: float
    loss: float | None
    tokens_per_second: float | None  # real (unpadded) tokens per second since the previous train line


@dataclass
class MetricsSummary:
    lines: int = 0
    train: list[TrainPoint] = field(default_factory=list)
    last_eval_loss: float | None = None
    gpu_peak_gb: float | None = None
    cpu_peak_gb: float | None = None
    predicted_peak_gb: float | None = None  # the memory estimate written when the run started
    events: dict[str, float] = field(default_factory=dict)  # each event's first time

    @classmethod
    def of(cls, lines: Iterable[dict[str, Any]]) -> MetricsSummary:
        summary = cls()
        for line in lines:
            summary.add(line)
        return summary

    def add(self, line: dict[str, Any]) -> None:
        self.lines += 1
        kind = line["kind"]
        if kind == "train":
            self.train.append(TrainPoint(line["time"], line.get("loss"), line.get("tokens_per_second")))
        elif kind == "eval" and line.get("eval_loss") is not None:
            self.last_eval_loss = line["eval_loss"]
        elif kind == "system":
            self.gpu_peak_gb = _max(self.gpu_peak_gb, line.get("gpu_mem_peak_gb"))
            self.cpu_peak_gb = _max(self.cpu_peak_gb, line.get("cpu_rss_gb"))
        elif kind == "event":
            self.events.setdefault(line.get("event", ""), line["time"])
            if line.get("event") == "memory_estimate" and line.get("predicted_peak_gb") is not None:
                self.predicted_peak_gb = line["predicted_peak_gb"]

    @property
    def peak_gb(self) -> float | None:
        return self.gpu_peak_gb if self.gpu_peak_gb is not None else self.cpu_peak_gb

    @property
    def memory_kind(self) -> str:
        """What peak_gb measured: 'gpu' (torch's peak allocation) or 'cpu' (the process's RSS)."""
        return "gpu" if self.gpu_peak_gb is not None else "cpu"

    @property
    def first_loss(self) -> float | None:
        return next((p.loss for p in self.train if p.loss is not None), None)

    @property
    def last_loss(self) -> float | None:
        return next((p.loss for p in reversed(self.train) if p.loss is not None), None)

    def tokens_per_second(self, skip: int = 0, how: str = "mean") -> float | None:
        """Mean (or median) real tokens/s over the train lines after the first `skip` (warm-up) ones."""
        values = [p.tokens_per_second for p in self.train if p.tokens_per_second]
        values = values[skip:] or values[-1:]
        if not values:
            return None
        return statistics.median(values) if how == "median" else sum(values) / len(values)

    def step_seconds(self) -> float | None:
        """Median time between consecutive train lines."""
        times = [p.time for p in self.train]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return statistics.median(gaps) if gaps else None

    def tokens_done(self, since: float) -> list[float]:
        """Real tokens trained by each train line, counted from `since` (each line's rate covers the time since
        the previous line)."""
        out, prev, total = [], since, 0.0
        for p in self.train:
            total += (p.tokens_per_second or 0.0) * (p.time - prev)
            prev = p.time
            out.append(total)
        return out

    def brief(self) -> str:
        """'194 tokens/s · peak 2.57 GB RAM': the run's throughput and memory so far, '' before its first line."""
        parts = []
        if (tps := self.tokens_per_second(skip=1)) is not None:
            parts.append(f"{tps:,.0f} tokens/s")
        if self.peak_gb is not None:
            parts.append(f"peak {self.peak_gb:.2f} GB {'GPU' if self.memory_kind == 'gpu' else 'RAM'}")
        return " · ".join(parts)


def _max(current: float | None, value: Any) -> float | None:
    if value is None:
        return current
    return value if current is None else max(current, value)
