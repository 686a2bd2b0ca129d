"""A job's process, told apart from a recycled pid, and how it is signalled.

Two records name it: the pid and start time the spawning server kept in the registry, and the pid and started_at
the job's process wrote into its status.json (the only record after the registry was rebuilt, or for a run started
from the command line).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil

from trainer.jobs.registry import Job
from trainer.run_dir import read_status

PID_START_SLACK_S = 1.0  # status.json's started_at is written after the process starts, never before


def is_our_process(job: Job) -> bool:
    """True if the job's pid is alive and is still the process we started (not a recycled pid)."""
    if not job.pid or job.proc_start is None:
        return False
    try:
        proc = psutil.Process(job.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
        # An empty command line is a process inside execve (a training job re-executes itself on tcmalloc at
        # start: trainer/run/lean_memory.py); its start time alone tells it from a recycled pid then
        return abs(proc.create_time() - job.proc_start) < 0.01 and (
            not cmdline or job.config_path in cmdline or job.run_dir in cmdline  # jobs get their dir (older: config)
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def status_process(run_dir: Path) -> int | None:
    """The pid status.json names, while that process runs: one started before the status said so (a recycled
    pid starts later) whose command line names the run (its dir or its config, relative or not)."""
    status = read_status(run_dir) or {}
    pid, started = status.get("pid"), status.get("started_at")
    if status.get("state") != "running" or not pid or started is None:
        return None
    try:
        proc = psutil.Process(pid)
        alive = proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= started + PID_START_SLACK_S
        alive = alive and any(run_dir.name in arg for arg in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return pid if alive else None


def kill_tree(pid: int | None) -> None:
    """SIGKILL a job's process group and everything below it: a multi-process run's `accelerate launch` runs in
    a session of its own (trainer/run/launch.py), which the group signal does not reach."""
    try:
        below = psutil.Process(pid).children(recursive=True) if pid else []
    except psutil.NoSuchProcess:
        below = []
    signal_group(pid, signal.SIGKILL)
    for proc in below:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def signal_group(pid: int | None, sig: int) -> None:
    if not pid:
        return
    try:
        os.killpg(os.getpgid(pid), sig)
    except ProcessLookupError:
        pass
