"""What the Train tab shows before a run: the first rows as the model will see them (trained vs masked
tokens), the token-length distribution against max_length, and every row that cannot be used, by line.

It runs the same reading, conversion and tokenization as training (trainer/data/prepare.py), with the tokenizer
only: no model weights are loaded. A form edit looks at a sample (the first SAMPLE_ROWS rows), or at the whole
file's counts when the cache of tokenized data has them; Start checks every row through that cache, which the job
then reuses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.config.run_config import ConfigError, RunConfig
from trainer.data.cache import cache_dir
from trainer.data.files import DataError, Source, locate, open_source
from trainer.data.formats import Example
from trainer.data.prepare import (
    REPORT_COLUMNS,
    Located,
    Tokenized,
    cached_tokens,
    examples_of,
    load_examples,
    prepare_data,
    tokenize,
)
from trainer.data.tokenization import TemplateError, TokenizeReport, chat_template_of, render_with_spans
from trainer.model.checks import model_source_problem
from trainer.model.model_configs import RemoteCodeRefused, refuse_remote_code

TRAINED, PROMPT, CUT = "trained", "prompt (masked)", "cut (over max_length)"
SAMPLE_ROWS = 200  # what a form edit reads and tokenizes of a larger source: the page answers at once


@dataclass
class PreviewRow:
    where: str
    segments: list[tuple[str, str]]  # (text, TRAINED | PROMPT | CUT), in order
    tokens: int


@dataclass
class DataPreview:
    source: str
    format: str | None
    max_length: int
    overlength: str
    rows: list[PreviewRow] = field(default_factory=list)
    report: TokenizeReport | None = None
    errors: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_total: int = 0  # the rows the source holds (about, from a line count, when only a sample was read)
    sampled: bool = False  # report and errors are of the first rows_read rows only
    note: str | None = None  # what the preview could not do here, and why

    @property
    def over_limit(self) -> int:
        return sum(n > self.max_length for n in self.report.lengths) if self.report else 0

    @property
    def usable_rows(self) -> int:
        """The rows that will train: the sample's share of the whole source when only a sample was tokenized."""
        r = self.report
        if r is None:
            return self.rows_total
        kept = r.rows - r.dropped_overlength - r.dropped_no_trainable
        return round(kept * self.rows_total / self.rows_read) if self.sampled else kept

    @property
    def ok(self) -> bool:
        return not self.errors and self.report is not None and self.report.trainable_tokens > 0

    def verdict(self) -> str:
        """A markdown summary: usable or not, and what happens to rows longer than max_length."""
        if self.report is None and self.note and not self.errors:
            of = f" of about {self.rows_total:,}" if self.rows_read < self.rows_total else ""
            return f"**Data read**: {self.rows_read}{of} rows as **{self.format}** from `{self.source}`. {self.note}."
        if self.report is None:
            return f"**Cannot use {self.source}**"
        r = self.report
        head = "**Data OK**" if self.ok else f"**{len(self.errors)} row(s) cannot be used**"
        if self.sampled:
            head += (
                f" in a sample, the first {self.rows_read:,} of about {self.rows_total:,} rows (the counts below are "
                "the sample's; Start reads and checks every row)"
            )
        over = {
            "truncate": f"{self.over_limit} row(s) exceed max_length {self.max_length} and will be truncated",
            "drop": f"{self.over_limit} row(s) exceed max_length {self.max_length} and will be dropped",
            "error": f"{self.over_limit} row(s) exceed max_length {self.max_length} (overlength: error)",
        }[self.overlength]
        return (
            f"{head}: {r.rows} rows read as **{self.format}** from `{self.source}`; {over}; "
            f"{r.dropped_no_trainable} dropped with no trainable tokens; {r.trainable_tokens:,} trainable tokens."
        )


@functools.lru_cache(maxsize=4)
def _tokenizer(config_yaml: str, path: str):
    """models.load_tokenizer, remembered per (config, path): the preview runs again on every data edit."""
    from trainer.config.run_config import validate_config
    from trainer.model.checks import is_hub_cached
    from trainer.model.load import load_tokenizer

    cfg = validate_config(yaml.safe_load(config_yaml))
    cached = not Path(path).is_dir() and is_hub_cached(path, cfg.model.revision)
    return load_tokenizer(cfg, path, local_only=cached)


def tokenizer_for(cfg: RunConfig):
    """The run's tokenizer (cached between previews); raises ConfigError naming model.name_or_path when the model
    is not on this machine (nor confirmed by the hub), DataError naming the model when its tokenizer cannot load,
    RemoteCodeRefused when it would need the model's own code (the preview runs in the UI server)."""
    from trainer.model.builtin_models import BUILTIN_REAL, cache_root, cached_dir, not_ready_message
    from trainer.model.load import model_path

    spec = BUILTIN_REAL.get(cfg.model.name_or_path)
    if spec is not None and cached_dir(spec, cache_root(cfg.output.runs_dir)) is None:  # never build in a handler
        raise DataError(spec.model_id, [not_ready_message(spec, Path(cfg.output.runs_dir))])
    refuse_remote_code(cfg.model.trust_remote_code, "counting tokens")  # its tokenizer may be the repo's code
    if (problem := model_source_problem(cfg)) is not None:  # at once, not after the hub's download retries
        raise ConfigError([problem])
    path = model_path(cfg)
    try:
        model_only = RunConfig(model=cfg.model).to_yaml()  # only the model section decides the tokenizer
        return _tokenizer(model_only, path)
    except Exception as e:  # offline hub id, missing files, bad repo: all reported the same way
        raise DataError(path, [f"model.name_or_path: cannot load its tokenizer ({type(e).__name__}: {e})"]) from None


def segments_of(tokenizer: Any, example: Example, template: str, max_length: int) -> tuple[list[tuple[str, str]], int]:
    """The rendered example split into trained / masked / cut text, and its token count."""
    if "text" in example:
        text, spans = example["text"], [(0, len(example["text"]))]
    else:
        text, spans = render_with_spans(tokenizer, example["messages"], template)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut_at = offsets[max_length - 1][1] if len(offsets) > max_length else len(text)

    def label(i: int) -> str:
        if i >= cut_at:
            return CUT
        return TRAINED if any(s <= i < e for s, e in spans) else PROMPT

    segments: list[tuple[str, str]] = []
    for i, ch in enumerate(text):
        lab = label(i)
        if segments and segments[-1][1] == lab:
            segments[-1] = (segments[-1][0] + ch, lab)
        else:
            segments.append((ch, lab))
    return segments, len(offsets)


def preview_data(cfg: RunConfig, n_rows: int = 3, roots: list[Path] | None = None) -> DataPreview:
    """Read and tokenize a sample of cfg.data.source as training would (or take the whole source's counts from the
    cache); never raises for bad data, it lists it. roots (the page's) confine the data file; a model with
    trust_remote_code is read but not tokenized."""
    d = cfg.data
    out = DataPreview(source=d.source, format=None, max_length=d.max_length, overlength=d.overlength)
    try:
        src = open_source(d.source, d.subset, d.split, roots)
        out.source = src.name
        out.format, located, out.rows_total = examples_of(src, d, SAMPLE_ROWS)
        out.rows_read = len(located)
        tok = tokenizer_for(cfg)
    except DataError as e:
        out.source, out.errors = e.source, e.problems
        return out
    except RemoteCodeRefused as e:
        out.note = str(e)
        return out
    except ConfigError as e:  # the model, not the data: the rows were read
        out.note = "Tokens not counted: " + "; ".join(e.problems)
        return out
    template = chat_template_of(tok, cfg.model.chat_template)
    found = _tokens(out, tok, src, cfg, template, located)
    out.report, out.errors = found.report, found.problems
    for where, example in located:
        if len(out.rows) == n_rows:
            break
        try:
            segments, tokens = segments_of(tok, example, template, d.max_length)
        except TemplateError:
            continue  # already listed in out.errors
        out.rows.append(PreviewRow(where, segments, tokens))
    return out


def _tokens(out: DataPreview, tok: Any, src: Source, cfg: RunConfig, template: str, located: Located) -> Tokenized:
    """The whole source's tokens when the cache holds them (Start or a job made them), else the sample's."""
    whole = cached_tokens(tok, src, cfg.data, template, cache_dir(cfg.output.runs_dir), REPORT_COLUMNS)
    if whole is not None:
        out.rows_read = out.rows_total = len(whole.columns["outcome"])
        return whole
    _quiet()
    out.sampled = out.rows_read < out.rows_total
    return Tokenized(src.name, out.format, tokenize(tok, located, cfg.data, template).to_dict())


def check_data(cfg: RunConfig, roots: list[Path] | None) -> DataError | None:
    """Every row of the run's data (and eval data) read, converted and tokenized as the job will, through the cache
    of tokenized data that the job then reuses: the problem, or None. A model whose tokenizer the page does not
    load (its own code; not on this machine) has its rows read and converted only."""
    d = cfg.data
    try:
        try:
            tok = tokenizer_for(cfg)
        except (RemoteCodeRefused, ConfigError):
            for source in filter(None, (d.source, d.eval_source)):
                load_examples(source, d, roots)
            return None
        template = chat_template_of(tok, cfg.model.chat_template)
        _quiet()
        prepare_data(tok, d, template, cfg.training.seed, cache_dir(cfg.output.runs_dir), roots)
    except DataError as e:
        return e
    return None


def _quiet() -> None:
    """No datasets progress bars in the UI server's log (a bar per form edit); the page runs no training."""
    from datasets import disable_progress_bars

    disable_progress_bars()


def pin_sources(cfg: RunConfig, roots: list[Path]) -> RunConfig:
    """cfg with data.source and data.eval_source as the absolute files the page checked (hub ids unchanged), so
    the job reads the file that was previewed; DataError for one outside roots or missing."""
    pinned = {}
    for name in ("source", "eval_source"):
        text = getattr(cfg.data, name)
        local = locate(text, roots) if text else None
        if local is not None:
            pinned[name] = str(local)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=pinned)})
