"""The data step of a run: read, convert, tokenize and split, all before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config.run_config import DataSection
from trainer.data.files import DataError, read_rows
from trainer.data.formats import Example, RowError, convert_rows, detect_format, rename_columns
from trainer.data.tokenization import (
    IGNORE_INDEX,
    TemplateError,
    TokenizedRow,
    TokenizeReport,
    apply_overlength,
    tokenize_example,
)


@dataclass
class Prepared:
    train: list[TokenizedRow]
    eval: list[TokenizedRow]
    report: TokenizeReport
    eval_report: TokenizeReport | None
    format: str
    source: str


def load_examples(
    source: str, cfg: DataSection, roots: list[Path] | None = None
) -> tuple[str, str, list[tuple[str, Example]]]:
    """(resolved source, format, [(row location, example)]) of one data source; raises DataError.
    roots confine a local file to the page's directories (data_files.read_rows)."""
    name, rows = read_rows(source, cfg.subset, cfg.split, roots)
    if cfg.max_samples:
        rows = rows[: cfg.max_samples]
    rows = [rename_columns(r, cfg.columns) for r in rows]
    fmt = cfg.format
    if fmt == "auto":
        try:
            fmt = detect_format(rows[0])
        except RowError as e:
            raise DataError(name, [f"{rows[0].where}: {e}"]) from None
    examples = convert_rows(rows, fmt, name, cfg.system_prompt)
    return name, fmt, [(r.where, ex) for r, ex in zip(rows, examples, strict=True)]


def tokenize_rows(
    tokenizer: Any, located: list[tuple[str, Example]], cfg: DataSection, template: str
) -> tuple[list[TokenizedRow], TokenizeReport, list[str]]:
    """Tokenize every example under the overlength policy: (kept rows, counts, one problem per bad row)."""
    report, out, problems = TokenizeReport(), [], []
    for where, example in located:
        try:
            row = tokenize_example(tokenizer, example, template)
        except TemplateError as e:
            problems.append(f"{where}: {e}")
            continue
        report.rows += 1
        report.lengths.append(len(row.input_ids))
        if len(row.input_ids) > cfg.max_length:
            if cfg.overlength == "error":
                problems.append(
                    f"{where}: {len(row.input_ids)} tokens, longer than data.max_length {cfg.max_length} "
                    "(raise max_length, or set data.overlength to truncate or drop)"
                )
                continue
            kept = apply_overlength(row, cfg.max_length, cfg.overlength)
            if kept is None:
                report.dropped_overlength += 1
                continue
            truncated, row = True, kept
        else:
            truncated = False
        trainable = sum(1 for x in row.labels if x != IGNORE_INDEX)
        if trainable == 0:  # never train a prompt-only row
            report.dropped_no_trainable += 1
            continue
        report.truncated += truncated
        report.trainable_tokens += trainable
        out.append(row)
    return out, report, problems


def tokenize_all(
    tokenizer: Any, located: list[tuple[str, Example]], cfg: DataSection, template: str, source: str
) -> tuple[list[TokenizedRow], TokenizeReport]:
    """tokenize_rows, raising one DataError with every bad row (or when nothing is left to train)."""
    out, report, problems = tokenize_rows(tokenizer, located, cfg, template)
    if problems:
        raise DataError(source, problems)
    if not out:
        raise DataError(source, [f"no trainable rows left ({report.summary()})"])
    return out, report


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


def prepare_data(tokenizer: Any, cfg: DataSection, template: str, seed: int) -> Prepared:
    """Everything the trainer needs from the data; every problem surfaces here as a DataError."""
    name, fmt, located = load_examples(cfg.source, cfg)
    train, report = tokenize_all(tokenizer, located, cfg, template, name)
    if cfg.eval_source:
        eval_name, _, eval_located = load_examples(cfg.eval_source, cfg)
        eval_rows, eval_report = tokenize_all(tokenizer, eval_located, cfg, template, eval_name)
    else:
        train, eval_rows = split_eval(train, cfg.val_size, seed)
        eval_report = None  # the held-out rows are counted in the train report
    return Prepared(train, eval_rows, report, eval_report, fmt, name)


def to_dataset(rows: list[TokenizedRow]):
    """A datasets.Dataset with input_ids + labels, which TRL's SFTTrainer takes as already processed."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]})


__all__ = ["DataError", "Prepared", "load_examples", "prepare_data", "to_dataset", "tokenize_all", "tokenize_rows"]
