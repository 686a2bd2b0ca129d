"""Speed options on the CPU: each one trains the tiny model, or is refused before any model loads with a message
naming its field. Packed and padding-free batches keep rows apart under sdpa/eager (same loss as unpacked)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import only_run
from trainer.config.presets import build_config, load_config
from trainer.config.run_config import RunConfig
from trainer.model.device import hardware_problems, plan
from trainer.run.train import run_training
from trainer.run_dir import read_metrics

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine refuses")


def train(make_config, training: dict, model: dict | None = None) -> list[dict]:
    """Train a few steps with these options; returns the run's metrics lines after checking it completed."""
    cfg_path = make_config({"training": training, "model": model or {}})
    assert run_training(str(cfg_path)) == 0
    run = only_run(Path(load_config(cfg_path).output.runs_dir))
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == status["max_steps"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    return read_metrics(run / "metrics.jsonl")


@pytest.mark.parametrize(
    "training",
    [
        {"packing": True},
        {"padding_free": True},
        {"packing": True, "padding_free": True, "group_by_length": True},
        {"group_by_length": True},
        {"dataloader_num_workers": 2},
        {"tf32": "auto"},
        {"tf32": False},
    ],
    ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()),
)
def test_speed_option_trains_on_the_cpu(make_config, training: dict) -> None:
    lines = train(make_config, {"max_steps": 3, "save_steps": 100, **training})
    steps = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in steps] == [1, 2, 3]
    # Real tokens are counted in the training process even when DataLoader workers collate the batches.
    assert all(math.isfinite(x["loss"]) and x["tokens_per_second"] > 0 for x in steps)


def test_packing_counts_packed_blocks_as_the_epoch(make_config) -> None:
    """With packing, the steps of an epoch come from the packed blocks (several rows each), not from the rows."""
    lines = train(make_config, {"packing": True, "max_steps": -1, "num_epochs": 1, "save_steps": 100})
    loaded = next(x for x in lines if x.get("event") == "model_loaded")
    rows = next(x for x in lines if x.get("event") == "data")["train_rows"]
    assert loaded["max_steps"] < math.ceil(rows / 4)  # 4 = per_device_batch_size of make_config
    assert max(x["step"] for x in lines if x["kind"] == "train") == loaded["max_steps"]


def _eval_loss(cfg_path: Path, **training) -> float:
    """Evaluation loss of the untrained adapter (B = 0, so the base model's) with these batching options."""
    from trl import SFTTrainer

    from trainer.data.prepare import to_dataset
    from trainer.model.load import load_model
    from trainer.model.peft_config import to_peft_config
    from trainer.run.train import Session, load_data, open_run_dir, setup_run, to_sft_config

    cfg = load_config(cfg_path)
    cfg = RunConfig.model_validate({**cfg.model_dump(), "training": {**cfg.training.model_dump(), **training}})
    s = Session(cfg, open_run_dir(cfg, cfg_path, False))
    device_plan, path, tokenizer, _ = setup = setup_run(s)
    data = load_data(s, setup)
    trainer = SFTTrainer(
        model=load_model(cfg, path, device_plan),
        args=to_sft_config(cfg, s.run, device_plan.trainer_flags, has_eval=True),
        train_dataset=to_dataset(data.train),
        eval_dataset=to_dataset(data.eval),
        processing_class=tokenizer,
        peft_config=to_peft_config(cfg, 1),
    )
    return trainer.evaluate()["eval_loss"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_do_not_attend_to_each_other(make_config, attn: str) -> None:
    # 16 held-out rows, one evaluation batch: the loss is the mean over the same completion tokens either way, so
    # it matches only if no packed row sees another one (TRL 'bfd' packing passes position_ids, no attention mask).
    cfg_path = make_config(
        {"model": {"attn_implementation": attn}, "data": {"val_size": 16}, "training": {"per_device_batch_size": 16}}
    )
    plain = _eval_loss(cfg_path)
    for options in ({"packing": True}, {"padding_free": True}):
        assert _eval_loss(cfg_path, **options) == pytest.approx(plain, rel=1e-4), options


def test_sft_config_overrides_trl_defaults(make_config) -> None:
    """TRL 1.16 turns gradient checkpointing and bf16 on by default; the run's own choices win, loss stays nll."""
    from trainer.run.train import to_sft_config
    from trainer.run_dir import RunDir

    cfg_path = make_config({"training": {"group_by_length": True, "dataloader_num_workers": 2, "torch_compile": True}})
    cfg = load_config(cfg_path)
    args = to_sft_config(cfg, RunDir(cfg_path.parent), plan(cfg, cuda=False, bf16_ok=False).trainer_flags, False)
    assert (args.activation_checkpointing, args.bf16, args.fp16, args.use_cpu) == (False, False, False, True)
    assert (args.loss_type, args.packing, args.packing_strategy, args.padding_free) == ("nll", False, "bfd", False)
    assert (args.train_sampling_strategy, args.dataloader_num_workers) == ("group_by_length", 2)
    assert (args.torch_compile, args.use_liger_kernel, args.tf32) == (True, False, None)
    assert args.max_length == cfg.data.max_length


def test_tf32_auto_resolves_per_machine() -> None:
    cfg = build_config({})
    assert cfg.training.tf32 == "auto"
    assert plan(cfg, cuda=False, bf16_ok=False).tf32 is None  # untouched on a CPU: no TF32 there
    assert "tf32" not in plan(cfg, cuda=False, bf16_ok=False).trainer_flags
    assert plan(cfg, cuda=True, bf16_ok=True, tf32_ok=True).trainer_flags["tf32"] is True
    assert plan(cfg, cuda=True, bf16_ok=False, tf32_ok=False).tf32 is None  # pre-Ampere GPU: left alone
    off = build_config({"training": {"tf32": False}})
    assert plan(off, cuda=True, bf16_ok=True, tf32_ok=True).trainer_flags["tf32"] is False


def test_attention_and_packing_auto_pick_flash_attention_and_packing_only_where_it_runs(monkeypatch) -> None:
    from trainer.model import device

    cfg = build_config({})
    assert (cfg.model.attn_implementation, cfg.training.packing) == ("auto", "auto")
    cpu = plan(cfg, cuda=False, bf16_ok=False)
    assert cpu.attn == "sdpa" and device.packing(cfg, cpu)[0] is False
    monkeypatch.setattr(device, "installed", lambda module: module == "flash_attn")  # a GPU box with flash-attn
    gpu = plan(cfg, cuda=True, bf16_ok=True)
    packs, why = device.packing(cfg, gpu)
    assert gpu.attn == "flash_attention_2" and packs is True and "variable-length" in why
    assert plan(build_config({"model": {"dtype": "float32"}}), cuda=True, bf16_ok=True).attn == "sdpa"  # FA2: 16-bit
    assert device.packing(build_config({"adapter": {"method": "adalora"}}), gpu)[0] is False
    assert device.packing(build_config({"training": {"packing": False}}), gpu)[0] is False  # an explicit choice wins
    monkeypatch.setattr(device, "installed", lambda module: False)
    assert plan(cfg, cuda=True, bf16_ok=True).attn == "sdpa"  # no flash-attn package: nothing to refuse either
    assert device.speed_problems(cfg, cuda=True, tf32_ok=True) == []


def test_a_cpu_run_decides_packing_and_says_why(make_config) -> None:
    lines = train(make_config, {"max_steps": 1, "packing": "auto"}, {"attn_implementation": "auto"})
    (event,) = [m for m in lines if m.get("event") == "packing"]
    assert event["enabled"] is False and "sdpa" in event["reason"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"model": {"attn_implementation": "flash_attention_2"}},
            "model.attn_implementation: flash_attention_2 needs a CUDA GPU",
        ),
        (
            {"model": {"attn_implementation": "flash_attention_3"}},
            "model.attn_implementation: flash_attention_3 needs a CUDA GPU",
        ),
        (
            {"training": {"use_liger_kernel": True}},
            "training.use_liger_kernel: Liger's kernels are Triton GPU kernels",
        ),
        ({"training": {"tf32": True}}, "training.tf32: true needs an Ampere or newer NVIDIA GPU (a CPU has no TF32)"),
    ],
)
@CPU_ONLY
def test_gpu_only_option_is_refused_before_the_model_loads(make_config, overrides: dict, message: str) -> None:
    cfg_path = make_config(overrides)
    assert run_training(str(cfg_path)) == 1
    run = only_run(cfg_path.parent / "runs")
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and message in status["error"]
    assert not any(x.get("event") in ("data", "model_loaded") for x in read_metrics(run / "metrics.jsonl"))


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
def test_liger_without_the_package_names_the_install() -> None:
    cfg = build_config({"training": {"use_liger_kernel": True}})
    problems = hardware_problems(cfg, cuda=True, gpu_count=1, bf16_ok=True, tf32_ok=True)
    assert any(p.startswith("training.use_liger_kernel:") and "pip install liger-kernel" in p for p in problems)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_the_package_names_the_install() -> None:
    cfg = build_config({"model": {"attn_implementation": "flash_attention_2"}})
    problems = hardware_problems(cfg, cuda=True, gpu_count=1, bf16_ok=True, tf32_ok=True)
    assert any(p.startswith("model.attn_implementation:") and "pip install flash-attn" in p for p in problems)
    assert hardware_problems(build_config({}), cuda=True, gpu_count=1, bf16_ok=True, tf32_ok=True) == []
