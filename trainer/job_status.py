"""Progress of a side job (export, evaluate): printed as `[kind] n/N what`, and with --status-dir also written
to that directory's status.json (step = finished phases) and result.json, which the UI's job view reads."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from trainer.run_dir import RunDir, write_json_atomic


class JobStatus:
    def __init__(self, kind: str, phases: int, status_dir: str | None = None):
        self.kind, self.phases = kind, phases
        self.dir = RunDir(Path(status_dir)) if status_dir else None

    def _write(self, **changes: Any) -> None:
        if self.dir is not None:
            self.dir.write_status(**changes)

    def start(self) -> None:
        self._write(state="running", pid=os.getpid(), started_at=time.time(), step=0, max_steps=self.phases)

    def phase(self, n: int, text: str) -> None:
        """Phase n (1-based) begins."""
        print(f"[{self.kind}] {n}/{self.phases} {text}", flush=True)
        self._write(step=n - 1, phase=text)

    def finish(self, result: dict[str, Any]) -> None:
        if self.dir is not None:
            write_json_atomic(self.dir.path / "result.json", result)
        self._write(state="completed", step=self.phases, exit_code=0, ended_at=time.time(), phase="done")

    def fail(self, error: str, exit_code: int = 1, exc: BaseException | None = None, kind: str | None = None) -> None:
        """The caller has already printed the error (to stderr, which the job's log also captures). The failure's
        kind comes from the exception caught, or is given (kind), else 'internal'."""
        from trainer.failure import classify, failure

        why = classify(exc, error) if exc is not None else failure(kind or "internal", error)  # type: ignore[arg-type]
        self._write(state="failed", error=error, failure=why.to_status(), exit_code=exit_code, ended_at=time.time())

    def stopped(self, message: str, exit_code: int) -> None:
        """Stopped by a signal before it finished (the queue writes the same state for a job that could not)."""
        self._write(state="stopped", error=message, exit_code=exit_code, ended_at=time.time())


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON file another process wrote atomically, or None when it is not there (yet)."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_result(job_dir: Path) -> dict[str, Any] | None:
    return read_json(job_dir / "result.json")
