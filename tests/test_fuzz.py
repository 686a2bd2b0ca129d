"""Property-based fuzzing: whatever a user feeds the config loader or the dataset readers and converters, the
answer is a RunConfig / examples or a clear ConfigError / DataError that names where, never a traceback; whatever
lies in a run's status.json or metrics.jsonl, every reader of the runs dir still lists the other runs."""

from __future__ import annotations

import json
import string
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import plots
from app.views.adapter_choices import adapter_choices
from app.views.monitor import RunWatch, explain_failure, progress
from app.views.runs_index import SummaryCache, loss_curves, summarize
from trainer.config.presets import load_config
from trainer.config.run_config import ConfigError, DataSection
from trainer.data.files import DataError
from trainer.data.prepare import load_examples
from trainer.jobs.queue import JobManager
from trainer.metrics_reader import NUMBER_KEYS
from trainer.run_dir import FINAL_STATES, STATES, RunDir, StatusError, load_status

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)

SECTION_KEYS = {
    "model": ["name_or_path", "dtype", "attn_implementation", "trust_remote_code", "chat_template", "revision"],
    "quantization": ["mode", "quant_type", "double_quant", "compute_dtype"],
    "adapter": ["method", "r", "lora_alpha", "lora_dropout", "target_modules", "init_r", "target_r"],
    "data": ["source", "format", "max_length", "val_size", "max_samples", "overlength", "columns"],
    "training": ["max_steps", "learning_rate", "per_device_batch_size", "optimizer", "precision", "packing"],
    "output": ["run_name", "runs_dir"],
    "hardware": ["num_gpus"],
}
sections = st.fixed_dictionaries(
    {},
    optional={
        name: st.dictionaries(st.sampled_from(keys + ["bogus"]), values, max_size=4) | values
        for name, keys in SECTION_KEYS.items()
    }
    | {"recipe": st.sampled_from(["lora", "qlora", "nope", "../x"]) | values, "model_preset": values},
)


def _load(tmp_path: Path, text: str | bytes):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        return load_config(path)
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
        return None


@FUZZ
@given(config=sections)
def test_config_loader_gives_a_config_or_named_problems(tmp_path_factory, config):
    tmp = tmp_path_factory.mktemp("cfg")
    text = json.dumps(config, default=str, allow_nan=True)  # JSON is YAML: every structure the user could type
    _load(tmp, text)


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(alphabet=string.printable + "äé{}[]:-#&*!|>'\"%@`", max_size=200))
def test_config_loader_survives_any_bytes(tmp_path_factory, raw):
    _load(tmp_path_factory.mktemp("raw"), raw)


COLUMNS = [
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "prompt",
    "completion",
    "text",
    "role",
    "content",
    "from",
    "value",
    "system",
    "facts",
]
message = st.dictionaries(
    st.sampled_from(["role", "content", "from", "value"]),
    values | st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool"]),
    max_size=3,
)
row = st.dictionaries(
    st.sampled_from(COLUMNS),
    values | st.lists(message | values, max_size=4) | st.text(max_size=20),
    max_size=4,
)


def _examples(path: Path, fmt: str = "auto"):
    try:
        return load_examples(str(path), DataSection(source=str(path), format=fmt))
    except DataError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
        return None


@FUZZ
@given(
    rows=st.lists(row | values, min_size=1, max_size=5),
    fmt=st.sampled_from(["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"]),
)
def test_jsonl_rows_convert_or_name_the_bad_line(tmp_path_factory, rows, fmt):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r, default=str) for r in rows) + "\n", encoding="utf-8")
    result = _examples(path, fmt)
    if result is not None:
        _, _, located = result
        assert len(located) == len(rows)
        for _, ex in located:
            assert ("messages" in ex and ex["messages"]) or isinstance(ex.get("text"), str)


@FUZZ
@given(raw=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_any_file_bytes_give_rows_or_a_data_error(tmp_path_factory, raw, suffix):
    path = tmp_path_factory.mktemp("raw") / f"file{suffix}"
    path.write_bytes(raw)
    _examples(path)


# --- the runs dir: status.json and metrics.jsonl as any process, editor or disk fault may leave them -----------
STATUS_KEYS = ["state", "pid", "started_at", "ended_at", "exit_code", "error", "step", "max_steps", "failure", "phase"]
status_docs = (
    st.dictionaries(st.sampled_from([*STATUS_KEYS, "bogus"]), values | st.sampled_from(STATES), max_size=6) | values
)
METRIC_KINDS = st.sampled_from(["train", "eval", "system", "event"])
gpu_entry = st.dictionaries(st.sampled_from(["index", "mem_used_gb", "mem_total_gb", "util_percent"]), values)
metric_line = st.fixed_dictionaries(
    {"step": st.integers(0, 50) | values, "time": st.floats(0, 2e9) | values, "kind": METRIC_KINDS | values},
    optional={k: st.floats(0, 10) | values for k in NUMBER_KEYS}
    | {"event": st.sampled_from(["start", "memory_estimate"]) | values, "gpus": st.lists(gpu_entry, max_size=2)},
)


def _runs_dir_with(tmp: Path, status: bytes | None = None, metrics: bytes | None = None) -> Path:
    """A runs dir with one good finished run and one run "fuzz" whose files hold what was drawn."""
    runs = tmp / "runs"
    for name in ("good", "fuzz"):
        run = RunDir(runs / name)
        run.path.mkdir(parents=True)
        run.config.write_text("adapter: {method: lora, r: 4}\n", encoding="utf-8")
        run.write_status(state="completed", step=1, max_steps=1, started_at=1.0, ended_at=2.0, exit_code=0)
        run.append_metric("train", 1, loss=1.0, tokens_per_second=5.0)
        run.close()
        run.adapter.mkdir()
        (run.adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    if status is not None:
        (runs / "fuzz" / "status.json").write_bytes(status)
    if metrics is not None:
        (runs / "fuzz" / "metrics.jsonl").write_bytes(metrics)
    return runs


def _every_reader_survives(runs: Path) -> None:
    """Startup adoption, the Runs table, the monitor, the chat/export lists, then a queue tick that
    settles the fuzzed run as a dead running job: none raises, the good run is always listed."""
    fuzz, reason = runs / "fuzz", ""
    try:
        status = load_status(fuzz)
    except StatusError as e:
        status, reason = None, str(e)
        assert reason.startswith("status.json")
    manager = JobManager(runs)
    skipped = manager.adopt_runs_on_disk()
    assert ("fuzz" in {j.id for j in manager.registry.all()}) == (
        status is not None and status["state"] in FINAL_STATES
    )
    assert bool(skipped) == (status is None and (fuzz / "status.json").exists())
    rows = {j.id: SummaryCache().get(j).row() for j in manager.registry.all()}
    assert rows["good"][4] == "completed"
    row = summarize(fuzz).row()
    assert row[4] == (status or {}).get("state", "unknown") or row[4] == f"unreadable: {reason}"
    watch = RunWatch(fuzz)
    watch.poll()
    progress(watch.status).text()
    explain_failure(watch.status)
    loss_curves(fuzz)
    assert str(runs / "good" / "adapter") in [path for _, path in adapter_choices(manager.registry.all())]
    if "fuzz" not in rows:
        manager.registry.add("fuzz", None, "train", fuzz / "config.yaml", fuzz, state="running")
    manager.registry.update("fuzz", state="running", pid=None, proc_start=None)
    manager.tick()  # its process is gone: the state it wrote if that is a final one, else failed
    final = status is not None and status["state"] in FINAL_STATES
    assert manager.registry.get("fuzz").state == (status["state"] if final else "failed")


@FUZZ
@given(doc=status_docs)
def test_any_status_json_leaves_every_reader_standing(tmp_path_factory, doc):
    text = json.dumps(doc, default=str, allow_nan=True)
    _every_reader_survives(_runs_dir_with(tmp_path_factory.mktemp("st"), status=text.encode("utf-8", "replace")))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_any_status_bytes_leave_every_reader_standing(tmp_path_factory, raw):
    _every_reader_survives(_runs_dir_with(tmp_path_factory.mktemp("sb"), status=raw))


@FUZZ
@given(lines=st.lists(metric_line | values, max_size=6), tail=st.binary(max_size=40))
def test_any_metrics_lines_leave_every_reader_standing(tmp_path_factory, lines, tail):
    text = "".join(json.dumps(line, default=str, allow_nan=True) + "\n" for line in lines)
    _every_reader_survives(_runs_dir_with(tmp_path_factory.mktemp("m"), metrics=text.encode() + tail))


@settings(FUZZ, max_examples=25)  # a plotly figure costs ~0.1 s: fewer cases, the same lines
@given(lines=st.lists(metric_line, max_size=6))
def test_any_metrics_lines_plot(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("plot") / "metrics.jsonl"
    path.write_text("".join(json.dumps(line, default=str, allow_nan=True) + "\n" for line in lines))
    watch = RunWatch(path.parent)
    watch.poll()
    for figure in (plots.loss_figure, plots.optim_figure, plots.speed_figure, plots.memory_figure):
        figure(watch.series)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_any_metrics_bytes_leave_every_reader_standing(tmp_path_factory, raw):
    _every_reader_survives(_runs_dir_with(tmp_path_factory.mktemp("mb"), metrics=raw))
