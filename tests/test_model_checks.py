"""What a first-time user trips on with the model (issue 15): an explicit target-module list with a name that is
no layer, a model id that is not on this machine, a max_length past the model's context. Each is one problem
naming the field, in the live estimate, at Start and in `lora-workbench train`, before any model loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from app.context import AppContext
from app.train_tab import estimate_md, preview_outputs, start_run
from app.views.form import default_values
from trainer.jobs.queue import JobManager
from trainer.run.train import run_training

ROOT = Path(__file__).resolve().parent.parent
MADE_UP = "nobody-lwb/made-up-model-7b"


@pytest.fixture
def ctx(tmp_path: Path) -> AppContext:
    runs = tmp_path / "runs"
    return AppContext(runs, JobManager(runs, max_running=0), data_dirs=[])  # nothing starts


def form(ctx: AppContext, model: Path | str, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The page's form on the tiny example (with this model), some fields typed in as the user would."""
    values = default_values(str(ctx.runs_dir), "examples/tiny-lora.yaml")
    return {**values, "model.name_or_path": str(model), **(changes or {})}


def refused_everywhere(ctx: AppContext, values: dict[str, Any], expected: str) -> None:
    """The live estimate and Start both say `expected` (no traceback, no run created)."""
    estimate = estimate_md(ctx, values)
    assert estimate.startswith("**Fix before starting:**") and expected in estimate, estimate
    message, run_id = start_run(ctx, values)
    assert run_id is None and message.startswith("**Not started. Fix these fields:**"), message
    assert expected in message, message
    assert not [p for p in ctx.runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]  # no run dir


def train_fails_before_the_model(make_config, overrides: dict[str, Any], expected: str, capsys) -> None:
    """`lora-workbench train` exits 1 with `expected` in stderr and status.json, no traceback, nothing trained."""
    config = make_config(overrides)
    code = run_training(str(config))
    err = capsys.readouterr().err
    assert code == 1 and expected in err and "Traceback" not in err, err
    (run,) = [p for p in (config.parent / "runs").iterdir() if p.is_dir()]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and expected in status["error"], status
    assert not (run / "adapter").exists()
    assert not any(json.loads(x)["kind"] == "train" for x in (run / "metrics.jsonl").read_text().splitlines())


# --- 1: an explicit target-modules list ------------------------------------------------------------------------
def test_a_target_module_list_naming_no_layer_is_refused_by_the_estimate_and_start(ctx, tiny_model):
    refused_everywhere(
        ctx,
        form(ctx, tiny_model, {"adapter.target_modules": "[foo_proj]"}),
        "adapter.target_modules: 'foo_proj' is no layer of this model",
    )
    typo = form(ctx, tiny_model, {"adapter.target_modules": "[q_proj, v_prj]"})  # PEFT would drop v_prj silently
    refused_everywhere(ctx, typo, "adapter.target_modules: 'v_prj' is no layer of this model; did you mean v_proj")
    regex = form(ctx, tiny_model, {"adapter.target_modules": r".*\.q_prj"})
    refused_everywhere(ctx, regex, r"adapter.target_modules: the regex '.*\\.q_prj' matches no layer of this model")
    commas = form(ctx, tiny_model, {"adapter.target_modules": "q_proj,v_proj"})  # read as one regex, as PEFT does
    refused_everywhere(ctx, commas, "for a list write [q_proj, v_proj]")


def test_a_valid_target_module_list_trains_exactly_the_layers_plain_peft_does(ctx, tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    values = form(ctx, tiny_model, {"adapter.target_modules": "[q_proj, v_proj]", "adapter.r": 4})
    estimate = estimate_md(ctx, values)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    assert f"**Trainable parameters: {trainable:,}**" in estimate, (trainable, estimate)


def test_train_refuses_a_misspelled_target_module_before_the_model_loads(make_config, capsys):
    overrides = {"adapter": {"target_modules": ["q_proj", "v_prj"]}}
    train_fails_before_the_model(make_config, overrides, "adapter.target_modules: 'v_prj' is no layer", capsys)


# --- 6: data.max_length against the model's context ------------------------------------------------------------
def test_a_max_length_past_the_models_context_is_refused_by_the_estimate_and_start(ctx, tiny_model):
    assert json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"] == 1024
    expected = "data.max_length: 10,000,000 is longer than the model's context (max_position_embeddings 1,024"
    refused_everywhere(ctx, form(ctx, tiny_model, {"data.max_length": 10_000_000}), expected)
    assert "Trainable parameters" in estimate_md(ctx, form(ctx, tiny_model, {"data.max_length": 1024}))


def test_train_refuses_a_max_length_past_the_models_context(make_config, capsys):
    expected = "data.max_length: 2,048 is longer than the model's context (max_position_embeddings 1,024"
    train_fails_before_the_model(make_config, {"data": {"max_length": 2048}}, expected, capsys)


# --- 2: a model id that is not on this machine -------------------------------------------------------------------
def test_an_uncached_model_id_offline_is_named_as_the_model_in_estimate_preview_and_start(ctx):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: no hub; the answer comes from the local cache lookup
    values = form(ctx, MADE_UP)
    expected = f"model.name_or_path: '{MADE_UP}' is not in the local model cache and the hub is off (HF_HUB_OFFLINE=1)"
    refused_everywhere(ctx, values, expected)
    message, _ = start_run(ctx, values)
    assert "the data has problems" not in message and "tokenizer" not in message
    assert f"hf download {MADE_UP}" in message and "type its directory" in message  # the fixes
    verdict, rows, _, errors = preview_outputs(ctx, values)
    assert verdict.startswith("**Data read**") and expected in verdict and not errors, (verdict, errors)


def test_a_model_path_that_does_not_exist_is_named_as_such(ctx, tmp_path):
    missing = tmp_path / "models" / "my-model"
    refused_everywhere(ctx, form(ctx, missing), f"model.name_or_path: no directory {missing}")
    (tmp_path / "empty-model").mkdir()
    empty = tmp_path / "empty-model"
    refused_everywhere(ctx, form(ctx, empty), f"model.name_or_path: the directory {empty} holds no config.json")


def test_train_refuses_an_uncached_model_id_offline(make_config, capsys):
    expected = f"model.name_or_path: '{MADE_UP}' is not in the local model cache"
    train_fails_before_the_model(
        make_config, {"model_preset": None, "model": {"name_or_path": MADE_UP}}, expected, capsys
    )


def test_without_a_network_one_hub_request_answers_naming_the_model(ctx, monkeypatch):
    """Not offline, but the hub cannot be reached (a closed local port): one request, not the download retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    expected = f"model.name_or_path: '{MADE_UP}' is not in the local model cache and the hub (http://127.0.0.1:9) cannot be reached"
    refused_everywhere(ctx, form(ctx, MADE_UP), expected)
    message, _ = start_run(ctx, form(ctx, MADE_UP))
    assert "set HF_HUB_OFFLINE=1 to stop trying the hub" in message and "the data has problems" not in message


def test_a_cached_hub_model_is_checked_from_the_cache(ctx, tmp_path, tiny_model, monkeypatch):
    """A hub id whose files are in the local hub cache passes offline, read from the cache; its layers are checked."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in tiny_model.iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read by every cache lookup
    assert "**Trainable parameters:" in estimate_md(ctx, form(ctx, "someone/tiny"))
    typo = form(ctx, "someone/tiny", {"adapter.target_modules": "[q_proj, v_prj]"})
    refused_everywhere(ctx, typo, "adapter.target_modules: 'v_prj' is no layer of this model; did you mean v_proj")
