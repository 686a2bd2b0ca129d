"""A run directory and its files, the contract between a training job and everything that watches it.

runs/<run_id>/ config.yaml  status.json  metrics.jsonl  train.log  adapter/  checkpoints/
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "completed", "failed", "stopped")
FINAL_STATES = ("completed", "failed", "stopped")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temp file in the same dir and rename over: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_run_id(run_name: str | None, runs_dir: Path) -> str:
    """<yyyymmdd-hhmmss>-<name>, with a numeric suffix if that directory already exists."""
    base = datetime.now().strftime("%Y%m%d-%H%M%S") + (f"-{run_name}" if run_name else "")
    run_id, n = base, 1
    while (runs_dir / run_id).exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id


class StatusError(ValueError):
    """A status.json that is there but cannot be used; the message says why (never the file's raw content)."""


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _is_time(value: Any) -> bool:
    # bounded, so that durations and ETAs computed from it stay finite floats
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e11


STATUS_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "state": (lambda v: isinstance(v, str) and v in STATES, "one of " + "|".join(STATES)),
    "pid": (lambda v: _is_int(v, 0, 2**31), "a process id"),
    "started_at": (_is_time, "a unix time in seconds"),
    "ended_at": (_is_time, "a unix time in seconds"),
    "exit_code": (lambda v: _is_int(v, -(2**31), 2**31), "an exit code"),
    "error": (lambda v: isinstance(v, str), "text"),
    "phase": (lambda v: isinstance(v, str), "text"),
    "step": (lambda v: _is_int(v, 0, 2**53), "a whole number of steps"),
    "max_steps": (lambda v: _is_int(v, 0, 2**53), "a whole number of steps"),
    "failure": (lambda v: isinstance(v, dict), "an object"),
}


def json_kind(value: Any) -> str:
    """What a JSON value is, in words (for messages that must not echo a file's content)."""
    kinds = [(bool, "true/false"), (str, "text"), (int | float, "a number"), (list, "a list"), (dict, "an object")]
    return next((name for t, name in kinds if isinstance(value, t)), "null")


def check_status(data: Any) -> dict[str, Any]:
    """The status object if every field the contract names has its type (null allowed but for state)."""
    if not isinstance(data, dict):
        raise StatusError(f"status.json holds {json_kind(data)}, expected an object")
    if data.get("state") is None:
        raise StatusError("status.json has no state")
    for key, (ok, expected) in STATUS_FIELDS.items():
        if data.get(key) is not None and not ok(data[key]):
            raise StatusError(f"status.json: {key} must be {expected} (found {json_kind(data[key])})")
    return data


def load_status(run_path: Path) -> dict[str, Any] | None:
    """A run's checked status.json; None when it has none; StatusError naming the reason when it is unusable."""
    try:
        raw = (run_path / "status.json").read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise StatusError(f"status.json cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StatusError("status.json is not UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StatusError(f"status.json is not valid JSON (line {e.lineno}: {e.msg})") from None
    except (ValueError, RecursionError):  # a number of thousands of digits, or nesting past the parser's depth
        raise StatusError("status.json holds a number or nesting too large to be a status") from None
    return check_status(data)


def read_status(run_path: Path) -> dict[str, Any] | None:
    """A run's status.json, or None when it is missing or unusable (load_status says why)."""
    try:
        return load_status(run_path)
    except StatusError:
        return None


def status_or_reason(run_path: Path) -> dict[str, Any]:
    """For views: the status, {} when there is none yet, or {"state": "unreadable: <why>"}."""
    if not run_path.is_dir():
        return {"state": "unreadable: run directory removed"}
    try:
        return load_status(run_path) or {}
    except StatusError as e:
        return {"state": f"unreadable: {e}"}


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file: a replaced one (atomic write) has another inode, an edited one another mtime."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class RunDir:
    """Paths of one run and the writers of its status and metrics."""

    def __init__(self, path: Path, writer: bool = True):
        self.path = path
        self.writer = writer  # False on the ranks after 0 of a multi-process run: rank 0 alone writes the files
        self.config = path / "config.yaml"
        self.status_file = path / "status.json"
        self.metrics_file = path / "metrics.jsonl"
        self.log_file = path / "train.log"
        self.adapter = path / "adapter"
        self.checkpoints = path / "checkpoints"
        self.status: dict[str, Any] = read_status(path) or {
            "state": "queued",
            "pid": None,
            "started_at": None,
            "ended_at": None,
            "exit_code": None,
            "error": None,
            "step": 0,
            "max_steps": None,
        }
        self._metrics = None
        self._last_status_write = 0.0

    @property
    def run_id(self) -> str:
        return self.path.name

    def write_status(self, throttle_s: float = 0.0, **changes: Any) -> None:
        """Update status.json atomically; with throttle_s, skip writes closer together than that."""
        self.status.update(changes)
        if not self.writer:
            return
        now = time.monotonic()
        if throttle_s and now - self._last_status_write < throttle_s:
            return
        self._last_status_write = now
        write_json_atomic(self.status_file, self.status)

    def append_metric(self, kind: str, step: int, **values: Any) -> None:
        """One metrics.jsonl line, flushed at once so a watcher sees it while training goes on."""
        if not self.writer:
            return
        if self._metrics is None:
            self._metrics = open(self.metrics_file, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        line = {"step": step, "time": round(time.time(), 3), "kind": kind, **values}
        nonfinite = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
        if nonfinite:  # strict JSON for every reader: NaN/inf become null, named in "nonfinite"
            line.update({k: None for k in nonfinite}, nonfinite=nonfinite)
        self._metrics.write(json.dumps(line, allow_nan=False) + "\n")
        self._metrics.flush()

    def event(self, step: int, event: str, **values: Any) -> None:
        self.append_metric("event", step, event=event, **values)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


JOB_LOCK = ".job.lock"


@contextmanager
def job_held(path: Path) -> Iterator[int | None]:
    """Hold a job dir while inside (flock on <dir>/.job.lock; the kernel drops it when the process ends, kill -9
    included): yields None when this process holds it, else the pid of the live process that does. Two processes
    launched for one job (two servers, a queue and a hand-run) never both run it. A missing dir is not held."""
    import fcntl

    try:
        fh = open(path / JOB_LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (closed below: the lock lives with it)
    except OSError:
        yield None
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            yield int(holder) if holder.isdigit() else -1
            return
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield None


def job_holder(path: Path) -> int | None:
    """The pid of the live process that holds the job dir (job_held), or None when none does."""
    import fcntl

    try:
        with open(path / JOB_LOCK, encoding="utf-8") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)  # got it: nobody holds the job (closing lets go)
                return None
            except BlockingIOError:
                holder = fh.read().strip()
                return int(holder) if holder.isdigit() else None
    except OSError:
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics.jsonl; a half-written last line is skipped."""
    from trainer.metrics_reader import MetricsTail

    return MetricsTail(path).poll()
