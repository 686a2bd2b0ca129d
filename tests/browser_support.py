"""The real UI server as a test/benchmark fixture, and Chromium settings that work on these machines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
CHROMIUM_ARGS.append("--disable-sync")
LOSS_POINTS_JS = "() => document.querySelector('#loss-plot .js-plotly-plot')?.data?.[0]?.x?.length ?? 0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `lora-workbench ui` process on a free port, over one runs dir; can be killed and restarted. Its page
    opens on `example` (the tiny model by default, for fast tests; the product default is the real model)."""

    def __init__(self, runs_dir: Path, log: Path, example: str = "examples/tiny-lora.yaml"):
        self.runs_dir, self.log, self.port, self.example = runs_dir, log, _free_port(), example
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        argv = [sys.executable, "-m", "trainer", "ui", "--port", str(self.port), "--runs-dir", str(self.runs_dir)]
        argv += ["--example", self.example]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"UI server did not answer: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """kill -9, as a crash would: its training subprocesses are in their own sessions and live on."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def kill_run(runs_dir: Path, run_id: str) -> None:
    """The job processes of one run (its status.json's pid and anything working in its dir), never the server
    that shares the runs dir (whose command line names the runs dir, not the run's)."""
    _kill_jobs(runs_dir / run_id, [runs_dir / run_id / "status.json"])


def kill_leftover_trainers(runs_dir: Path) -> None:
    """Every job process still working in the runs dir (a 100000-step run the test left), by its status.json's pid
    and by its command line (a job that had not written its pid yet): none outlives the test to load the machine.
    A server on that runs dir is killed too: call it after the server stopped (kill_run while it serves)."""
    _kill_jobs(runs_dir, list(runs_dir.glob("*/status.json")))


def _kill_jobs(path: Path, status_files: list[Path]) -> None:
    """SIGKILL the process group of each running status.json's pid, then every process whose command line names
    `path`."""
    import psutil

    for status_file in status_files:
        status = json.loads(status_file.read_text()) if status_file.is_file() else {}
        if status.get("pid") and status.get("state") == "running":
            try:
                os.killpg(os.getpgid(status["pid"]), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(path) in arg for arg in proc.info["cmdline"] or []):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def set_number(page, path: str, value: int | float) -> None:
    box = page.locator(f"#f-{path.replace('.', '-')} input")
    box.fill(str(value))
    box.press("Tab")
