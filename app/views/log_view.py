"""What the page shows of a job's log: its newest lines as a terminal would show them, repeated warnings folded.

A train.log is the raw stdout+stderr of the job. Progress bars redraw themselves with carriage returns, Python's
warnings take two lines (the warning and its `warnings.warn(` source line), and some libraries warn on every
step (bitsandbytes' "MatMul8bitLt: inputs will be cast ..." once per 8-bit matmul call): read raw, 40 lines are
mostly noise. Pure functions here; the tabs only show the result.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TAIL_BYTES = 65536  # enough of the end of the log that folding still leaves a screenful of distinct lines
WARNING_RE = re.compile(r":\d+: \w*Warning: ")  # "path.py:12: UserWarning: ...", as warnings.showwarning writes


def screen_lines(text: str) -> list[str]:
    """The lines a terminal would show: of a line redrawn with carriage returns (tqdm), only its last drawing."""
    out = []
    for line in text.split("\n"):
        drawings = [part for part in line.split("\r") if part.strip()]
        out.append(drawings[-1] if drawings else "")
    return out


def entries(lines: list[str]) -> list[list[str]]:
    """Lines grouped so a Python warning and its indented source line stay one entry."""
    grouped: list[list[str]] = []
    for line in lines:
        follows_warning = grouped and WARNING_RE.search(grouped[-1][0]) and len(grouped[-1]) == 1
        if follows_warning and line.startswith((" ", "\t")) and line.strip():
            grouped[-1].append(line)
        else:
            grouped.append([line])
    return grouped


def fold_repeats(lines: list[str]) -> list[str]:
    """Each entry that repeats is shown once, where it last appeared (so a warning that comes every step stays in
    the newest lines), with how many times it came."""
    grouped = entries(lines)
    counts: dict[tuple[str, ...], int] = {}
    last: dict[tuple[str, ...], int] = {}
    for i, entry in enumerate(grouped):
        key = tuple(entry)
        counts[key], last[key] = counts.get(key, 0) + 1, i
    out: list[str] = []
    for i, entry in enumerate(grouped):
        key = tuple(entry)
        if last[key] != i and entry[0].strip():
            continue
        out += [f"{entry[0]}  [×{counts[key]}]" if counts[key] > 1 and entry[0].strip() else entry[0], *entry[1:]]
    return out


def read_end(path: Path, size: int = TAIL_BYTES) -> str:
    """The last `size` bytes of a file as text, starting at a whole line; "" when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            start = max(0, f.tell() - size)
            f.seek(start)
            data = f.read()
    except OSError:  # no log yet, or its run dir was removed
        return ""
    if start:
        data = data.partition(b"\n")[2]  # the first line is cut off mid-way
    return data.decode("utf-8", "replace")


def log_view(run_dir: Path, lines: int = 40, name: str = "train.log") -> str:
    """The newest `lines` lines of a job's log, as the page shows them (oldest first, the newest at the bottom)."""
    shown = fold_repeats(screen_lines(read_end(run_dir / name)))
    while shown and not shown[-1].strip():
        shown.pop()
    return "\n".join(shown[-lines:])
