"""One server per runs dir: a second `lora-workbench ui` on a runs dir in use refuses, naming the first, before its
queue could launch anything; a lock left by a dead server never blocks a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from trainer.jobs.runs_lock import LOCK_NAME, RunsDirBusy, hold_runs_dir


def test_a_second_holder_is_refused_with_the_first_named(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first = hold_runs_dir(runs, "http://127.0.0.1:7860")
    with pytest.raises(RunsDirBusy, match=rf"pid {os.getpid()}, http://127.0.0.1:7860, since .*different --runs-dir"):
        hold_runs_dir(runs, "http://127.0.0.1:7861")
    first.close()  # the first server ends: the runs dir is free again
    hold_runs_dir(runs, "http://127.0.0.1:7861").close()


def test_a_lock_file_left_by_a_dead_server_does_not_block(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / LOCK_NAME).write_text(json.dumps({"pid": 999999, "url": "http://0.0.0.0:7860", "started": "then"}))
    held = hold_runs_dir(runs, "http://127.0.0.1:7862")  # flock dies with its process; the file alone holds nothing
    assert json.loads((runs / LOCK_NAME).read_text())["pid"] == os.getpid()
    held.close()


def test_the_second_ui_server_exits_before_touching_the_queue(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    queued = runs / "20260101-000000-waiting"
    queued.mkdir(parents=True)
    (queued / "status.json").write_text(json.dumps({"state": "queued"}))
    held = hold_runs_dir(runs, "http://127.0.0.1:7860")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "trainer", "ui", "--runs-dir", str(runs), "--port", "7999"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        held.close()
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"another LoRA Workbench server is using it (pid {os.getpid()}, http://127.0.0.1:7860" in done.stderr
    assert json.loads((queued / "status.json").read_text()) == {"state": "queued"}
    assert not (runs / "registry.sqlite").exists()  # no queue was built on it


def test_a_taken_port_is_refused_naming_port_before_the_runs_dir_is_touched(tmp_path: Path) -> None:
    """A second server on the first one's port (another runs dir): one line naming --port, and nothing written in
    its runs dir (Gradio's own error came after the lock and the registry were made, with a traceback)."""
    import socket

    from app.server import LaunchError, serve

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(LaunchError, match=rf"--port {port}: cannot listen on 127.0.0.1:{port}"):
            serve(port=port, runs_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()
