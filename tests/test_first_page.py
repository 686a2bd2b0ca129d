"""The first page opened the moment `lora-workbench ui` answers: its load handlers (live estimate, data preview,
monitor) run on several Gradio worker threads at once, the first time this process imports peft/transformers.
And the Train tab's log tail, opened on a long log, shows its newest line."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, Server
from tests.test_log_view import CAST, eight_bit_log

ERRORS_JS = """() => [...document.querySelectorAll('.toast-body.error, .toast-body, .error')]
    .filter(e => e.offsetParent !== null).map(e => e.innerText.trim()).filter(t => t)"""
LOG_AT_BOTTOM_JS = """() => { const t = document.querySelector('#log-tail textarea');
    return t && t.value.includes('"step": 168') && t.scrollHeight > t.clientHeight
        && t.scrollTop + t.clientHeight >= t.scrollHeight - 4; }"""


def finished_run(runs: Path) -> None:
    """A run `lora-workbench train` finished before the server started, with a long 8-bit log."""
    run = runs / "20260101-000000-eight-bit"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name_or_path: tiny}\n", encoding="utf-8")
    (run / "train.log").write_text(eight_bit_log(), encoding="utf-8")
    now = time.time()
    status = {"state": "completed", "pid": None, "started_at": now - 60, "ended_at": now, "exit_code": 0}
    (run / "status.json").write_text(json.dumps({**status, "error": None, "step": 168, "max_steps": 168}))


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[Server]:
    finished_run(tmp_path / "runs")
    srv = Server(tmp_path / "runs", tmp_path / "server.log")
    srv.start()  # returns as soon as GET / answers 200
    yield srv
    srv.stop()


def test_two_pages_building_the_tiny_model_at_once(tmp_path: Path):
    """Two fresh pages' estimates on a tiny-model example each build the model into the runs dir's cache, on two
    worker threads of one server process: both get the model, neither an error, no half-built dir is left. Run in
    a fresh process, each thread's first `from transformers import AutoModelForCausalLM` also races the other's
    ("cannot import name"), unless the server has imported the libraries before it serves, as serve() does."""
    from app.server import import_model_libraries
    from trainer.model.tiny_model import ensure_tiny_model

    import_model_libraries()

    results: list[object] = []
    start = threading.Barrier(2)

    def page_estimate() -> None:
        start.wait()
        try:
            results.append(ensure_tiny_model(tmp_path / ".cache"))
        except Exception as e:  # noqa: BLE001  (what the page would show as Error)
            results.append(e)

    threads = [threading.Thread(target=page_estimate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / ".cache" / "tiny-model"] * 2
    assert sorted(p.name for p in (tmp_path / ".cache").iterdir()) == ["tiny-model"]
    assert (tmp_path / ".cache" / "tiny-model" / "model.safetensors").is_file()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_pages_opened_as_the_server_answers_show_no_errors(fresh_server: Server):
    """Three pages at once, the moment GET / answers: every handler's first run (imports, the tiny model's build)."""
    playwright_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright wheel")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pages = [browser.new_page(viewport={"width": 1500, "height": 1100}) for _ in range(3)]
        for page in pages:
            page.set_default_timeout(90_000)
            page.goto(fresh_server.url, wait_until="commit")
        shown = []
        for page in pages:
            page.wait_for_function(
                "() => /Trainable parameters|Error/.test(document.querySelector('#estimate')?.innerText)"
            )
            page.wait_for_function("() => document.querySelector('#data-verdict')?.innerText.trim().length > 0")
            page.wait_for_function(LOG_AT_BOTTOM_JS)  # the newest line in view, not the top of the log
            shown.append((page.evaluate(ERRORS_JS), page.locator("#log-tail textarea").input_value()))
        browser.close()
    server_log = fresh_server.log.read_text(errors="replace")
    for errors, log in shown:
        assert errors == [], f"{errors}\n{server_log[-3000:]}"
        assert log.count("MatMul8bitLt") == 1 and f"{CAST}  [×168]" in log
    assert "Traceback" not in server_log, server_log[-3000:]
