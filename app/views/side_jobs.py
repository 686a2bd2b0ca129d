"""Export and evaluate jobs as the UI sees them: where the page exports to, and a job's progress, log and numbers
turned into text and table rows. (The request itself is queued as it is: trainer/jobs/requests.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.export.fidelity import trained_line
from trainer.job_status import read_json, read_result
from trainer.jobs.queue import log_file, log_tail
from trainer.jobs.registry import Job
from trainer.run_dir import read_status


def exports_root(runs_dir: Path) -> Path:
    """The only directory the page exports into (the CLI may write anywhere)."""
    return runs_dir / "exports"


def default_export_dir(runs_dir: Path, adapter_dir: str | Path) -> Path:
    from app.views.adapter_choices import adapter_name

    return exports_root(runs_dir) / f"{adapter_name(adapter_dir)}-merged"


def progress_md(job: Job) -> str:
    """One line: kind, id, state, phase k/N and what it is doing (or the error)."""
    status = read_status(Path(job.run_dir)) or {}
    head = f"**{job.kind}** `{job.id}`: {job.state}"
    if job.state == "queued":
        return head + " (waits for the job ahead of it)"
    if job.state == "running":
        done, total = status.get("step", 0), status.get("max_steps")
        if total and done >= total:  # every phase done; the registry settles it on the next tick
            return head + ", finishing"
        return head + f", step {done + 1}/{total or '?'}: {status.get('phase', '')}"
    if job.state == "failed":
        return head + f"\n\n```\n{(job.error or status.get('error') or '').strip()[:2000]}\n```"
    return head


def job_log(job: Job, lines: int = 40) -> str:
    log = log_file(job)
    return log_tail(log.parent, lines, log.name)


def export_result_md(job: Job) -> str:
    """The export's output and fidelity numbers (also of a failed check, from export_report.json)."""
    report = read_result(Path(job.run_dir)) or read_json(Path(job.run_dir) / "export_report.json")
    if report is None:
        return ""
    f = report.get("fidelity") or {}
    lines = []
    if report.get("format") == "gguf":
        return gguf_result_md(report, job.state == "completed")
    if "out" in report and job.state == "completed":
        mb = report.get("size_bytes", 0) / 1e6
        lines.append(
            f"Merged model: `{report['out']}` ({len(report.get('shards', []))} shard(s), {mb:.1f} MB, "
            f"{report.get('dtype')}, merged into {report.get('merge_into')})"
        )
    if f:
        verdict = "passed" if f.get("passed") else "FAILED"
        lines.append(
            f"Fidelity check {verdict}: max |logit diff| {f['max_abs_logit_diff']:.3g} "
            f"(tolerance {f['tolerance']:.3g}), mean {f.get('mean_abs_logit_diff', 0):.3g}, "
            f"greedy-token agreement {f.get('greedy_agreement', 0):.1%}"
        )
    if trained := trained_line(report, "Merge into:"):  # a 4/8-bit run: how far from the model it trained with
        lines.append(trained)
    if report.get("pushed_to"):
        lines.append(f"Pushed to {report['pushed_to']}")
    return "\n\n".join(lines)


def gguf_result_md(report: dict[str, Any], completed: bool) -> str:
    """A GGUF export's file and each of its checks; a failed one's reasons."""
    f, eos = report.get("logits") or {}, report.get("eos") or {}
    lines = []
    if completed:
        mb = report.get("size_bytes", 0) / 1e6
        lines.append(f"GGUF: `{report['out']}/{report['gguf']}` ({mb:.1f} MB, {report['quant']}) + `Modelfile`")
    if f:
        lines.append(
            f"GGUF check {'passed' if not report.get('failures') else 'FAILED'}: max |logit diff| "
            f"{f['max_abs_logit_diff']:.3g} (tolerance {f['tolerance']:.3g}), greedy-token agreement "
            f"{f.get('greedy_agreement', 0):.1%}; reply to {eos.get('prompt', '')!r}: {eos.get('reply', '')!r}"
        )
    lines += [f"- {x}" for x in report.get("failures") or []]
    return "\n\n".join(lines)


# "facts stated" last: a result without facts gives rows one column shorter, and the table drops that header.
EVAL_HEADERS = ["model", "exact match", "loss", "perplexity", "facts stated"]
EXAMPLE_HEADERS = ["question", "must state", "base answer", "base", "adapter answer", "adapter"]


def eval_rows(result: dict[str, Any] | None) -> list[list[Any]]:
    if not result:
        return []
    rows = []
    for who in (w for w in ("base", "adapter") if w in result):
        m = result[who]
        row = [who, f"{m['exact_match']:.1%}", m["loss"], m["perplexity"]]
        rows.append(row + [f"{m['facts']:.1%}"] if "facts" in m else row)
    return rows


def eval_examples(result: dict[str, Any] | None, limit: int = 30) -> list[list[str]]:
    """Per-row answers of an evaluation (columns EXAMPLE_HEADERS): the facts a row needs, or its exact reference,
    and whether each answer hits ("yes"/"no")."""
    rows = []
    for ex in (result or {}).get("examples", [])[:limit]:
        need = "; ".join(" / ".join(f) for f in ex["facts"]) if ex.get("facts") else f"exactly: {ex['reference']}"
        verdicts = ["yes" if ex.get(f"{who}_hit") else "no" for who in ("base", "adapter")]
        rows.append([ex["question"], need, ex["base"], verdicts[0], ex["adapter"], verdicts[1]])
    return rows


def read_eval(run_path: Path) -> dict[str, Any] | None:
    """A run's eval_results.json (written by `lora-workbench evaluate`), if it has one."""
    return read_json(run_path / "eval_results.json")
