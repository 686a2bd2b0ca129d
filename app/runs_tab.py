"""The Runs tab: every run in a table; several overlaid and diffed; one opened (config, log, model card,
adapter zip, rename, delete)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from app import plots
from app.context import AppContext
from app.live_views import POKE_CLASS, LiveView, LiveViews
from app.log_widget import log_box
from app.views.log_view import log_view
from app.views.runs_index import COLUMNS, adapter_zip, config_diff, config_section, loss_curves, read_config
from app.views.side_jobs import EVAL_HEADERS, EXAMPLE_HEADERS, eval_examples, eval_rows, progress_md, read_eval
from trainer.jobs.requests import EvaluateJob
from trainer.run_dir import file_stamp

BACKGROUND = {"show_progress": "hidden", "concurrency_limit": None}  # timers' events: read-only, pages never wait


def table_rows(ctx: AppContext) -> list[list[Any]]:
    return [ctx.summaries.get(job).row() for job in ctx.jobs_newest_first()]


def compare(ctx: AppContext, run_ids: list[str]) -> tuple[Any, dict[str, Any], list[list[Any]]]:
    """(overlay figure, config diff rows, throughput/memory rows) of the selected runs."""
    paths = {r: p for r in run_ids if (p := ctx.run_path(r)) is not None}
    if not paths:
        return None, {"headers": ["field"], "data": []}, []
    figure = plots.overlay_figure({r: loss_curves(p) for r, p in paths.items()})
    diff = {"headers": ["field", *paths], "data": config_diff({r: read_config(p) for r, p in paths.items()})}
    perf = []
    for r in paths:
        job = ctx.manager.registry.get(r)
        if job is not None:
            row = ctx.summaries.get(job).row()
            perf.append(
                [
                    r,
                    row[COLUMNS.index("tokens/s")],
                    row[COLUMNS.index("peak memory (GB)")],
                    row[COLUMNS.index("predicted GPU peak (GB)")],
                    row[COLUMNS.index("duration")],
                ]
            )
    return figure, diff, perf


def open_run(ctx: AppContext, run_id: str | None) -> tuple[str, str, str]:
    """(config.yaml, train.log tail, model card) of one run."""
    path = ctx.run_path(run_id) if run_id else None
    if path is None:
        return "", "", ""

    def read(rel: str, default: str) -> str:
        try:
            return (path / rel).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return default

    card = read("adapter/README.md", "_No model card yet: it is written with the adapter when the run ends._")
    return read("config.yaml", ""), log_view(path, 200), card


def zip_note(run_id: str, skipped: list[str]) -> str:
    """What the page says after zipping an adapter, naming any symlinks left out of the download."""
    note = f"Adapter of `{run_id}` zipped."
    if skipped:
        shown = ", ".join(f"`{name}`" for name in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        note += f" Left out (symlinks or special files, not part of the saved adapter): {shown}."
    return note


def submit_evaluate(ctx: AppContext, run_id: str | None) -> str:
    """Queue `lora-workbench evaluate` for a finished run (base vs adapter on its held-out data)."""
    path = ctx.run_path(run_id) if run_id else None
    if path is None:
        return "Pick a run first."
    if not (path / "adapter" / "adapter_config.json").is_file():
        return f"`{run_id}` has no saved adapter yet; evaluate it when it has finished."
    if not config_section(read_config(path), "data").get("eval_source"):
        return f"`{run_id}` has no held-out data (data.eval_source); run `lora-workbench evaluate` with --data."
    job_id = ctx.manager.submit_side_job(EvaluateJob(path), name=run_id)
    ctx.manager.tick()
    return f"Queued evaluation `{job_id}`."


def evaluation_view(ctx: AppContext, run_id: str | None) -> tuple[str, list[list[Any]], Any, list[list[str]]]:
    """(the newest evaluation job's progress, base-vs-adapter rows, chart, per-question answers) of one run."""
    path = ctx.run_path(run_id) if run_id else None
    if path is None:
        return "", [], None, []
    jobs = [j for j in ctx.jobs_newest_first("evaluate") if j.name == run_id]
    result = read_eval(path)
    figure = plots.eval_figure(result) if result else None
    return (progress_md(jobs[0]) if jobs else ""), eval_rows(result), figure, eval_examples(result)


def eval_key(ctx: AppContext, run_id: str | None) -> tuple | None:
    """What evaluation_view shows depends on: the run's newest evaluation job and the files it writes."""
    path = ctx.run_path(run_id) if run_id else None
    if path is None:
        return None
    job = next((j for j in ctx.jobs_newest_first("evaluate") if j.name == run_id), None)
    job_part = (job.id, job.state, file_stamp(Path(job.run_dir) / "status.json")) if job else None
    return run_id, job_part, file_stamp(path / "eval_results.json")


def eval_update(ctx: AppContext, run_id: str | None, last: tuple | None) -> list[Any]:
    """The Evaluate tab's outputs and their key, or gr.skip() for each when the key is the one shown."""
    key = eval_key(ctx, run_id)
    if key == last:
        return [gr.skip()] * 4 + [last]
    return [*evaluation_view(ctx, run_id), key]


def table_update(ctx: AppContext, last: Any, selected: str | None) -> tuple[Any, ...]:
    """(table, compare choices, run choices, the rows shown): gr.skip() for each while the rows are the same."""
    rows = table_rows(ctx)
    if rows == last:
        return gr.skip(), gr.skip(), gr.skip(), last
    ids = [r[0] for r in rows]
    if last is not None and ids == [r[0] for r in last]:  # a run's numbers changed, not which runs there are
        return rows, gr.skip(), gr.skip(), rows
    # The pick is written only to clear one that is gone: `selected` is the page's when the poller asked, and the
    # user may have picked another run since (writing it back would undo their pick)
    opened = gr.Dropdown(choices=ids) if selected is None or selected in ids else gr.Dropdown(choices=ids, value=None)
    return rows, gr.CheckboxGroup(choices=ids), opened, rows


def not_listed_md(lines: list[str]) -> str:
    """The run dirs the server found at startup but could not read: named with the reason, never deleted."""
    if not lines:
        return ""
    shown = "\n".join(f"- `{line}`" for line in lines)
    return f"**Not listed** (found in the runs dir at startup, unreadable; left as they are):\n{shown}"


@dataclass
class RunsLayout:
    """The Runs tab's components, as runs_layout places them."""

    refresh: gr.Button
    table: list[gr.components.Component]  # table, compare picks, opened run, seen: table_update's outputs
    compared: list[gr.components.Component]  # overlay, config diff, throughput table: compare's outputs
    opened_views: list[gr.components.Component]  # config, log, card: open_run's outputs
    download: gr.DownloadButton
    evaluate: gr.Button
    eval_note: gr.Markdown
    evaluation: list[gr.components.Component]  # progress, table, plot, answers, seen: eval_update's outputs
    new_name: gr.Textbox
    rename: gr.Button
    confirm: gr.Checkbox
    delete: gr.Button
    note: gr.Markdown
    table_poke: gr.Button
    eval_poke: gr.Button

    @property
    def opened(self) -> gr.Dropdown:
        return self.table[2]


def build_runs_tab(demo: gr.Blocks, ctx: AppContext, live: LiveViews) -> None:
    wire_runs(demo, ctx, live, runs_layout(ctx))


def runs_layout(ctx: AppContext) -> RunsLayout:
    with gr.Row():
        refresh = gr.Button("Refresh", size="sm", elem_id="runs-refresh")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True, elem_id="runs-table", label="All runs")
    gr.Markdown(not_listed_md(ctx.manager.not_listed), elem_id="runs-not-listed")
    gr.Markdown(
        "### Compare runs\nTick two or more runs: their loss curves overlaid, and the config fields that differ."
    )
    picks = gr.CheckboxGroup(choices=[], label="Runs to compare", elem_id="compare-runs")
    overlay = gr.Plot(elem_id="overlay-plot", show_label=False)
    with gr.Row():
        diff = gr.Dataframe(
            headers=["field"], label="Config fields that differ", interactive=False, wrap=True, elem_id="config-diff"
        )
        perf = gr.Dataframe(
            headers=["run", "tokens/s", "peak memory (GB)", "predicted GPU peak (GB)", "duration"],
            label="Throughput and peak memory",
            interactive=False,
            elem_id="compare-perf",
        )
    gr.Markdown("### Open a run")
    with gr.Row():
        opened = gr.Dropdown(choices=[], label="Run", elem_id="open-run", scale=3)
        download = gr.DownloadButton("Download adapter (.zip)", elem_id="download-adapter", scale=1)
    with gr.Tabs():
        with gr.Tab("config.yaml"):
            config = gr.Code(language="yaml", elem_id="run-config")
        with gr.Tab("train.log"):
            log = log_box("run-log", 20, 40)
        with gr.Tab("Model card"):
            card = gr.Markdown(elem_id="run-card")
        with gr.Tab("Evaluate"):
            gr.Markdown(
                "Scores the base (adapter off) and the adapter on the run's held-out data: answer loss, perplexity, "
                "exact match of greedy answers and, where the rows list the facts a right answer must state (as "
                "data/persona_heldout.jsonl does), the share of answers that state them all. Runs as a job in the "
                "queue; saved in the run as eval_results.json."
            )
            evaluate = gr.Button("Evaluate base vs adapter", elem_id="evaluate-btn")
            # its own note: the run's zip note lands on #runs-note when a run is opened and must not replace it
            eval_note = gr.Markdown(elem_id="eval-note")
            eval_progress = gr.Markdown(elem_id="eval-progress")
            eval_table = gr.Dataframe(headers=EVAL_HEADERS, interactive=False, elem_id="eval-table")
            eval_plot = gr.Plot(elem_id="eval-plot", show_label=False)
            eval_answers = gr.Dataframe(
                headers=EXAMPLE_HEADERS, interactive=False, wrap=True, elem_id="eval-answers", label="Answers"
            )
        with gr.Tab("Rename / delete"):
            new_name = gr.Textbox(label="New name (letters, digits, . _ -)", elem_id="rename-text")
            rename = gr.Button("Rename", elem_id="rename-btn")
            confirm = gr.Checkbox(label="Yes, delete this run's directory and adapter for good", elem_id="delete-ok")
            delete = gr.Button("Delete run", variant="stop", elem_id="delete-btn")
    note = gr.Markdown(elem_id="runs-note")
    seen, eval_seen = gr.State(None), gr.State(None)  # what this page shows: the rows, the evaluation's key
    # clicked by the page's poller when the table's or the evaluation's stamp changed (app/live_views.py)
    table_poke = gr.Button("Redraw", elem_id="runs-poke", elem_classes=POKE_CLASS)
    eval_poke = gr.Button("Redraw", elem_id="eval-poke", elem_classes=POKE_CLASS)
    return RunsLayout(
        refresh, [table, picks, opened, seen], [overlay, diff, perf], [config, log, card], download, evaluate,
        eval_note, [eval_progress, eval_table, eval_plot, eval_answers, eval_seen], new_name, rename, confirm,
        delete, note, table_poke, eval_poke,
    )  # fmt: skip


def wire_runs(demo: gr.Blocks, ctx: AppContext, live: LiveViews, v: RunsLayout) -> None:
    live.add(LiveView("runs", "tab-runs", "runs-poke", None, 3.0, lambda _: table_rows(ctx)))
    live.add(LiveView("evaluation", "tab-runs", "eval-poke", "open-run", 3.0, lambda r: eval_key(ctx, r)))
    opened, seen, eval_seen = v.opened, v.table[-1], v.evaluation[-1]

    v.refresh.click(lambda selected: table_update(ctx, None, selected), inputs=opened, outputs=v.table)
    demo.load(lambda selected: table_update(ctx, None, selected), inputs=opened, outputs=v.table)
    v.table_poke.click(
        lambda last, selected: table_update(ctx, last, selected),
        inputs=[seen, opened],
        outputs=v.table,
        trigger_mode="always_last",
        **BACKGROUND,
    )

    v.table[1].change(lambda ids: compare(ctx, ids), inputs=v.table[1], outputs=v.compared)
    opened.change(lambda r: open_run(ctx, r), inputs=opened, outputs=v.opened_views)
    opened.change(lambda r: eval_update(ctx, r, ()), inputs=opened, outputs=v.evaluation)  # (): not a key, redraws
    v.eval_poke.click(
        lambda r, last: eval_update(ctx, r, last),
        inputs=[opened, eval_seen],
        outputs=v.evaluation,
        trigger_mode="always_last",
        **BACKGROUND,
    )
    v.evaluate.click(lambda r: submit_evaluate(ctx, r), inputs=opened, outputs=v.eval_note)

    def make_zip(run_id: str | None):
        path = ctx.run_path(run_id) if run_id else None
        if path is None:
            return gr.skip(), "Pick a run first."
        try:
            made = adapter_zip(path, ctx.downloads_dir)
        except FileNotFoundError as e:
            return gr.skip(), str(e)
        return str(made.path), zip_note(run_id, made.skipped)

    opened.change(make_zip, inputs=opened, outputs=[v.download, v.note])

    def do_rename(run_id: str | None, name: str):
        if not run_id:
            return "Pick a run first."
        try:
            ctx.manager.rename(run_id, name.strip())
        except ValueError as e:
            return str(e)
        return f"`{run_id}` is now named {name.strip()!r}."

    v.rename.click(do_rename, inputs=[opened, v.new_name], outputs=v.note)

    def do_delete(run_id: str | None, ok: bool):
        if not run_id:
            return "Pick a run first.", gr.skip()
        if not ok:
            return "Tick the confirmation box first: deleting removes the run's directory and adapter.", gr.skip()
        try:
            ctx.manager.delete(run_id)
        except (KeyError, ValueError) as e:
            return str(e), gr.skip()
        return f"Deleted `{run_id}`.", False

    v.delete.click(do_delete, inputs=[opened, v.confirm], outputs=[v.note, v.confirm])
