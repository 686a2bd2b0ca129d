"""The data step of a run: read, convert, tokenize and split, all before any model is loaded.

Tokenizing is datasets' `Dataset.map` over the converted examples, kept on disk by content (trainer/data/cache.py):
the Start check, the pre-flight and the training process tokenize the same data under the same settings once.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config.run_config import DataSection
from trainer.data import cache as data_cache
from trainer.data.files import DataError, Source, open_source
from trainer.data.formats import Example, RowError, convert_rows, detect_format, rename_columns
from trainer.data.tokenization import KEPT, TokenizedRow, TokenizeReport, tokenize_row

Located = list[tuple[str, Example]]  # (row location such as "line 7", example), in the source's order
REPORT_COLUMNS = ["outcome", "length", "trainable", "problem"]  # what Tokenized.report and .problems read


@dataclass
class Prepared:
    train: list[TokenizedRow]
    eval: list[TokenizedRow]
    report: TokenizeReport
    eval_report: TokenizeReport | None
    format: str
    source: str
    cached: bool = False  # the training rows' tokens came from the cache


@dataclass
class Tokenized:
    """One source tokenized under the run's settings: tokenize_row's fields and the location, a list per field."""

    source: str
    format: str
    columns: dict[str, list]
    cached: bool = False

    @property
    def report(self) -> TokenizeReport:
        c = self.columns
        return TokenizeReport.of(c["outcome"], c["length"], c["trainable"])

    @property
    def problems(self) -> list[str]:
        return [p for p in self.columns["problem"] if p]

    def checked(self) -> tuple[list[TokenizedRow], TokenizeReport]:
        """The rows to train on and the counts; one DataError with every bad row, or when nothing is left to train."""
        c, report = self.columns, self.report
        if self.problems:
            raise DataError(self.source, self.problems)
        rows = [
            TokenizedRow(ids, labels)
            for ids, labels, outcome in zip(c["input_ids"], c["labels"], c["outcome"], strict=True)
            if outcome in KEPT
        ]
        if not rows:
            raise DataError(self.source, [f"no trainable rows left ({report.summary()})"])
        return rows, report


def examples_of(src: Source, cfg: DataSection, limit: int | None = None) -> tuple[str, Located, int]:
    """(format, located examples, rows the source holds) of src's first `limit` rows (None: all); raises DataError."""
    rows, total = src.rows(limit)
    if cfg.max_samples:
        rows, total = rows[: cfg.max_samples], min(total, cfg.max_samples)
    if not rows:
        raise DataError(src.name, ["the dataset holds no rows"])
    rows = [rename_columns(r, cfg.columns) for r in rows]
    fmt = cfg.format
    if fmt == "auto":
        try:
            fmt = detect_format(rows[0])
        except RowError as e:
            raise DataError(src.name, [f"{rows[0].where}: {e}"]) from None
    examples = convert_rows(rows, fmt, src.name, cfg.system_prompt)
    return fmt, [(r.where, ex) for r, ex in zip(rows, examples, strict=True)], total


def load_examples(source: str, cfg: DataSection, roots: list[Path] | None = None) -> tuple[str, str, Located]:
    """(resolved source, format, located examples) of one data source; raises DataError.
    roots confine a local file to the page's directories (files.open_source)."""
    src = open_source(source, cfg.subset, cfg.split, roots)
    fmt, located, _ = examples_of(src, cfg)
    return src.name, fmt, located


def tokenize(tokenizer: Any, located: Located, cfg: DataSection, template: str, fingerprint: str | None = None) -> Any:
    """A datasets.Dataset of tokenize_row's fields and "where", one row per example in order: Dataset.map."""
    from datasets import Dataset

    field = "text" if "text" in located[0][1] else "messages"
    examples = Dataset.from_dict({"where": [w for w, _ in located], field: [ex[field] for _, ex in located]})
    limits = (cfg.max_length, cfg.overlength)

    def batch(b: dict[str, list]) -> dict[str, list]:
        out = [
            tokenize_row(tokenizer, w, {field: x}, limits, template) for w, x in zip(b["where"], b[field], strict=True)
        ]
        return {k: [o[k] for o in out] for k in out[0]}

    # a fingerprint given, datasets does not hash the function (and the tokenizer inside it) to make one
    return examples.map(batch, batched=True, remove_columns=[field], new_fingerprint=fingerprint or uuid.uuid4().hex)


def cached_tokens(
    tokenizer: Any, src: Source, cfg: DataSection, template: str, cache: Path, columns: list[str] | None = None
) -> Tokenized | None:
    """src's tokens from the cache (only `columns`, e.g. REPORT_COLUMNS, when given), or None when they are not there
    yet (nothing is read or tokenized)."""
    return _from_cache(src, cache, data_cache.data_key(src, cfg, tokenizer, template), columns)


def _from_cache(src: Source, cache: Path, key: str, columns: list[str] | None = None) -> Tokenized | None:
    try:
        found = data_cache.load(cache, key)
        if found is None:
            return None
        rows, meta = found
        if len(rows) != meta["rows"] or not isinstance(meta["format"], str):
            raise ValueError(f"{len(rows)} rows where its meta.json says {meta['rows']}")
        rows = rows.select_columns(columns) if columns else rows  # Arrow reads only those from the mapped file
        return Tokenized(src.name, meta["format"], rows.to_dict(), cached=True)
    except Exception as e:  # a cut, edited or half-deleted entry: tokenize again and replace it, never fail on it
        print(
            f"warning: cached tokens {cache / key} unusable ({type(e).__name__}: {e}); tokenizing again",
            file=sys.stderr,
        )
        data_cache.discard(cache, key)
        return None


def tokenize_source(
    tokenizer: Any, src: Source, cfg: DataSection, template: str, cache: Path | None = None
) -> Tokenized:
    """The whole of src read, converted and tokenized, through the cache when one is given; raises DataError for
    rows that cannot be read or converted (those never reach the cache)."""
    key = data_cache.data_key(src, cfg, tokenizer, template) if cache else None
    if key and (hit := _from_cache(src, cache, key)):
        return hit
    fmt, located, _ = examples_of(src, cfg)
    rows = tokenize(tokenizer, located, cfg, template, key)
    if key:
        data_cache.store(cache, key, rows, {"format": fmt, "rows": len(located)})
    return Tokenized(src.name, fmt, rows.to_dict())


def split_eval(rows: list[TokenizedRow], val_size: float, seed: int) -> tuple[list[TokenizedRow], list[TokenizedRow]]:
    """Hold out val_size (fraction or count) of the rows, chosen with the run's seed."""
    import random

    n_eval = int(val_size) if val_size >= 1 else round(len(rows) * val_size)
    if n_eval == 0:
        return rows, []
    if n_eval >= len(rows):
        raise DataError("data.val_size", [f"holds out {n_eval} of {len(rows)} rows, leaving none to train on"])
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def prepare_data(
    tokenizer: Any,
    cfg: DataSection,
    template: str,
    seed: int,
    cache: Path | None = None,
    roots: list[Path] | None = None,
) -> Prepared:
    """Everything the trainer needs from the data; every problem surfaces here as a DataError. cache: the directory
    of tokenized data (cache.cache_dir), None to tokenize without one; roots: as load_examples."""

    def tokens(source: str) -> Tokenized:
        return tokenize_source(tokenizer, open_source(source, cfg.subset, cfg.split, roots), cfg, template, cache)

    main = tokens(cfg.source)
    train, report = main.checked()
    if cfg.eval_source:
        eval_rows, eval_report = tokens(cfg.eval_source).checked()
    else:
        train, eval_rows = split_eval(train, cfg.val_size, seed)
        eval_report = None  # the held-out rows are counted in the train report
    return Prepared(train, eval_rows, report, eval_report, main.format, main.source, main.cached)


def to_dataset(rows: list[TokenizedRow]):
    """A datasets.Dataset with input_ids + labels, which TRL's SFTTrainer takes as already processed."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]})


__all__ = [
    "REPORT_COLUMNS",
    "DataError",
    "Prepared",
    "Tokenized",
    "cached_tokens",
    "load_examples",
    "prepare_data",
    "to_dataset",
    "tokenize",
    "tokenize_source",
]
