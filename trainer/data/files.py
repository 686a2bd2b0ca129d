"""Reading dataset rows from local files and the hub, each row tagged with where it came from.

Files are parsed as data only (json, csv, parquet); nothing is unpickled or executed.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config.paths import HUB_ID_RE, PROJECT_ROOT, inside_roots, refusal, resolve_local

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
DEEP_LEVELS = 100  # a row is an object of texts and short lists; json.loads gives up near Python's recursion limit
TOO_DEEP = (
    f"nested too deeply (arrays/objects more than {DEEP_LEVELS} levels inside each other); "
    "a row is an object of text fields"
)


class DataError(ValueError):
    """Bad input data; the message names the file, the line/row and the field."""

    failure_kind = "data"  # trainer/failure.py's kind

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"bad data in {source}:\n" + "\n".join(f"  - {p}" for p in shown) + more)


@dataclass(frozen=True)
class Row:
    where: str  # "line 7" for JSONL/JSON-with-lines, "row 3 (line 4)" for CSV, "row 3" otherwise
    data: dict[str, Any]


@dataclass(frozen=True)
class Source:
    """A data source found: a local file, or a hub dataset already loaded (datasets keeps it on disk)."""

    name: str  # the resolved name used in messages
    path: Path | None = None
    hub: Any = None  # a datasets.Dataset

    def rows(self, limit: int | None = None) -> tuple[list[Row], int]:
        """The first `limit` rows (all when None), and how many the source holds (about, for a text file cut short)."""
        if self.path is not None:
            return read_file(self.path, limit)
        picked = self.hub if limit is None else self.hub.select(range(min(limit, len(self.hub))))
        return [Row(f"row {i}", r) for i, r in enumerate(picked, start=1)], len(self.hub)


def open_source(
    source: str, subset: str | None = None, split: str = "train", roots: list[Path] | None = None
) -> Source:
    """The local file or hub dataset a data source names; raises DataError.

    roots (the page's: trainer/config/paths.py page_roots) confine local files to those directories; None (the CLI,
    run by the machine's user) reads any path."""
    local = locate(source, roots)
    if local is not None:
        return Source(str(local), path=local)
    if roots is None:
        return Source(source, hub=load_hub(source, subset, split))
    try:
        return Source(source, hub=load_hub(source, subset, split))
    except DataError as e:  # the hub's own error can tell which local names exist: the server log gets it
        print(f"data source {source}: {'; '.join(e.problems)}", file=sys.stderr)
        raise DataError(source, [hub_refusal(source, roots)]) from None


def hub_refusal(source: str, roots: list[Path]) -> str:
    """The page's one message for a name that is neither a file inside the roots nor a hub dataset it can load:
    the same whether or not a file of that name exists elsewhere (the details go to the server's log)."""
    offline = " (HF_HUB_OFFLINE is set: the hub is not asked)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return (
        f"{refusal('data file', source, roots)}; and no hub dataset of that name could be loaded{offline}: the "
        "server's log says why"
    )


def locate(source: str, roots: list[Path] | None = None) -> Path | None:
    """The local file a data source names, or None for a hub dataset id; DataError when it is neither."""
    if roots is None:
        local = resolve_local(source)
    else:  # the cwd first, then the project, as resolve_local; but nothing outside the roots is looked at
        inside = [p for p in (inside_roots(source, roots), inside_roots(source, roots, PROJECT_ROOT)) if p]
        local = next((p for p in inside if p.exists()), None)
    if local is not None:
        return local
    if _is_hub_id(source):
        if roots is not None and Path(source).exists():  # datasets would read it from the cwd, outside the roots
            raise DataError(source, [hub_refusal(source, roots)])
        return None
    if roots is not None and not inside:
        raise DataError(source, [refusal("data file", source, roots)])
    raise DataError(source, ["file not found (looked in the working directory and the project's data/)"])


def _is_hub_id(source: str) -> bool:
    path = Path(source)
    return path.suffix.lower() not in SUFFIXES and ".." not in path.parts and bool(HUB_ID_RE.match(source))


def read_file(path: Path, limit: int | None = None) -> tuple[list[Row], int]:
    """The file's first `limit` rows (all when None), and how many rows it holds (about, when the read stopped early)."""
    if path.is_dir():
        raise DataError(str(path), ["is a directory; give a .json, .jsonl, .csv or .parquet file"])
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(str(path), [f"unsupported file type {suffix!r} (expected one of {', '.join(SUFFIXES)})"])
    if path.stat().st_size == 0:
        raise DataError(str(path), ["the file is empty"])
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}[suffix]
    rows, total = reader(path, limit)
    if not rows:
        raise DataError(str(path), ["the file holds no rows"])
    return rows, total


def _decode(path: Path, lines: int | None = None) -> tuple[str, bool]:
    """The file's text, or only its first `lines` lines (a sample, without reading the rest); and whether that is
    the whole file."""
    with path.open("rb") as f:
        data = f.read() if lines is None else b"".join(itertools.islice(f, lines))  # binary lines end at b"\n" only
        whole = lines is None or not f.read(1)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(str(path), [f"not UTF-8 text (byte {e.start}): {e.reason}"]) from None
    return text.replace("\r\n", "\n").replace("\r", "\n"), whole  # universal newlines, as text mode reads


def _count_lines(path: Path) -> int:
    """The file's line count, from its newline bytes: the size of a file whose rows were only sampled."""
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _read_jsonl(path: Path, limit: int | None = None) -> tuple[list[Row], int]:
    rows, problems = [], []
    text, whole = _decode(path, limit)
    # split on "\n" only: str.splitlines also breaks at U+2028/U+0085, which JSON strings may hold unescaped
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        except RecursionError:
            problems.append(f"line {n}: {TOO_DEEP}")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {n}: expected a JSON object per line, got {type(obj).__name__}")
            continue
        rows.append(Row(f"line {n}", obj))
    if problems:
        raise DataError(str(path), problems)
    return rows, len(rows) if whole else max(_count_lines(path), len(rows))


def _read_json(path: Path, limit: int | None = None) -> tuple[list[Row], int]:
    text, _ = _decode(path)  # a JSON array parses only whole
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a .json file that is really JSON Lines
            return _read_jsonl(path, limit)
        raise DataError(str(path), [f"line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})"]) from None
    except RecursionError:
        raise DataError(str(path), [f"line {_deep_line(text)}: {TOO_DEEP}"]) from None
    if isinstance(obj, dict):  # {"data": [rows]} is a wrapped array; any other object is one row
        only = next(iter(obj.values())) if len(obj) == 1 else None
        wrapped = isinstance(only, list) and all(isinstance(r, dict) for r in only) and only
        obj = only if wrapped and next(iter(obj)) not in ("messages", "conversations") else [obj]
    if not isinstance(obj, list):
        raise DataError(str(path), ["expected a JSON array of row objects (or JSON Lines)"])
    bad = [
        f"row {i}: expected an object, got {type(r).__name__}" for i, r in enumerate(obj, 1) if not isinstance(r, dict)
    ]
    if bad:
        raise DataError(str(path), bad)
    return [Row(f"row {i}", r) for i, r in enumerate(obj[:limit], start=1)], len(obj)


def _deep_line(text: str, limit: int = DEEP_LEVELS) -> int:
    """The line where arrays/objects first nest deeper than limit: json's RecursionError carries no position."""
    depth, in_string, escaped, line = 0, False, False, 1
    for ch in text:
        if ch == "\n":
            line += 1
        elif in_string:  # brackets inside strings do not count
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return line
        elif ch in "]}":
            depth -= 1
    return 1


def _read_csv(path: Path, limit: int | None = None) -> tuple[list[Row], int]:
    text, whole = _decode(path, None if limit is None else limit + 2)  # the header, the rows, one more
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or any(not (f or "").strip() for f in reader.fieldnames):
        raise DataError(str(path), ["line 1: the header row must name every column"])
    rows, problems = [], []
    try:
        for i, rec in enumerate(reader, start=1):
            line = reader.line_num
            if None in rec:
                problems.append(f"row {i} (line {line}): more fields than the header's {len(reader.fieldnames)}")
                continue
            rows.append(Row(f"row {i} (line {line})", {k: v for k, v in rec.items() if v is not None}))
    except csv.Error as e:
        problems.append(f"line {reader.line_num + 1}: not valid CSV ({e})")
    if problems:
        raise DataError(str(path), problems)
    if whole:
        return rows, len(rows)
    # a quoted field may span lines, so the sample's last row may be cut: it is left out
    return rows[: min(limit, len(rows) - 1)], max(_count_lines(path) - 1, len(rows))


def _read_parquet(path: Path, limit: int | None = None) -> tuple[list[Row], int]:
    import pyarrow.parquet as pq

    try:
        if limit is None:
            table = pq.read_table(path)
            return [Row(f"row {i}", r) for i, r in enumerate(table.to_pylist(), start=1)], table.num_rows
        with pq.ParquetFile(path) as pf:
            batch = next(pf.iter_batches(batch_size=limit), None)
            head = batch.to_pylist() if batch is not None else []
            return [Row(f"row {i}", r) for i, r in enumerate(head, start=1)], pf.metadata.num_rows
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(str(path), [f"not a readable Parquet file ({e})"]) from None


def load_hub(dataset_id: str, subset: str | None, split: str) -> Any:
    """The hub dataset's split, as a datasets.Dataset (datasets caches it on disk)."""
    from datasets import load_dataset

    try:
        return load_dataset(dataset_id, subset, split=split)
    except Exception as e:  # offline, unknown id, unknown split: all mean the same to the user
        raise DataError(dataset_id, [f"could not load hub dataset (subset={subset}, split={split}): {e}"]) from None
