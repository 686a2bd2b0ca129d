"""Browser tests: Playwright drives Debian's Chromium against the real `lora-workbench ui` server, which
trains the offline tiny model in real subprocesses.

Set LWB_SCREENSHOTS=DIR to also write the README's screenshots there.
"""

from __future__ import annotations

import json
import os
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.browser_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    LOSS_POINTS_JS,
    Server,
    kill_leftover_trainers,
    kill_run,
    set_number,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright wheel")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ui")
    srv = Server(root / "runs", root / "server.log")
    srv.start()
    yield srv
    srv.stop()
    kill_leftover_trainers(srv.runs_dir)


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


def reopen(page, url: str, tries: int = 3) -> None:
    """Load the page again after a server restart: the old page's own reconnect can abort the first try."""
    for attempt in range(tries):
        try:
            page.goto(url)
            return
        except playwright_api.Error:
            if attempt == tries - 1:
                raise
            time.sleep(1)


def run_state(page, run_id: str) -> tuple[str | None, int]:
    """(state, step) the monitor shows for run_id; (None, 0) while it shows something else."""
    el = page.locator(".lwb-progress")
    if el.count() == 0 or el.get_attribute("data-run") != run_id:
        return None, 0
    return el.get_attribute("data-state"), int(el.get_attribute("data-step") or 0)


def wait_until(
    check: Callable[[], bool], timeout: float = 120, what: str = "", why: Callable[[], str] | None = None
) -> None:
    """Poll check() until it holds; a timeout is a limit, not a measured time, and says what was seen (why())."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} after {timeout:.0f} s" + (f"\n{why()}" if why else ""))


def seen(page, server: Server, run_id: str) -> Callable[[], str]:
    """What a timeout reports about a run: the monitor's attributes, the run's status.json, the server log's tail."""

    def report() -> str:
        el = page.locator(".lwb-progress")
        shown = {k: el.first.get_attribute(k) for k in ("data-run", "data-state", "data-step")} if el.count() else {}
        status = server.runs_dir / run_id / "status.json"
        log = server.log.read_text(errors="replace")[-2000:] if server.log.is_file() else ""
        return f"monitor: {shown}\nstatus.json: {status.read_text() if status.is_file() else 'missing'}\n{log}"

    return report


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

    wait_until(done, 300, "the run to complete", seen(page, server, run_id))
    assert len(counts_while_running - {0}) >= 2, f"loss chart did not grow while running: {counts_while_running}"
    wait_until(lambda: page.evaluate(LOSS_POINTS_JS) >= 40, 30, "all 40 loss points (200 steps / 5)")
    assert (server.runs_dir / run_id / "adapter" / "adapter_config.json").is_file()
    assert json.loads((server.runs_dir / run_id / "status.json").read_text())["state"] == "completed"


def test_stop_from_page_saves_adapter(page, server: Server) -> None:
    open_app(page, server)
    run_id = start_from_page(page, training__max_steps=100000, training__logging_steps=5)
    wait_until(
        lambda: run_state(page, run_id)[0] == "running" and run_state(page, run_id)[1] > 5,
        300,
        "the run to make steps",
        seen(page, server, run_id),
    )
    page.click("#stop-btn")
    wait_until(lambda: run_state(page, run_id)[0] == "stopped", 120, "the run to stop", seen(page, server, run_id))
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
    wait_until(lambda: run_state(page, first)[0] == "completed", 300, "first run", seen(page, server, first))
    second = start_from_page(page, training__max_steps=30, adapter__r=4)
    wait_until(lambda: run_state(page, second)[0] == "completed", 300, "second run", seen(page, server, second))
    page.get_by_role("tab", name="Runs", exact=True).click()
    page.wait_for_function(f"() => document.querySelector('#runs-table')?.innerText.includes('{second}')")
    for run_id in (first, second):
        page.locator("#compare-runs label", has_text=run_id).click()
    names_js = "() => (document.querySelector('#overlay-plot .js-plotly-plot')?.data || []).map(t => t.name).join('|')"
    wait_until(lambda: first in page.evaluate(names_js) and second in page.evaluate(names_js), 30, "overlay")
    page.wait_for_function("() => document.querySelector('#config-diff')?.innerText.includes('adapter.r')")


def test_runs_tab_during_a_run_and_adapter_download(page, server: Server) -> None:
    open_app(page, server)
    run_id = start_from_page(page, training__max_steps=100000, training__logging_steps=5)
    try:
        runs_tab_during_a_run(page, server, run_id)
    finally:  # a run left training would hold the module server's queue and fail the tests after this one
        kill_run(server.runs_dir, run_id)


def runs_tab_during_a_run(page, server: Server, run_id: str) -> None:
    wait_until(lambda: run_state(page, run_id)[1] > 20, 300, "the run to make steps", seen(page, server, run_id))
    page.get_by_role("tab", name="Runs", exact=True).click()
    page.wait_for_function(f"() => document.querySelector('#runs-table')?.innerText.includes('{run_id}')")
    finished = sorted(p.name for p in server.runs_dir.iterdir() if (p / "adapter" / "adapter_config.json").is_file())
    assert finished, "the tests above leave finished runs in this server's runs dir"
    for other in finished[-2:]:  # overlaid while another run trains: the README's screenshot
        page.locator("#compare-runs label", has_text=other).click()
    page.wait_for_function(f"() => document.querySelector('#config-diff')?.innerText.includes('{finished[-1]}')")
    screenshot(page, "runs-tab.png")
    page.locator("#open-run input").click()
    page.get_by_role("option", name=finished[0]).click()
    page.wait_for_function("() => document.querySelector('#run-config')?.innerText.includes('adapter')")
    page.wait_for_function(f"() => document.querySelector('#runs-note')?.innerText.includes('{finished[0]}')")
    with page.expect_download() as download:
        page.click("#download-adapter")
    names = zipfile.ZipFile(download.value.path()).namelist()
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names
    # what the page offers is served; the run's files and the job registry are not, whatever path is typed
    route = server.url.rstrip("/") + "/gradio_api/file="
    assert page.request.get(route + str(server.runs_dir / ".downloads" / f"{finished[0]}-adapter.zip")).ok
    for private in (server.runs_dir / "registry.sqlite", server.runs_dir / finished[0] / "config.yaml"):
        assert private.is_file()
        assert page.request.get(route + str(private)).status == 403, private
    page.get_by_role("tab", name="Train", exact=True).click()
    watched = lambda: page.locator("#watch-run input").input_value() == run_id  # noqa: E731
    wait_until(watched, 30, "the monitor to watch the run", seen(page, server, run_id))
    page.click("#stop-btn")
    status = server.runs_dir / run_id / "status.json"
    stopped = lambda: json.loads(status.read_text())["state"] == "stopped"  # noqa: E731
    wait_until(
        stopped,
        120,
        "the run to stop",
        lambda: f"#start-msg: {page.inner_text('#start-msg')}\n" + seen(page, server, run_id)(),
    )


def test_ten_sessions_watch_one_run(browser, page, server: Server) -> None:
    """Nine more browser sessions open while a run trains: each finds the running job by itself, follows it and
    sees it complete at its last step; the first session started it."""
    open_app(page, server)
    run_id = start_from_page(page, training__max_steps=120, training__logging_steps=10)
    contexts = [browser.new_context(viewport={"width": 1000, "height": 700}) for _ in range(9)]
    try:
        pages = [page]
        for context in contexts:
            pg = context.new_page()
            pg.set_default_timeout(120_000)
            pg.goto(server.url)
            pg.wait_for_selector("#start-btn")
            pages.append(pg)
        for i, pg in enumerate(pages):
            wait_until(lambda pg=pg: run_state(pg, run_id)[0] == "completed", 300, f"session {i + 1} to see the end")
            assert run_state(pg, run_id) == ("completed", 120)
    finally:
        for context in contexts:
            context.close()
    assert json.loads((server.runs_dir / run_id / "status.json").read_text())["state"] == "completed"


def test_reload_and_server_restart_keep_the_running_job(page, tmp_path: Path) -> None:
    srv = Server(tmp_path / "runs", tmp_path / "server.log")
    srv.start()
    try:
        open_app(page, srv)
        run_id = start_from_page(page, training__max_steps=100000, training__logging_steps=5)
        running = seen(page, srv, run_id)
        wait_until(
            lambda: run_state(page, run_id)[0] == "running" and run_state(page, run_id)[1] > 0, 300, "running", running
        )

        page.reload()  # the page finds the running job by itself
        page.wait_for_selector("#start-btn")
        wait_until(lambda: run_state(page, run_id)[0] == "running", 30, "monitor after reload")
        assert page.locator("#watch-run input").input_value() == run_id
        step_before = run_state(page, run_id)[1]
        wait_until(lambda: run_state(page, run_id)[1] > step_before, 60, "steps after reload")

        srv.kill()  # the server dies; the training subprocess does not
        trainer_pid = json.loads((srv.runs_dir / run_id / "status.json").read_text())["pid"]
        assert Path(f"/proc/{trainer_pid}").exists()
        srv.start()
        reopen(page, srv.url)
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
        kill_leftover_trainers(srv.runs_dir)


GROWTH_JS = """(sel) => {  // record every distinct length the last reply in a chat pane shows
  window.__lens = window.__lens || {};
  const lens = window.__lens[sel] = [];
  const el = document.querySelector(sel);
  new MutationObserver(() => {
    const bots = el.querySelectorAll('.bot, [data-testid="bot"]');
    const n = bots.length ? bots[bots.length - 1].innerText.length : 0;
    if (n && lens[lens.length - 1] !== n) lens.push(n);
  }).observe(el, {subtree: true, childList: true, characterData: true});
}"""


def pick_option(page, dropdown: str, text: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=text).first.click()


def load_in_chat(page, run_id: str) -> None:
    """Chat tab: tick the run's adapter and load it (compare mode then shows base | adapter)."""
    page.get_by_role("tab", name="Chat", exact=True).click()
    page.click("#chat-refresh")
    pick_option(page, "#chat-adapters", run_id)
    page.keyboard.press("Escape")
    page.click("#chat-load")
    page.wait_for_function(f"() => document.querySelector('#chat-status')?.innerText.includes('{run_id} (lora)')")


def test_train_then_chat_in_compare_mode_then_export(page, tmp_path: Path) -> None:
    server = Server(tmp_path / "runs", tmp_path / "server.log")  # its own server: a fresh queue and chat model
    server.start()
    try:
        train_chat_export(page, server)
    finally:
        server.stop()
        kill_leftover_trainers(server.runs_dir)


def train_chat_export(page, server: Server) -> None:
    open_app(page, server)
    run_id = start_from_page(page, training__max_steps=80, training__logging_steps=10)
    wait_until(
        lambda: run_state(page, run_id)[0] == "completed", 300, "the run to complete", seen(page, server, run_id)
    )

    load_in_chat(page, run_id)
    assert page.locator("#chat-right-target input").input_value() == run_id
    for pane in ("#chat-left", "#chat-right"):
        page.evaluate(GROWTH_JS, pane)
    page.fill("#chat-input textarea", "Review: The film was wonderful and moving.\nSentiment:")
    page.click("#chat-send")
    page.wait_for_function(
        "() => ['base', 'tok/s'].every(s => document.querySelector('#chat-speed')?.innerText.includes(s))"
        f" && document.querySelector('#chat-speed').innerText.includes('{run_id}')",
        timeout=180_000,
    )
    left = page.locator("#chat-left").inner_text()
    right = page.locator("#chat-right").inner_text()
    assert "wonderful" in left and "wonderful" in right  # the prompt in both panes
    assert re.search(r"\b(positive|negative)\b", right), right  # the adapter answers the trained task
    lens = page.evaluate("() => window.__lens")
    assert len(lens["#chat-left"]) > 1, f"the base's reply did not stream: {lens}"
    screenshot(page, "chat-tab.png")

    page.get_by_role("tab", name="Export", exact=True).click()
    page.click("#export-refresh")
    pick_option(page, "#export-run", run_id)
    page.click("#export-btn")
    page.wait_for_function("() => document.querySelector('#export-msg')?.innerText.startsWith('Queued export')")
    page.wait_for_function(
        "() => document.querySelector('#export-progress')?.innerText.includes(': completed')", timeout=180_000
    )
    page.wait_for_function("() => document.querySelector('#export-result')?.innerText.includes('passed')")
    result = page.inner_text("#export-result")
    assert "max |logit diff|" in result and "greedy-token agreement" in result, result
    screenshot(page, "export-tab.png")
    out = server.runs_dir / "exports" / f"{run_id}-merged"
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
