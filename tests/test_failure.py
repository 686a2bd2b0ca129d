"""status.json's structured failure: the kind comes from the exception the job caught, not from its text."""

from __future__ import annotations

import errno
import json
import signal
from pathlib import Path

import torch

from trainer.config.run_config import ConfigError
from trainer.data.files import DataError
from trainer.export.merge import ExportError
from trainer.failure import HINTS, classify, died
from trainer.job_status import JobStatus
from trainer.plan.preflight import Trial, measure
from trainer.run_dir import RunDir


def test_each_exception_has_its_kind() -> None:
    cases = [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
        (MemoryError(), "oom"),
        (DataError("a.jsonl", ["line 2: invalid JSON"]), "data"),
        (ConfigError(["training.learning_rate: must be > 0"]), "config"),
        (ConfigError(["model.name_or_path: no such directory"]), "model"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk"),
        (RuntimeError("[enforce fail] write: No space left on device"), "disk"),  # a library's wrapped OSError
        (ExportError("the export's logits differ by 4.2 (tolerance 0.01)"), "check"),
        (KeyError("lm_head"), "internal"),
    ]
    for exc, kind in cases:
        why = classify(exc, str(exc))
        assert (why.kind, why.hint) == (kind, HINTS[kind]), exc
        assert why.to_status() == {"kind": kind, "message": str(exc), "hint": HINTS[kind]}


def test_a_process_gone_without_a_word_is_killed_or_crashed() -> None:
    assert died(-signal.SIGKILL, "x").kind == "killed"
    assert died(128 + signal.SIGKILL, "x").kind == "killed"  # through a shell
    assert died(None, "x").kind == "killed"  # ended while no server watched: it did not write why
    assert died(1, "x").kind == "internal"


def test_a_side_job_writes_its_failure_and_the_preflight_reads_the_kind(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    status = JobStatus("evaluate", 3, str(job))
    status.start()
    status.fail("bad data in q.jsonl, line 1: invalid JSON", exc=DataError("q.jsonl", ["line 1: invalid JSON"]))
    written = json.loads((job / "status.json").read_text())
    assert written["state"] == "failed" and written["failure"]["kind"] == "data"

    short = tmp_path / "short-run"
    short.mkdir()
    RunDir(short).write_status(
        state="failed", error="RuntimeError: allocator", failure={"kind": "oom", "message": "", "hint": ""}
    )
    trial = measure(short)  # the kind, not the wording, says it ran out of memory
    assert trial.failure_kind == "oom" and trial.out_of_memory
    assert not Trial(None, False, error="KeyError: x", failure_kind="internal").out_of_memory
