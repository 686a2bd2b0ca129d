"""Data formats convert; malformed input fails with file, line/row and field, before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from trainer.config.run_config import DataSection
from trainer.data.files import DataError
from trainer.data.prepare import load_examples, prepare_data
from trainer.data.tokenization import IGNORE_INDEX

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def prepare(tok, path: Path | str, **data) -> object:
    return prepare_data(tok, DataSection(source=str(path), **data), tok.chat_template, seed=0)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("instructions_alpaca.json", "alpaca"),
        ("instructions_sharegpt.json", "sharegpt"),
        ("instructions_messages.jsonl", "messages"),
        ("sentiment_train.jsonl", "prompt_completion"),
    ],
)
def test_bundled_formats_convert_and_train_only_answers(tok, name: str, fmt: str) -> None:
    prepared = prepare(tok, ROOT / "data" / name, max_length=256)
    assert prepared.format == fmt and prepared.report.rows == len(prepared.train) > 20
    row = prepared.train[0]
    trained = tok.decode([t for t in row.labels if t != IGNORE_INDEX])
    masked = tok.decode([t for t, lab in zip(row.input_ids, row.labels, strict=True) if lab == IGNORE_INDEX])
    assert trained.endswith("<|im_end|>\n") and "<|im_start|>assistant" in masked
    assert "user" in masked and "user" not in trained


def test_alpaca_sharegpt_messages_give_the_same_conversation(tok) -> None:
    ex = {
        n: load_examples(str(ROOT / "data" / n), DataSection())[2][3][1]["messages"]
        for n in ("instructions_alpaca.json", "instructions_sharegpt.json", "instructions_messages.jsonl")
    }
    strip = [m for m in ex["instructions_messages.jsonl"] if m["role"] != "system"]
    assert ex["instructions_alpaca.json"] == ex["instructions_sharegpt.json"] == strip


def test_text_csv_parquet_and_multi_turn(tok, tmp_path: Path) -> None:
    text = prepare(tok, write(tmp_path, "t.jsonl", '{"text": "hello world"}\n{"text": "more text"}\n'))
    assert text.format == "text" and text.train[0].labels == text.train[0].input_ids
    assert text.train[0].input_ids[-1] == tok.eos_token_id
    csv = prepare(tok, write(tmp_path, "a.csv", "instruction,input,output\nSay hi,,hi\nAdd,1 and 2,3\n"))
    assert csv.format == "alpaca" and len(csv.train) == 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a?", "b?"], "completion": ["yes", "no"]}), tmp_path / "p.parquet")
    assert prepare(tok, tmp_path / "p.parquet").format == "prompt_completion"
    turns = [
        {"role": r, "content": c}
        for r, c in [("user", "hi"), ("assistant", "first answer"), ("user", "again"), ("assistant", "second answer")]
    ]
    multi = prepare(tok, write(tmp_path, "m.jsonl", json.dumps({"messages": turns}) + "\n"))
    trained = tok.decode([t for t in multi.train[0].labels if t != IGNORE_INDEX])
    assert "first answer" in trained and "second answer" in trained and "again" not in trained


def test_columns_mapping_and_system_prompt(tok, tmp_path: Path) -> None:
    path = write(tmp_path, "q.jsonl", '{"question": "2+2?", "answer": "4"}\n')
    with pytest.raises(DataError, match=r"line 1: cannot tell the format from the columns \['answer', 'question'\]"):
        prepare(tok, path)
    ok = load_examples(
        str(path), DataSection(columns={"question": "prompt", "answer": "completion"}, system_prompt="Be brief.")
    )
    assert ok[2][0][1]["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": "broken\n', r"bad.jsonl:\n  - line 2: invalid JSON"),
        ("empty.jsonl", "", r"empty.jsonl:\n  - the file is empty"),
        ("blank.jsonl", "\n\n", r"blank.jsonl:\n  - the file holds no rows"),
        (
            "miss.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
            r"line 2: cannot tell|line 2: field 'output' is missing",
        ),
        (
            "alp.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": ""}\n',
            r"line 2: field 'output' is empty",
        ),
        ("cols.jsonl", '{"foo": 1, "bar": 2}\n', r"line 1: cannot tell the format from the columns \['bar', 'foo'\]"),
        (
            "share.json",
            '[{"conversations": [{"from": "robot", "value": "x"}]}]',
            r"row 1: field 'conversations' item 0: unknown 'from' 'robot'",
        ),
        (
            "noasst.jsonl",
            '{"messages": [{"role": "user", "content": "hi"}]}\n',
            r"line 1: field 'messages' has no assistant turn to train on",
        ),
        ("arr.json", '{"a": 1', r"line 1: invalid JSON"),
        ("x.txt", "hello", r"unsupported file type '.txt'"),
        ("short.csv", "instruction,output\nhi,there,extra\n", r"row 1 \(line 2\): more fields than the header's 2"),
        ("num.jsonl", '{"text": 42}\n', r"line 1: field 'text' must be text, got int"),
    ],
)
def test_malformed_input_names_file_line_and_field(tok, tmp_path: Path, name: str, text: str, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        prepare(tok, write(tmp_path, name, text))


def test_unknown_format_and_missing_file(tok, tmp_path: Path) -> None:
    from trainer.config.presets import build_config
    from trainer.config.run_config import ConfigError

    with pytest.raises(ConfigError, match="data.format: Input should be 'auto', 'alpaca', 'sharegpt'"):
        build_config({"data": {"format": "xml"}})
    with pytest.raises(DataError, match=r"nope.jsonl:\n  - file not found"):
        prepare(tok, tmp_path / "nope.jsonl")


def test_overlength_truncate_drop_error(tok, tmp_path: Path) -> None:
    long = {"prompt": "Review: good.", "completion": "positive " * 30}  # answer outlives truncation
    short = {"prompt": "Review: good.", "completion": "positive"}
    answer_cut = {"prompt": "x " * 60, "completion": "positive"}
    path = write(tmp_path, "l.jsonl", "".join(json.dumps(r) + "\n" for r in (short, long, answer_cut)))
    kept = prepare(tok, path, max_length=40)
    assert (kept.report.truncated, kept.report.dropped_no_trainable, len(kept.train)) == (1, 1, 2)
    assert all(len(r.input_ids) <= 40 for r in kept.train)
    dropped = prepare(tok, path, max_length=40, overlength="drop")
    assert (dropped.report.dropped_overlength, len(dropped.train)) == (2, 1)
    with pytest.raises(DataError, match=r"line 2: \d+ tokens, longer than data.max_length 40"):
        prepare(tok, path, max_length=40, overlength="error")


def test_template_that_cannot_format_a_row_is_an_error(tok, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n",
    )
    strict = "{% for m in messages %}{% if m['role'] == 'user' %}{{ raise_exception('no users here') }}{% endif %}{% endfor %}"
    with pytest.raises(DataError, match=r"line 1: the chat template cannot format this row: no users here"):
        prepare_data(tok, DataSection(source=str(path)), strict, seed=0)


def test_val_size_splits_with_the_seed(tok) -> None:
    a = prepare(tok, ROOT / "data/sentiment_train.jsonl", val_size=0.25)
    b = prepare(tok, ROOT / "data/sentiment_train.jsonl", val_size=0.25)
    assert len(a.eval) == 144 and len(a.train) == 432
    assert [r.input_ids for r in a.eval] == [r.input_ids for r in b.eval]


def test_answer_token_straddling_the_generation_prompt_is_trained(tok, tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    path = write(tmp_path, "p.jsonl", '{"prompt": "Review: good.", "completion": "positive"}\n')
    row = prepare_data(tok, DataSection(source=str(path)), template, seed=0).train[0]
    assert "positive" in tok.decode([t for t in row.labels if t != IGNORE_INDEX])


def test_template_that_ends_text_only_after_the_last_turn(tok, tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}<|endoftext|>{% endif %}"
    )
    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "two"},
    ]
    path = write(tmp_path, "m.jsonl", json.dumps({"messages": turns}) + "\n")
    row = prepare_data(tok, DataSection(source=str(path)), template, seed=0).train[0]
    trained = tok.decode([t for t in row.labels if t != IGNORE_INDEX])
    assert "one" in trained and "two" in trained and "b" not in trained.replace("<|im_end|>", "")


def test_json_edge_cases(tok, tmp_path: Path) -> None:
    sep = write(tmp_path, "s.jsonl", json.dumps({"text": "para one\u2028para two"}, ensure_ascii=False) + "\n")
    assert len(prepare(tok, sep).train) == 1
    one = write(
        tmp_path,
        "one.json",
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
    )
    assert prepare(tok, one).format == "messages"
    bad = write(tmp_path, "pc.jsonl", '{"prompt": ["p"], "completion": ["x"]}\n')
    with pytest.raises(DataError, match=r"line 1: field 'messages' item 0 must be an object"):
        prepare(tok, bad)
