"""Property-based fuzzing: whatever a user feeds the config loader or the dataset readers and converters, the
answer is a RunConfig / examples or a clear ConfigError / DataError that names where, never a traceback."""

from __future__ import annotations

import json
import string
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.config import ConfigError, DataSection
from trainer.data import load_examples
from trainer.data_files import DataError
from trainer.presets import load_config

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
