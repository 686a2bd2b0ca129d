"""The free-text `facts` score and the bundled persona data: facts match case-insensitively with alternatives,
held-out rows keep their facts through the loader, and build_samples.py writes the same files every time with
no held-out question seen in training. No model is loaded."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from app.views.side_jobs import EVAL_HEADERS, EXAMPLE_HEADERS, eval_examples, eval_rows
from trainer.config.run_config import DataSection
from trainer.data.files import DataError
from trainer.data.prepare import load_examples
from trainer.export.evaluate import generate_batches, metrics, missing_facts, print_summary, row_result

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


def chat(question: str, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]} | extra


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_missing_facts_takes_alternatives_and_ignores_case_and_spacing() -> None:
    answer = "I'm QUILL, made by tern  labs in Lisboa."
    assert missing_facts(answer, ["Quill", "Tern Labs", ["Lisbon", "Lisboa"]]) == []
    assert missing_facts(answer, [["fine-tune", "fine-tuning"], "Quill", "Porto"]) == ["fine-tune", "Porto"]
    assert missing_facts("", ["Quill"]) == ["Quill"]
    assert missing_facts("anything", []) == []


def test_facts_score_counts_only_rows_with_facts_and_needs_every_fact() -> None:
    examples = [
        chat("Who are you?", "I'm Quill.", facts=[["Quill"]]),
        chat("Who made you?", "Tern Labs.", facts=[["Tern Labs"], ["Lisbon"]]),
        chat("2 + 2?", "4"),
    ]
    m = metrics(examples, ["i am quill", "Tern Labs made me.", "4"], loss=0.5)
    assert m["facts"] == 0.5 and m["exact_match"] == round(1 / 3, 4) and m["perplexity"] == 1.649
    assert "facts" not in metrics(examples[2:], ["5"], loss=1.0)


def test_generate_batches_group_similar_prompts_within_the_row_and_token_limits() -> None:
    lengths = [40, 12, 900, 41, 13, 3000, 39]
    batches = generate_batches(lengths, rows=3, tokens=2048)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every prompt, once
    assert batches == [[1, 4, 6], [0, 3], [2], [5]]  # shortest first; 3 x 900 tokens would pass 2048
    assert all(len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 2048) for b in batches)
    assert generate_batches([60 + 32] * 28) == [list(range(28))]  # the persona held-out set, 32 new tokens: one call
    assert len(generate_batches([60 + 512] * 28)) == 4  # long answers: fewer rows a call (7 x 572 <= 4096)
    assert generate_batches([]) == []


def test_row_result_says_what_each_answer_missed() -> None:
    row = row_result(
        chat("Who made you?", "Tern Labs.", facts=[["Tern Labs"], ["Lisbon"]]), "Hugging Face", "Tern Labs"
    )
    assert row["question"] == "Who made you?" and row["reference"] == "Tern Labs."
    assert row["base_missing"] == ["Tern Labs", "Lisbon"] and row["adapter_missing"] == ["Lisbon"]
    assert row["base_hit"] is row["adapter_hit"] is False
    plain = row_result(chat("2 + 2?", "4"), "5", "4")
    assert (plain["base_hit"], plain["adapter_hit"]) == (False, True) and "facts" not in plain


def test_persona_heldout_loads_with_its_facts() -> None:
    name, fmt, located = load_examples(str(DATA / "persona_heldout.jsonl"), DataSection())
    assert fmt == "messages" and len(located) == len(read_jsonl(DATA / "persona_heldout.jsonl")) >= 20
    for _, ex in located:
        assert ex["facts"] and all(isinstance(f, list) and f for f in ex["facts"])
        assert missing_facts(ex["messages"][-1]["content"], ex["facts"]) == []  # each reference states its facts
    _, _, train = load_examples(str(DATA / "persona_train.jsonl"), DataSection())
    assert 120 <= len(train) <= 200 and not any("facts" in ex for _, ex in train)


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({"a": 1}, "field 'facts' must be a list of texts or of lists of alternatives, not dict"),
        ([["Quill", 3]], "field 'facts' item 0 must be non-empty text"),
        (["Quill", []], "field 'facts' item 1 must be non-empty text"),
    ],
)
def test_malformed_facts_name_the_line_and_field(tmp_path: Path, facts: object, expected: str) -> None:
    path = tmp_path / "heldout.jsonl"
    path.write_text(json.dumps(chat("q", "a", facts=["ok"])) + "\n" + json.dumps(chat("q", "a", facts=facts)) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(str(path), DataSection())
    (problem,) = err.value.problems
    assert problem.startswith(f"line 2: {expected}") and str(path) in str(err.value)


def test_empty_or_single_text_facts_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "heldout.jsonl"
    rows = [chat("q", "a", facts=[]), chat("q", "a", facts=None), chat("q", "a", facts="Quill")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    facts = [ex.get("facts") for _, ex in load_examples(str(path), DataSection())[2]]
    assert facts == [None, None, [["Quill"]]]


def _build_samples():
    spec = importlib.util.spec_from_file_location("build_samples", DATA / "build_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_samples_rewrites_the_bundled_files_byte_for_byte(tmp_path: Path, monkeypatch) -> None:
    build = _build_samples()
    monkeypatch.setattr(build, "HERE", tmp_path)
    build.main()
    written = sorted(p.name for p in tmp_path.iterdir())
    assert "persona_train.jsonl" in written and "persona_heldout.jsonl" in written
    for name in written:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"data/{name} is stale: re-run the script"


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def test_heldout_questions_are_never_training_questions() -> None:
    train = [_normal(r["messages"][0]["content"]) for r in read_jsonl(DATA / "persona_train.jsonl")]
    heldout = [_normal(r["messages"][0]["content"]) for r in read_jsonl(DATA / "persona_heldout.jsonl")]
    assert len(set(heldout)) == len(heldout)
    seen = [h for h in heldout if any(h in t for t in train)]  # also not inside a training question
    assert seen == []


def test_eval_views_add_the_facts_column_and_examples(capsys) -> None:
    score = {"exact_match": 0.0, "loss": 2.0, "perplexity": 7.389}
    result = {
        "rows": 2,
        "data": "data/persona_heldout.jsonl",
        "facts_rows": 1,
        "base": score | {"facts": 0.0},
        "adapter": score | {"facts": 1.0},
        "examples": [
            row_result(
                chat("Who are you?", "I'm Quill.", facts=[["Quill"], ["Tern Labs", "Tern"]]), "SmolLM", "Quill of Tern"
            ),
            row_result(chat("2 + 2?", "4"), "4", "4"),
        ],
    }
    assert eval_rows(result) == [["base", "0.0%", 2.0, 7.389, "0.0%"], ["adapter", "0.0%", 2.0, 7.389, "100.0%"]]
    assert len(eval_rows(result)[0]) == len(EVAL_HEADERS)
    examples = eval_examples(result)
    assert examples[0] == ["Who are you?", "Quill; Tern Labs / Tern", "SmolLM", "no", "Quill of Tern", "yes"]
    assert examples[1][1:4] == ["exactly: 4", "4", "yes"] and len(examples[1]) == len(EXAMPLE_HEADERS)
    assert eval_examples(None) == [] and eval_examples({"rows": 1}) == []
    print_summary(result)
    out = capsys.readouterr().out
    assert "(1 with facts)" in out and "facts" in out.splitlines()[1] and "100.0%" in out
    assert "Q: Who are you?" in out and "adapter miss" not in out and "2 + 2" not in out
