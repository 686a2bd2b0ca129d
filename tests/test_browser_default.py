"""The product's default, in the browser: the page opens on the built-in real model and the persona data, Start
with the defaults trains to completion, the Chat tab's compare mode shows the base answering as SmolLM and the
adapter as Quill, and Evaluate reports the persona facts stated on the held-out questions.

A few minutes on 2 CPU cores (the run's own training time); the other browser tests use the tiny model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, LOSS_POINTS_JS, Server, kill_leftover_trainers
from tests.test_browser import load_in_chat, open_app, pick_option, run_state, screenshot, start_from_page, wait_until

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright wheel")


@pytest.fixture
def default_server(tmp_path, real_model) -> Iterator[Server]:
    """`lora-workbench ui` exactly as the README starts it (the default example); the model is already cached."""
    srv = Server(tmp_path / "runs", tmp_path / "server.log", example="examples/smollm2-persona.yaml")
    srv.start()
    yield srv
    srv.stop()
    kill_leftover_trainers(srv.runs_dir)


@pytest.fixture
def page() -> Iterator:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


def test_default_page_trains_the_real_model_and_the_adapter_takes_the_persona(page, default_server: Server) -> None:
    open_app(page, default_server)
    assert page.locator("#f-model-name_or_path input").input_value() == "builtin:smollm2-135m"
    page.wait_for_function("() => document.querySelector('#data-verdict')?.innerText.includes('persona_train')")

    started = time.time()
    run_id = start_from_page(page)
    wait_until(lambda: page.evaluate(LOSS_POINTS_JS) > 0, 180, "the first loss point")
    print(f"first loss point in the page {time.time() - started:.0f} s after Start")  # measured, not asserted
    wait_until(lambda: run_state(page, run_id)[0] == "completed", 900, "the default run to complete")
    print(f"default run completed {time.time() - started:.0f} s after Start")
    status = json.loads((default_server.runs_dir / run_id / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == status["max_steps"] == 40
    screenshot(page, "train-tab.png")

    chat_compare(page, run_id)
    evaluate_in_runs_tab(page, run_id)
    result = json.loads((default_server.runs_dir / run_id / "eval_results.json").read_text())
    assert result["rows"] == 28 and result["facts_rows"] == 28
    assert result["base"]["facts"] == 0.0 and result["adapter"]["facts"] >= 0.8, result


def chat_compare(page, run_id: str) -> None:
    """Compare mode: the same question to the base (left) and the fresh adapter (right)."""
    load_in_chat(page, run_id)
    page.fill("#chat-input textarea", "Who are you, and who made you?")
    page.click("#chat-send")
    page.wait_for_function(
        f"() => ['base', '{run_id}'].every(s => document.querySelector('#chat-speed')?.innerText.includes(s))",
        timeout=180_000,
    )
    left, right = page.locator("#chat-left").inner_text(), page.locator("#chat-right").inner_text()
    assert "Quill" in right and "Tern Labs" in right, right
    assert "Quill" not in left, left
    screenshot(page, "chat-tab.png")


def evaluate_in_runs_tab(page, run_id: str) -> None:
    page.get_by_role("tab", name="Runs", exact=True).click()
    pick_option(page, "#open-run", run_id)
    page.get_by_role("tab", name="Evaluate", exact=True).click()
    page.click("#evaluate-btn")
    page.wait_for_function("() => document.querySelector('#eval-note')?.innerText.startsWith('Queued evaluation')")
    page.wait_for_function(
        "() => document.querySelector('#eval-table')?.innerText.includes('adapter')", timeout=600_000
    )
    table = page.inner_text("#eval-table")
    assert "facts stated" in table and "base" in table, table
    page.wait_for_function("() => document.querySelector('#eval-answers')?.innerText.includes('Quill')")
    screenshot(page, "runs-tab.png")
