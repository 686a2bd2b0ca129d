"""A real subprocess: SIGTERM mid-run saves a loadable adapter (state stopped, exit 143); --resume continues."""

from __future__ import annotations

import ctypes.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, only_run
from trainer.run import lean_memory
from trainer.run.train import run_training
from trainer.run_dir import read_metrics, read_status


def wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def stopped_run(make_config) -> Path:
    cfg_path = make_config({"training": {"max_steps": 5000, "save_steps": 4, "logging_steps": 1}})
    runs = cfg_path.parent / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", "train", str(cfg_path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: runs.exists() and any(runs.glob("*/checkpoints/checkpoint-8/CHECKPOINT_COMPLETE")))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
    return only_run(runs)


def test_sigterm_saves_adapter_and_resume_continues(stopped_run: Path) -> None:
    from peft import PeftConfig

    status = read_status(stopped_run)
    assert (status["state"], status["exit_code"]) == ("stopped", 143)
    stopped_at = status["step"]
    assert 8 <= stopped_at < 5000
    assert PeftConfig.from_pretrained(stopped_run / "adapter").peft_type == "LORA"
    assert "SIGTERM" in (stopped_run / "train.log").read_text()
    # the command re-executed itself on a lean allocator where one is installed, and still stopped on SIGTERM
    lean = next(x for x in read_metrics(stopped_run / "metrics.jsonl") if x.get("event") == "lean_memory")
    installed = next((name for name in lean_memory.ALLOCATORS if ctypes.util.find_library(name)), "system")
    assert lean["allocator"] == installed

    # Resume from the newest complete checkpoint, with a shorter horizon so the test ends quickly.
    cfg = stopped_run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("max_steps: 5000", f"max_steps: {stopped_at + 6}"))
    newest = max(
        int(p.name.split("-")[1])
        for p in stopped_run.glob("checkpoints/checkpoint-*")
        if (p / "CHECKPOINT_COMPLETE").exists()
    )
    assert run_training(str(cfg), resume=True) == 0
    status = read_status(stopped_run)
    assert (status["state"], status["step"]) == ("completed", stopped_at + 6)
    train_steps = [x["step"] for x in read_metrics(stopped_run / "metrics.jsonl") if x["kind"] == "train"]
    resumed = train_steps[train_steps.index(stopped_at) + 1 :] if stopped_at in train_steps else train_steps
    assert resumed[0] == newest + 1 and resumed[-1] == stopped_at + 6


def test_incomplete_checkpoints_are_not_resumed_from(tmp_path: Path) -> None:
    from trainer.run.callbacks import latest_complete_checkpoint

    for step, complete in ((5, True), (10, True), (15, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "CHECKPOINT_COMPLETE").write_text(json.dumps({"step": step}))
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-10"
    assert latest_complete_checkpoint(tmp_path / "none") is None


def catches_sigterm(pid: int) -> bool:
    """The process has installed a SIGTERM handler of its own (Linux: the SigCgt mask in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def log_says(runs: Path, text: str) -> bool:
    return any(text in log.read_text() for log in runs.glob("*/train.log"))


def stop_at(moment: str, cfg_path: Path, runs: Path) -> bool:
    """SIGTERM a `lora-workbench train` at the moment; False when it had already passed the model load (the
    process is frozen with SIGSTOP while the log is read, so the signal lands exactly where it was)."""
    argv = [sys.executable, "-m", "trainer", "train", str(cfg_path)]
    proc = subprocess.Popen(argv, cwd=cfg_path.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if moment == "while the model loads":
            wait_for(lambda: proc.poll() is not None or log_says(runs, "loading the model"))
        else:
            wait_for(lambda: proc.poll() is not None or catches_sigterm(proc.pid))
        assert proc.poll() is None, "the trainer ended before the moment to stop it came"
        proc.send_signal(signal.SIGSTOP)
        if moment == "while the model loads" and log_says(runs, "optimizer steps"):  # the model line: too late
            return False
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=60) == 143
        return True
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("moment", ["as soon as it handles signals", "while the model loads"])
def test_a_stop_before_the_first_step_ends_the_run_stopped(make_config, moment: str) -> None:
    for attempt in range(5):  # the tiny model loads in a blink: a signal that came too late is tried again
        cfg_path = make_config(name=f"cfg{attempt}.yaml", overrides={"output": {"runs_dir": f"runs{attempt}"}})
        runs = cfg_path.parent / f"runs{attempt}"
        if stop_at(moment, cfg_path, runs):
            break
    else:
        pytest.fail(f"the trainer was past the model load before the signal came, 5 times ({moment})")
    run = only_run(runs)
    status = read_status(run)
    assert (status["state"], status["exit_code"], status["step"]) == ("stopped", 143, 0)
    assert status["error"] == "stopped before training began: no adapter saved"
    assert not (run / "adapter").exists()
    metrics = read_metrics(run / "metrics.jsonl")
    assert not [x for x in metrics if x["kind"] == "train"]
    assert [x.get("state") for x in metrics if x.get("event") == "end"] == ["stopped"]
    log = (run / "train.log").read_text()
    assert f"run {run.name}: stopped: stopped before training began: no adapter saved" in log
    if moment == "while the model loads":  # the earliest signal comes before train.log exists
        assert "received SIGTERM: stopping before training begins" in log
