"""Faults: a disk that fills up while a checkpoint is saved, and a long queue that must drain in order."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from trainer.config.presets import load_config
from trainer.jobs.queue import JobManager
from trainer.run.callbacks import CHECKPOINT_MARKER, latest_complete_checkpoint
from trainer.run_dir import read_status


def wait_until(predicate, manager: JobManager, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        manager.tick()
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 MB tmpfs to fill up (needs root, as CI and the dev machine have)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(mount)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Write a filler file until only leave_bytes are free."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        remaining = free - leave_bytes
        try:
            while remaining > 0:
                remaining -= f.write(chunk[: min(len(chunk), remaining)])
            f.flush()
        except OSError:  # the trainer wrote meanwhile: the disk is full already
            pass
    return filler


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(make_config, small_disk: Path):
    cfg = load_config(
        make_config(
            {
                "training": {"max_steps": 100000, "save_steps": 5, "logging_steps": 1, "save_total_limit": None},
                "output": {"runs_dir": str(small_disk / "runs")},
            }
        )
    )
    manager = JobManager(small_disk / "runs", cwd=ROOT)
    run_id = manager.submit(cfg)
    run = small_disk / "runs" / run_id
    wait_until(lambda: latest_complete_checkpoint(run / "checkpoints") is not None, manager)

    def complete_ones() -> dict[str, dict[str, bytes]]:
        return {
            c.name: {p.name: p.read_bytes() for p in c.iterdir() if p.is_file()}
            for c in (run / "checkpoints").glob("checkpoint-*")
            if (c / CHECKPOINT_MARKER).is_file()
        }

    before = complete_ones()
    pid = manager.registry.get(run_id).pid
    filler = fill(small_disk, leave_bytes=64 * 1024)  # room for metrics lines, not for another checkpoint
    deadline = time.monotonic() + 120
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the trainer kept running on a full disk"
        time.sleep(0.2)
    filler.unlink()  # the registry lives on the same disk: the queue settles the job once there is room again
    wait_until(lambda: manager.registry.get(run_id).state in ("failed", "completed", "stopped"), manager)

    job = manager.registry.get(run_id)
    assert job.state == "failed", job.error  # how it failed depends on which write hit the full disk first
    after = complete_ones()
    assert all(after[name] == files for name, files in before.items())  # every saved checkpoint untouched
    first = latest_complete_checkpoint(run / "checkpoints")  # a half-written later one is never "complete"
    assert first is not None and first.name in after
    assert read_status(run) is not None  # status.json was replaced atomically or not at all: still valid JSON

    resumed_cfg = run / "config.yaml"
    text = resumed_cfg.read_text().replace("max_steps: 100000", f"max_steps: {int(first.name.split('-')[1]) + 3}")
    resumed_cfg.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "train", str(resumed_cfg), "--resume"], cwd=ROOT, capture_output=True
    )
    assert done.returncode == 0, done.stdout.decode()[-2000:] + done.stderr.decode()[-2000:]
    assert read_status(run)["state"] == "completed"


def test_a_queue_of_ten_jobs_drains_in_order_with_none_lost(make_config, tmp_path: Path):
    """Five times the two running slots: every job waits its turn at least once, none is lost or run twice."""
    manager = JobManager(tmp_path / "runs", max_running=2, cwd=ROOT)
    cfg = load_config(make_config({"training": {"max_steps": 1, "save_steps": 100}, "data": {"max_samples": 8}}))
    ids = [manager.submit(cfg) for _ in range(10)]
    wait_until(lambda: all(manager.registry.get(i).state == "completed" for i in ids), manager, timeout=400)
    jobs = [manager.registry.get(i) for i in ids]
    assert [j.seq for j in sorted(jobs, key=lambda j: j.started_at)] == [j.seq for j in jobs]  # started in order
    assert all((Path(j.run_dir) / "adapter" / "adapter_config.json").is_file() for j in jobs)
    assert len({j.run_dir for j in jobs}) == 10
