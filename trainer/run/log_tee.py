"""Copy what the trainer prints into the run's train.log when no job runner already captures it."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

CAPTURED_ENV = "LORA_WORKBENCH_LOG_CAPTURED"  # set by the job runner, which redirects stdout+stderr itself


class _Tee:
    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.streams[0].fileno()


@contextlib.contextmanager
def tee_to(log_file: Path) -> Iterator[None]:
    if os.environ.get(CAPTURED_ENV):
        yield
        return
    with open(log_file, "a", encoding="utf-8") as f:
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(old[0], f), _Tee(old[1], f)
        moved = _redirect_handlers({id(old[0]): sys.stdout, id(old[1]): sys.stderr})
        try:
            yield
        finally:
            sys.stdout, sys.stderr = old
            for handler, stream in moved:
                handler.setStream(stream)


def _redirect_handlers(new_streams: dict[int, TextIO]) -> list[tuple[logging.StreamHandler, TextIO]]:
    """Logging handlers made before the tee (transformers', at import) hold the old stream: point them at it."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    moved = []
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and id(h.stream) in new_streams:
                moved.append((h, h.setStream(new_streams[id(h.stream)])))
    return moved
