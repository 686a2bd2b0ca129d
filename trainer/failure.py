"""Why a job failed, as data: status.json's `failure` ({kind, message, hint}) that the UI shows without parsing text.

The job's own process classifies the exception it caught (it knows the type); the queue classifies only what it
sees when the process is gone without a final state (killed, crashed, its directory removed). `error` keeps the
message as before, for readers that know only it.
"""

from __future__ import annotations

import errno
import signal
from dataclasses import asdict, dataclass
from typing import Any, Literal

Kind = Literal["oom", "nan", "data", "config", "model", "disk", "check", "killed", "internal"]

HINTS: dict[str, str] = {
    "oom": (
        "The run needed more memory than the device has. Ways to fit it, most effective first: 4-bit QLoRA "
        "(recipe qlora); halve per_device_batch_size and double gradient_accumulation_steps (same effective "
        "batch); gradient_checkpointing on; a shorter data.max_length; a paged optimizer (paged_adamw_8bit) "
        "absorbs short spikes."
    ),
    "nan": (
        "The loss or gradient norm became NaN/inf: training diverged. Lower learning_rate (2e-4 is a safe start "
        "for adapters), keep max_grad_norm > 0, and prefer bf16 or fp32 over fp16."
    ),
    "data": "The data could not be used as given. Fix the rows named above (file and line), then start again.",
    "config": "Fix the config fields named above, then start again.",
    "model": "The model could not be loaded as configured; the message names the field and the fix.",
    "check": (
        "What was written did not pass its check after writing, so nothing was kept; the message names the check "
        "and by how much it missed."
    ),
    "disk": "The disk filled up. Free space (old checkpoints, exports, the model cache) or point runs_dir elsewhere.",
    "killed": (
        "The process was ended from outside (a signal or the out-of-memory killer), so it could not write why; "
        "the last lines of its log are in the message. On Linux, `dmesg` names an OOM kill."
    ),
    "internal": "An unexpected error: the log shows where. The last lines usually name the cause.",
}


@dataclass(frozen=True)
class Failure:
    kind: Kind
    message: str
    hint: str

    def to_status(self) -> dict[str, Any]:
        return asdict(self)


def failure(kind: Kind, message: str) -> Failure:
    return Failure(kind, message, HINTS[kind])


def classify(exc: BaseException, message: str) -> Failure:
    """The failure kind of an exception a job process caught. The workbench's own errors carry theirs
    (`failure_kind`: ConfigError, DataError, AdapterError, ExportError), so this contract imports no stage."""
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return failure("oom", message)
    if (kind := getattr(exc, "failure_kind", None)) in HINTS:
        return failure(kind, message)
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if full or "No space left on device" in message:  # libraries that wrap the OSError keep its text
        return failure("disk", message)
    return failure("internal", message)


def died(exit_code: int | None, message: str) -> Failure:
    """A process gone without a final state: killed by a signal (negative code, or 128+N from a shell), else a
    hard crash."""
    by_signal = exit_code is not None and (exit_code < 0 or exit_code in (128 + signal.SIGKILL, 128 + signal.SIGTERM))
    return failure("killed" if by_signal or exit_code is None else "internal", message)
