"""A real subprocess: SIGTERM mid-run saves a loadable adapter (state stopped, exit 143); --resume continues."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, only_run
from trainer.run_dir import read_metrics, read_status
from trainer.train import run_training


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
    from trainer.callbacks import latest_complete_checkpoint

    for step, complete in ((5, True), (10, True), (15, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "CHECKPOINT_COMPLETE").write_text(json.dumps({"step": step}))
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-10"
    assert latest_complete_checkpoint(tmp_path / "none") is None
