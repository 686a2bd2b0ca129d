"""Live view of one run for the UI: series built incrementally from metrics.jsonl, progress and ETA from
status.json, and a readable explanation when a run fails.

One RunWatch per run is shared by every browser session watching it (Watchers), so ten open pages cost
one incremental read per tick, not ten re-parses of the whole file.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.metrics_reader import MetricsTail
from trainer.metrics_summary import MetricsSummary
from trainer.run_dir import FINAL_STATES, file_stamp, status_or_reason

MEMORY_KEYS = ("gpu_mem_allocated_gb", "gpu_mem_reserved_gb", "gpu_mem_peak_gb", "gpu_mem_total_gb", "cpu_rss_gb")


@dataclass
class Series:
    """Column lists per metric kind, ready to plot."""

    train: dict[str, list] = field(default_factory=lambda: {k: [] for k in _TRAIN_KEYS})
    eval: dict[str, list] = field(default_factory=lambda: {"step": [], "eval_loss": []})
    system: dict[str, list] = field(default_factory=lambda: {k: [] for k in _SYSTEM_KEYS})
    events: list[dict[str, Any]] = field(default_factory=list)

    def add(self, line: dict[str, Any]) -> None:
        kind = line.get("kind")
        if kind == "event":
            self.events.append(line)
            return
        columns = {"train": self.train, "eval": self.eval, "system": self.system}.get(kind)
        if columns is None or (kind == "eval" and "eval_loss" not in line):
            return
        for key, values in columns.items():
            values.append(line.get(key))


_TRAIN_KEYS = ("step", "time", "loss", "learning_rate", "grad_norm", "tokens_per_second")
_SYSTEM_KEYS = ("step", "time", *MEMORY_KEYS, "gpu_util_percent", "gpus")  # gpus: per-GPU list (NVML)


class RunWatch:
    """The live state of one run directory; poll() reads only what was appended since the last poll.

    Shared by every page watching the run, so what is derived from it (a chart, the log view) is built once per
    change of its data and handed to every page: view(name, key, build)."""

    def __init__(self, run_path: Path):
        self.path = run_path
        self.tail = MetricsTail(run_path / "metrics.jsonl")
        self.series = Series()
        self.summary = MetricsSummary()  # throughput and peak memory so far, as the Runs tab computes them
        self.status: dict[str, Any] = {}
        self.version = 0  # bumps whenever something a page shows changed
        self.status_version = 0  # bumps when status.json says something new
        self.log_stamp: tuple[int, int, int] | None = None  # train.log's, at the last poll
        self._status_stamp: tuple[int, int, int] | None = (-1, -1, -1)  # never a real stamp: the first poll reads
        self._views: dict[str, tuple[Any, Any]] = {}
        self._paced: dict[str, tuple[tuple, float]] = {}  # paced_key's: the key every page is shown, and since when
        self._lock = threading.Lock()  # a poll never changes the series while a view is built from it

    def poll(self) -> bool:
        with self._lock:
            generation = self.tail.generation
            new = self.tail.poll()
            if self.tail.generation != generation:  # metrics.jsonl was rewritten: rebuild, dropping what it held
                self.series, self.summary, new = Series(), MetricsSummary(), self.tail.lines
            changed = bool(new) or self.tail.generation != generation
            for line in new:
                self.series.add(line)
                self.summary.add(line)
            stamp = file_stamp(self.path / "status.json")
            if stamp != self._status_stamp:
                self._status_stamp = stamp
                status, self.status = self.status, status_or_reason(self.path)
                if status != self.status:
                    self.status_version += 1
                    changed = True
            log_stamp = file_stamp(self.path / "train.log")
            changed = changed or log_stamp != self.log_stamp
            self.log_stamp = log_stamp
            self.version += changed
            return changed

    def data_key(self, *kinds: str) -> tuple:
        """What tells a change of the lines of these kinds: the file's generation and how many lines each has."""
        s = self.series
        counts = {"train": s.train["step"], "eval": s.eval["step"], "system": s.system["step"], "event": s.events}
        return (self.tail.generation, *(len(counts[k]) for k in kinds))

    def paced_key(self, name: str, kinds: tuple[str, ...], every_s: float) -> tuple:
        """data_key(*kinds) renewed at most every `every_s` while the run goes on: a chart keyed by it is redrawn in
        every page at that pace however fast lines arrive; at once when it is new, its first lines came or the run
        has ended."""
        with self._lock:
            key, now = self.data_key(*kinds), time.monotonic()
            shown = self._paced.get(name)
            at_once = shown is None or not any(shown[0][1:]) or self.status.get("state") in FINAL_STATES
            if shown is None or (shown[0] != key and (at_once or now - shown[1] >= every_s)):
                shown = self._paced[name] = (key, now)
            return shown[0]

    def view(self, name: str, key: Any, build: Callable[[], Any]) -> Any:
        """build() once per key: every page asking for the same view of the same data gets the same object."""
        with self._lock:
            hit = self._views.get(name)
            if hit is None or hit[0] != key:
                hit = self._views[name] = (key, build())
            return hit[1]


class Watchers:
    """RunWatch objects shared between sessions, polled at most once per `min_interval_s` each."""

    def __init__(self, min_interval_s: float = 0.25, capacity: int = 32):
        self._watches: dict[Path, tuple[RunWatch, float]] = {}
        self._lock = threading.Lock()
        self.min_interval_s, self.capacity = min_interval_s, capacity

    def get(self, run_path: Path) -> RunWatch:
        now = time.monotonic()
        with self._lock:
            watch, last = self._watches.pop(run_path, (None, -math.inf))  # a new watch polls at once
            if watch is None:
                watch = RunWatch(run_path)
            if now - last >= self.min_interval_s:
                watch.poll()
                last = now
            self._watches[run_path] = (watch, last)  # re-inserted last: the dict keeps recency order
            while len(self._watches) > self.capacity:
                self._watches.pop(next(iter(self._watches)))
            return watch


def ema(values: list[float | None], weight: float = 0.8) -> list[float | None]:
    """TensorBoard-style smoothing with bias correction; gaps (None/NaN) stay gaps."""
    out, acc, n = [], 0.0, 0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(None)
            continue
        acc, n = weight * acc + (1 - weight) * v, n + 1
        out.append(acc / (1 - weight**n))
    return out


@dataclass(frozen=True)
class Progress:
    state: str
    step: int
    max_steps: int
    elapsed_s: float
    eta_s: float | None

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.max_steps) if self.max_steps > 0 else 0.0

    def text(self) -> str:
        eta = f", ETA {_duration(self.eta_s)}" if self.eta_s is not None and self.state == "running" else ""
        steps = f"step {self.step}/{self.max_steps}" if self.max_steps > 0 else f"step {self.step}"
        return f"{self.state}: {steps} ({100 * self.fraction:.0f}%), elapsed {_duration(self.elapsed_s)}{eta}"


def progress(status: dict[str, Any], now: float | None = None) -> Progress:
    """Step, elapsed and ETA (from the mean step time so far) of a run's status.json."""
    now = time.time() if now is None else now
    state = status.get("state", "queued")
    step, max_steps = int(status.get("step") or 0), int(status.get("max_steps") or 0)
    started = status.get("started_at")
    end = status.get("ended_at") if state in FINAL_STATES else None
    elapsed = max(0.0, (end or now) - started) if started else 0.0
    eta = elapsed / step * (max_steps - step) if step > 0 and max_steps >= step else None
    return Progress(state, step, max_steps, elapsed, eta)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


FAILURE_TITLES = {
    "oom": "Out of memory",
    "nan": "Loss became NaN",
    "data": "Bad data",
    "config": "Bad config",
    "model": "The model could not be loaded",
    "disk": "Disk full",
    "check": "A check failed",
    "killed": "The process was killed",
    "internal": "The run failed",
}


def explain_failure(status: dict[str, Any]) -> str | None:
    """Markdown for a failed run from status.json's structured `failure` (kind, message, hint): what happened and
    what to change. None if it did not fail. A run written before `failure` existed shows its error alone."""
    if status.get("state") != "failed":
        return None
    why = status.get("failure") or {}
    error = str(why.get("message") or status.get("error") or "the run failed without an error message")
    title = FAILURE_TITLES.get(why.get("kind"), "The run failed")
    hint = why.get("hint") or "The log below shows where; the last lines usually name the cause."
    return f"### {title}\n\n```\n{error.strip()}\n```\n\n{hint}"
