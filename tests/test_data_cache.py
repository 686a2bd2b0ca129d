"""Tokenized data is kept on disk by content: the same data under the same settings is tokenized once across the
Start check, the pre-flight and the training process; the page's preview of a large file tokenizes a sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.conftest import ROOT
from trainer.config.presets import load_config
from trainer.config.run_config import DataSection
from trainer.data.cache import cache_dir
from trainer.data.files import DataError, read_file
from trainer.data.prepare import prepare_data
from trainer.plan.data_preview import SAMPLE_ROWS, check_data, preview_data
from trainer.run_dir import read_metrics

ROWS = (ROOT / "data/sentiment_train.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def tok(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def rows_file(path: Path, n: int) -> Path:
    path.write_text("".join(ROWS[i % len(ROWS)] + "\n" for i in range(n)))
    return path


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def test_the_second_prepare_of_the_same_data_is_a_cache_hit(tok, tmp_path: Path) -> None:
    cache, data = tmp_path / "cache", rows_file(tmp_path / "d.jsonl", 40)
    cfg = DataSection(source=str(data), max_length=32, val_size=0.25)
    first = prepare_data(tok, cfg, tok.chat_template, 0, cache)
    assert not first.cached and len(entries(cache)) == 1
    again = prepare_data(tok, cfg, tok.chat_template, 0, cache)
    assert again.cached and len(entries(cache)) == 1
    assert [r.input_ids for r in again.train] == [r.input_ids for r in first.train]
    assert [r.labels for r in again.eval] == [r.labels for r in first.eval]
    assert again.report == first.report and again.format == first.format == "prompt_completion"
    uncached = prepare_data(tok, cfg, tok.chat_template, 0)
    assert uncached.report == first.report and [r.input_ids for r in uncached.train] == [
        r.input_ids for r in first.train
    ]


def test_a_changed_file_max_length_or_template_misses(tok, tmp_path: Path) -> None:
    cache, data = tmp_path / "cache", rows_file(tmp_path / "d.jsonl", 20)
    cfg = DataSection(source=str(data), max_length=32)
    assert not prepare_data(tok, cfg, tok.chat_template, 0, cache).cached
    assert not prepare_data(tok, cfg.model_copy(update={"max_length": 24}), tok.chat_template, 0, cache).cached
    other = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert not prepare_data(tok, cfg, other, 0, cache).cached
    assert prepare_data(tok, cfg, tok.chat_template, 0, cache).cached  # each is kept
    rows_file(data, 21)  # one row more
    assert not prepare_data(tok, cfg, tok.chat_template, 0, cache).cached
    assert len(entries(cache)) == 4


def test_bad_rows_are_not_cached_and_the_overlength_error_is_named_from_the_cache(tok, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(ROWS[0] + "\n" + '{"prompt": "x"}\n')
    with pytest.raises(DataError, match=r"line 2: field 'completion' is missing"):
        prepare_data(tok, DataSection(source=str(bad)), tok.chat_template, 0, cache)
    assert entries(cache) == []
    long = rows_file(tmp_path / "long.jsonl", 3)
    cfg = DataSection(source=str(long), max_length=8, overlength="error")
    for _ in range(2):  # tokenized, then from the cache: the same message, naming each line
        with pytest.raises(DataError, match=r"line 3: \d+ tokens, longer than data.max_length 8"):
            prepare_data(tok, cfg, tok.chat_template, 0, cache)
    assert len(entries(cache)) == 1


FILL = """
import sys, time
from pathlib import Path
from transformers import AutoTokenizer
import trainer.data.cache as data_cache
from trainer.config.run_config import DataSection
from trainer.data.prepare import prepare_data
tok = AutoTokenizer.from_pretrained(sys.argv[1])
go, store = Path(sys.argv[4]), data_cache.store


def store_together(*args):  # both processes have missed and tokenized: they write the one entry at the same moment
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)
    store(*args)


data_cache.store = store_together
data = prepare_data(tok, DataSection(source=sys.argv[2], max_length=32), tok.chat_template, 0, Path(sys.argv[3]))
print("cached" if data.cached else "tokenized", len(data.train))
"""


def test_two_processes_filling_the_cache_at_once_both_succeed(tok, tiny_model: Path, tmp_path: Path) -> None:
    cache, data, go = tmp_path / "cache", rows_file(tmp_path / "d.jsonl", 400), tmp_path / "go"
    args = [sys.executable, "-c", FILL, str(tiny_model), str(data), str(cache), str(go)]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2, [p.stderr.read()[-2000:] for p in procs]
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.split() for out, _ in outs] == [["tokenized", "400"]] * 2
    assert len(entries(cache)) == 1 and not any(n.startswith(".tmp") for n in entries(cache))
    here = prepare_data(tok, DataSection(source=str(data), max_length=32), tok.chat_template, 0, cache)
    assert here.cached and len(here.train) == 400  # this process's key is theirs


def test_the_preview_of_a_large_file_tokenizes_a_sample_and_says_so(make_config, tmp_path: Path) -> None:
    data = rows_file(tmp_path / "big.jsonl", 5000)
    cfg = load_config(make_config({"data": {"source": str(data), "max_samples": None}}))
    preview = preview_data(cfg)
    assert preview.sampled and preview.rows_read == SAMPLE_ROWS and preview.rows_total == 5000
    assert preview.report.rows == SAMPLE_ROWS and len(preview.report.lengths) == SAMPLE_ROWS
    assert f"in a sample, the first {SAMPLE_ROWS} of about 5,000 rows" in preview.verdict(), preview.verdict()
    assert preview.usable_rows == 5000  # the sample's share, scaled: every row of this data trains
    assert entries(cache_dir(cfg.output.runs_dir)) == []  # a form edit writes no cache

    assert check_data(cfg, None) is None  # Start: every row, into the cache
    whole = preview_data(cfg)
    assert not whole.sampled and whole.report.rows == whole.rows_read == 5000
    assert "sample" not in whole.verdict() and "5000 rows read" in whole.verdict()


def test_start_checks_every_row_the_sample_did_not_reach(make_config, tmp_path: Path) -> None:
    data = rows_file(tmp_path / "big.jsonl", 1000)
    with data.open("a") as f:
        f.write('{"prompt": "no answer"}\n')
    cfg = load_config(make_config({"data": {"source": str(data), "max_samples": None}}))
    assert preview_data(cfg).ok  # the first rows are fine
    problem = check_data(cfg, None)
    assert problem is not None and problem.problems == ["line 1001: field 'completion' is missing"]


def test_the_training_run_reuses_the_start_checks_tokens(make_config, capsys) -> None:
    from tests.conftest import only_run
    from trainer.run.train import run_training

    cfg_path = make_config({"training": {"max_steps": 1}})
    cfg = load_config(cfg_path)
    assert check_data(cfg, None) is None
    assert len(entries(cache_dir(cfg.output.runs_dir))) == 1
    assert run_training(str(cfg_path)) == 0
    assert "data: tokens from the cache in" in capsys.readouterr().out
    events = [x for x in read_metrics(only_run(Path(cfg.output.runs_dir)) / "metrics.jsonl") if x["kind"] == "event"]
    assert [x["tokens_cached"] for x in events if x.get("event") == "data"] == [True]


def test_a_sample_read_stops_early_and_keeps_whole_rows(tmp_path: Path) -> None:
    lines = tmp_path / "d.jsonl"
    rows_file(lines, 500)
    rows, total = read_file(lines, 50)
    assert [r.where for r in rows] == [f"line {i}" for i in range(1, 51)] and total == 500
    multi = tmp_path / "m.csv"
    multi.write_text("prompt,completion\n" + "".join(f'"q{i}\nstill q{i}",a{i}\n' for i in range(300)))
    rows, total = read_file(multi, 100)
    whole, n = read_file(multi)
    assert n == 300 and 0 < len(rows) <= 100 and [r.data for r in rows] == [r.data for r in whole[: len(rows)]]
    assert total >= 300  # about: lines, not rows, were counted
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"row {i}" for i in range(300)]}), tmp_path / "p.parquet")
    rows, total = read_file(tmp_path / "p.parquet", 20)
    assert [r.data["text"] for r in rows] == [f"row {i}" for i in range(20)] and total == 300
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"text": f"t{i}"} for i in range(30)]))
    rows, total = read_file(array, 5)
    assert len(rows) == 5 and total == 30


@pytest.mark.parametrize("damage", ["cut arrow", "bad meta", "meta without format", "rows removed", "other rows"])
def test_a_damaged_cache_entry_is_tokenized_again_and_replaced(tok, tmp_path: Path, damage: str) -> None:
    """A cut, edited or swapped entry never fails a run nor feeds it other rows: it is rebuilt from the file."""
    import shutil

    cache, data = tmp_path / "cache", rows_file(tmp_path / "d.jsonl", 40)
    cfg = DataSection(source=str(data), max_length=32)
    first = prepare_data(tok, cfg, tok.chat_template, 0, cache)
    (entry,) = (cache / name for name in entries(cache))
    if damage == "cut arrow":
        arrow = next((entry / "rows").glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    elif damage == "bad meta":
        (entry / "meta.json").write_text("garbage{")
    elif damage == "meta without format":
        (entry / "meta.json").write_text("{}")
    elif damage == "rows removed":
        shutil.rmtree(entry / "rows")
    else:  # another entry's rows (fewer) under this key
        small = prepare_data(tok, cfg.model_copy(update={"max_samples": 5}), tok.chat_template, 0, cache)
        assert small.report.rows == 5
        other = next(cache / n for n in entries(cache) if cache / n != entry)
        shutil.rmtree(entry / "rows")
        shutil.copytree(other / "rows", entry / "rows")
    again = prepare_data(tok, cfg, tok.chat_template, 0, cache)
    assert not again.cached and again.report == first.report
    assert [r.input_ids for r in again.train] == [r.input_ids for r in first.train]
    assert prepare_data(tok, cfg, tok.chat_template, 0, cache).cached  # replaced: the next one hits


def test_a_same_size_edit_with_its_mtime_put_back_is_a_new_key(tok, tmp_path: Path) -> None:
    """The server remembers file hashes by their stat: a same-size edit under `touch -r` still changes ctime."""
    import os

    cache, data = tmp_path / "cache", rows_file(tmp_path / "d.jsonl", 20)
    cfg = DataSection(source=str(data), max_length=32)
    before = prepare_data(tok, cfg, tok.chat_template, 0, cache)
    st = data.stat()
    text = data.read_text()
    data.write_text(text.replace("positive", "zqxjvkwy"))  # same length
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data.stat().st_size == st.st_size and data.stat().st_mtime_ns == st.st_mtime_ns
    after = prepare_data(tok, cfg, tok.chat_template, 0, cache)
    assert not after.cached and len(entries(cache)) == 2
    assert after.report.trainable_tokens != before.report.trainable_tokens or after.train != before.train
