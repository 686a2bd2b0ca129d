"""Incremental reading of a run's metrics.jsonl: each poll parses only the bytes appended since the last one.

A watcher (the UI's timer) keeps one MetricsTail per run; a half-written last line waits for the next poll,
and lines it cannot parse or keys it does not know are skipped, as the contract says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsTail:
    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self._partial = b""
        self.lines: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        """New complete lines since the last poll (also appended to self.lines)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        complete, _, self._partial = data.rpartition(b"\n")
        new = []
        for raw in complete.split(b"\n") if complete else []:
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(obj, dict) and {"step", "time", "kind"} <= obj.keys():
                new.append(obj)
        self.lines.extend(new)
        return new
