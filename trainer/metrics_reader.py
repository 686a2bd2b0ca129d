"""Incremental reading of a run's metrics.jsonl: each poll parses only the bytes appended since the last one.

A watcher (the UI's timer) keeps one MetricsTail per run; a half-written last line waits for the next poll,
and lines it cannot parse, lines whose values have the wrong types and keys it does not know are skipped, as
the contract says. A file that was replaced, truncated or edited in place is read again from its start.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# the keys readers compute with: each must be a number (or null) for the line to be used
NUMBER_KEYS = (
    "loss",
    "learning_rate",
    "grad_norm",
    "epoch",
    "tokens_per_second",
    "eval_loss",
    "gpu_mem_allocated_gb",
    "gpu_mem_reserved_gb",
    "gpu_mem_peak_gb",
    "gpu_mem_total_gb",
    "gpu_util_percent",
    "cpu_rss_gb",
    "predicted_peak_gb",
)
GPU_NUMBER_KEYS = ("mem_used_gb", "mem_total_gb", "util_percent")
EDGE_BYTES = 64  # the bytes just before the read offset, re-checked each poll to notice a rewritten file


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63


def _is_number(value: Any) -> bool:
    # finite floats and 64-bit ints: sums, means and plots of them stay finite floats
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _is_gpu(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and _is_int(value.get("index"))
        and all(value.get(k) is None or _is_number(value[k]) for k in GPU_NUMBER_KEYS)
    )


def valid_line(obj: Any) -> bool:
    """True if obj has the contract's shape: step, time, kind and every number readers use of the right type."""
    if not (isinstance(obj, dict) and _is_int(obj.get("step")) and _is_number(obj.get("time"))):
        return False
    if not isinstance(obj.get("kind"), str) or not isinstance(obj.get("event", ""), str):
        return False
    if not all(obj.get(k) is None or _is_number(obj[k]) for k in NUMBER_KEYS):
        return False
    gpus = obj.get("gpus")
    return gpus is None or (isinstance(gpus, list) and all(_is_gpu(g) for g in gpus))


def parse_line(raw: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON / not UTF-8, a huge number, nesting past the parser's depth
        return None
    return obj if valid_line(obj) else None


class MetricsTail:
    def __init__(self, path: Path):
        self.path = path
        self.lines: list[dict[str, Any]] = []
        self.generation = 0  # bumps when the file was rewritten and self.lines started over
        self.bytes_read = 0  # of the file's lines, over every poll: each byte once unless the file was rewritten
        self._reset()

    def _reset(self) -> None:
        self.offset, self._partial, self._edge = 0, b"", b""
        self._identity: tuple[int, int, int] | None = None  # (device, inode, mtime) at the last read
        if self.lines:
            self.lines, self.generation = [], self.generation + 1

    def _rewritten(self, f: Any, st: os.stat_result) -> bool:
        """The file is not the one read so far: another inode, shorter, changed without growing, or other bytes
        where the last read ended."""
        if self._identity is None:
            return False
        if (st.st_dev, st.st_ino) != self._identity[:2] or st.st_size < self.offset:
            return True
        if st.st_size == self.offset and st.st_mtime_ns != self._identity[2]:
            return True
        f.seek(self.offset - len(self._edge))
        return f.read(len(self._edge)) != self._edge

    def poll(self) -> list[dict[str, Any]]:
        """New complete lines since the last poll (also appended to self.lines); all of them after a rewrite."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if self._rewritten(f, st):
                    self._reset()
                f.seek(self.offset)
                chunk = f.read()
                st = os.fstat(f.fileno())  # after the read: an append during it is not taken for an edit
        except OSError:  # not there (yet, or any more), or not a readable file: nothing to show from it
            self._reset()
            return []
        self.offset += len(chunk)
        self.bytes_read += len(chunk)
        self._edge = (self._edge + chunk)[-EDGE_BYTES:]
        self._identity = (st.st_dev, st.st_ino, st.st_mtime_ns)
        complete, _, self._partial = (self._partial + chunk).rpartition(b"\n")
        new = [obj for raw in complete.split(b"\n") if complete and (obj := parse_line(raw)) is not None]
        self.lines.extend(new)
        return new
