"""MetricsTail reads only what was appended and waits for half-written lines."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.metrics_reader import MetricsTail
from trainer.run_dir import RunDir


def test_tail_reads_appended_lines_once_and_waits_for_partial_ones(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    tail = MetricsTail(run.metrics_file)
    assert tail.poll() == []  # no file yet
    run.append_metric("train", 1, loss=2.0)
    run.append_metric("system", 1, cpu_rss_gb=0.5)
    assert [x["kind"] for x in tail.poll()] == ["train", "system"]
    assert tail.poll() == []
    with open(run.metrics_file, "a") as f:  # a writer caught mid-line
        f.write('{"step": 2, "time": 1.0, "kind": "train", "lo')
    assert tail.poll() == []
    with open(run.metrics_file, "a") as f:
        f.write('ss": 1.5, "future_key": 1}\nnot json\n["a list"]\n')
    new = tail.poll()
    assert len(new) == 1 and new[0]["loss"] == 1.5 and new[0]["future_key"] == 1
    assert [x["step"] for x in tail.lines] == [1, 1, 2]
    assert tail.offset == run.metrics_file.stat().st_size
    run.close()


def test_tail_matches_a_full_read(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "time": float(i), "kind": "train", "loss": 1 / (i + 1)} for i in range(50)]
    tail = MetricsTail(path)
    for i, row in enumerate(rows):
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if i % 7 == 0:
            tail.poll()
    tail.poll()
    assert tail.lines == rows
