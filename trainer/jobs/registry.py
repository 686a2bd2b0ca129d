"""The job registry: one SQLite table (WAL mode) in <runs_dir>/registry.sqlite, safe to read while jobs write.

Each call opens its own short-lived connection, so UI threads and the queue thread never share one.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue order
    id          TEXT NOT NULL UNIQUE,               -- the run id (directory name)
    name        TEXT,
    kind        TEXT NOT NULL,                      -- train | export
    state       TEXT NOT NULL,                      -- queued | running | completed | failed | stopped
    pid         INTEGER,
    proc_start  REAL,                               -- the process's start time: tells our pid from a reused one
    created_at  REAL NOT NULL,
    started_at  REAL,
    ended_at    REAL,
    config_path TEXT NOT NULL,
    run_dir     TEXT NOT NULL,
    exit_code   INTEGER,
    error       TEXT,
    stop_requested REAL                             -- when a stop was asked for, if it was
);
"""


@dataclass(frozen=True)
class Job:
    seq: int
    id: str
    name: str | None
    kind: str
    state: str
    pid: int | None
    proc_start: float | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    config_path: str
    run_dir: str
    exit_code: int | None
    error: str | None
    stop_requested: float | None


COLUMNS = [f.name for f in fields(Job)]


class Registry:
    def __init__(self, runs_dir: Path):
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.path = runs_dir / "registry.sqlite"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA busy_timeout=30000")
        try:
            yield db
        finally:
            db.close()

    def add(
        self, job_id: str, name: str | None, kind: str, config_path: Path, run_dir: Path, state: str = "queued"
    ) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (id, name, kind, state, created_at, config_path, run_dir) VALUES (?,?,?,?,?,?,?)",
                (job_id, name, kind, state, time.time(), str(config_path), str(run_dir)),
            )

    def update(self, job_id: str, **values: Any) -> None:
        unknown = set(values) - set(COLUMNS)
        if unknown:
            raise KeyError(f"unknown job columns: {unknown}")
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), job_id))

    def claim(self, job_id: str, **values: Any) -> bool:
        """Compare-and-set: mark a queued job running (with values) only if it is still queued; False when
        another tick or server got there first."""
        assignments = ", ".join(f"{k} = ?" for k in values)
        with self._connect() as db:
            cur = db.execute(
                f"UPDATE jobs SET state = 'running', {assignments} WHERE id = ? AND state = 'queued'",
                (*values.values(), job_id),
            )
            return cur.rowcount == 1

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def all(self, state: str | None = None) -> list[Job]:
        query = f"SELECT {', '.join(COLUMNS)} FROM jobs"
        args: tuple = ()
        if state:
            query, args = query + " WHERE state = ?", (state,)
        with self._connect() as db:
            return [Job(*r) for r in db.execute(query + " ORDER BY seq", args).fetchall()]

    def delete(self, job_id: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
