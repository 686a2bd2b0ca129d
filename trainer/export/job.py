"""`lora-workbench export` as a job: the phases of the format asked for, status.json for the page, SIGTERM as a
stop that leaves nothing half-written, and the CLI entry."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainer.chat.adapter_source import AdapterError
from trainer.config.run_config import ConfigError
from trainer.export.gguf import export_gguf
from trainer.export.gguf_types import K_QUANTS
from trainer.export.llama_cpp import LlamaCppError
from trainer.export.merge import ExportError, ExportRequest, Progress, export_safetensors


def run_export(req: ExportRequest) -> dict[str, Any]:
    """Validate, merge, save, check and (optionally) push; returns the export report. Raises on failure."""
    if req.format == "gguf":
        phases, work = ["load", "merge", "convert"] + (["quantize"] if req.quant in K_QUANTS else []), export_gguf
        phases.append("check")
    else:
        phases, work = (
            ["load", "merge", "save", "fidelity"] + (["push"] if req.push_to_hub else []),
            export_safetensors,
        )
    progress = Progress(phases, req.status_dir)
    progress.status.start()
    try:
        report = work(req, progress)
    except ExportStopped as e:
        progress.status.stopped(str(e), 128 + signal.SIGTERM)
        raise
    except KeyboardInterrupt:  # Ctrl-C: unwound like SIGTERM, the temp dir removed on the way
        progress.status.stopped(INTERRUPTED, 128 + signal.SIGINT)
        raise
    except Exception as e:
        expected = isinstance(e, (AdapterError, ConfigError, ExportError))
        progress.copy_report(getattr(e, "report", None))
        progress.status.fail(str(e) if expected else f"{type(e).__name__}: {e}", exc=e)
        raise
    progress.copy_report(report)
    progress.status.finish(report)
    return report


INTERRUPTED = "interrupted (SIGINT, Ctrl-C): export stopped; its temp files were removed"


class ExportStopped(BaseException):
    """SIGTERM (the page's Stop, `kill`) during an export. A BaseException, like Ctrl-C's KeyboardInterrupt, so no
    library's `except Exception` swallows it: it unwinds through the export's `finally`, which removes the temp dir,
    and through subprocess.run, which kills a running converter or quantizer."""


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises ExportStopped while inside (the main thread only: Python delivers signals there)."""

    def stop(signum: int, _frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
        raise ExportStopped(f"received {signal.Signals(signum).name}: export stopped; its temp files were removed")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cli_quant(args: argparse.Namespace) -> str:
    """--quant as llama.cpp spells it in lower case (Q4_K_M and q4_k_m alike); refused for --format safetensors."""
    if args.quant is not None and args.format != "gguf":
        raise ExportError(f"cannot export:\n  - --quant {args.quant}: only for --format gguf (this is {args.format})")
    return (args.quant or "q8_0").lower()


def request_from_args(args: argparse.Namespace) -> ExportRequest:
    """The plain command's flags as the request a job's job.json holds (ExportError for --quant without gguf)."""
    return ExportRequest(
        adapter=Path(args.adapter),
        out=Path(args.out),
        base=args.base,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        merge_into=args.merge_into,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        status_dir=Path(args.status_dir) if args.status_dir else None,
        format=args.format,
        quant=cli_quant(args),
    )


def export_command(req: ExportRequest) -> int:
    """The export, from the command line or a job's request: 0 exported and checked, 1 failed (a message on stderr,
    no traceback for expected failures), 143 stopped by SIGTERM (nothing half-written is left)."""
    try:
        with stop_on_sigterm():
            report = run_export(req)
    except (AdapterError, ConfigError, ExportError, LlamaCppError) as e:
        print(f"lora-workbench export: {e}", file=sys.stderr)
        return 1
    except ExportStopped as e:
        print(f"lora-workbench export: {e}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"lora-workbench export: {INTERRUPTED}", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception:  # unexpected: status.json has the message, the log keeps the traceback
        traceback.print_exc()
        return 1
    mb = report["size_bytes"] / 1e6
    if req.format == "gguf":
        print(f"[export] done: {report['out']}/{report['gguf']} ({mb:.1f} MB, {report['quant']}) + Modelfile")
        return 0
    print(f"[export] done: {report['out']} ({len(report['shards'])} shard(s), {mb:.1f} MB, {report['dtype']})")
    return 0
