"""The Export tab: merge a run's adapter into its base as a plain transformers model (a queued `export` job with
its own progress, log and fidelity numbers), or download the adapter alone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from app.context import AppContext
from app.live_views import POKE_CLASS, LiveView, LiveViews
from app.views.adapter_choices import adapter_choices, adapter_name, resolve_base, resolve_user_dir
from app.views.runs_index import zip_adapter
from app.views.side_jobs import (
    default_export_dir,
    export_result_md,
    exports_root,
    job_log,
    progress_md,
)
from trainer.chat.adapter_source import AdapterError
from trainer.config.run_config import ConfigError
from trainer.export.gguf_types import CONVERTER_QUANTS, K_QUANTS
from trainer.export.merge import ExportError, ExportRequest, validate_request
from trainer.jobs.queue import log_file
from trainer.run_dir import file_stamp

BACKGROUND = {"show_progress": "hidden", "concurrency_limit": None}  # timers' events: read-only, pages never wait

MERGE_HELP = (
    "16bit (default): the base is reloaded unquantized in the chosen dtype and ΔW = B·A·α/r is added to it, the "
    "usual way to ship a QLoRA adapter. dequantized: the 4/8-bit base as the adapter saw it in training, "
    "dequantized, plus ΔW; choose it when the adapter learned to correct quantization error (small bases, "
    "aggressive 4-bit), where 16-bit weights would shift its answers. For a 4/8-bit run the result shows both: the "
    "check against base + adapter, and how far the export is from the model it was trained with."
)

FORMAT_HELP = (
    "gguf: for llama.cpp, Ollama and LM Studio, written by llama.cpp's own converter (fetched once from PyPI) with "
    "an Ollama Modelfile beside it, then loaded back and checked (logits, tokenizer, chat template, EOS). f16, bf16 "
    "and q8_0 work everywhere; k-quants (q4_k_m, ...) need llama.cpp's llama-quantize (in the Docker image)."
)


# --- handlers --------------------------------------------------------------------------------------------------
def submit_export(
    ctx: AppContext,
    picked: str | None,
    typed: str,
    base: str,
    out: str,
    dtype: str,
    shard: str,
    merge_into: str,
    overwrite: bool,
    push: str,
    fmt: str = "safetensors",
    quant: str = "q8_0",
) -> tuple[str, str | None]:
    """(message, export job id or None): everything is checked before the job is queued."""
    try:
        adapter = resolve_user_dir(typed, ctx.roots) if typed.strip() else (Path(picked) if picked else None)
        if adapter is None:
            return "Pick a run or type an adapter directory first.", None
        # realpath: symlinks followed, so the exports-root rule (checked in validate_request) holds for the target
        out_dir = Path(os.path.realpath(Path(out.strip()).expanduser())) if out.strip() else None
        req = ExportRequest(
            adapter=adapter,
            out=out_dir or default_export_dir(ctx.runs_dir, adapter),
            out_root=exports_root(ctx.runs_dir),
            base=resolve_base(base, ctx.roots),
            dtype=dtype,
            max_shard_size=shard.strip() or "2GB",
            merge_into=merge_into,
            overwrite=overwrite,
            push_to_hub=push.strip() or None,
            format=fmt,
            quant=quant,
        )
        validate_request(req)  # as `lora-workbench export` checks it (nothing loads); the job checks it again
    except (AdapterError, ExportError, ConfigError) as e:
        return f"**Not queued.** {e}", None
    job_id = ctx.manager.submit_side_job(req, name=adapter_name(adapter))
    ctx.manager.tick()
    return f"Queued export `{job_id}` → `{req.out}`.", job_id


def export_view(ctx: AppContext, job_id: str | None) -> tuple[str, str, str]:
    """(progress, log tail, result) of one export job."""
    job = ctx.manager.registry.get(job_id) if job_id else None
    if job is None:
        return "", "", ""
    return progress_md(job), job_log(job), export_result_md(job)


def export_key(ctx: AppContext, job_id: str | None) -> tuple | None:
    """What export_view shows depends on: the job's row and the files it writes (status, log, result, report)."""
    job = ctx.manager.registry.get(job_id) if job_id else None
    if job is None:
        return None
    files = (Path(job.run_dir) / name for name in ("status.json", "result.json", "export_report.json"))
    return job.id, job.state, job.error, file_stamp(log_file(job)), *(file_stamp(f) for f in files)


def export_update(ctx: AppContext, job_id: str | None, seen: tuple | None) -> list[Any]:
    """(progress, log tail, result, key), or gr.skip() for each of the first three when the key is the one shown."""
    key = export_key(ctx, job_id)
    if key == seen:
        return [gr.skip()] * 3 + [seen]
    return [*export_view(ctx, job_id), key]


# --- layout -----------------------------------------------------------------------------------------------------
@dataclass
class ExportLayout:
    """The Export tab's components, as export_layout places them."""

    picked: gr.Dropdown
    refresh: gr.Button
    request: list[gr.components.Component]  # submit_export's arguments, in its order
    export: gr.Button
    download: gr.DownloadButton
    message: gr.Markdown
    job: gr.Dropdown
    shown: list[gr.components.Component]  # progress, log, result, seen: export_update's outputs
    poke: gr.Button


def build_export_tab(demo: gr.Blocks, ctx: AppContext, live: LiveViews) -> None:
    wire_export(demo, ctx, live, export_layout())


def export_layout() -> ExportLayout:
    gr.Markdown(
        "### Export a merged model\nThe adapter is merged into its base and saved as a plain transformers model "
        "(safetensors shards + index, config, generation config, tokenizer with its chat template, model card). "
        "After saving, the model is reloaded and its logits compared with base + adapter; the export fails if "
        "they differ by more than the dtype explains."
    )
    with gr.Row():
        picked = gr.Dropdown(choices=[], label="Run", elem_id="export-run", scale=3)
        refresh = gr.Button("↻", size="sm", elem_id="export-refresh", scale=0, min_width=40)
        typed = gr.Textbox(label="…or an adapter directory", elem_id="export-adapter-dir", scale=2)
    with gr.Row():
        base = gr.Textbox(
            label="Base override", placeholder="blank: the base it was trained on", elem_id="export-base"
        )
        out = gr.Textbox(
            label="Output dir (inside <runs>/exports)",
            placeholder="blank: <runs>/exports/<run>-merged",
            elem_id="export-out",
            scale=2,
        )
    with gr.Row():
        dtype = gr.Radio(["bf16", "fp16", "fp32"], value="bf16", label="dtype", elem_id="export-dtype")
        shard = gr.Textbox("2GB", label="Max shard size", elem_id="export-shard")
        merge_into = gr.Radio(["16bit", "dequantized"], value="16bit", label="Merge into", info=MERGE_HELP)
    with gr.Row():
        fmt = gr.Radio(["safetensors", "gguf"], value="safetensors", label="Format", info=FORMAT_HELP)
        quant = gr.Dropdown(list(CONVERTER_QUANTS + K_QUANTS), value="q8_0", label="GGUF type", elem_id="export-quant")
    with gr.Row():
        overwrite = gr.Checkbox(
            False,
            label="Replace an earlier export in the output dir (only one this page or the CLI exported)",
            elem_id="export-overwrite",
        )
        push = gr.Textbox(label="Push to hub repo (optional, needs HF_TOKEN)", elem_id="export-push")
    with gr.Row():
        export = gr.Button("Export", variant="primary", elem_id="export-btn")
        download = gr.DownloadButton("Download adapter only (.zip)", elem_id="export-zip")
    message = gr.Markdown(elem_id="export-msg")
    job = gr.Dropdown(choices=[], label="Export job", elem_id="export-job")
    progress = gr.Markdown(elem_id="export-progress")
    result = gr.Markdown(elem_id="export-result")
    log = gr.Code(language=None, label="job.log", elem_id="export-log", max_lines=30)
    seen = gr.State(None)  # the key of what this page shows (export_key)
    # clicked by the page's poller when the job's stamp changed (app/live_views.py)
    poke = gr.Button("Redraw", elem_id="export-poke", elem_classes=POKE_CLASS)
    request = [picked, typed, base, out, dtype, shard, merge_into, overwrite, push, fmt, quant]
    return ExportLayout(picked, refresh, request, export, download, message, job, [progress, log, result, seen], poke)


def wire_export(demo: gr.Blocks, ctx: AppContext, live: LiveViews, v: ExportLayout) -> None:
    live.add(LiveView("export", "tab-export", "export-poke", "export-job", 2.0, lambda j: export_key(ctx, j)))

    def refresh_choices(current: str | None):
        choices = adapter_choices(ctx.jobs_newest_first())
        values = [c for _, c in choices]
        jobs = [j.id for j in ctx.jobs_newest_first("export")]
        return (
            gr.Dropdown(choices=choices, value=current if current in values else (values[0] if values else None)),
            gr.Dropdown(choices=jobs),
        )

    v.refresh.click(refresh_choices, inputs=v.picked, outputs=[v.picked, v.job])
    demo.load(refresh_choices, inputs=v.picked, outputs=[v.picked, v.job])

    def on_export(*a: Any):
        msg, job_id = submit_export(ctx, *a)
        if job_id is None:
            return msg, gr.skip()
        return msg, gr.Dropdown(choices=[j.id for j in ctx.jobs_newest_first("export")], value=job_id)

    v.export.click(on_export, inputs=v.request, outputs=[v.message, v.job])
    v.poke.click(
        lambda job_id, shown: export_update(ctx, job_id, shown),
        inputs=[v.job, v.shown[-1]],
        outputs=v.shown,
        trigger_mode="always_last",
        **BACKGROUND,
    )
    v.job.change(lambda j: export_update(ctx, j, ()), inputs=v.job, outputs=v.shown)  # (): redraw

    def make_zip(adapter: str | None):
        if not adapter or Path(adapter).name != "adapter":  # a running run's checkpoint: zip it when it is done
            return gr.skip()
        try:
            return str(zip_adapter(Path(adapter).parent, ctx.downloads_dir))
        except FileNotFoundError:
            return gr.skip()

    v.picked.change(make_zip, inputs=v.picked, outputs=v.download)
