"""Browser tests: Playwright drives Debian's Chromium against the real `lora-workbench ui` server, which
trains the offline tiny model in real subprocesses.

Set LWB_SCREENSHOTS=DIR to also write the README's screenshots there.
"""

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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright wheel")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
CHROMIUM_ARGS.append("--disable-sync")
LOSS_POINTS_JS = "() => document.querySelector('#loss-plot .js-plotly-plot')?.data?.[0]?.x?.length ?? 0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `lora-workbench ui` process on a free port, over one runs dir; can be killed and restarted."""

    def __init__(self, runs_dir: Path, log: Path):
        self.runs_dir, self.log, self.port = runs_dir, log, _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        argv = [sys.executable, "-m", "trainer", "ui", "--port", str(self.port), "--runs-dir", str(self.runs_dir)]
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


def _kill_leftover_trainers(runs_dir: Path) -> None:
    for status_file in runs_dir.glob("*/status.json"):
        pid = json.loads(status_file.read_text()).get("pid")
        if pid and json.loads(status_file.read_text()).get("state") == "running":
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ui")
    srv = Server(root / "runs", root / "server.log")
    srv.start()
    yield srv
    srv.stop()
    _kill_leftover_trainers(srv.runs_dir)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    context.close()


def open_app(page, server: Server) -> None:
    page.goto(server.url)
    page.wait_for_selector("#start-btn")
    page.wait_for_function("() => document.querySelector('#estimate')?.innerText.includes('Trainable parameters')")


def set_number(page, path: str, value: int | float) -> None:
    box = page.locator(f"#f-{path.replace('.', '-')} input")
    box.fill(str(value))
    box.press("Tab")


def run_state(page, run_id: str) -> tuple[str | None, int]:
    """(state, step) the monitor shows for run_id; (None, 0) while it shows something else."""
    el = page.locator(".lwb-progress")
    if el.count() == 0 or el.get_attribute("data-run") != run_id:
        return None, 0
    return el.get_attribute("data-state"), int(el.get_attribute("data-step") or 0)


def wait_until(check: Callable[[], bool], timeout: float = 120, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start_from_page(page, **numbers: float) -> str:
    """Set number fields, press Start, return the new run id shown in the monitor."""
    for path, value in numbers.items():
        set_number(page, path.replace("__", "."), value)
    before = page.inner_text("#start-msg")
    page.click("#start-btn")

    def answered() -> bool:
        msg = page.inner_text("#start-msg")
        return msg != before and msg.startswith(("Run ", "Not started"))

    wait_until(answered, 60, "the start message")
    msg = page.inner_text("#start-msg")
    assert msg.startswith("Run "), msg
    return msg.split()[1]


def screenshot(page, name: str) -> None:
    out = os.environ.get("LWB_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / name), full_page=False)


def test_train_from_page_streams_loss_and_completes(page, server: Server) -> None:
    open_app(page, server)
    run_id = start_from_page(page, training__logging_steps=5)
    counts_while_running: set[int] = set()

    def done() -> bool:
        state, _ = run_state(page, run_id)
        if state == "running":
            counts_while_running.add(page.evaluate(LOSS_POINTS_JS))
            if len(counts_while_running - {0}) == 3:
                screenshot(page, "train-tab.png")
        return state == "completed"

    wait_until(done, 180, "the run to complete")
    assert len(counts_while_running - {0}) >= 2, f"loss chart did not grow while running: {counts_while_running}"
    wait_until(lambda: page.evaluate(LOSS_POINTS_JS) >= 40, 30, "all 40 loss points (200 steps / 5)")
    assert (server.runs_dir / run_id / "adapter" / "adapter_config.json").is_file()
    assert json.loads((server.runs_dir / run_id / "status.json").read_text())["state"] == "completed"


def test_stop_from_page_saves_adapter(page, server: Server) -> None:
    open_app(page, server)
    run_id = start_from_page(page, training__max_steps=100000, training__logging_steps=5)
    wait_until(
        lambda: run_state(page, run_id)[0] == "running" and run_state(page, run_id)[1] > 5,
        120,
        "the run to make steps",
    )
    page.click("#stop-btn")
    wait_until(lambda: run_state(page, run_id)[0] == "stopped", 90, "the run to stop")
    run = server.runs_dir / run_id
    assert (run / "adapter" / "adapter_config.json").is_file()
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["exit_code"] == 143
    pid = status["pid"]
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "the trainer process to be gone")


def test_malformed_upload_names_the_line(page, server: Server, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jsonl"
    good = json.dumps({"instruction": "Say hi", "output": "hi"})
    bad.write_text(f"{good}\n{good}\n{{'instruction': oops\n{good}\n")
    open_app(page, server)
    with page.expect_file_chooser() as chooser:
        page.click("#upload-data")
    chooser.value.set_files(str(bad))
    page.wait_for_function("() => document.querySelector('#data-errors')?.innerText.includes('line 3')")
    assert "broken" in page.locator("#f-data-source input").input_value()
    stored = list((server.runs_dir / "uploads").glob("*broken.jsonl"))
    assert len(stored) == 1 and stored[0].read_text() == bad.read_text()


def test_runs_tab_overlays_two_runs(page, server: Server) -> None:
    open_app(page, server)
    first = start_from_page(page, training__max_steps=30, training__logging_steps=2)
    wait_until(lambda: run_state(page, first)[0] == "completed", 120, "first run")
    second = start_from_page(page, training__max_steps=30, adapter__r=4)
    wait_until(lambda: run_state(page, second)[0] == "completed", 120, "second run")
    page.get_by_role("tab", name="Runs").click()
    page.wait_for_function(f"() => document.querySelector('#runs-table')?.innerText.includes('{second}')")
    for run_id in (first, second):
        page.locator("#compare-runs label", has_text=run_id).click()
    names_js = "() => (document.querySelector('#overlay-plot .js-plotly-plot')?.data || []).map(t => t.name).join('|')"
    wait_until(lambda: first in page.evaluate(names_js) and second in page.evaluate(names_js), 30, "overlay")
    page.wait_for_function("() => document.querySelector('#config-diff')?.innerText.includes('adapter.r')")


def test_reload_and_server_restart_keep_the_running_job(page, tmp_path: Path) -> None:
    srv = Server(tmp_path / "runs", tmp_path / "server.log")
    srv.start()
    try:
        open_app(page, srv)
        run_id = start_from_page(page, training__max_steps=100000, training__logging_steps=5)
        wait_until(lambda: run_state(page, run_id)[0] == "running" and run_state(page, run_id)[1] > 0, 120, "running")

        page.reload()  # the page finds the running job by itself
        page.wait_for_selector("#start-btn")
        wait_until(lambda: run_state(page, run_id)[0] == "running", 30, "monitor after reload")
        assert page.locator("#watch-run input").input_value() == run_id
        step_before = run_state(page, run_id)[1]
        wait_until(lambda: run_state(page, run_id)[1] > step_before, 60, "steps after reload")
        page.get_by_role("tab", name="Runs").click()
        page.wait_for_function(f"() => document.querySelector('#runs-table')?.innerText.includes('{run_id}')")
        screenshot(page, "runs-tab.png")

        srv.kill()  # the server dies; the training subprocess does not
        trainer_pid = json.loads((srv.runs_dir / run_id / "status.json").read_text())["pid"]
        assert Path(f"/proc/{trainer_pid}").exists()
        srv.start()
        page.reload()
        page.wait_for_selector("#start-btn")
        wait_until(lambda: run_state(page, run_id)[0] == "running", 30, "re-attached run after restart")
        assert page.locator("#watch-run input").input_value() == run_id
        step_before = run_state(page, run_id)[1]
        wait_until(lambda: run_state(page, run_id)[1] > step_before, 60, "steps after restart")
        page.click("#stop-btn")  # the restarted server still controls the re-attached run
        wait_until(lambda: run_state(page, run_id)[0] == "stopped", 90, "stop after restart")
        assert (srv.runs_dir / run_id / "adapter" / "adapter_config.json").is_file()
    finally:
        srv.stop()
        _kill_leftover_trainers(srv.runs_dir)
