"""One server per runs dir: an exclusive lock the UI server holds for its whole life.

Two servers on one runs dir would each run the queue and could both launch the same queued job. The lock is
flock(2) on <runs>/.server.lock, so the kernel drops it when the holder exits, kill -9 included: a stale lock file
never blocks a restart. The file names its holder (pid, address, start time) so the refusal can say where the
running server is.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import IO

LOCK_NAME = ".server.lock"


class RunsDirBusy(RuntimeError):
    """Another live server holds the runs dir; the message names it and what to do."""


def hold_runs_dir(runs_dir: Path, url: str) -> IO[str]:
    """Take the runs dir for this process (keep the returned file open for as long as the server runs)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    fh = open(runs_dir / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 (held open: the lock lives with it)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(fh)
        fh.close()
        raise RunsDirBusy(busy_message(runs_dir, holder)) from None
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "url": url, "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    fh.flush()
    return fh


def read_holder(fh: IO[str]) -> dict:
    fh.seek(0)
    try:
        holder = json.loads(fh.read() or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def busy_message(runs_dir: Path, holder: dict) -> str:
    who = f"pid {holder.get('pid', '?')}, {holder.get('url', 'address unknown')}, since {holder.get('started', '?')}"
    return (
        f"--runs-dir {runs_dir}: another LoRA Workbench server is using it ({who}). Two servers on one runs dir "
        "would both run its queue. Open that server, stop it first, or pass a different --runs-dir."
    )
