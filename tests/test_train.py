"""End-to-end training on the tiny model: every method, quantization, AdaLoRA, NaN guard, metrics contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import only_run
from trainer.config.presets import load_config
from trainer.plan.estimate import estimate
from trainer.run import lean_memory
from trainer.run.train import run_training
from trainer.run_dir import read_metrics

METHOD_OVERRIDES = {
    "lora": {"recipe": "lora"},
    "dora": {"recipe": "dora"},
    "rslora": {"recipe": "rslora"},
    "pissa": {"recipe": "pissa"},
    "adalora": {"recipe": "adalora", "adapter": {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 1}},
    "qlora-4bit": {"recipe": "qlora", "quantization": {"compute_dtype": "float32"}},
    "qlora-8bit": {
        "recipe": "qlora",
        "quantization": {"mode": "8bit"},
        "training": {"optimizer": "paged_adamw_32bit"},
    },
}


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
def test_method_trains_saves_and_changes_only_the_adapter(method: str, make_config, tiny_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg_path = make_config(METHOD_OVERRIDES[method])
    assert run_training(str(cfg_path)) == 0
    run = only_run(Path(load_config(cfg_path).output.runs_dir))
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["exit_code"], status["step"], status["max_steps"]) == ("completed", 0, 6, 6)
    adapter = run / "adapter"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "README.md",
        "workbench_config.yaml",
    ):
        assert (adapter / name).is_file(), name
    card = (adapter / "README.md").read_text()
    assert "Trainable parameters" in card and str(tiny_model) in card
    weights = load_file(adapter / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())

    # Base weights unchanged, adapter effective: base+adapter with the adapter disabled equals the untouched base.
    ids = torch.tensor([[1, 5, 9, 30, 200, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    reference = logits_of(base, ids)
    if method.startswith("qlora"):
        return  # a quantized base differs from the fp32 one by design; training and files were checked above
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    with tuned.disable_adapter():
        assert torch.allclose(logits_of(tuned, ids), reference, atol=1e-5)
    assert not torch.allclose(logits_of(tuned, ids), reference, atol=1e-4)


def test_loftq_needs_a_gpu(make_config) -> None:
    if torch.cuda.is_available():
        pytest.skip("GPU present: LoftQ runs in the GPU check, not here")
    cfg_path = make_config({"recipe": "loftq"})
    assert run_training(str(cfg_path)) == 1
    status = json.loads((only_run(cfg_path.parent / "runs") / "status.json").read_text())
    assert status["state"] == "failed" and "loftq needs a CUDA GPU" in status["error"]
    assert status["failure"]["kind"] == "config" and status["failure"]["message"] == status["error"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="LoftQ initialisation asserts CUDA")
def test_loftq_trains_on_gpu(make_config) -> None:
    assert run_training(str(make_config({"recipe": "loftq"}))) == 0


def test_adalora_reallocates_ranks(make_config) -> None:
    cfg_path = make_config(
        {
            "recipe": "adalora",
            "adapter": {"init_r": 8, "target_r": 2, "tinit": 2, "tfinal": 4, "delta_t": 1},
            "training": {"max_steps": 20, "logging_steps": 5, "save_steps": 100},
        }
    )
    assert run_training(str(cfg_path)) == 0
    run = only_run(cfg_path.parent / "runs")
    ranks = json.loads((run / "adalora_ranks.json").read_text())
    assert len(ranks) == 14 and set(ranks.values()) != {8}, ranks
    assert sum(ranks.values()) < 8 * len(ranks)
    assert any(e.get("event") == "adalora_ranks" for e in read_metrics(run / "metrics.jsonl"))


def test_metrics_lines_follow_the_contract(make_config) -> None:
    cfg_path = make_config({"data": {"val_size": 0.25}, "training": {"eval_steps": 3}})
    assert run_training(str(cfg_path)) == 0
    run = only_run(cfg_path.parent / "runs")
    lines = read_metrics(run / "metrics.jsonl")
    assert all({"step", "time", "kind"} <= set(x) and x["kind"] in ("train", "eval", "system", "event") for x in lines)
    train = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3, 4, 5, 6]
    for x in train:
        assert {"loss", "learning_rate", "grad_norm", "epoch", "tokens_per_second"} <= set(x)
        assert math.isfinite(x["loss"]) and x["tokens_per_second"] > 0
    assert [x["step"] for x in lines if x["kind"] == "eval"] == [3, 6]
    assert all("eval_loss" in x for x in lines if x["kind"] == "eval")
    system = [x for x in lines if x["kind"] == "system"]
    assert len(system) == 6 and all(x.get("cpu_rss_gb", 0) > 0 or "gpu_mem_allocated_gb" in x for x in system)
    events = [x["event"] for x in lines if x["kind"] == "event"]
    assert events[0] == "start" and "data" in events and events[-1] == "end"
    precision = next(x for x in lines if x.get("event") == "precision")  # what 'auto' became, and why
    assert precision["precision"] in ("bf16", "fp16", "fp32") and precision["reason"].startswith(
        precision["precision"]
    )
    lean = next(x for x in lines if x.get("event") == "lean_memory")  # in-process: this test's own allocator
    assert lean["allocator"] == (lean_memory.loaded_allocator() or "system")
    assert lean["fused_head_tile_tokens"] in (lean_memory.HEAD_TILE_TOKENS, None)  # None: a TRL without the knob
    log = (run / "train.log").read_text()
    assert "completed" in log and "'loss'" in log and "training.precision auto -> " in log
    assert (run / "checkpoints" / "checkpoint-6" / "CHECKPOINT_COMPLETE").is_file()


def test_estimate_matches_the_trained_count(make_config) -> None:
    for overrides in (
        {"recipe": "lora"},
        {"recipe": "dora", "adapter": {"target_modules": "attention"}},
        {"recipe": "adalora", "adapter": {"init_r": 6, "target_r": 2}},
    ):
        cfg_path = make_config(
            {**overrides, "output": {"runs_dir": str(Path(make_config().parent) / overrides["recipe"])}}
        )
        assert run_training(str(cfg_path)) == 0
        run = only_run(Path(load_config(cfg_path).output.runs_dir))
        loaded = next(x for x in read_metrics(run / "metrics.jsonl") if x.get("event") == "model_loaded")
        est = estimate(load_config(cfg_path))
        assert (est.trainable_params, est.total_params) == (loaded["trainable_params"], loaded["total_params"])


def test_nan_loss_stops_the_run_as_failed(make_config, tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # a corrupt base: every forward pass gives a NaN loss
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(broken)
    cfg_path = make_config({"model": {"name_or_path": str(broken)}, "training": {"max_steps": 20}})
    assert run_training(str(cfg_path)) == 1
    run = only_run(cfg_path.parent / "runs")
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "became nan at step 1" in status["error"]
    assert status["failure"]["kind"] == "nan" and "learning_rate" in status["failure"]["hint"]
    assert status["step"] < 20
    train = [x for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "train"]
    assert train[0]["loss"] is None and "loss" in train[0]["nonfinite"]  # shown, as strict JSON, not hidden


def test_bad_data_fails_before_the_model_loads(make_config, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    cfg_path = make_config({"data": {"source": str(bad)}})
    assert run_training(str(cfg_path)) == 1
    run = only_run(cfg_path.parent / "runs")
    status = json.loads((run / "status.json").read_text())
    assert "bad.jsonl" in status["error"] and "line 2: invalid JSON" in status["error"]
    assert status["failure"]["kind"] == "data" and "file and line" in status["failure"]["hint"]
    assert not any(x.get("event") == "model_loaded" for x in read_metrics(run / "metrics.jsonl"))


def test_invalid_config_creates_no_run(make_config, capsys) -> None:
    cfg_path = make_config({"adapter": {"r": 0}})
    assert run_training(str(cfg_path)) == 1
    assert "adapter.r: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert not (cfg_path.parent / "runs").exists()


def test_a_finished_run_is_not_overwritten(make_config) -> None:
    cfg_path = make_config()
    assert run_training(str(cfg_path)) == 0
    run = only_run(cfg_path.parent / "runs")
    before = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert run_training(str(run / "config.yaml")) == 1
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert json.loads((run / "status.json").read_text())["state"] == "completed"


def test_a_crashed_run_is_not_restarted_over_itself(make_config) -> None:
    cfg_path = make_config()
    assert run_training(str(cfg_path)) == 0
    run = only_run(cfg_path.parent / "runs")
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "state": "running", "pid": 999999}))
    assert run_training(str(run / "config.yaml")) == 1  # needs --resume, never retrains from step 1 in place
    assert json.loads((run / "status.json").read_text())["state"] == "running"
