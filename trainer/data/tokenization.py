"""Examples -> token ids and labels: the chat template renders, only assistant tokens are trained.

Written here rather than left to TRL so that masks, truncation counts and dropped rows are known before
training (and shown in the UI's preview). Assistant spans are found by rendering the conversation up to
each assistant turn: the text between "prompt so far + generation prompt" and "conversation through this
turn" is that turn's answer, end-of-turn token included, so the model learns to stop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from trainer.data.formats import Example

IGNORE_INDEX = -100
# ChatML, used when neither the tokenizer nor the config provides a chat template.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """The chat template cannot render a row the way training needs."""


@dataclass
class TokenizedRow:
    input_ids: list[int]
    labels: list[int]


# What became of a row: KEPT ones are trained; the two problems are bad input (listed by line), the rest are counted.
KEPT = ("kept", "truncated")
OUTCOMES = (*KEPT, "dropped_overlength", "dropped_no_trainable", "too_long", "unformattable")


@dataclass
class TokenizeReport:
    rows: int = 0
    truncated: int = 0
    dropped_overlength: int = 0
    dropped_no_trainable: int = 0
    lengths: list[int] = field(default_factory=list)  # untruncated token counts, for histograms
    trainable_tokens: int = 0

    def summary(self) -> str:
        return (
            f"{self.rows} rows: {self.truncated} truncated to max_length, {self.dropped_overlength} dropped as "
            f"too long, {self.dropped_no_trainable} dropped with no trainable tokens left; "
            f"{self.trainable_tokens} trainable tokens"
        )

    @classmethod
    def of(cls, outcomes: list[str], lengths: list[int | None], trainable: list[int]) -> TokenizeReport:
        """The counts of tokenized rows from their outcome, untruncated length and trainable tokens (tokenize_row's)."""
        report = cls()
        for outcome, length, n in zip(outcomes, lengths, trainable, strict=True):
            if outcome == "unformattable":  # never tokenized: no length to count
                continue
            report.rows += 1
            report.lengths.append(length)
            report.truncated += outcome == "truncated"
            report.dropped_overlength += outcome == "dropped_overlength"
            report.dropped_no_trainable += outcome == "dropped_no_trainable"
            report.trainable_tokens += n
        return report


def chat_template_of(tokenizer: Any, override: str | None) -> str:
    return override or getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE


def render_with_spans(tokenizer: Any, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant answers."""

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=template)

    try:
        full = render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            # Some templates add end-of-text only after the last turn (Phi-3): the answer ends where the
            # rendering through this turn stops agreeing with the whole conversation.
            end = len(os.path.commonprefix([through, full]))
            if not (through.startswith(before) and full.startswith(before) and end > len(before)):
                raise TemplateError(
                    f"the chat template does not render turn {i} as a prefix of the conversation "
                    "(it rewrites earlier turns), so its answer cannot be located; use data.format text "
                    "or another chat template"
                )
            spans.append((len(before), end))
    except TemplateError:
        raise
    except Exception as e:  # jinja raises TemplateError/TypeError/... for rows the template rejects
        raise TemplateError(f"the chat template cannot format this row: {e}") from None
    return full, spans


def tokenize_example(tokenizer: Any, example: Example, template: str) -> TokenizedRow:
    """Token ids and labels (-100 outside assistant answers) of one canonical example."""
    if "text" in example:
        ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        return TokenizedRow(ids, list(ids))
    text, spans = render_with_spans(tokenizer, example["messages"], template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(start < e and end > s for s, e in spans) else IGNORE_INDEX  # overlap: a token may straddle
        for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return TokenizedRow(enc["input_ids"], labels)


def apply_overlength(row: TokenizedRow, max_length: int, policy: str) -> TokenizedRow | None:
    """Truncate (or drop) a row longer than max_length; None means drop."""
    if len(row.input_ids) <= max_length:
        return row
    if policy == "drop":
        return None
    return TokenizedRow(row.input_ids[:max_length], row.labels[:max_length])


def tokenize_row(tokenizer: Any, where: str, example: Example, limits: tuple[int, str], template: str) -> dict:
    """One example under limits (max_length, overlength policy): input_ids, labels, untruncated length, trainable
    token count, outcome (one of OUTCOMES) and the problem, for a row that is bad input, naming its location."""
    max_length, policy = limits
    try:
        row = tokenize_example(tokenizer, example, template)
    except TemplateError as e:
        return _outcome("unformattable", None, problem=f"{where}: {e}")
    length = len(row.input_ids)
    if length > max_length and policy == "error":
        problem = (
            f"{where}: {length} tokens, longer than data.max_length {max_length} "
            "(raise max_length, or set data.overlength to truncate or drop)"
        )
        return _outcome("too_long", length, problem=problem)
    kept = apply_overlength(row, max_length, policy)
    if kept is None:
        return _outcome("dropped_overlength", length)
    trainable = sum(1 for x in kept.labels if x != IGNORE_INDEX)
    if trainable == 0:  # never train a prompt-only row
        return _outcome("dropped_no_trainable", length)
    outcome = "truncated" if length > max_length else "kept"
    return _outcome(outcome, length, kept.input_ids, kept.labels, trainable)


def _outcome(
    outcome: str,
    length: int | None,
    ids: list[int] | None = None,
    labels: list[int] | None = None,
    trainable: int = 0,
    problem: str = "",
) -> dict:
    return {
        "input_ids": ids or [],
        "labels": labels or [],
        "length": length,
        "trainable": trainable,
        "outcome": outcome,
        "problem": problem,
    }
