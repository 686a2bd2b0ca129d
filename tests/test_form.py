"""The Train tab's form as a first-time user meets it (issue 15 items 3, 7, 8, 9): presets give the config the
CLI builds, a new dataset does not keep the example's eval file, a run that repeats its data says so, labels
are words, method-only knobs show for their method, and Start shows the new run's (empty) plots at once.

Pure logic (app/views/form.py, app/train_tab.py's handlers) and the page's wiring read from the built Blocks;
no browser, no training (the job manager starts nothing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pytest
import yaml

from app.context import AppContext
from app.live_views import LiveViews
from app.train_tab import build_train_tab, monitor_update, preview_outputs, start_and_watch, upload_outputs
from app.views.form import (
    BY_PATH,
    FIELDS,
    apply_preset,
    config_from_form,
    default_form,
    edited_after,
    form_values,
    shown_fields,
)
from app.views.monitor import Watchers
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, Server
from trainer.config.presets import build_config, load_config
from trainer.config.run_config import RunConfig
from trainer.jobs.queue import JobManager

ROOT = Path(__file__).resolve().parent.parent


def without_runs_dir(cfg: RunConfig) -> dict:
    return cfg.model_dump(exclude={"output": {"runs_dir"}})  # the page's runs dir is the server's


@pytest.fixture
def ctx(tmp_path: Path) -> AppContext:
    runs = tmp_path / "runs"
    return AppContext(runs, JobManager(runs, max_running=0), example="examples/tiny-lora.yaml")  # nothing starts


# --- item 8: a preset means in the page what it means in config.yaml --------------------------------------------
def test_switching_qlora_to_lora_gives_what_config_yaml_says(tmp_path: Path) -> None:
    """The page opens on the QLoRA example; picking recipe lora must drop 4-bit, as `recipe: lora` in the file does."""
    values, edited = default_form("runs", "examples/tiny-qlora.yaml")
    assert values["quantization.mode"] == "4bit"
    out = apply_preset(values, edited, "recipes", "lora")
    as_file = yaml.safe_load((ROOT / "examples/tiny-qlora.yaml").read_text()) | {"recipe": "lora"}
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(as_file))
    cli = load_config(tmp_path / "edited.yaml")
    page = config_from_form(out, "runs")
    assert page.quantization.mode == "none" and page.recipe == "lora"
    assert without_runs_dir(page) == without_runs_dir(cli)
    assert page.training.optimizer == "paged_adamw_32bit"  # the example's own value, which the file keeps too


def test_a_field_the_user_edited_survives_a_preset_and_the_others_follow_it() -> None:
    values, edited = form_values(build_config({"model_preset": "tiny"})), set()
    values["adapter.r"], values["training.max_steps"] = 4, 7  # typed by the user
    edited = edited_after(edited, "adapter.r") | {"training.max_steps"}
    qlora = apply_preset(values, edited, "recipes", "qlora")
    cli = build_config({"recipe": "qlora", "model_preset": "tiny", "adapter": {"r": 4}, "training": {"max_steps": 7}})
    assert without_runs_dir(config_from_form(qlora, "runs")) == without_runs_dir(cli)
    # Then the model preset: the recipe's 4-bit stays, as it does under the CLI's layering.
    qwen = apply_preset(qlora, edited, "models", "qwen2")
    cli = build_config({"recipe": "qlora", "model_preset": "qwen2", "adapter": {"r": 4}, "training": {"max_steps": 7}})
    assert without_runs_dir(config_from_form(qwen, "runs")) == without_runs_dir(cli)
    # No recipe at all: the defaults come back for what the recipe had set (the CLI without a `recipe:` line).
    none = apply_preset(qwen, edited, "recipes", "")
    cli = build_config({"model_preset": "qwen2", "adapter": {"r": 4}, "training": {"max_steps": 7}})
    assert without_runs_dir(config_from_form(none, "runs")) == without_runs_dir(cli)


def test_an_edited_field_keeps_its_text_even_when_it_does_not_parse() -> None:
    values = form_values(build_config({"model_preset": "tiny"}))
    values["adapter.target_modules"] = "[q_proj, v_proj"  # half-typed YAML: kept for the user to finish
    out = apply_preset(values, {"adapter.target_modules"}, "recipes", "qlora")
    assert out["adapter.target_modules"] == "[q_proj, v_proj" and out["quantization.mode"] == "4bit"


# --- item 3: stale state after an edit ------------------------------------------------------------------------------
def write_rows(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = (ROOT / "data/sentiment_train.jsonl").read_text().splitlines()[:n]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_uploading_new_data_does_not_evaluate_on_the_examples_file(ctx: AppContext, tmp_path: Path) -> None:
    values, edited = default_form(str(ctx.runs_dir), ctx.example)
    assert values["data.eval_source"] == "data/sentiment_heldout.jsonl"
    up = upload_outputs(ctx, str(write_rows(tmp_path / "mine.jsonl", 41)), values, edited)
    new_values, new_edited, note = up["values"], up["edited"], up["note"]
    assert Path(new_values["data.source"]).parent == ctx.runs_dir / "uploads"
    assert new_values["data.eval_source"] == "" and new_values["data.val_size"] == 0.1
    assert "data/sentiment_heldout.jsonl" in note and "10%" in note  # the user is told what changed, and to what
    assert {"data.source", "data.eval_source", "data.val_size"} <= new_edited
    cfg = config_from_form(new_values, str(ctx.runs_dir))
    assert cfg.data.eval_source is None and cfg.data.val_size == 0.1


def test_a_run_that_sees_its_data_more_than_ten_times_says_so_before_start(ctx: AppContext, tmp_path: Path) -> None:
    values, _ = default_form(str(ctx.runs_dir), ctx.example)  # 200 steps x 16 rows
    verdict = preview_outputs(ctx, values)[0]
    assert "Data OK" in verdict and "passes over" not in verdict  # 576 rows: 5.6 passes, no warning
    small = {**values, "data.source": str(write_rows(ctx.runs_dir / "uploads" / "small.jsonl", 41))}
    verdict = preview_outputs(ctx, small)[0]
    assert "Data OK" in verdict
    assert "200 steps × 16 sequences = about 78 passes over the 41 training rows" in verdict, verdict
    assert "training.max_steps" in verdict  # says which knob to turn


def test_the_data_preview_reruns_when_the_model_or_steps_change(ctx: AppContext) -> None:
    """The preview depends on the model (tokenizer, template) and the step count: a change to them, typed or set by
    a preset (`.change` fires for both), refreshes it."""
    with gr.Blocks() as demo:
        build_train_tab(demo, ctx, LiveViews())
    verdict = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "data-verdict")
    triggers = {
        (demo.blocks[t[0]].elem_id, t[1])
        for fn in demo.fns.values()
        if verdict in fn.outputs
        for t in fn.targets
        if t[0] in demo.blocks
    }
    for path in ("model.name_or_path", "model.chat_template", "data.source", "training.max_steps"):
        assert ("f-" + path.replace(".", "-"), "change") in triggers, (path, sorted(triggers))


# --- item 7: the form reads as words, and shows a method's knobs only for it ------------------------------------
def test_labels_are_words_and_the_config_path_is_the_secondary_text() -> None:
    raw = [f.path for f in FIELDS if f.label == f.path or "_" in f.label or "." in f.label]
    assert not raw, raw
    assert BY_PATH["adapter.lora_alpha"].label == "LoRA alpha"
    assert BY_PATH["adapter.lora_alpha"].info.endswith("(adapter.lora_alpha)")
    assert all(f.path in f.info for f in FIELDS)


def test_method_only_fields_show_only_for_their_method() -> None:
    adalora = ("adapter.init_r", "adapter.target_r", "adapter.tinit", "adapter.tfinal", "adapter.delta_t")
    loftq = ("adapter.loftq_bits", "adapter.loftq_iter")
    four_bit = ("quantization.quant_type", "quantization.double_quant", "quantization.compute_dtype")
    lora = shown_fields({"adapter.method": "lora", "quantization.mode": "none"})
    assert not any(lora[p] for p in (*adalora, *loftq, *four_bit)) and lora["adapter.r"]
    assert all(shown_fields({"adapter.method": "adalora", "quantization.mode": "none"})[p] for p in adalora)
    assert all(shown_fields({"adapter.method": "loftq", "quantization.mode": "none"})[p] for p in loftq)
    assert all(shown_fields({"adapter.method": "lora", "quantization.mode": "4bit"})[p] for p in four_bit)
    assert set(lora) == set(BY_PATH)


def test_the_page_toggles_method_fields_when_the_method_or_recipe_changes(ctx: AppContext) -> None:
    with gr.Blocks() as demo:
        build_train_tab(demo, ctx, LiveViews())
    ids = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    boxes = {"f-adapter-init_r-box", "f-adapter-loftq_bits-box", "f-quantization-double_quant-box"}
    assert not any(ids[b].visible for b in boxes)  # the tiny LoRA example: no AdaLoRA, LoftQ or 4-bit knobs
    for trigger in ("f-adapter-method", "f-recipe", "f-quantization-mode"):
        fns = [fn for fn in demo.fns.values() if any(demo.blocks.get(t[0]) is ids[trigger] for t in fn.targets)]
        outs = {o.elem_id for fn in fns for o in fn.outputs}
        assert boxes <= outs, trigger


# --- item 9: Start switches the dropdown and the plots together -------------------------------------------------
def traces_points(plot: Any) -> int:
    """Points drawn by a chart output: a plotly Figure, or the plotly JSON (gradio PlotData) the monitor sends."""
    if hasattr(plot, "plot"):  # PlotData: the figure as plotly JSON, built once per change for every page
        return sum(len(t.get("x") or ()) for t in json.loads(plot.plot)["data"])
    return sum(len(t.x or ()) for t in plot.data)


def test_start_shows_the_new_runs_plots_with_its_name(ctx: AppContext, tmp_path: Path) -> None:
    values, _ = default_form(str(ctx.runs_dir), ctx.example)
    ctx.watchers = Watchers(min_interval_s=0)  # every read sees the file as it is now
    first = start_and_watch(ctx, values)
    old = first["run"].value
    lines = [{"step": s, "time": time.time(), "kind": "train", "loss": 2.0 / s} for s in (1, 2, 3)]
    (ctx.run_path(old) / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    watched = monitor_update(ctx, old, {"ids": None, "run": None, "version": -1, "interval": 1.0})
    assert traces_points(watched[3]) > 0  # the page shows the first run's loss
    second = start_and_watch(ctx, {**values, "output.run_name": "second"})
    new = second["run"].value
    assert new != old and second["message"].startswith(f"Run `{new}`")
    assert f'data-run="{new}"' in second["progress"] and traces_points(second["loss"]) == 0
    assert second["seen"]["run"] == new  # the next tick redraws nothing of the old run


# --- the same in the real page: one short browser check of the layout and the wiring -----------------------------
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_in_the_page_the_checkbox_has_room_and_a_recipe_switch_follows_the_cli(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright wheel")
    srv = Server(tmp_path / "runs", tmp_path / "server.log", example="examples/tiny-qlora.yaml")
    srv.start()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(srv.url)
            page.wait_for_selector("#start-btn")
            assert page.get_by_text("LoRA alpha", exact=True).count() == 1
            assert page.locator("#f-quantization-double_quant-box").bounding_box()["width"] >= 200  # was 37 px
            assert not page.locator("#f-adapter-init_r-box").is_visible()
            page.locator("#f-recipe input").click()
            page.get_by_role("option", name="lora", exact=True).click()
            page.wait_for_selector("#f-quantization-double_quant-box", state="hidden")
            assert page.input_value("#f-quantization-mode input") == "none"  # as `recipe: lora` in the file
            page.locator("#f-adapter-method input").click()
            page.get_by_role("option", name="adalora", exact=True).click()
            page.wait_for_selector("#f-adapter-init_r-box", state="visible")
            browser.close()
    finally:
        srv.stop()
