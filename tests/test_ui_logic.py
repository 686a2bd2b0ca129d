"""The UI's logic without a browser: form <-> RunConfig, data preview, live run monitor, runs index, uploads and
the server's exposure checks."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

from app.server import AUTH_ENV, LaunchError, check_exposure, is_loopback, parse_auth, read_auth
from app.views.form import (
    FIELDS,
    SECTIONS,
    apply_preset,
    cli_command,
    config_from_form,
    default_values,
    form_values,
)
from app.views.monitor import RunWatch, Series, Watchers, ema, explain_failure, progress
from app.views.runs_index import (
    COLUMNS,
    SummaryCache,
    config_diff,
    flatten,
    loss_curves,
    method_label,
    summarize,
    zip_adapter,
)
from trainer.config.presets import build_config, load_config
from trainer.config.run_config import ConfigError, RunConfig
from trainer.data.files import DataError
from trainer.data.prepare import load_examples
from trainer.data.tokenization import chat_template_of, render_with_spans
from trainer.data.uploads import dataset_choices, store_upload, uploads_dir
from trainer.jobs.registry import Job
from trainer.plan.data_preview import CUT, PROMPT, TRAINED, preview_data, tokenizer_for
from trainer.run_dir import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
BY_PATH = {f.path: f for f in FIELDS}


def dump_without_runs_dir(cfg: RunConfig) -> dict:
    data = cfg.model_dump()
    data["output"].pop("runs_dir")
    return data


def config_error(values: dict, runs_dir: str = "runs") -> ConfigError:
    with pytest.raises(ConfigError) as e:
        config_from_form(values, runs_dir)
    return e.value


# --- app/views/form.py ----------------------------------------------------------------------------------------


def test_every_config_knob_has_a_form_field_with_help() -> None:
    expected = {
        f"{section}.{name}"
        for section in SECTIONS
        for name in RunConfig.model_fields[section].annotation.model_fields  # type: ignore[union-attr]
    } - {"output.runs_dir"}
    assert set(BY_PATH) == expected
    assert len(FIELDS) == len(BY_PATH)  # no duplicates
    assert all(f.help.strip() for f in FIELDS), [f.path for f in FIELDS if not f.help.strip()]
    paths = (
        "adapter.r",
        "adapter.target_modules",
        "quantization.mode",
        "training.packing",
        "training.padding_free",
        "data.val_size",
        "data.source",
    )
    assert {p: BY_PATH[p].kind for p in paths} == {
        "adapter.r": "int",
        "adapter.target_modules": "yaml",
        "quantization.mode": "choice",
        "training.packing": "choice",
        "training.padding_free": "bool",
        "data.val_size": "float",
        "data.source": "text",
    }
    assert BY_PATH["quantization.mode"].choices == ("none", "8bit", "4bit")
    assert BY_PATH["training.packing"].choices == ("auto", True, False)  # shown as auto / on / off
    assert BY_PATH["data.max_samples"].optional and not BY_PATH["adapter.r"].optional


@pytest.mark.parametrize(
    "user",
    [
        {"recipe": "qlora", "model_preset": "tiny"},
        {
            "recipe": "adalora",
            "model_preset": "gemma",
            "model": {"chat_template": "{{ messages }}", "revision": "main"},
            "adapter": {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
            "data": {"columns": {"q": "instruction"}, "max_samples": 10, "system_prompt": "Be brief."},
            "training": {"save_total_limit": None, "max_steps": 5},
            "output": {"run_name": "my-run"},
        },
        # A regex target that is not plain YAML: it must come back as the same string, not a list.
        {"model_preset": "tiny", "adapter": {"target_modules": "[qv]_proj"}},
        {"model_preset": "tiny", "adapter": {"target_modules": ".*layers: (q|v)_proj"}},
    ],
)
def test_form_round_trip_gives_the_same_config(user: dict, tmp_path: Path) -> None:
    cfg = build_config(user)
    values = form_values(cfg)
    assert values["recipe"] == cfg.recipe and values["model_preset"] == cfg.model_preset
    again = config_from_form(values, str(tmp_path / "runs"))
    assert again.output.runs_dir == str(tmp_path / "runs")
    assert dump_without_runs_dir(again) == dump_without_runs_dir(cfg)


def test_form_widget_values_are_plain_for_widgets() -> None:
    cfg = build_config({"model_preset": "tiny", "adapter": {"target_modules": ["q_proj", "v_proj"]}})
    values = form_values(cfg)
    assert values["adapter.target_modules"] == "[q_proj, v_proj]"
    assert values["data.max_samples"] == 0  # unset optional count shows as 0
    assert values["model.revision"] == ""  # unset text shows as empty
    assert values["data.columns"] == ""  # empty mapping shows as an empty box
    assert yaml.safe_load(values["model.module_groups"]) == cfg.model.module_groups


def test_form_yaml_text_becomes_a_list_and_blank_optionals_become_none() -> None:
    values = form_values(build_config({"model_preset": "tiny"}))
    values |= {
        "adapter.target_modules": "[q_proj, v_proj]",
        "data.max_samples": 0,
        "training.save_total_limit": 0,
        "model.revision": "   ",
        "data.columns": "",
        "adapter.r": 8.0,  # number widgets may hand back floats
    }
    cfg = config_from_form(values, "runs")
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.max_samples is None and cfg.training.save_total_limit is None
    assert cfg.model.revision is None
    assert cfg.data.columns == {}
    assert cfg.adapter.r == 8 and isinstance(cfg.adapter.r, int)


def test_form_bad_yaml_names_the_field() -> None:
    values = form_values(build_config({"model_preset": "tiny"}))
    err = config_error({**values, "adapter.target_modules": "[q_proj, v_proj", "data.columns": "{a: b"})
    named = [p.split(":")[0] for p in err.problems]
    assert "adapter.target_modules" in named and "data.columns" in named
    assert any(p.startswith("data.columns: not valid YAML") for p in err.problems), err.problems


def test_form_invalid_values_raise_config_error_naming_fields() -> None:
    values = form_values(build_config({"model_preset": "tiny"}))
    err = config_error({**values, "adapter.r": 0})
    assert any(p.startswith("adapter.r") for p in err.problems), err.problems
    assert "adapter.r" in str(err)
    err = config_error({**values, "adapter.lora_dropout": 1.5, "training.learning_rate": 0.0})
    assert {p.split(":")[0] for p in err.problems} >= {"adapter.lora_dropout", "training.learning_rate"}
    # Cross-field rules are applied too.
    err = config_error({**values, "output.run_name": "bad name!"})
    assert any(p.startswith("output.run_name") for p in err.problems)


def test_apply_preset_layers_as_the_cli_does_keeping_only_edited_fields() -> None:
    values = form_values(build_config({"model_preset": "tiny", "data": {"source": "data/instructions_alpaca.json"}}))
    values["training.max_steps"] = 7
    edited = {"data.source", "training.max_steps"}
    out = apply_preset(values, edited, "recipes", "qlora")
    assert out["recipe"] == "qlora"
    assert out["quantization.mode"] == "4bit" and out["training.optimizer"] == "paged_adamw_8bit"
    assert out["training.gradient_checkpointing"] == "auto"
    assert out["data.source"] == "data/instructions_alpaca.json" and out["training.max_steps"] == 7
    assert values["quantization.mode"] == "none"  # the input is not modified
    cfg = config_from_form(out, "runs")
    assert cfg.quantization.mode == "4bit" and cfg.recipe == "qlora"

    models = apply_preset(out, edited, "models", "qwen2")
    assert models["model_preset"] == "qwen2" and models["model.name_or_path"].startswith("Qwen/")
    assert "q_proj" in yaml.safe_load(models["model.module_groups"])["default"]
    assert models["quantization.mode"] == "4bit"  # the recipe's fields stay

    # No recipe: what the recipe set goes back to the defaults, as a config.yaml without `recipe:` gets them.
    cleared = apply_preset(out, edited, "recipes", "")
    assert cleared["recipe"] is None and cleared["quantization.mode"] == "none"
    with pytest.raises(ConfigError, match="unknown preset"):
        apply_preset(values, edited, "recipes", "../../etc/passwd")


def test_default_values_load_the_example(tmp_path: Path) -> None:
    runs = str(tmp_path / "runs")
    values = default_values(runs, "examples/tiny-lora.yaml")
    example = load_config(ROOT / "examples/tiny-lora.yaml")
    assert values["recipe"] == "lora" and values["model_preset"] == "tiny"
    assert values["data.source"] == "data/sentiment_train.jsonl" and values["training.max_steps"] == 200
    assert "output.runs_dir" not in values
    assert dump_without_runs_dir(config_from_form(values, runs)) == dump_without_runs_dir(example)
    plain = default_values(runs)
    assert plain["recipe"] is None and plain["adapter.r"] == RunConfig().adapter.r
    assert default_values(runs, "examples/does-not-exist.yaml") == plain


def test_cli_command_quotes_paths() -> None:
    assert cli_command("runs/a.yaml") == "lora-workbench train runs/a.yaml"
    cmd = cli_command("/tmp/my runs/it's.yaml")
    assert cmd.startswith("lora-workbench train ")
    import shlex

    assert shlex.split(cmd) == ["lora-workbench", "train", "/tmp/my runs/it's.yaml"]


# --- trainer/plan/data_preview.py --------------------------------------------------------------------------------


def test_preview_of_good_data_marks_trained_and_prompt_text(make_config) -> None:
    cfg = load_config(make_config())
    preview = preview_data(cfg, n_rows=2)
    assert preview.ok and preview.errors == []
    assert preview.format == "prompt_completion" and preview.source.endswith("sentiment_train.jsonl")
    assert preview.report is not None and preview.report.rows == 64 and preview.report.trainable_tokens > 0
    assert preview.verdict().startswith("**Data OK**") and "64 rows" in preview.verdict()
    assert [r.where for r in preview.rows] == ["line 1", "line 2"]

    first = json.loads((ROOT / "data/sentiment_train.jsonl").read_text().splitlines()[0])
    row = preview.rows[0]
    trained = "".join(t for t, lab in row.segments if lab == TRAINED)
    prompt = "".join(t for t, lab in row.segments if lab == PROMPT)
    assert first["completion"].strip() in trained and first["prompt"] in prompt
    assert first["prompt"] not in trained and first["completion"].strip() not in prompt
    assert all(lab != CUT for _, lab in row.segments)
    # adjacent segments never share a label
    assert all(a[1] != b[1] for a, b in zip(row.segments, row.segments[1:], strict=False))

    tok = tokenizer_for(cfg)
    _, _, located = load_examples(cfg.data.source, cfg.data)
    text, _ = render_with_spans(tok, located[0][1]["messages"], chat_template_of(tok, cfg.model.chat_template))
    assert "".join(t for t, _ in row.segments) == text
    assert row.tokens == len(tok(text, add_special_tokens=False)["input_ids"])


def test_preview_of_malformed_jsonl_names_the_line(make_config, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "a", "completion": " b"}\n{"prompt": "c", "completion": " d"}\n{"prompt": "x",\n'
        '{"prompt": "e", "completion": " f"}\n'
    )
    preview = preview_data(load_config(make_config({"data": {"source": str(bad)}})))
    assert not preview.ok
    assert any("line 3" in e for e in preview.errors), preview.errors
    assert preview.rows == [] and preview.report is None
    assert "Cannot use" in preview.verdict()


def test_preview_never_raises_for_missing_file_or_bad_rows(make_config, tmp_path: Path) -> None:
    missing = preview_data(load_config(make_config({"data": {"source": str(tmp_path / "nope.jsonl")}})))
    assert not missing.ok and missing.errors
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "c"}\n')
    bad_row = preview_data(load_config(make_config({"data": {"source": str(rows)}})))
    assert not bad_row.ok and any("line 2" in e for e in bad_row.errors), bad_row.errors


def _long_data(tmp_path: Path) -> Path:
    path = tmp_path / "long.jsonl"
    rows = [
        {"prompt": "Short question?", "completion": " yes"},
        {"prompt": "Tell me a long story.", "completion": " " + "once upon a time " * 40},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_preview_shows_the_cut_part_of_an_overlength_row(make_config, tmp_path: Path) -> None:
    cfg = load_config(make_config({"data": {"source": str(_long_data(tmp_path)), "max_length": 32}}))
    preview = preview_data(cfg, n_rows=5)
    assert preview.ok and preview.over_limit == 1
    assert preview.report is not None and preview.report.truncated == 1
    short, long = preview.rows
    assert short.tokens <= 32 and all(lab != CUT for _, lab in short.segments)
    assert long.tokens > 32
    labels = [lab for _, lab in long.segments]
    assert labels[-1] == CUT and labels.count(CUT) == 1
    assert "once upon a time" in "".join(t for t, lab in long.segments if lab == CUT)
    assert "will be truncated" in preview.verdict() and "1 row(s) exceed max_length 32" in preview.verdict()


def test_preview_verdict_says_overlength_rows_are_dropped(make_config, tmp_path: Path) -> None:
    cfg = load_config(
        make_config({"data": {"source": str(_long_data(tmp_path)), "max_length": 32, "overlength": "drop"}})
    )
    preview = preview_data(cfg)
    assert preview.ok and preview.over_limit == 1 and preview.report.dropped_overlength == 1
    assert "1 row(s) exceed max_length 32 and will be dropped" in preview.verdict()

    cfg = load_config(
        make_config({"data": {"source": str(_long_data(tmp_path)), "max_length": 32, "overlength": "error"}})
    )
    preview = preview_data(cfg)
    assert not preview.ok and any("line 2" in e and "max_length" in e for e in preview.errors)


# --- app/views/monitor.py -------------------------------------------------------------------------------------


def _line(kind: str, step: int, **kw) -> str:
    return json.dumps({"kind": kind, "step": step, "time": 1000.0 + step, **kw}) + "\n"


def test_series_sorts_lines_by_kind() -> None:
    s = Series()
    s.add({"kind": "train", "step": 1, "time": 1.0, "loss": 2.0, "unknown": 1})
    s.add({"kind": "eval", "step": 1, "time": 1.0})  # eval without eval_loss: ignored
    s.add({"kind": "eval", "step": 2, "time": 2.0, "eval_loss": 1.5})
    s.add({"kind": "system", "step": 2, "time": 2.0, "cpu_rss_gb": 0.5})
    s.add({"kind": "event", "step": 2, "time": 2.0, "event": "checkpoint"})
    s.add({"kind": "mystery", "step": 3, "time": 3.0})
    assert s.train["step"] == [1] and s.train["loss"] == [2.0] and s.train["grad_norm"] == [None]
    assert "unknown" not in s.train
    assert s.eval == {"step": [2], "eval_loss": [1.5]}
    assert s.system["cpu_rss_gb"] == [0.5] and s.system["gpu_mem_peak_gb"] == [None]
    assert [e["event"] for e in s.events] == ["checkpoint"]


def test_run_watch_reads_incrementally(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    watch = RunWatch(run)
    assert watch.poll() is False and watch.version == 0  # nothing there yet

    metrics = run / "metrics.jsonl"
    metrics.write_text(_line("train", 1, loss=3.0) + _line("train", 2, loss=2.5))
    write_json_atomic(run / "status.json", {"state": "running", "step": 2, "max_steps": 10})
    assert watch.poll() is True and watch.version == 1
    assert watch.series.train["loss"] == [3.0, 2.5] and watch.status["step"] == 2

    assert watch.poll() is False and watch.version == 1  # no change, no bump

    half = _line("eval", 3, eval_loss=2.2)
    with open(metrics, "a") as f:
        f.write(_line("train", 3, loss=2.0) + half[:10])
    assert watch.poll() is True and watch.version == 2
    assert watch.series.train["step"] == [1, 2, 3] and watch.series.eval["step"] == []

    with open(metrics, "a") as f:
        f.write(half[10:])
    assert watch.poll() is True and watch.version == 3
    assert watch.series.eval == {"step": [3], "eval_loss": [2.2]}
    assert watch.series.train["step"] == [1, 2, 3]  # nothing read twice

    write_json_atomic(run / "status.json", {"state": "completed", "step": 10, "max_steps": 10})
    assert watch.poll() is True and watch.status["state"] == "completed" and watch.version == 4


def test_watchers_share_one_watch_per_run(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        p.mkdir()
    (a / "metrics.jsonl").write_text(_line("train", 1, loss=1.0))
    watchers = Watchers(min_interval_s=0.0, capacity=2)
    wa = watchers.get(a)
    assert watchers.get(a) is wa and watchers.get(b) is not wa
    assert wa.series.train["loss"] == [1.0]  # polled on get
    with open(a / "metrics.jsonl", "a") as f:
        f.write(_line("train", 2, loss=0.5))
    assert watchers.get(a).series.train["loss"] == [1.0, 0.5]

    c = tmp_path / "c"
    c.mkdir()
    watchers.get(c)  # over capacity: the least recently used (b) is evicted
    assert watchers.get(a) is wa

    slow = Watchers(min_interval_s=3600)
    w = slow.get(a)
    with open(a / "metrics.jsonl", "a") as f:
        f.write(_line("train", 3, loss=0.25))
    assert slow.get(a).series.train["loss"] == [1.0, 0.5]  # not re-polled within the interval
    assert w.poll() and w.series.train["loss"][-1] == 0.25


def test_ema_keeps_gaps_and_is_bias_corrected() -> None:
    assert ema([]) == []
    out = ema([4.0, None, 2.0, float("nan"), 2.0], weight=0.5)
    assert out[0] == 4.0  # bias correction: the first value is the input
    assert out[1] is None and out[3] is None
    assert out[2] == pytest.approx((0.25 * 4 + 0.5 * 2) / 0.75)
    assert out[4] == pytest.approx((0.125 * 4 + 0.25 * 2 + 0.5 * 2) / 0.875)
    constant = ema([5.0] * 20)
    assert all(v == pytest.approx(5.0) for v in constant)


def test_progress_elapsed_and_eta() -> None:
    p = progress({"state": "running", "step": 25, "max_steps": 100, "started_at": 1000.0}, now=1050.0)
    assert (p.step, p.max_steps, p.elapsed_s) == (25, 100, 50.0)
    assert p.eta_s == pytest.approx(150.0) and p.fraction == 0.25
    assert p.text() == "running: step 25/100 (25%), elapsed 50s, ETA 2m30s"

    done = progress(
        {"state": "completed", "step": 100, "max_steps": 100, "started_at": 1000.0, "ended_at": 4725.0}, now=9999.0
    )
    assert done.elapsed_s == 3725.0 and done.fraction == 1.0
    assert done.text() == "completed: step 100/100 (100%), elapsed 1h02m05s"  # no ETA once finished

    queued = progress({}, now=5.0)
    assert (queued.state, queued.step, queued.elapsed_s, queued.eta_s, queued.fraction) == ("queued", 0, 0.0, None, 0)
    unknown_total = progress({"state": "running", "step": 3, "max_steps": 0, "started_at": 1.0}, now=31.0)
    assert unknown_total.eta_s is None and unknown_total.text() == "running: step 3 (0%), elapsed 30s"


def test_explain_failure_shows_the_structured_failure_never_parsing_text() -> None:
    from trainer.failure import failure

    for state in ("running", "completed", "stopped", "queued"):
        assert explain_failure({"state": state, "error": "CUDA out of memory"}) is None
    oom = failure("oom", "out of memory: CUDA out of memory. Tried...").to_status()
    shown = explain_failure({"state": "failed", "error": oom["message"], "failure": oom})
    assert shown is not None and shown.startswith("### Out of memory")
    assert "QLoRA" in shown and "gradient_checkpointing" in shown and "max_length" in shown
    assert "CUDA out of memory. Tried" in shown  # the message itself is shown

    nan = failure("nan", "loss became nan at step 12").to_status()
    shown = explain_failure({"state": "failed", "failure": nan})
    assert shown is not None and shown.startswith("### Loss became NaN") and "learning_rate" in shown
    data = failure("data", "bad data in data/x.jsonl:\n  - line 4: missing key").to_status()
    shown = explain_failure({"state": "failed", "failure": data})
    assert shown is not None and shown.startswith("### Bad data") and "line 4" in shown and "Fix the rows" in shown
    # the kind decides, not the words: an internal error that mentions memory is not an out-of-memory failure
    internal = failure("internal", "ValueError: out of memory budget field").to_status()
    assert explain_failure({"state": "failed", "failure": internal}).startswith("### The run failed")
    legacy = explain_failure({"state": "failed", "error": "torch.OutOfMemoryError: CUDA out of memory"})
    assert legacy.startswith("### The run failed") and "CUDA out of memory" in legacy  # no failure: error alone
    other = explain_failure({"state": "failed"})
    assert other is not None and "without an error message" in other and other.startswith("### The run failed")


# --- app/views/runs_index.py ----------------------------------------------------------------------------------


def _make_run(runs: Path, run_id: str = "20250101-000000-abcd", *, quant: str = "4bit") -> Path:
    run = runs / run_id
    run.mkdir(parents=True)
    cfg = {
        "model": {"name_or_path": "builtin:tiny"},
        "quantization": {"mode": quant, "quant_type": "nf4"},
        "adapter": {"method": "lora", "r": 16},
        "output": {"run_name": "first"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_json_atomic(
        run / "status.json",
        {"state": "completed", "step": 6, "max_steps": 6, "started_at": 100.0, "ended_at": 130.0},
    )
    (run / "metrics.jsonl").write_text(
        _line("train", 2, loss=3.0, tokens_per_second=100.0)
        + _line("system", 2, cpu_rss_gb=1.5)
        + _line("train", 4, loss=2.0, tokens_per_second=300.0)
        + _line("eval", 4, eval_loss=2.5)
        + _line("system", 4, cpu_rss_gb=1.25)
        + _line("train", 6, loss=1.0)
        + _line("eval", 6, eval_loss=1.75)
        + '{"kind": "train", "step": 7'  # half-written line: skipped
    )
    return run


def _job(run: Path, name: str | None = None) -> Job:
    return Job(
        seq=1,
        id=run.name,
        name=name,
        kind="train",
        state="completed",
        pid=None,
        proc_start=None,
        created_at=0.0,
        started_at=None,
        ended_at=None,
        config_path=str(run / "config.yaml"),
        run_dir=str(run),
        exit_code=None,
        error=None,
        stop_requested=None,
    )


def test_summarize_a_run_dir(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    s = summarize(run)
    assert (s.run_id, s.name, s.model, s.method, s.state) == (
        run.name,
        "first",
        "builtin:tiny",
        "qlora r16 (4bit nf4)",
        "completed",
    )
    assert (s.step, s.max_steps, s.train_loss, s.eval_loss, s.duration_s) == (6, 6, 1.0, 1.75, 30.0)
    assert s.peak_mem_gb == 1.5 and s.mem_kind == "cpu"
    assert s.tokens_per_second == 200.0
    assert s.row() == [
        run.name,
        "first",
        "builtin:tiny",
        "qlora r16 (4bit nf4)",
        "completed",
        "6/6",
        1.0,
        1.75,
        "30s",
        "1.500 (cpu)",
        "",
        200.0,
    ]
    assert summarize(run, name="renamed").name == "renamed"

    with open(run / "metrics.jsonl", "a") as f:
        f.write("\n" + _line("system", 8, gpu_mem_peak_gb=3.0, cpu_rss_gb=9.0))
        f.write("\n" + _line("event", 0, event="memory_estimate", predicted_peak_gb=3.25))
    s = summarize(run)
    assert s.peak_mem_gb == 3.0 and s.mem_kind == "gpu"  # GPU peak wins over host RSS
    assert s.predicted_gb == 3.25 and s.row()[COLUMNS.index("predicted GPU peak (GB)")] == 3.25


def test_summarize_an_empty_run_dir(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    s = summarize(empty)
    assert (s.state, s.step, s.train_loss, s.eval_loss, s.duration_s, s.peak_mem_gb) == (
        "unknown",
        0,
        None,
        None,
        None,
        None,
    )
    assert s.method == "lora r?" and s.row()[5:] == ["0", "", "", "", "", "", ""]


def test_summary_cache_recomputes_only_on_change(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    cache = SummaryCache()
    first = cache.get(_job(run))
    assert cache.get(_job(run)) is first
    renamed = cache.get(_job(run, name="other"))
    assert renamed is not first and renamed.name == "other"
    write_json_atomic(run / "status.json", {"state": "failed", "step": 7, "max_steps": 6})
    changed = cache.get(_job(run, name="other"))
    assert changed is not renamed and changed.state == "failed" and changed.step == 7
    assert cache.get(_job(run, name="other")) is changed


def test_flatten_and_config_diff() -> None:
    a = {"adapter": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "data": {"columns": {}}, "seed": 1}
    b = {"adapter": {"r": 16, "target_modules": ["q_proj", "v_proj"]}, "data": {"columns": {}}, "extra": {"x": "y"}}
    assert flatten(a) == {
        "adapter.r": 8,
        "adapter.target_modules": ["q_proj", "v_proj"],
        "data.columns": {},
        "seed": 1,
    }
    rows = config_diff({"run-a": a, "run-b": b})
    assert rows == [
        ["adapter.r", "8", "16"],
        ["extra.x", "(unset)", "y"],
        ["seed", "1", "(unset)"],
    ]
    assert config_diff({"run-a": a, "run-a2": a}) == []
    assert config_diff({}) == []
    three = config_diff({"1": {"m": {"q": "none"}}, "2": {"m": {"q": "none"}}, "3": {"m": {"q": "4bit"}}})
    assert three == [["m.q", "none", "none", "4bit"]]


def test_method_label() -> None:
    assert method_label({}) == "lora r?"
    assert method_label({"adapter": {"method": "lora", "r": 16}}) == "lora r16"
    assert method_label({"adapter": {"r": 16}, "quantization": {"mode": "4bit", "quant_type": "nf4"}}) == (
        "qlora r16 (4bit nf4)"
    )
    assert method_label(
        {"adapter": {"method": "dora", "r": 8}, "quantization": {"mode": "4bit", "quant_type": "fp4"}}
    ) == ("dora r8 (4bit fp4)")
    assert method_label({"adapter": {"method": "lora", "r": 4}, "quantization": {"mode": "8bit"}}) == "lora r4 (8bit)"
    cfg = build_config({"recipe": "qlora"}).model_dump(mode="json")
    assert method_label(cfg) == "qlora r16 (4bit nf4)"


def test_zip_adapter(tmp_path: Path) -> None:
    run = _make_run(tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        zip_adapter(run, tmp_path / "zips")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00weights")
    with pytest.raises(FileNotFoundError):
        zip_adapter(run, tmp_path / "zips")
    (run / "adapter" / "adapter_config.json").write_text('{"r": 16}')
    out = zip_adapter(run, tmp_path / "zips")
    assert out == tmp_path / "zips" / f"{run.name}-adapter.zip" and out.is_file()
    with zipfile.ZipFile(out) as z:
        names = {n.rstrip("/") for n in z.namelist()} - {"."}
        assert names == {"adapter_config.json", "adapter_model.safetensors"}
        assert z.read("adapter_config.json") == b'{"r": 16}'
    (run / "adapter" / "README.md").write_text("card")
    with zipfile.ZipFile(zip_adapter(run, tmp_path / "zips")) as z:  # made fresh: the new file is in it
        assert "README.md" in z.namelist()


def test_loss_curves(tmp_path: Path) -> None:
    curves = loss_curves(_make_run(tmp_path))
    assert curves == {"step": [2, 4, 6], "loss": [3.0, 2.0, 1.0], "eval_step": [4, 6], "eval_loss": [2.5, 1.75]}
    empty = tmp_path / "none"
    empty.mkdir()
    assert loss_curves(empty) == {"step": [], "loss": [], "eval_step": [], "eval_loss": []}


# --- trainer/data/uploads.py -------------------------------------------------------------------------------------


def test_store_upload_checks_type_and_size(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    src = tmp_path / "upload.bin"
    src.write_text('{"prompt": "a", "completion": " b"}\n')
    with pytest.raises(DataError, match="unsupported file type '.exe'"):
        store_upload(src, "data.exe", runs)
    with pytest.raises(DataError, match="none"):
        store_upload(src, "README", runs)
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (2 * 2**20 + 1))
    with pytest.raises(DataError, match="over the upload limit of 2 MB") as e:
        store_upload(big, "big.jsonl", runs, limit_mb=2)
    assert e.value.source == "big.jsonl"
    assert not uploads_dir(runs).exists() or not any(uploads_dir(runs).iterdir())  # nothing stored


def test_store_upload_never_overwrites_and_stays_inside(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    src = tmp_path / "upload.bin"
    src.write_text('{"prompt": "a", "completion": " b"}\n')
    first = store_upload(src, "train.JSONL", runs)
    second = store_upload(src, "train.jsonl", runs)
    assert first != second and first.parent == second.parent == uploads_dir(runs)
    assert first.name.endswith("-train.jsonl") and first.read_text() == src.read_text()
    evil = store_upload(src, "../../evil name.jsonl", runs)
    assert evil.parent == uploads_dir(runs) and evil.resolve().is_relative_to(uploads_dir(runs).resolve())
    assert evil.name.endswith("-evil_name.jsonl") and "/" not in evil.name and " " not in evil.name
    dots = store_upload(src, "....csv", runs)
    assert dots.name.endswith("-data.csv")
    assert len(list(uploads_dir(runs).iterdir())) == 4
    assert src.is_file()  # the upload itself is left alone


def test_dataset_choices_lists_bundled_then_uploads(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    bundled = [f"data/{p.name}" for p in sorted((ROOT / "data").iterdir()) if p.suffix in (".json", ".jsonl")]
    assert "data/sentiment_train.jsonl" in bundled
    assert dataset_choices(runs) == bundled  # no uploads dir yet
    up = uploads_dir(runs)
    up.mkdir(parents=True)
    old, new = up / "20240101-000000-aaaaaaaa-old.jsonl", up / "20250101-000000-bbbbbbbb-new.csv"
    old.write_text("{}\n")
    new.write_text("a\n")
    (up / "notes.txt").write_text("not data")
    choices = dataset_choices(runs)
    assert "data/build_samples.py" not in choices
    assert choices == [*bundled, str(new), str(old)]


# --- app/server.py ------------------------------------------------------------------------------------------


def test_parse_auth() -> None:
    assert parse_auth(None) is None and parse_auth("") is None
    assert parse_auth("admin:s3cret") == ("admin", "s3cret")
    assert parse_auth("admin:pa:ss") == ("admin", "pa:ss")
    for bad in ("admin", "admin:", ":secret"):
        with pytest.raises(LaunchError, match="USER:PASS"):
            parse_auth(bad)


def test_read_auth_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(AUTH_ENV, raising=False)
    assert read_auth(None, None) is None
    monkeypatch.setenv(AUTH_ENV, "env:pw")
    assert read_auth(None, None) == ("env", "pw")
    creds = tmp_path / "auth.txt"
    creds.write_text("file:pw\n")
    assert read_auth(None, str(creds)) == ("file", "pw")  # the file wins over the environment
    assert read_auth("arg:pw", str(creds)) == ("arg", "pw")  # the argument wins over both
    with pytest.raises(LaunchError, match="--auth-file"):
        read_auth(None, str(tmp_path / "missing.txt"))
    creds.write_text("no-colon\n")
    with pytest.raises(LaunchError):
        read_auth(None, str(creds))


def test_is_loopback() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "192.168.1.10", "::", "8.8.8.8"):
        assert not is_loopback(host), host


def test_check_exposure() -> None:
    with pytest.raises(LaunchError, match="refusing to serve on 0.0.0.0"):
        check_exposure("0.0.0.0", None, False)
    check_exposure("0.0.0.0", ("u", "p"), False)
    check_exposure("0.0.0.0", None, True)
    check_exposure("127.0.0.1", None, False)
    check_exposure("localhost", None, False)


def test_the_file_route_serves_only_the_offered_downloads(tmp_path: Path, monkeypatch) -> None:
    from gradio.utils import is_allowed_file

    from app.server import served_files

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    runs = tmp_path / "runs"
    access = served_files(runs)

    def served(path: Path) -> bool:  # as Gradio's /file= route decides (its own cache counts as created)
        return is_allowed_file(path, access["blocked_paths"], access["allowed_paths"], [str(tmp_path / "cache")])[0]

    assert served(runs / ".downloads" / "20261125-tiny-adapter.zip")
    for private in (
        runs / "registry.sqlite",
        runs / ".jobs" / "abc" / "job.log",
        runs / "20261125-tiny" / "config.yaml",
        runs / "20261125-tiny" / "adapter" / "adapter_model.safetensors",
        tmp_path / "hf" / "token",
    ):
        assert not served(private), private
    assert (
        is_allowed_file(tmp_path / "hf" / "token", access["blocked_paths"], [str(tmp_path)], [])[1] == "in_blocklist"
    )


def test_summary_cache_reads_a_growing_metrics_file_from_where_it_stopped(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    write_json_atomic(run / "status.json", {"state": "running", "step": 6, "max_steps": 60})
    cache = SummaryCache()
    before = cache.get(_job(run))
    tail = cache._tails[run][0]
    read_up_to = tail.offset
    with open(run / "metrics.jsonl", "a") as f:  # the writer finishes the half-written last line
        f.write(', "time": 1.0, "loss": 0.125}\n')
    after = cache.get(_job(run))
    assert after.train_loss == 0.125 != before.train_loss
    assert cache._tails[run][0] is tail and tail.offset > read_up_to  # only the appended bytes were parsed
    assert after == summarize(run, "")  # the same row as reading the whole file
    (run / "metrics.jsonl").write_text("")  # replaced by a shorter file: read again from the start
    assert cache.get(_job(run)).train_loss is None and cache._tails[run][0] is not tail
    write_json_atomic(run / "status.json", {"state": "completed", "step": 60, "max_steps": 60})
    assert cache.get(_job(run)).state == "completed" and run not in cache._tails  # done: the row stays, not the lines
