"""The job registry: an index of the job dirs in one SQLite table (WAL mode), <runs_dir>/registry.sqlite.

It holds what no job dir says: the queue order, the page's name, the pid and start time of the process a server
spawned, and when a stop was asked for. A job's state is its status.json's: the registry's copy is a cache, refreshed
from the file whenever the file changed (never the other way round), with two exceptions: `running` from the moment
a server claims a queued job (compare-and-set) until its process writes its own, and the final state of a job whose
directory is gone. Lost or unreadable, the file is rebuilt from the job dirs (trainer/jobs/from_disk.py).
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

from trainer.run_dir import StatusError, file_stamp, load_status

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue order
    id          TEXT NOT NULL UNIQUE,               -- the run id (directory name)
    name        TEXT,
    kind        TEXT NOT NULL,                      -- train | export | evaluate | preflight
    state       TEXT NOT NULL,                      -- status.json's state (cached), or a claim's running
    pid         INTEGER,
    proc_start  REAL,                               -- the process's start time: tells our pid from a reused one
    created_at  REAL NOT NULL,
    started_at  REAL,                               -- when it was launched (its claim)
    ended_at    REAL,
    config_path TEXT NOT NULL,                      -- its request: a run's config.yaml, a side job's job.json
    run_dir     TEXT NOT NULL,
    exit_code   INTEGER,
    error       TEXT,
    stop_requested REAL,                            -- when a stop was asked for, if it was
    status_stamp TEXT                               -- of the status.json the cached state was read from
);
"""
CACHED = {"state", "error", "exit_code", "started_at", "ended_at"}  # refreshed from status.json


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
        self.fresh = not self.path.exists()  # nothing indexed yet: the job dirs are listed again
        try:
            self._create()
        except sqlite3.DatabaseError:  # not a database (a torn copy, a stray file): kept aside, rebuilt
            self.path.rename(self.path.with_name(f"registry.sqlite.unreadable-{int(time.time())}"))
            for suffix in ("-wal", "-shm"):
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
            self.fresh = True
            self._create()

    def _create(self) -> None:
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            if "status_stamp" not in have:  # a registry from before the cache was refreshed
                db.execute("ALTER TABLE jobs ADD COLUMN status_stamp TEXT")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA busy_timeout=30000")
        try:
            yield db
        finally:
            db.close()

    def add(
        self,
        job_id: str,
        name: str | None,
        kind: str,
        config_path: Path,
        run_dir: Path,
        state: str = "queued",
        created_at: float | None = None,
    ) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (id, name, kind, state, created_at, config_path, run_dir) VALUES (?,?,?,?,?,?,?)",
                (job_id, name, kind, state, created_at or time.time(), str(config_path), str(run_dir)),
            )
        self.refresh(job_id)

    def update(self, job_id: str, **values: Any) -> None:
        unknown = set(values) - set(COLUMNS)
        if unknown:
            raise KeyError(f"unknown job columns: {unknown}")
        if CACHED & set(values):  # a state not read from status.json: the file is read again at the next look
            values = {**values, "status_stamp": None}
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

    def refresh(self, job_id: str | None = None) -> None:
        """Take the state of every job (or one) whose status.json changed since it was last read."""
        query, args = "SELECT id, run_dir, state, status_stamp FROM jobs", ()
        if job_id is not None:
            query, args = query + " WHERE id = ?", (job_id,)
        with self._connect() as db:
            rows = db.execute(query, args).fetchall()
            changes = [c for c in (_status_change(*row) for row in rows) if c is not None]
            for job_id_, values in changes:
                # started_at is when the job was launched (its claim); status.json's only fills in a missing one
                assignments = ", ".join(f"{k} = COALESCE({k}, ?)" if k == "started_at" else f"{k} = ?" for k in values)
                db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), job_id_))

    def get(self, job_id: str) -> Job | None:
        self.refresh(job_id)
        with self._connect() as db:
            row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def all(self, state: str | None = None) -> list[Job]:
        query = f"SELECT {', '.join(COLUMNS)} FROM jobs"
        args: tuple = ()
        if state:
            query, args = query + " WHERE state = ?", (state,)
        self.refresh()
        with self._connect() as db:
            return [Job(*r) for r in db.execute(query + " ORDER BY seq", args).fetchall()]

    def delete(self, job_id: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))


def _status_change(job_id: str, run_dir: str, state: str, stamp: str | None) -> tuple[str, dict[str, Any]] | None:
    """The cached columns to change for one job, or None when its status.json is as last read (or unusable, or
    gone: then the cache keeps what it has)."""
    now = file_stamp(Path(run_dir) / "status.json")
    if now is None or str(now) == stamp:
        return None
    try:
        status = load_status(Path(run_dir))
    except StatusError:
        return None
    if status is None:
        return None
    values: dict[str, Any] = {"status_stamp": str(now)}
    if status["state"] != "queued":  # only a submit writes queued: a claimed job stays running until its process
        values.update({k: status.get(k) for k in sorted(CACHED)})
    return job_id, values
