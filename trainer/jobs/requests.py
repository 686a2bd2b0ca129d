"""The job protocol: every job is a typed request in its job dir, run as `lora-workbench <kind> --job-dir DIR`.

    runs/<run_id>/job.json          {"kind": "train", "name": ..., "resume": false, "overrides": []}
                                    (the request is the run's config.yaml plus these flags)
    runs/.jobs/<job_id>/job.json    {"kind": "export", "name": ..., <ExportRequest's fields>}
                                    {"kind": "evaluate", "name": ..., "run_dir": ..., "data": ..., ...}
                                    {"kind": "preflight", "name": ..., "config": "config.yaml", "steps": 6}

The plain command forms (`lora-workbench export --adapter ...`) build the same request in memory and run it
through run_request, as `--job-dir` does after reading the file: one path for the page and the command line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import TypeAdapter, ValidationError

from trainer.config.run_config import ConfigError
from trainer.export.merge import ExportRequest
from trainer.run_dir import job_held, write_json_atomic

if TYPE_CHECKING:
    from trainer.run.launch import Machines

REQUEST_FILE = "job.json"


@dataclass(frozen=True)
class TrainJob:
    """What `train` takes besides the run dir's config.yaml."""

    resume: bool = False  # continue from the newest complete checkpoint
    overrides: list[str] = field(default_factory=list)  # section.field=value, applied to config.yaml


@dataclass(frozen=True)
class EvaluateJob:
    run_dir: Path  # the finished run whose adapter is scored
    data: str | None = None  # held-out file; None: the run's data.eval_source
    max_new_tokens: int = 32
    limit: int | None = None  # score only the first N rows


@dataclass(frozen=True)
class PreflightJob:
    config: Path = Path("config.yaml")  # in job.json, relative to the job dir
    steps: int = 6


Request = TrainJob | ExportRequest | EvaluateJob | PreflightJob
KINDS: dict[str, type] = {
    "train": TrainJob,
    "export": ExportRequest,
    "evaluate": EvaluateJob,
    "preflight": PreflightJob,
}
JOB_DIR_FIELDS = {"status_dir"}  # ExportRequest's: always the job dir itself, never taken from the file


def kind_of(request: Request) -> str:
    return next(kind for kind, cls in KINDS.items() if isinstance(request, cls))


def write_request(job_dir: Path, request: Request, name: str | None = None) -> Path:
    """job.json: the kind, the job's name on the page, and the request's fields."""
    data = TypeAdapter(type(request)).dump_python(request, mode="json")
    body = {k: v for k, v in data.items() if k not in JOB_DIR_FIELDS}
    path = job_dir / REQUEST_FILE
    write_json_atomic(path, {"kind": kind_of(request), "name": name, **body})
    return path


def read_request(job_dir: Path, kind: str) -> Request:
    """The checked request of a job dir; ConfigError naming the file and each bad field."""
    path = job_dir / REQUEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            [f"{REQUEST_FILE}: missing (the job's request, written when it was queued)"], str(path)
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError([f"{REQUEST_FILE}: not readable JSON ({e})"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{REQUEST_FILE}: expected an object of fields"], str(path))
    if data.get("kind") != kind:
        raise ConfigError([f"kind: {data.get('kind')!r}, but this is `lora-workbench {kind}`"], str(path))
    cls = KINDS[kind]
    known = {f.name for f in fields(cls)} - JOB_DIR_FIELDS
    body = {k: v for k, v in data.items() if k not in ("kind", "name")}
    problems = [f"{k}: unknown field (known: {', '.join(sorted(known))})" for k in body if k not in known]
    try:
        request = TypeAdapter(cls).validate_python(body)
    except ValidationError as e:
        problems += [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors(include_url=False)]
    if problems:
        raise ConfigError(problems, str(path))
    return request


def request_field(job_dir: Path, key: str) -> object:
    """One field of a job's job.json, or None when it has none or the file is unreadable (listing never fails)."""
    try:
        data = json.loads((job_dir / REQUEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def request_name(job_dir: Path) -> str | None:
    """The job's name on the page."""
    name = request_field(job_dir, "name")
    return name if isinstance(name, str) else None


def request_kind(job_dir: Path) -> str | None:
    kind = request_field(job_dir, "kind")
    return kind if kind in KINDS else None


def rename_request(job_dir: Path, name: str) -> None:
    """A new name from the page, kept in job.json too, so that a rebuilt registry lists it (a run made on the command
    line has no job.json: its name lives in the registry alone)."""
    if request_field(job_dir, "kind") is not None:
        data = json.loads((job_dir / REQUEST_FILE).read_text(encoding="utf-8"))
        write_json_atomic(job_dir / REQUEST_FILE, {**data, "name": name})


def run_job_dir(kind: str, job_dir: Path, machines: Machines | None = None) -> int:
    """`lora-workbench <kind> --job-dir DIR`: read and check DIR/job.json, then run it as the plain form would."""
    with job_held(job_dir) as holder:
        if holder is not None:  # launched twice: the other process runs it; this one writes nothing
            who = f"pid {holder}" if holder > 0 else "another process"
            print(
                f"lora-workbench {kind}: {job_dir} is already being run by {who}; this one leaves it", file=sys.stderr
            )
            return 1
        try:
            request = read_request(job_dir, kind)
        except ConfigError as e:
            print(f"lora-workbench {kind}: {e}", file=sys.stderr)
            from trainer.run.train import fail_queued

            fail_queued(job_dir, str(e))
            return 1
        if isinstance(request, PreflightJob):  # its config file lies in the job dir
            request = replace(request, config=job_dir / request.config)
        return run_request(request, job_dir, machines)


def run_request(request: Request, job_dir: Path | None = None, machines: Machines | None = None) -> int:
    """Run one request; job_dir receives its status.json (and result files) when given."""
    if isinstance(request, TrainJob):  # the plain `train CONFIG.yaml` form creates its run dir first: run_training
        from trainer.run.train import run_job_dir as train_in_job_dir

        if job_dir is None:
            raise ValueError("a train request runs in its run dir (--job-dir)")
        return train_in_job_dir(job_dir, request.resume, request.overrides, machines)
    status_dir = str(job_dir) if job_dir is not None else None
    if isinstance(request, ExportRequest):
        from trainer.export.job import export_command

        return export_command(replace(request, status_dir=job_dir) if job_dir is not None else request)
    if isinstance(request, EvaluateJob):
        from trainer.export.evaluate import evaluate_command

        return evaluate_command(str(request.run_dir), request.data, request.max_new_tokens, request.limit, status_dir)
    from trainer.plan.preflight import preflight_command

    return preflight_command(str(request.config), request.steps, status_dir)
