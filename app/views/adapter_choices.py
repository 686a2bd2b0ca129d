"""What the chat and export tabs can pick from: finished runs' adapters, a running run's newest checkpoint,
or a directory the user types (allowed only inside the server's roots: trainer/config/paths.py page_roots)."""

from __future__ import annotations

import sys
from pathlib import Path

from app.views.runs_index import config_section, read_config
from trainer.chat.adapter_source import AdapterError
from trainer.config.paths import HUB_ID_RE, inside_roots, refusal
from trainer.jobs.registry import Job
from trainer.model.checks import hub_model_problem


def run_adapter(run_path: Path) -> Path | None:
    """A run's adapter to use: the final adapter/, or the newest complete checkpoint while it trains."""
    from trainer.run.callbacks import latest_complete_checkpoint

    if (run_path / "adapter" / "adapter_config.json").is_file():
        return run_path / "adapter"
    return latest_complete_checkpoint(run_path / "checkpoints")


def adapter_choices(jobs: list[Job]) -> list[tuple[str, str]]:
    """(label, adapter dir) for every training run that has an adapter or a checkpoint, newest first."""
    choices = []
    for job in sorted(jobs, key=lambda j: j.seq, reverse=True):
        if job.kind != "train" or job.state == "queued":
            continue
        path = run_adapter(Path(job.run_dir))
        if path is None:
            continue
        method = config_section(read_config(Path(job.run_dir)), "adapter").get("method", "?")
        where = "" if path.name == "adapter" else f" @ {path.name}"
        choices.append((f"{job.id}{where} ({method}, {job.state})", str(path)))
    return choices


def resolve_user_dir(text: str, roots: list[Path], what: str = "adapter directory") -> Path:
    """A directory path typed into the page, resolved (symlinks too) and required to lie inside one of roots."""
    if not text.strip():
        raise AdapterError(f"{what}: empty")
    path = inside_roots(text, roots)
    if path is None:
        raise AdapterError(refusal(what, text, roots))
    return path


def gpu_busy_warning(jobs: list[Job], cuda: bool) -> str | None:
    """A warning when a training job holds the GPU that a chat model would share."""
    running = [j.name or j.id for j in jobs if j.state == "running"]
    if not cuda or not running:
        return None
    return (
        f"Training job {', '.join(running)} is using the GPU. A second model there can run it out of memory. "
        "Press Load again to load anyway."
    )


def resolve_base(text: str, roots: list[Path]) -> str | None:
    """A base model typed into the page: blank (the adapter's own), a directory inside roots, or a hub id."""
    text = text.strip()
    if not text:
        return None
    local = inside_roots(text, roots)
    if local is not None and local.is_dir():
        return str(local)
    if ".." in text or not HUB_ID_RE.match(text):
        raise AdapterError(refusal("base model", text, roots) + ", or give a hub id like Org/Model")
    # A hub id that is also a directory under the cwd would load from there, outside the roots; and the hub's own
    # answer differs from the refusal: both read the same, whether or not such a directory exists (details: log).
    problem = "a directory of that name lies outside the roots" if Path(text).exists() else hub_model_problem(text)
    if problem:
        print(f"base model {text}: {problem}", file=sys.stderr)
        raise AdapterError(
            refusal("base model", text, roots) + "; and no hub model of that name can be loaded here: the server's "
            "log says why"
        )
    return text


def adapter_name(path: str | Path) -> str:
    """A short name for an adapter directory: the run id (with @checkpoint-N for a checkpoint), else the dir."""
    p = Path(path)
    if p.name == "adapter":
        return p.parent.name
    if p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}@{p.name}"
    return p.name
