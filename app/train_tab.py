"""The Train tab: the run form (every RunConfig knob, grouped, with help), the live estimate, the data
preview, Start/Stop with the queue position, and the live monitor of the watched run."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from app import plots
from app.context import AppContext
from app.live_views import POKE_CLASS, LiveView, LiveViews
from app.log_widget import log_box
from app.views.form import (
    FIELDS,
    GROUPS,
    after_data_change,
    apply_preset,
    cli_command,
    config_from_form,
    default_form,
    edited_after,
    passes_warning,
    shown_fields,
)
from app.views.log_view import log_view
from app.views.monitor import RunWatch, explain_failure, progress
from app.widgets import make_field, make_widget
from trainer.config.presets import list_presets, load_preset
from trainer.config.run_config import ConfigError, RunConfig
from trainer.data.files import DataError
from trainer.data.uploads import dataset_choices, store_upload
from trainer.jobs.requests import PreflightJob
from trainer.model.model_configs import RemoteCodeRefused
from trainer.plan.data_preview import CUT, PROMPT, TRAINED, DataPreview, check_data, pin_sources, preview_data

PATHS = ["recipe", "model_preset", *(f.path for f in FIELDS)]
# What the data preview (and its passes-over-the-data warning) reads: a change to any of these re-runs it.
PREVIEW_PATHS = (
    "model.name_or_path",
    "model.revision",
    "model.chat_template",
    "model.trust_remote_code",
    *(f.path for f in FIELDS if f.path.startswith("data.")),
    "training.max_steps",
    "training.num_epochs",
    "training.per_device_batch_size",
    "training.gradient_accumulation_steps",
    "hardware.num_gpus",
)
BACKGROUND = {"show_progress": "hidden", "concurrency_limit": None}  # timers' events: read-only, pages never wait
MONITOR_OUTPUTS = ("run", "progress", "error", "loss", "optim", "speed", "memory", "log", "seen")
START_ROW = {"output.run_name"}  # shown next to Start rather than in its group
COLORS = {TRAINED: "#16a34a", PROMPT: "#cbd5e1", CUT: "#f87171"}


def _model_ids() -> list[str]:
    ids = [(load_preset("models", n).get("model") or {}).get("name_or_path") for n in list_presets("models")]
    return sorted({i for i in ids if i})


def _suggestions(ctx: AppContext) -> dict[str, list[str]]:
    data = dataset_choices(ctx.runs_dir)
    return {
        "model.name_or_path": _model_ids(),
        "data.source": data,
        "data.eval_source": data,
        "adapter.target_modules": ["all-linear", "default", "attention"],
    }


def _problems_md(title: str, problems: list[str], limit: int = 50) -> str:
    shown = "\n".join(f"- `{p}`" if len(p) < 200 else f"- {p}" for p in problems[:limit])
    more = f"\n- ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"**{title}**\n\n{shown}{more}"


# --- handlers: thin glue between widgets and trainer/ ----------------------------------------------------
def estimate_md(ctx: AppContext, values: dict[str, Any]) -> str:
    from trainer.plan.estimate import estimate_cached

    try:
        cfg = config_from_form(values, str(ctx.runs_dir))
        est = estimate_cached(cfg)
    except ConfigError as e:
        return _problems_md("Fix before starting:", e.problems)
    except RemoteCodeRefused as e:
        return f"**No live estimate.** {e}; `lora-workbench estimate CONFIG.yaml` computes it in its own process."
    a, t = cfg.adapter, cfg.training
    scale = (
        f"alpha/sqrt(r) = {a.lora_alpha / a.r**0.5:.3g}"
        if a.method == "rslora"
        else f"alpha/r = {a.lora_alpha / a.r:.3g}"
    )
    return (
        f"**Trainable parameters: {est.trainable_params:,}** of {est.total_params:,} "
        f"(**{est.trainable_percent:.3f}%** of the model) · adapter file **{est.adapter_mb:.2f} MB** "
        f"({est.adapter_dtype})  \n"
        f"ΔW = B·A with rank {a.r}, scaled by {scale}; B starts at zero, so step 0 is exactly the base model. "
        f"Effective batch: {t.per_device_batch_size} × {t.gradient_accumulation_steps} accumulation"
        f" × {max(cfg.hardware.num_gpus, 1)} GPU(s) = "
        f"{t.per_device_batch_size * t.gradient_accumulation_steps * max(cfg.hardware.num_gpus, 1)} sequences/step."
        + (f"  \n{est.memory.summary(est.total_params)}" if est.memory else "")
        + builtin_note(cfg)
    )


def builtin_note(cfg: RunConfig) -> str:
    """Where a built-in model is cached, or what its first use will fetch and convert."""
    from trainer.model.builtin_models import BUILTIN_REAL, cache_note, cache_root

    spec = BUILTIN_REAL.get(cfg.model.name_or_path)
    return f"  \n{cache_note(spec, cache_root(cfg.output.runs_dir))}" if spec else ""


def preview_outputs(ctx: AppContext, values: dict[str, Any]) -> tuple[str, list, Any, str]:
    """(verdict, highlighted rows, length histogram, errors) for the data the form points at."""
    try:
        cfg = config_from_form(values, str(ctx.runs_dir))
    except ConfigError as e:
        return _problems_md("Fix the config first:", e.problems), [], None, ""
    p: DataPreview = preview_data(cfg, roots=ctx.roots)
    highlighted: list[tuple[str, str | None]] = []
    for row in p.rows:
        highlighted.append((f"\n── {row.where} · {row.tokens} tokens ──\n", None))
        highlighted.extend(row.segments)
    hist = plots.length_histogram(p.report.lengths, p.max_length) if p.report and p.report.lengths else None
    errors = _problems_md(f"{len(p.errors)} row(s) cannot be used ({p.source}):", p.errors) if p.errors else ""
    warning = passes_warning(cfg, p.usable_rows) if p.usable_rows else ""
    return p.verdict() + (f"  \n{warning}" if warning else ""), highlighted, hist, errors


def upload_outputs(ctx: AppContext, file: str, values: dict[str, Any], edited: set[str]) -> dict[str, Any]:
    """Store an uploaded dataset and point the form at it: {values, edited, note}, or {refused: markdown}."""
    try:
        stored = store_upload(Path(file), Path(file).name, ctx.runs_dir)
    except DataError as e:
        return {"refused": _problems_md(f"Upload refused ({e.source}):", e.problems)}
    new, edited, note = after_data_change({**values, "data.source": str(stored)}, edited | {"data.source"})
    return {"values": new, "edited": edited, "note": note}


def config_preview(ctx: AppContext, values: dict[str, Any]) -> tuple[str, str]:
    try:
        cfg = config_from_form(values, str(ctx.runs_dir))
    except ConfigError as e:
        return str(e), ""
    name = cfg.output.run_name or "my-run"
    cmd = (
        f"# save the YAML above as {name}.yaml, then:\n{cli_command(f'{name}.yaml')}\n"
        f"# the UI writes the same file to {ctx.runs_dir}/<run_id>/config.yaml and runs:\n"
        f"{cli_command(f'{ctx.runs_dir}/<run_id>/config.yaml')}"
    )
    return cfg.to_yaml(), cmd


def checked_config(ctx: AppContext, values: dict[str, Any], refused: str) -> tuple[RunConfig | None, str]:
    """(the form's config, "") when it and its data are valid, else (None, what to fix)."""
    from trainer.model.checks import check_model

    try:
        cfg = config_from_form(values, str(ctx.runs_dir))
        check_model(cfg)  # the model is here and its layers and context fit the config, before the data is read
    except ConfigError as e:
        return None, _problems_md(f"{refused}. Fix these fields:", e.problems)
    problem = check_data(cfg, ctx.roots)  # every row, before queuing; the job reuses its tokens from the cache
    if problem is not None:
        return None, _problems_md(f"{refused}: the data has problems ({problem.source}):", problem.problems)
    try:
        return pin_sources(cfg, ctx.roots), ""  # the job reads the very files checked here
    except DataError as e:
        return None, _problems_md(f"{refused}: the data has problems ({e.source}):", e.problems)


def start_run(ctx: AppContext, values: dict[str, Any]) -> tuple[str, str | None]:
    """Validate config and data, then queue the run; (message, run id or None)."""
    cfg, problems = checked_config(ctx, values, "Not started")
    if cfg is None:
        return problems, None
    run_id = ctx.manager.submit(cfg)
    ctx.manager.tick()
    pos = ctx.manager.queue_position(run_id)
    where = f"queued at position {pos}" if pos else "started"
    return f"Run `{run_id}` {where}. Its files: `{ctx.runs_dir / run_id}`", run_id


def start_preflight(ctx: AppContext, values: dict[str, Any]) -> tuple[str, str | None]:
    """Queue `lora-workbench preflight` on the form's config; (message, job id or None)."""
    cfg, problems = checked_config(ctx, values, "No pre-flight")
    if cfg is None:
        return problems, None
    job_id = ctx.manager.submit_side_job(
        PreflightJob(Path("config.yaml")), name=cfg.output.run_name, inputs={"config.yaml": cfg.to_yaml()}
    )
    ctx.manager.tick()
    return f"Pre-flight `{job_id}` queued: a few steps on the longest rows of the data.", job_id


def preflight_md(ctx: AppContext, job_id: str | None) -> str:
    """The pre-flight job's progress, then what it measured (and the change that fits, after an OOM)."""
    from app.views.side_jobs import progress_md
    from trainer.job_status import read_result
    from trainer.plan.preflight import PreflightReport

    job = ctx.manager.registry.get(job_id) if job_id else None
    if job is None:
        return ""
    result = read_result(Path(job.run_dir))
    lines = PreflightReport.from_dict(result).lines() if result else []
    return progress_md(job) + "".join(f"  \n{line}" for line in lines)


def stop_run(ctx: AppContext, run_id: str | None) -> str:
    job = ctx.manager.registry.get(run_id) if run_id else None
    if job is None:
        return "No run selected."
    if job.state not in ("queued", "running"):
        return f"Run `{run_id}` is already {job.state}."
    ctx.manager.stop(run_id)
    return f"Stopping `{run_id}`: the trainer finishes its step and saves the adapter."


def _progress_html(run_id: str, status: dict[str, Any], queue_pos: int | None, brief: str = "") -> str:
    p = progress(status)
    text = p.text() + (f" · {brief}" if brief else "") + (f" · position {queue_pos} in the queue" if queue_pos else "")
    color = {"failed": "#dc2626", "stopped": "#d97706", "completed": "#16a34a"}.get(p.state, "#2563eb")
    return (
        f'<div class="lwb-progress" data-run="{html.escape(run_id)}" data-state="{p.state}" data-step="{p.step}">'
        f'<div style="background:#e5e7eb;border-radius:6px;height:14px;overflow:hidden">'
        f'<div style="width:{100 * p.fraction:.1f}%;background:{color};height:14px"></div></div>'
        f'<div id="run-state" style="margin-top:4px">{html.escape(text)}</div></div>'
    )


# How often a page asks for the monitor's stamp: while a job is queued/running, and otherwise. Each answer that
# finds a change is a Gradio event the page renders, so a busy run costs a watching browser a share of a core per
# redraw a second (benchmarks/page_cpu.py).
FAST_S, IDLE_S = 1.0, 5.0
# A running run's charts are redrawn at most this often (the progress line at every poll): each redraw re-renders
# Plotly charts in every page watching, a browser's core kept busy by a run that logs many lines a second.
CHART_EVERY_S = 2.0
UNSEEN = {"ids": None, "run": None, "drawn": {}}  # a page that has drawn nothing yet
_NEVER = object()  # the key of an output a page has not drawn


@dataclass
class MonitorNow:
    """What a page's monitor shows now, as one key per output (MONITOR_OUTPUTS): an output whose key the page
    has drawn is not sent again. Finding them reads only what the run's files gained since the last poll."""

    run_id: str | None
    ids: list[str]
    watch: RunWatch | None
    queue_pos: int | None
    keys: dict[str, Any]
    chosen: bool = False  # the run was chosen here: the page watched none, or one that is gone


def monitor_now(ctx: AppContext, run_id: str | None) -> MonitorNow:
    jobs = ctx.jobs_newest_first()
    ids = [j.id for j in jobs]
    chosen = run_id not in ids
    if chosen:  # a page watching nothing follows the first run that appears; one whose run was deleted, the next
        run_id = ctx.run_to_watch()
    job = next((j for j in jobs if j.id == run_id), None)
    keys: dict[str, Any] = {"run": (tuple(ids), run_id)}
    if job is None:
        return MonitorNow(run_id, ids, None, None, {**keys, "progress": None, "error": None}, chosen)
    watch = ctx.watchers.get(Path(job.run_dir))  # one shared, rate-limited poll of the run's files
    queue_pos = ctx.manager.queue_position(run_id) if job.state == "queued" else None
    failed = watch.status.get("state") == "failed"
    charts = plots.MONITOR_CHARTS.items()
    keys.update(
        progress=(run_id, watch.status_version, queue_pos, watch.summary.brief()),
        error=(run_id, (watch.status_version, watch.log_stamp) if failed else None),
        log=(run_id, watch.log_stamp),
        **{name: (run_id, *watch.paced_key(name, kinds, CHART_EVERY_S)) for name, (_, kinds) in charts},
    )
    return MonitorNow(run_id, ids, watch, queue_pos, keys, chosen)


def monitor_keys(ctx: AppContext, run_id: str | None) -> dict[str, Any]:
    """The monitor's live-view keys (app/live_views.py): what a page drew at these keys is all there is to show."""
    return monitor_now(ctx, run_id).keys


def monitor_poll_s(ctx: AppContext) -> float:
    """How soon a page asks again: often while a job is queued or running, seldom otherwise."""
    return FAST_S if any(j.state in ("queued", "running") for j in ctx.jobs_newest_first()) else IDLE_S


def monitor_update(ctx: AppContext, run_id: str | None, seen: dict[str, Any], pick: bool = False) -> list[Any]:
    """Everything the monitor shows, or gr.skip() where the page already shows it.
    Outputs (MONITOR_OUTPUTS): run dropdown, progress, error panel, 4 plots, log, seen-state.

    The run dropdown's value is written only where `pick` (Start, a pick) or the run was chosen here (the page
    watched nothing, or a deleted run): a redraw carries the run the page watched when it asked, and a Start's reply
    may have come in since (the poller sees the new job the moment Start queues it); writing the old run back would
    leave that page watching it, its stamp unchanged. The redraw's other outputs are then the old run's for one
    poll: the next stamp, for the new run, differs."""
    now = monitor_now(ctx, run_id)
    drawn = seen.get("drawn") or {}
    due = [name for name, key in now.keys.items() if drawn.get(name, _NEVER) != key]
    out: dict[str, Any] = {name: gr.skip() for name in MONITOR_OUTPUTS}
    out["seen"] = {"ids": now.ids, "run": now.run_id, "drawn": now.keys}
    for name in due:
        out[name] = _monitor_output(name, now, pick or now.chosen)
    return [out[name] for name in MONITOR_OUTPUTS]


def _monitor_output(name: str, now: MonitorNow, pick: bool) -> Any:
    """One monitor output, built once per change for every page watching the run (RunWatch.view)."""
    watch = now.watch
    if name == "run":
        return gr.Dropdown(choices=now.ids, value=now.run_id) if pick else gr.Dropdown(choices=now.ids)
    if watch is None:
        idle = '<div id="run-state">No run yet: set up the form and press Start.</div>'
        return idle if name == "progress" else gr.Markdown(visible=False)
    if name == "progress":
        return _progress_html(now.run_id, watch.status, now.queue_pos, watch.summary.brief())
    if name == "log":
        return watch.view("log", now.keys["log"], lambda: log_view(watch.path, 40))
    if name == "error":
        failure = explain_failure(watch.status)
        return gr.Markdown(value=failure or "", visible=failure is not None)
    spec, _ = plots.MONITOR_CHARTS[name]
    return watch.view(name, now.keys[name], lambda: plots.plot_data(spec(watch.series)))


def start_and_watch(ctx: AppContext, values: dict[str, Any]) -> dict[str, Any]:
    """Start the form's run and draw the monitor for it in the same reply, so the run dropdown and the plots
    switch together (the new run's plots are empty until its first metrics line); {message, *MONITOR_OUTPUTS}."""
    message, run_id = start_run(ctx, values)
    if run_id is None:
        return {"message": message}
    drawn = monitor_update(ctx, run_id, UNSEEN, pick=True)
    return {"message": message, **dict(zip(MONITOR_OUTPUTS, drawn, strict=True))}


# --- layout and wiring ------------------------------------------------------------------------------------
@dataclass
class TrainLayout:
    """The Train tab's components, as train_layout places them."""

    widgets: dict[str, gr.components.Component]  # one per form path (PATHS)
    holders: dict[str, gr.blocks.Block]  # what shows/hides each field (its widget, or the column around it)
    edited: gr.State  # the fields the user set (the example's count): presets never override them
    data_ui: dict[str, Any]  # _data_preview_block
    estimate: gr.Markdown
    start: gr.Button
    stop: gr.Button
    show: gr.Button
    pre: gr.Button
    message: gr.Markdown
    preflight: list[Any]  # result markdown, job id state, timer
    config_views: list[gr.Code]  # config.yaml, command line
    monitor: dict[str, Any]  # _monitor_block

    @property
    def form(self) -> list[gr.components.Component]:
        return [self.widgets[p] for p in PATHS]

    @property
    def data_outputs(self) -> list[gr.components.Component]:
        return [self.data_ui[k] for k in ("verdict", "rows", "hist", "errors")]


def as_values(args: tuple) -> dict[str, Any]:
    """The form's values by path, from the widgets' values in PATHS order."""
    return dict(zip(PATHS, args, strict=True))


def build_train_tab(demo: gr.Blocks, ctx: AppContext, live: LiveViews) -> None:
    v = train_layout(ctx)
    wire_form(ctx, v)
    wire_data(ctx, v)
    wire_run(ctx, v)
    wire_monitor(demo, ctx, live, v)


def train_layout(ctx: AppContext) -> TrainLayout:
    values, example_edits = default_form(str(ctx.runs_dir), ctx.example)
    shown = shown_fields(values)
    suggestions = _suggestions(ctx)
    widgets: dict[str, gr.components.Component] = {}
    holders: dict[str, gr.blocks.Block] = {}
    with gr.Row():
        with gr.Column(scale=5):
            with gr.Row():
                widgets["recipe"] = gr.Dropdown(
                    list_presets("recipes"),
                    value=values["recipe"],
                    label="Recipe preset",
                    info="Fills the adapter/quantization/optimizer knobs of a method (lora, qlora, dora, ...).",
                    elem_id="f-recipe",
                )
                widgets["model_preset"] = gr.Dropdown(
                    list_presets("models"),
                    value=values["model_preset"],
                    label="Model preset",
                    info="Fills the model id and its layer groups; type any hub id or local path below.",
                    elem_id="f-model_preset",
                )
            for group in GROUPS:
                with gr.Accordion(group, open=group != "Advanced", elem_id="group-" + group.split()[0].lower()):
                    with gr.Row(equal_height=False):  # wraps: two or three knobs per line
                        for f in FIELDS:
                            if f.group == group and f.path not in START_ROW:
                                widgets[f.path], holders[f.path] = make_field(
                                    f, values[f.path], suggestions.get(f.path), visible=shown[f.path]
                                )
                    if group == "Data":
                        data_ui = _data_preview_block()
        with gr.Column(scale=6):
            estimate = gr.Markdown(elem_id="estimate")
            with gr.Row(equal_height=True):
                run_name = next(f for f in FIELDS if f.path == "output.run_name")
                widgets[run_name.path] = make_widget(run_name, values[run_name.path])
                start = gr.Button("Start", variant="primary", elem_id="start-btn")
                stop = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                show = gr.Button("Preview config", elem_id="preview-config-btn")
                pre = gr.Button("Pre-flight", elem_id="preflight-btn")
            message = gr.Markdown(elem_id="start-msg")
            preflight = [gr.Markdown(elem_id="preflight-result"), gr.State(None), gr.Timer(2.0, active=False)]
            with gr.Accordion("Config preview: the exact config.yaml and the command that runs it", open=False):
                config_yaml = gr.Code(language="yaml", label="config.yaml", elem_id="config-yaml")
                config_cli = gr.Code(language="shell", label="command line", elem_id="config-cli")
            monitor = _monitor_block()
    return TrainLayout(
        widgets, holders, gr.State(example_edits), data_ui, estimate, start, stop, show, pre, message, preflight,
        [config_yaml, config_cli], monitor,
    )  # fmt: skip


def wire_form(ctx: AppContext, v: TrainLayout) -> None:
    """Edits are remembered, the estimate follows the form, presets and method switches fill and show fields."""
    widgets, form, edited = v.widgets, v.form, v.edited
    for f in FIELDS:
        widgets[f.path].input(
            lambda e, p=f.path: edited_after(e, p), inputs=edited, outputs=edited, show_progress="hidden"
        )

    gr.on(
        [w.change for w in form],
        lambda *a: estimate_md(ctx, as_values(a)),
        inputs=form,
        outputs=v.estimate,
        trigger_mode="always_last",
        show_progress="hidden",
    )

    toggled = [p for p, on in shown_fields({}).items() if not on]  # the method/mode-only fields
    toggled_boxes = [v.holders[p] for p in toggled]

    def on_preset(kind: str, name: str | None, e: set[str], *a: Any) -> list[Any]:
        out = apply_preset(as_values(a), e, kind, name)
        visible = shown_fields(out)
        return [*(out[p] for p in PATHS[2:]), *(gr.update(visible=visible[p]) for p in toggled)]

    for key, kind in (("recipe", "recipes"), ("model_preset", "models")):
        widgets[key].input(
            lambda name, e, *a, kind=kind: on_preset(kind, name, e, *a),
            inputs=[widgets[key], edited, *form],
            outputs=[*form[2:], *toggled_boxes],
        )
    gr.on(
        [widgets["adapter.method"].input, widgets["quantization.mode"].input],
        lambda *a: [gr.update(visible=shown_fields(as_values(a))[p]) for p in toggled],
        inputs=form,
        outputs=toggled_boxes,
        show_progress="hidden",
    )


def wire_data(ctx: AppContext, v: TrainLayout) -> None:
    """The data preview follows the model and the data; a new source or an upload resets what depends on it."""
    widgets, form, edited, data_ui = v.widgets, v.form, v.edited, v.data_ui
    preview = {"fn": lambda *a: preview_outputs(ctx, as_values(a)), "inputs": form, "outputs": v.data_outputs}
    data_ui["button"].click(**preview)
    # .change, not .input: a preset or an upload that sets the model or the data makes the old verdict stale too.
    gr.on([widgets[p].change for p in PREVIEW_PATHS], trigger_mode="always_last", **preview)
    data_changed = [widgets[p] for p in ("data.eval_source", "data.val_size")]

    def on_source_typed(e: set[str], *a: Any):
        new, e, note = after_data_change(as_values(a), edited_after(e, "data.source"))
        return new["data.eval_source"], new["data.val_size"], e, note or gr.skip()  # keep the note while typing

    widgets["data.source"].input(
        on_source_typed, inputs=[edited, *form], outputs=[*data_changed, edited, data_ui["note"]]
    )

    def on_upload(file: str | None, e: set[str], *a: Any):
        if not file:
            return [gr.skip()] * 6
        up = upload_outputs(ctx, file, as_values(a), e)
        if "refused" in up:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), up["refused"]
        new = up["values"]
        choices = dataset_choices(ctx.runs_dir)
        source = gr.Dropdown(choices=choices, value=new["data.source"])
        return source, new["data.eval_source"], new["data.val_size"], up["edited"], up["note"], gr.skip()

    data_ui["upload"].upload(
        on_upload,
        inputs=[data_ui["upload"], edited, *form],
        outputs=[widgets["data.source"], *data_changed, edited, data_ui["note"], data_ui["verdict"]],
    )


def wire_run(ctx: AppContext, v: TrainLayout) -> None:
    """Preview config, Start, Stop and Pre-flight."""
    form, monitor = v.form, v.monitor
    v.show.click(lambda *a: config_preview(ctx, as_values(a)), inputs=form, outputs=v.config_views)

    def on_start(*a: Any):
        shown = start_and_watch(ctx, as_values(a))
        return [shown["message"], *(shown.get(k, gr.skip()) for k in MONITOR_OUTPUTS)]

    v.start.click(on_start, inputs=form, outputs=[v.message, *(monitor[k] for k in MONITOR_OUTPUTS)])
    v.stop.click(lambda run_id: stop_run(ctx, run_id), inputs=monitor["run"], outputs=v.message)

    def on_preflight(*a: Any):
        msg, job_id = start_preflight(ctx, as_values(a))
        return msg, job_id, gr.Timer(active=job_id is not None)

    v.pre.click(on_preflight, inputs=form, outputs=v.preflight)
    result, job_id_state, timer = v.preflight

    def preflight_tick(job_id: str | None):
        job = ctx.manager.registry.get(job_id) if job_id else None
        done = job is None or job.state in ("completed", "failed", "stopped")
        return preflight_md(ctx, job_id), gr.Timer(active=not done)

    timer.tick(preflight_tick, inputs=job_id_state, outputs=[result, timer], show_progress="hidden")


def wire_monitor(demo: gr.Blocks, ctx: AppContext, live: LiveViews, v: TrainLayout) -> None:
    """The live monitor redraws what changed when the page's poller says so; a page load fills the tab."""
    monitor = v.monitor
    outs = [monitor[k] for k in MONITOR_OUTPUTS]
    live.add(
        LiveView(
            "train",
            "tab-train",
            "monitor-poke",
            "watch-run",
            FAST_S,
            lambda r: monitor_keys(ctx, r),
            lambda: monitor_poll_s(ctx),
        )
    )
    monitor["poke"].click(  # the poller clicks it when the monitor's stamp changed (app/live_views.py)
        lambda run_id, seen: monitor_update(ctx, run_id, seen),
        inputs=[monitor["run"], monitor["seen"]],
        outputs=outs,
        trigger_mode="always_last",  # a change while a redraw is on its way is drawn after it, never dropped
        **BACKGROUND,
    )
    # A run picked by hand is drawn in the same reply, so its name and its plots change together.
    monitor["run"].input(
        lambda run_id, seen: monitor_update(ctx, run_id, {**seen, "drawn": {}}, pick=True),
        inputs=[monitor["run"], monitor["seen"]],
        outputs=outs,
        show_progress="hidden",
    )

    def on_load(*a: Any):
        run_id = ctx.run_to_watch()
        ids = [j.id for j in ctx.jobs_newest_first()]
        return (
            gr.Dropdown(choices=ids, value=run_id),
            {"ids": ids, "run": run_id, "drawn": {"run": (tuple(ids), run_id)}},
            estimate_md(ctx, as_values(a)),
            *preview_outputs(ctx, as_values(a)),
        )

    outputs = [monitor["run"], monitor["seen"], v.estimate, *v.data_outputs]
    demo.load(on_load, inputs=v.form, outputs=outputs)


def _data_preview_block() -> dict[str, Any]:
    with gr.Row():
        upload = gr.UploadButton(
            "Upload a dataset (JSON, JSONL, CSV, Parquet)",
            file_types=[".json", ".jsonl", ".csv", ".parquet"],
            file_count="single",
            elem_id="upload-data",
        )
        button = gr.Button("Preview data", elem_id="preview-data-btn")
    note = gr.Markdown(elem_id="data-note")  # what changed in the form because the data did
    verdict = gr.Markdown(elem_id="data-verdict")
    errors = gr.Markdown(elem_id="data-errors")
    rows = gr.HighlightedText(
        label="First rows through the chat template: green is trained on, grey is masked prompt, red is cut",
        color_map=COLORS,
        show_legend=True,
        combine_adjacent=False,
        show_inline_category=False,
        elem_id="data-rows",
    )
    hist = gr.Plot(label="Token lengths", elem_id="data-hist")
    parts = {"upload": upload, "button": button, "note": note, "verdict": verdict, "errors": errors}
    return {**parts, "rows": rows, "hist": hist}


def _monitor_block() -> dict[str, Any]:
    gr.Markdown("### Live monitor")
    # a custom value is allowed so that a redraw's choices, a moment older than the page's value (Start's new
    # run), never fail the events that read it (Stop, the next redraw); a run that is not there is followed anew
    run = gr.Dropdown(label="Watching run", choices=[], allow_custom_value=True, elem_id="watch-run")
    progress_html = gr.HTML(elem_id="progress")
    error = gr.Markdown(visible=False, elem_id="error-panel")
    with gr.Row():
        loss = gr.Plot(elem_id="loss-plot", show_label=False)
        optim = gr.Plot(elem_id="optim-plot", show_label=False)
    with gr.Row():
        speed = gr.Plot(elem_id="speed-plot", show_label=False)
        memory = gr.Plot(elem_id="memory-plot", show_label=False)
    log = log_box("log-tail", 10, 20, label="train.log (newest lines; repeats folded: [×N])")
    return {
        "run": run,
        "progress": progress_html,
        "error": error,
        "loss": loss,
        "optim": optim,
        "speed": speed,
        "memory": memory,
        "log": log,
        "seen": gr.State(dict(UNSEEN)),  # what this page shows: a key per output
        "poke": gr.Button("Redraw", elem_id="monitor-poke", elem_classes=POKE_CLASS),  # clicked by the page's poller
    }
