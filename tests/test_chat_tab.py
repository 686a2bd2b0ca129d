"""The Chat tab's handlers without a browser: load, stream into two panes, stats, readable failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.chat_tab import load_models, plain, reply, unload_models
from app.context import AppContext
from trainer.chat.engine import BASE, GenerationSettings
from trainer.jobs.queue import JobManager

GREEDY = GenerationSettings(temperature=0, max_new_tokens=16)


@pytest.fixture
def ctx(tmp_path: Path) -> AppContext:
    return AppContext(tmp_path / "runs", JobManager(tmp_path / "runs"))


def test_load_then_compare_streams_both_panes(ctx: AppContext, trained_adapter):
    run = trained_adapter("lora")
    text, awaiting = load_models(ctx, [str(run / "adapter")], "", "", "as trained", False)
    assert not awaiting and f"Adapters: {run.name} (lora)" in text and "MiB" in text
    updates = list(reply(ctx, "Review: a dull, slow film. Sentiment?", [], [], True, BASE, run.name, GREEDY))
    assert len(updates) > 2
    left, right, note = updates[-1]
    assert [m["role"] for m in left] == [m["role"] for m in right] == ["user", "assistant"]
    assert right[-1]["content"].strip() in ("positive", "negative") and left[-1]["content"] != right[-1]["content"]
    assert "**base**" in note and f"**{run.name}**" in note and "tok/s" in note
    # the second turn carries each pane's own history
    _, right2, _ = list(reply(ctx, "And again?", left, right, False, BASE, run.name, GREEDY))[-1]
    assert len(right2) == 4
    assert "Nothing loaded" in unload_models(ctx)


def test_single_mode_leaves_the_left_pane_alone(ctx: AppContext, trained_adapter):
    run = trained_adapter("lora")
    load_models(ctx, [str(run / "adapter")], "", "", "as trained", False)
    old_left = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    left, right, _ = list(reply(ctx, "Review: fine. Sentiment?", old_left, [], False, BASE, run.name, GREEDY))[-1]
    assert left == old_left and len(right) == 2


def test_failures_are_shown_not_raised(ctx: AppContext, tmp_path: Path):
    text, _ = load_models(ctx, [], "/etc", "", "as trained", False)
    assert text.startswith("**Not loaded.**") and "outside the directories" in text
    text, _ = load_models(ctx, [], "", "", "as trained", False)
    assert "choose at least one adapter" in text
    *_, note = list(reply(ctx, "hi", [], [], True, BASE, "lora", GREEDY))[-1]
    assert "no model is loaded" in note
    assert list(reply(ctx, "  ", [], [], True, BASE, "x", GREEDY))[-1][2] == "Type a message first."


def test_plain_flattens_gradio_message_parts():
    got = plain([{"role": "user", "content": [{"type": "text", "text": "hi"}], "metadata": None}])
    assert got == [{"role": "user", "content": "hi"}]


def page_load_outputs(ctx: AppContext) -> dict[str, object]:
    """What a freshly (re)loaded page shows: the Chat tab built as the server builds it, every load handler run with
    the components' initial values (as Gradio does on a page load); elem_id -> the value or update it returns."""
    import gradio as gr

    from app.chat_tab import build_chat_tab

    with gr.Blocks() as demo:
        build_chat_tab(demo, ctx)
    shown: dict[str, object] = {}
    for fn in demo.fns.values():
        if any(trigger == "load" for _, trigger in fn.targets):
            result = fn.fn(*[c.value for c in fn.inputs])
            results = result if isinstance(result, tuple) else (result,)
            shown.update({c.elem_id: r for c, r in zip(fn.outputs, results, strict=True)})
    return shown


def test_a_reloaded_page_shows_the_model_the_server_holds(ctx: AppContext, trained_adapter):
    run = trained_adapter("lora")
    load_models(ctx, [str(run / "adapter")], "", "", "as trained", False)  # loaded from another page
    shown = page_load_outputs(ctx)
    status = shown["chat-status"]
    assert f"Adapters: {run.name} (lora)" in getattr(status, "value", status)
    left, right = shown["chat-left-target"], shown["chat-right-target"]
    assert [c[0] for c in left.choices] == [c[0] for c in right.choices] == [BASE, run.name]
    assert (left.value, right.value) == (BASE, run.name)  # Send compares base with the adapter, not base with base
    ctx.chat.unload()
    shown = page_load_outputs(ctx)
    assert "Nothing loaded" in getattr(shown["chat-status"], "value", shown["chat-status"])
