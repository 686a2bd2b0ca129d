"""The Chat tab: load a base with one or more adapters, then chat; in compare mode two panes answer the same
prompt side by side (the base with adapters off, and an adapter, or two adapters)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.context import AppContext
from app.views.adapter_choices import (
    adapter_choices,
    adapter_name,
    gpu_busy_warning,
    resolve_base,
    resolve_user_dir,
)
from trainer.chat.adapter_source import AdapterError
from trainer.chat.engine import BASE, QUANT_CHOICES, GenerationSettings
from trainer.config.run_config import ConfigError

Chat = list[dict[str, str]]

HELP = (
    "The base loads once, as the first adapter's run trained it (4-bit for a QLoRA run) unless you choose "
    "otherwise; every adapter you tick is put on top of it with PEFT, so switching between them, or turning "
    "them all off for the base's own answer, costs no reload. A LoRA adapter only adds ΔW = B·A·α/r to the "
    "frozen weights, which is why one base can serve many adapters."
)


def plain(history: list[dict[str, Any]] | None) -> Chat:
    """Chatbot messages as the chat template wants them: Gradio 6 hands content over as a list of parts."""
    out = []
    for m in history or []:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": m["role"], "content": str(content or "")})
    return out


def _targets(ctx: AppContext) -> list[str]:
    return [BASE, *ctx.chat.adapter_names]


# --- handlers --------------------------------------------------------------------------------------------------
def load_models(
    ctx: AppContext, picked: list[str], typed: str, base: str, quant: str, confirmed: bool
) -> tuple[str, bool]:
    """(status text, whether a GPU warning awaits a second press)."""
    import torch

    warning = gpu_busy_warning(ctx.jobs_newest_first(), torch.cuda.is_available())
    if warning and not confirmed:
        return f"⚠️ {warning}", True
    try:
        dirs = [*picked, *([str(resolve_user_dir(typed, ctx.roots))] if typed.strip() else [])]
        adapters = {adapter_name(d): d for d in dirs}
        ctx.chat.load(adapters, resolve_base(base, ctx.roots), quant)
    except (AdapterError, ConfigError) as e:
        return f"**Not loaded.** {e}", False
    return ctx.chat.describe(), False


def target_dropdowns(ctx: AppContext) -> tuple[gr.Dropdown, gr.Dropdown]:
    """The panes' choices from what the shared engine holds: the left pane the base, the right the first adapter."""
    targets = _targets(ctx)
    right_default = targets[1] if len(targets) > 1 else BASE
    return gr.Dropdown(choices=targets, value=BASE), gr.Dropdown(choices=targets, value=right_default)


def held_view(ctx: AppContext) -> tuple[str, gr.Dropdown, gr.Dropdown]:
    """A (re)loaded page's status line and pane choices: the engine is shared, so another page (or this one before
    a reload) may have loaded a model, and the page must not pretend nothing is there."""
    return ctx.chat.describe(), *target_dropdowns(ctx)


def unload_models(ctx: AppContext) -> str:
    ctx.chat.unload()
    return ctx.chat.describe()


def settings_from(*values: Any) -> GenerationSettings:
    """Settings from the widgets; one left unset (a closed accordion not yet rendered) keeps its default."""
    names = ["system_prompt", "temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty"]
    given = {n: v for n, v in zip(names, values, strict=True) if v is not None}
    defaults = GenerationSettings()
    return GenerationSettings(**{n: type(getattr(defaults, n))(v) for n, v in given.items()})


def reply(
    ctx: AppContext,
    message: str,
    left: Chat,
    right: Chat,
    compare_on: bool,
    target_left: str,
    target_right: str,
    settings: GenerationSettings,
) -> Iterator[tuple[Chat, Chat, str]]:
    """Stream the answers into the panes: the left one only in compare mode."""
    if not message.strip():
        yield left, right, "Type a message first."
        return
    panes = [(target_right, right)] if not compare_on else [(target_left, left), (target_right, right)]
    turns = [(target, [*history, {"role": "user", "content": message}]) for target, history in panes]
    shown = [[*msgs, {"role": "assistant", "content": ""}] for _, msgs in turns]

    def out(note: str) -> tuple[Chat, Chat, str]:
        return (shown[0], shown[1], note) if compare_on else (left, shown[0], note)

    try:
        for i, text in ctx.chat.compare(turns, settings):
            shown[i][-1] = {"role": "assistant", "content": text}
            yield out("Generating…")
    except AdapterError as e:
        yield left, right, f"**{e}**"
        return
    yield out(stats_md(ctx))


def stats_md(ctx: AppContext) -> str:
    parts = []
    for s in ctx.chat.last_stats:
        first = f"{s.first_token_s * 1000:.0f} ms to first token, " if s.first_token_s is not None else ""
        parts.append(
            f"**{s.target}**: {first}{s.new_tokens} tokens at {s.tokens_per_second:.1f} tok/s"
            + (" (stopped)" if s.stopped else "")
        )
    return " · ".join(parts)


# --- layout -----------------------------------------------------------------------------------------------------
@dataclass
class ChatLayout:
    """The Chat tab's components, as chat_layout places them."""

    picked: gr.Dropdown
    refresh: gr.Button
    typed: gr.Textbox
    base: gr.Textbox
    quant: gr.Radio
    load: gr.Button
    unload: gr.Button
    status: gr.Markdown
    confirmed: gr.State
    settings: list[gr.components.Component]  # system prompt, temperature, top-p, top-k, max new, repetition
    compare_on: gr.Checkbox
    target_left: gr.Dropdown
    target_right: gr.Dropdown
    left: gr.Chatbot
    right: gr.Chatbot
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    clear: gr.Button
    speed: gr.Markdown


def build_chat_tab(demo: gr.Blocks, ctx: AppContext) -> None:
    wire_chat(demo, ctx, chat_layout())


def chat_layout() -> ChatLayout:
    gr.Markdown(f"### Chat with what you trained\n{HELP}")
    with gr.Row():
        picked = gr.Dropdown(
            choices=[],
            multiselect=True,
            label="Adapters (finished runs, or the newest checkpoint of a running one)",
            elem_id="chat-adapters",
            scale=3,
        )
        refresh = gr.Button("↻", size="sm", elem_id="chat-refresh", scale=0, min_width=40)
    with gr.Row():
        typed = gr.Textbox(label="…or an adapter directory (inside the runs dir)", elem_id="chat-adapter-dir")
        base = gr.Textbox(
            label="Base model override", placeholder="blank: the base the adapter was trained on", elem_id="chat-base"
        )
        quant = gr.Radio(
            list(QUANT_CHOICES),
            value="as trained",
            label="Load the base",
            info="'as trained' reloads a QLoRA run's base in 4-bit, as the adapter saw it",
            elem_id="chat-quant",
        )
    with gr.Row():
        load = gr.Button("Load", variant="primary", elem_id="chat-load")
        unload = gr.Button("Unload", elem_id="chat-unload")
    status = gr.Markdown("Nothing loaded.", elem_id="chat-status")
    with gr.Accordion("Generation settings", open=False):
        system = gr.Textbox(label="System prompt", lines=2, elem_id="chat-system")
        with gr.Row():
            settings = [
                system,
                gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0: greedy)", elem_id="chat-temp"),
                gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p"),
                gr.Slider(0, 200, value=50, step=1, label="Top-k (0: off)"),
                gr.Slider(1, 2048, value=256, step=1, label="Max new tokens", elem_id="chat-max-new"),
                gr.Slider(1.0, 2.0, value=1.1, step=0.01, label="Repetition penalty"),
            ]
    with gr.Row():
        compare_on = gr.Checkbox(True, label="Compare side by side", elem_id="chat-compare")
        target_left = gr.Dropdown([BASE], value=BASE, label="Left pane", elem_id="chat-left-target")
        target_right = gr.Dropdown([BASE], value=BASE, label="Right pane", elem_id="chat-right-target")
    with gr.Row():
        left = gr.Chatbot(label="Left", elem_id="chat-left", height=360)
        right = gr.Chatbot(label="Right", elem_id="chat-right", height=360)
    with gr.Row():
        message = gr.Textbox(placeholder="Message…", show_label=False, elem_id="chat-input", scale=5)
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
        stop = gr.Button("Stop", elem_id="chat-stop", scale=1)
        clear = gr.Button("Clear", elem_id="chat-clear", scale=1)
    speed = gr.Markdown(elem_id="chat-speed")
    return ChatLayout(
        picked, refresh, typed, base, quant, load, unload, status, gr.State(False), settings,
        compare_on, target_left, target_right, left, right, message, send, stop, clear, speed,
    )  # fmt: skip


def wire_chat(demo: gr.Blocks, ctx: AppContext, v: ChatLayout) -> None:
    def refresh_choices(current: list[str] | None):
        choices = adapter_choices(ctx.jobs_newest_first())
        values = [c for _, c in choices]
        return gr.Dropdown(choices=choices, value=[c for c in current or [] if c in values])

    v.refresh.click(refresh_choices, inputs=v.picked, outputs=v.picked)
    demo.load(refresh_choices, inputs=v.picked, outputs=v.picked)
    demo.load(lambda: held_view(ctx), outputs=[v.status, v.target_left, v.target_right])

    def on_load(p, t, b, q, c):
        text, awaiting = load_models(ctx, p or [], t, b, q, c)
        return (text, awaiting, *target_dropdowns(ctx))

    v.load.click(
        on_load,
        inputs=[v.picked, v.typed, v.base, v.quant, v.confirmed],
        outputs=[v.status, v.confirmed, v.target_left, v.target_right],
        concurrency_limit=1,
        concurrency_id="chat-model",
    )
    v.unload.click(
        lambda: (unload_models(ctx), *target_dropdowns(ctx)),
        outputs=[v.status, v.target_left, v.target_right],
        concurrency_id="chat-model",
    )
    v.compare_on.change(lambda on: gr.Chatbot(visible=on), inputs=v.compare_on, outputs=v.left)

    def on_send(msg, lh, rh, on, tl, tr, *s):
        yield from reply(ctx, msg, plain(lh), plain(rh), on, tl, tr, settings_from(*s))

    sent = dict(
        fn=on_send,
        inputs=[v.message, v.left, v.right, v.compare_on, v.target_left, v.target_right, *v.settings],
        outputs=[v.left, v.right, v.speed],
        show_progress="hidden",
    )
    v.send.click(**sent).then(lambda: "", outputs=v.message)
    v.message.submit(**sent).then(lambda: "", outputs=v.message)
    v.stop.click(lambda: ctx.chat.stop(), concurrency_limit=None, queue=False)
    v.clear.click(lambda: ([], [], ""), outputs=[v.left, v.right, v.speed])
