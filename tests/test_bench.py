"""The benchmark harness: the plain-TRL reference script, the arithmetic and table, and one small bench run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from tests.conftest import ROOT
from trainer.bench import bench
from trainer.bench import report as bench_report
from trainer.bench.bench import Case
from trainer.bench.report import Measure
from trainer.cli import main as cli_main
from trainer.config.presets import build_config


def load_reference():
    spec = importlib.util.spec_from_file_location("reference_trl", ROOT / "benchmarks" / "reference_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_script_trains_and_writes_its_measurements(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "ref.json"
    argv = ["--model", str(tiny_model), "--data", str(ROOT / "data/sentiment_train.jsonl"), "--max-length", "48"]
    argv += [
        "--steps",
        "3",
        "--batch",
        "4",
        "--r",
        "4",
        "--alpha",
        "8",
        "--warmup",
        "1",
        "--no-gradient-checkpointing",
    ]
    load_reference().main(argv + ["--output-dir", str(tmp_path / "out"), "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["steps"] == 3 and len(r["step_times_s"]) == 3 and len(r["tokens_per_step"]) == 3
    assert r["tokens_per_second"] > 0 and r["mean_step_s"] > 0 and r["train_wall_s"] > 0
    assert sum(r["tokens_per_step"]) == r["tokens"] > 0
    assert math.isfinite(r["first_loss"]) and r["peak_mem_gb"] > 0
    assert r["trainable_params"] > 0 and r["settings"]["optim"] == "adamw_torch"


def test_reference_trains_the_last_assistant_turn_of_every_format() -> None:
    ref = load_reference()
    pc = ref.to_prompt_completion({"prompt": "Review: bad.\nSentiment:", "completion": " negative"})
    assert pc == {
        "prompt": [{"role": "user", "content": "Review: bad.\nSentiment:"}],
        "completion": [{"role": "assistant", "content": "negative"}],  # stripped, as the workbench does
    }
    alpaca = ref.to_prompt_completion({"instruction": "Add.", "input": "1 and 2", "output": "3"})
    assert alpaca["prompt"] == [{"role": "user", "content": "Add.\n\n1 and 2"}]
    sharegpt = ref.to_prompt_completion(
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    )
    assert sharegpt["completion"] == [{"role": "assistant", "content": "yo"}]


def test_summary_ratio_and_mfu_arithmetic() -> None:
    # 5 steps of 1 s ending at t = 11..15 after t0 = 10; 100 tokens per step; the first 2 are warm-up.
    wall, step_s, tps = bench_report.summarize(10.0, [11, 12, 13, 14, 15], [100, 200, 300, 400, 500], warmup=2)
    assert (wall, step_s, tps) == (5.0, 1.0, 100.0)
    wall, step_s, tps = bench_report.summarize(0.0, [3.0, 4.0, 6.0], [50, 150, 350], warmup=1)
    assert (wall, step_s, tps) == (6.0, 1.5, 100.0)
    assert bench_report.summarize(0.0, [2.0], [10], warmup=3)[1:] == (2.0, 5.0)  # too few steps: keep the last one
    assert (
        bench_report.ratio(3.0, 2.0) == 1.5
        and bench_report.ratio(None, 2.0) is None
        and bench_report.ratio(1.0, 0.0) is None
    )
    # 4·N + 6·N_lora + 12·L·d·s: N = 1e9, N_lora = 1e7, L = 24, d = 1024, s = 512
    flops = bench_report.flops_per_token(10**9, 10**7, 24, 1024, 512)
    assert flops == 4e9 + 6e7 + 12 * 24 * 1024 * 512
    assert bench_report.mfu(10_000, flops, 989.4e12) == pytest.approx(10_000 * flops / 989.4e12)
    assert bench_report.mfu(None, flops, 1e12) is None and bench_report.mfu(1.0, flops, None) is None
    assert (
        bench_report.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
        and bench_report.peak_flops("NVIDIA H100 PCIe") == 756e12
    )
    assert bench_report.peak_flops("NVIDIA L40S") == 362e12 and bench_report.peak_flops("cpu") is None


def test_table_rows_show_ratios_to_the_reference() -> None:
    runs = {
        "a": Measure(wall_s=10.0, cpu_s=8.0, step_s=0.5, tokens_per_s=1000.0, peak_gb=2.0, first_loss=1.25),
        "b": Measure(10.4, 8.2, 0.52, 960.0, peak_gb=2.0, first_loss=1.25, predicted_gb=2.5),
        "c": Measure(error="exit 1, see c.log"),
    }
    rows = bench_report.table_rows("m-lora-512", runs, flops=1e9, peak=1e12)
    a, b, c = ([x.strip() for x in row.strip("|").split("|")] for row in rows)
    assert a[:2] == ["m-lora-512", "(a) plain TRL"]
    assert a[2:] == ["1,000", "500.0", "10.00", "8.00", "2.000", "100.0", "1.00", "1.000", "1.000", "1.2500", "n/a"]
    assert b[2:] == ["960", "520.0", "10.40", "8.20", "2.000", "96.0", "0.96", "1.040", "1.025", "1.2500", "+25"]
    assert c[:3] == ["m-lora-512", "(c) workbench defaults", "failed: exit 1, see c.log"]
    assert all(row.count("|") == bench_report.TABLE_HEAD.splitlines()[0].count("|") for row in rows)
    lines = bench_report.findings([("x", runs), ("y", {**runs, "b": Measure(wall_s=9.0, tokens_per_s=1.0)})])
    assert lines == [
        "(b)/(a) training wall time: median 0.970, range 0.900 to 1.040 over 2 cases",
        "(b)/(a) training CPU time: median 1.025, range 1.025 to 1.025 over 1 cases",
    ]


def test_cpu_clock_interpolates_the_cpu_time_of_a_window() -> None:
    clock = bench.CpuClock.__new__(bench.CpuClock)  # samples only, no sampling thread
    clock.samples = [(10.0, 0.0), (11.0, 0.5), (12.0, 1.5)]
    assert clock.at(10.5) == 0.25 and clock.between(10.5, 11.5) == 0.75
    assert clock.at(9.0) is None and clock.between(10.0, 13.0) is None


def test_median_of_repeats_skips_failed_runs() -> None:
    runs = [
        Measure(wall_s=3.0, peak_gb=1.0),
        Measure(error="x"),
        Measure(wall_s=1.0, peak_gb=1.0),
        Measure(wall_s=2.0),
    ]
    m = bench_report.median_measure(runs)
    assert (m.wall_s, m.peak_gb, m.step_s, m.error) == (2.0, 1.0, None, None)
    assert bench_report.median_measure([Measure(error="x")]).error == "x"


def test_workbench_measure_reads_metrics_and_the_memory_estimate(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "20260101-000000-x"
    run.mkdir(parents=True)
    lines = [{"step": 0, "time": 100.0, "kind": "event", "event": "model_loaded"}]
    lines.append({"step": 0, "time": 100.0, "kind": "event", "event": "memory_estimate", "predicted_peak_gb": 0.75})
    for step in range(1, 6):  # 2 s per step at 50 tokens/s: 100 tokens a step
        lines.append(
            {"step": step, "time": 100.0 + 2 * step, "kind": "train", "loss": 2.0 / step, "tokens_per_second": 50}
        )
        lines.append({"step": step, "time": 100.0 + 2 * step, "kind": "system", "gpu_mem_peak_gb": 0.4 + step / 10})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (run / "status.json").write_text(json.dumps({"state": "completed"}))
    m = bench.workbench_measure(tmp_path / "runs", 0, tmp_path / "log", warmup=2)
    assert (m.wall_s, m.step_s, m.tokens_per_s, m.first_loss) == (10.0, 2.0, 50.0, 2.0)
    assert (m.peak_gb, m.predicted_gb) == (pytest.approx(0.9), 0.75)
    rename = {"gpu_mem_peak_gb": "cpu_rss_gb"}
    cpu_lines = [{rename.get(k, k): v for k, v in x.items()} for x in lines]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in cpu_lines) + "\n")
    m = bench.workbench_measure(tmp_path / "runs", 0, tmp_path / "log", warmup=2)
    assert (m.peak_gb, m.predicted_gb) == (pytest.approx(0.9), None)  # a GPU prediction is not compared with RSS
    assert bench.workbench_measure(tmp_path / "runs", 1, Path("x.log"), 2).error == "exit 1, see x.log"


def test_case_selection_by_name_or_prefix() -> None:
    cpu = bench.matrix("cpu")
    assert [c.name for c in bench.select(cpu, "tiny-lora")] == ["tiny-lora-64", "tiny-lora-256"]
    assert [c.name for c in bench.select(cpu, "tiny-lora-64, small-qlora-256")] == ["tiny-lora-64", "small-qlora-256"]
    assert bench.select(cpu, "tiny-lo") == [] and len(bench.select(cpu, None)) == 8
    assert {c.model for c in bench.matrix("gpu")} == {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.1-8b"}
    assert {(c.quant, c.max_length) for c in bench.matrix("gpu")} == {
        (q, n) for q in (False, True) for n in (512, 2048)
    }


REAL_NAMES = ["smollm2-lora-256", "smollm2-qlora-256", "smollm2-lora-1024", "smollm2-qlora-1024"]


def test_real_model_cases_are_picked_by_name_from_either_matrix() -> None:
    assert bench.resolve_cases("cpu", None, cuda=False)[0] == bench.matrix("cpu")  # the cpu matrix as before
    assert not any(c.model == "smollm2" for c in bench.matrix("cpu") + bench.matrix("gpu"))
    cases, pool = bench.resolve_cases("cpu", "smollm2", cuda=False)
    assert [c.name for c in cases] == REAL_NAMES and len(pool) == 12 and cases == bench.matrix("real")
    assert {c.max_length: (c.batch, c.accum, c.steps) for c in cases} == {256: (2, 1, 10), 1024: (1, 1, 10)}
    picked = bench.resolve_cases("cpu", "tiny-lora-64, smollm2-qlora-1024", cuda=False)[0]
    assert [c.name for c in picked] == ["tiny-lora-64", "smollm2-qlora-1024"]
    gpu = bench.resolve_cases("gpu", "smollm2-lora", cuda=True)[0]
    assert [(c.name, c.batch) for c in gpu] == [("smollm2-lora-256", 8), ("smollm2-lora-1024", 8)]
    assert bench.resolve_cases("real", "tiny", cuda=False)[0] == []
    assert bench.steps_note({"a": 60, "b": 60}) == "60 steps, the first 3 left out of step time and tokens/s"
    assert bench.steps_note({"tiny-lora-64": 60, "smollm2-lora-256": 10}).startswith(
        "10 steps: smollm2-lora-256; 60 steps: tiny-lora-64, the first 3"
    )


@pytest.mark.parametrize("quant", [False, True])
def test_real_cases_train_the_converted_checkpoint_in_every_variant(
    quant: bool, real_model: Path, tmp_path: Path
) -> None:
    case = Case("smollm2", quant, 256, 2, 1, 10)
    model_dir = bench.prepare_model(case, tmp_path / "cache", {})  # $LORA_WORKBENCH_CACHE (conftest) wins
    assert model_dir == real_model and not (tmp_path / "cache").exists()
    defaults = bench.workbench_config(case, model_dir, tmp_path / "d.jsonl", 10, tmp_path / "runs")
    matched, knobs, _ = bench.plain_trl(defaults, cuda_bf16=False)
    for cfg in (build_config(defaults), build_config(matched)):
        assert cfg.model.name_or_path == str(real_model) and cfg.model.module_groups  # the smollm2 preset
        assert cfg.adapter.target_modules == bench.TARGETS and cfg.quantization.mode == ("4bit" if quant else "none")
    argv = bench.reference_argv(case, model_dir, tmp_path / "d.jsonl", 10, knobs, tmp_path)
    assert argv[argv.index("--model") + 1] == str(real_model)
    ref = load_reference()
    assert ref.resolve_model("builtin:smollm2-135m") == str(real_model) and ref.resolve_model("x/y") == "x/y"


def test_real_text_rows_reach_max_length_without_truncation(real_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from trainer.data.tokenization import chat_template_of, tokenize_example

    path = bench.text_data(real_model, 256, 64, tmp_path / "rows.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    template = chat_template_of(tokenizer, None)
    lengths = [len(tokenize_example(tokenizer, row, template).input_ids) for row in rows]
    assert len(rows) == 64 and all(128 <= n <= 256 for n in lengths) and max(lengths) >= 240
    text = " ".join(m["content"] for row in rows for m in row["messages"])
    assert "the" in text.split() and "system You are" not in text  # English, without the rows' role fields
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    assert bench.text_data(real_model, 256, 64, path) == path  # cached


@pytest.mark.parametrize("quant", [False, True])
def test_matched_config_has_the_references_settings(quant: bool, tiny_model: Path, tmp_path: Path) -> None:
    case = Case("tiny", quant, 64, 8, 2)
    defaults = bench.workbench_config(case, tiny_model, bench.BUNDLED_DATA, 30, tmp_path / "runs")
    matched, knobs, _ = bench.plain_trl(defaults, cuda_bf16=False)
    c, b = build_config(defaults), build_config(matched)
    # the recipe's optimizer; TRL's own default checkpointing (on), which the workbench's 'auto' decides instead
    assert knobs == {"optim": c.training.optimizer, "gradient_checkpointing": True}
    assert c.training.gradient_checkpointing == "auto"
    assert (b.training.packing, b.training.precision, b.model.dtype) == (False, "fp32", "float32")
    assert (b.training.optimizer, b.training.gradient_checkpointing) == (
        knobs["optim"],
        knobs["gradient_checkpointing"],
    )
    assert b.quantization.mode == ("4bit" if quant else "none")
    for name in type(b.training).model_fields.keys() & bench.PLAIN_TRL.keys():  # speed options: plain TRL's behaviour
        assert getattr(b.training, name) == bench.PLAIN_TRL[name], name
    argv = bench.reference_argv(case, tiny_model, bench.BUNDLED_DATA, 30, knobs, tmp_path)
    assert argv[argv.index("--optim") + 1] == knobs["optim"] and ("--4bit" in argv) == quant
    assert ("--gradient-checkpointing" in argv) == knobs["gradient_checkpointing"]


def test_bench_command_runs_one_case_and_appends_a_table(tiny_model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny-model").symlink_to(tiny_model)
    out = tmp_path / "RESULTS.md"
    earlier = bench_report.RESULTS_HEADER + "\n## an earlier run\n\nits table\n"
    out.write_text(earlier)
    argv = ["bench", "--matrix", "cpu", "--only", "tiny-lora-64", "--steps", "3", "--threads", "1", "--variants", "b"]
    code = cli_main(argv + ["--out", str(out), "--work-dir", str(tmp_path / "work"), "--cache-dir", str(cache)])
    assert code == 0
    text = out.read_text()
    assert text.startswith(earlier) and text.count("\n## ") == 2 and "cpu matrix" in text  # appended, earlier kept
    rows = {r.split("|")[2].strip(): r.split("|") for r in text.splitlines() if r.startswith("| tiny-lora-64 |")}
    assert set(rows) == {"(a) plain TRL", "(b) workbench, TRL settings"}
    for cells in rows.values():
        assert float(cells[3].replace(",", "")) > 0  # real tokens/s
    # Same tokens, masks and adapter initialisation: (a) and (b) start from the same loss.
    assert rows["(a) plain TRL"][12] == rows["(b) workbench, TRL settings"][12] != " n/a "
    assert all(float(cells[6]) > 0 for cells in rows.values())  # CPU seconds of the training part
