"""The registry from the job dirs: what a server lists when its registry.sqlite is new (lost, deleted, unreadable)
and the finished runs `lora-workbench train` made outside it.

Every run dir (runs/<run_id>/) and side-job dir (runs/.jobs/<job_id>/) with a readable status.json is a job:
finished ones always, queued and running ones when the queue made them (their status.json has `submitted_at`:
a run the command line is training now is listed once it has finished). Queued jobs keep their submit order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from trainer.jobs.registry import Registry
from trainer.jobs.requests import REQUEST_FILE, request_kind, request_name
from trainer.run_dir import FINAL_STATES, StatusError, load_status

JOBS_SUBDIR = ".jobs"


@dataclass(frozen=True)
class Found:
    path: Path
    kind: str
    status: dict[str, Any]

    @property
    def submitted(self) -> bool:
        return _number(self.status.get("submitted_at")) is not None

    @property
    def order(self) -> tuple[float, str]:
        """When it was submitted (or started, or the time in its name): the queue's order."""
        for key in ("submitted_at", "started_at"):
            if (t := _number(self.status.get(key))) is not None:
                return t, self.path.name
        try:
            return datetime.strptime(self.path.name[:15], "%Y%m%d-%H%M%S").timestamp(), self.path.name
        except ValueError:
            return 0.0, self.path.name

    def add_to(self, registry: Registry) -> None:
        request = self.path / ("config.yaml" if self.kind == "train" else REQUEST_FILE)
        registry.add(
            self.path.name,
            request_name(self.path),
            self.kind,
            request,
            self.path,
            state=self.status["state"],
            created_at=self.order[0] or None,
        )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def job_dirs(runs_dir: Path, not_listed: list[str], say: bool = True) -> list[Found]:
    """Every job dir with a usable status.json, in queue order; an unusable one is named in not_listed (and, with
    say, printed), with the reason."""
    found = []
    side = runs_dir / JOBS_SUBDIR
    candidates = [(p, "train") for p in sorted(runs_dir.iterdir()) if not p.name.startswith(".")]
    candidates += [(p, None) for p in sorted(side.iterdir())] if side.is_dir() else []
    for path, kind in candidates:
        if not path.is_dir():
            continue
        try:
            status = load_status(path)
        except StatusError as e:
            not_listed.append(f"{path}: not listed: {e}")
            if say:
                print(not_listed[-1], file=sys.stderr, flush=True)
            continue
        kind = kind or request_kind(path)
        if status is not None and kind is not None:
            found.append(Found(path, kind, status))
    return sorted(found, key=lambda f: f.order)


def rebuild_from_disk(registry: Registry, runs_dir: Path, not_listed: list[str]) -> None:
    """List every job dir again, with its state from its status.json (the registry was new or lost). What cannot
    be listed is said by adopt_runs_on_disk, which the server runs next."""
    known = {j.id for j in registry.all()}
    for f in job_dirs(runs_dir, not_listed, say=False):
        if f.path.name not in known and (f.status["state"] in FINAL_STATES or f.submitted):
            f.add_to(registry)


def adopt_runs_on_disk(registry: Registry, runs_dir: Path, not_listed: list[str]) -> None:
    """Register finished run directories made by `lora-workbench train` outside the UI."""
    known = {j.id for j in registry.all()}
    for f in job_dirs(runs_dir, not_listed):
        if f.kind == "train" and f.path.name not in known and f.status["state"] in FINAL_STATES:
            f.add_to(registry)
