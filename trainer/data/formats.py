"""Detecting a dataset's format and converting each row to one canonical example.

Every format becomes either `{"messages": [{"role", "content"}, ...]}` (loss on assistant turns only)
or `{"text": str}` (loss on every token). A row's optional `facts` (what a correct free-text answer must state,
scored by `lora-workbench evaluate`) rides along as `example["facts"]`; training ignores it.
"""

from __future__ import annotations

from typing import Any

from trainer.data.files import DataError, Row

Example = dict[str, Any]

FORMAT_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "model": "assistant",
}
CHAT_ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """One row's problem: the field and what was expected."""


def detect_format(row: Row) -> str:
    keys = set(row.data)
    for fmt, cols in FORMAT_COLUMNS.items():
        if set(cols) <= keys:
            return fmt
    expected = "; ".join(f"{f}: {', '.join(c)}" for f, c in FORMAT_COLUMNS.items())
    raise RowError(
        f"cannot tell the format from the columns {sorted(keys)} (expected {expected}); "
        "set data.format, and data.columns to map your column names"
    )


def rename_columns(row: Row, columns: dict[str, str]) -> Row:
    if not columns:
        return row
    return Row(row.where, {columns.get(k, k): v for k, v in row.data.items()})


def convert_rows(rows: list[Row], fmt: str, source: str, system_prompt: str | None = None) -> list[Example]:
    """Convert every row, collecting all row errors into one DataError."""
    examples, problems = [], []
    for row in rows:
        try:
            example = CONVERTERS[fmt](row.data)
            if facts := _facts(row.data):
                example["facts"] = facts
            if system_prompt and "messages" in example and example["messages"][0]["role"] != "system":
                example["messages"].insert(0, {"role": "system", "content": system_prompt})
            examples.append(example)
        except RowError as e:
            problems.append(f"{row.where}: {e}")
    if problems:
        raise DataError(source, problems)
    return examples


def _text(data: dict, field: str, *, required: bool = True) -> str:
    value = data.get(field)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN (empty CSV/parquet cell)
        if required:
            raise RowError(f"field '{field}' is missing")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{field}' must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise RowError(f"field '{field}' is empty")
    if not _encodes(value):
        raise RowError(f"field '{field}' holds an invalid character (a lone UTF-16 surrogate)")
    return value


def _encodes(text: str) -> bool:
    """False for text with a lone UTF-16 surrogate (JSON's "\\ud800"), which no tokenizer or Arrow column takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _facts(data: dict) -> list[list[str]] | None:
    """The row's `facts` as lists of accepted alternatives: each fact a string or a list of strings."""
    facts = data.get("facts")
    if facts is None or facts == "" or facts == []:  # no facts, or an empty CSV/parquet cell
        return None
    if not isinstance(facts, list | str):
        raise RowError(
            f"field 'facts' must be a list of texts or of lists of alternatives, not {type(facts).__name__}"
        )
    out = []
    for i, fact in enumerate([facts] if isinstance(facts, str) else facts):
        alternatives = [fact] if isinstance(fact, str) else fact
        if not isinstance(alternatives, list) or not alternatives or not all(_is_text(a) for a in alternatives):
            raise RowError(f"field 'facts' item {i} must be non-empty text or a list of non-empty texts")
        out.append(alternatives)
    return out


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def from_alpaca(data: dict) -> Example:
    instruction, inp = _text(data, "instruction"), _text(data, "input", required=False)
    output = _text(data, "output")
    messages = []
    if system := _text(data, "system", required=False):
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(data.get("history") or []):
        if not (
            isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) and _encodes(t) for t in turn)
        ):
            raise RowError(f"field 'history' item {i} must be a [question, answer] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


def from_sharegpt(data: dict) -> Example:
    turns = data.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowError("field 'conversations' must be a non-empty list of {from, value} objects")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(f"field 'conversations' item {i} must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise RowError(
                f"field 'conversations' item {i}: unknown 'from' {turn['from']!r} "
                f"(expected one of {', '.join(SHAREGPT_ROLES)})"
            )
        messages.append({"role": role, "content": turn["value"]})
    return {"messages": check_messages(messages, "conversations")}


def from_messages(data: dict) -> Example:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"field 'messages' item {i} must be an object with 'role' and 'content'")
    return {"messages": check_messages([{"role": m["role"], "content": m["content"]} for m in messages], "messages")}


def from_prompt_completion(data: dict) -> Example:
    prompt, completion = data.get("prompt"), data.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
        return from_messages({"messages": prompt + completion})
    prompt, completion = _text(data, "prompt"), _text(data, "completion")
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion.strip()}]}


def from_text(data: dict) -> Example:
    return {"text": _text(data, "text")}


def check_messages(messages: list[dict], field: str) -> list[dict]:
    """Roles known, contents non-empty text, and at least one assistant turn to learn from."""
    for i, m in enumerate(messages):
        if m["role"] not in CHAT_ROLES:
            raise RowError(f"field '{field}' item {i}: unknown role {m['role']!r} (expected {', '.join(CHAT_ROLES)})")
        if not isinstance(m["content"], str):
            raise RowError(f"field '{field}' item {i}: content must be text, got {type(m['content']).__name__}")
        if not _encodes(m["content"]):
            raise RowError(f"field '{field}' item {i}: content holds an invalid character (a lone UTF-16 surrogate)")
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError(f"field '{field}' item {i}: assistant content is empty")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(f"field '{field}' has no assistant turn to train on")
    return messages


CONVERTERS = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "prompt_completion": from_prompt_completion,
    "text": from_text,
}
