"""QLoRA and 8-bit runs resume faithfully: the resumed run keeps the adapter's dtype and its loss curve is the
uninterrupted run's (TRL casts a quantized base's adapter to bf16; PEFT's reload used to upcast it to fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import only_run
from trainer.run.train import run_training
from trainer.run_dir import read_metrics


def adapter_dtypes(run: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(run / "adapter" / "adapter_model.safetensors", framework="pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def train_losses(run: Path) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "train"}


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_resume_matches_the_uninterrupted_run(make_config, tmp_path: Path, mode: str) -> None:
    import torch
    from safetensors.torch import load_file

    overrides = {"quantization": {"mode": mode}, "training": {"max_steps": 6, "save_steps": 3}}
    whole_cfg = make_config(overrides, name="whole.yaml")
    assert run_training(str(whole_cfg)) == 0
    whole = only_run(tmp_path / "runs")
    checkpoint = whole / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "CHECKPOINT_COMPLETE").is_file()

    # The same run stopped after step 3 and resumed: a new run that starts from that checkpoint.
    resumed_runs = tmp_path / "resumed-runs"
    cfg = yaml.safe_load(whole_cfg.read_text())
    cfg["output"]["runs_dir"] = str(resumed_runs)
    cfg["training"]["resume_from_checkpoint"] = str(checkpoint)
    resumed_cfg = tmp_path / "resumed.yaml"
    resumed_cfg.write_text(yaml.safe_dump(cfg))
    assert run_training(str(resumed_cfg)) == 0
    resumed = only_run(resumed_runs)

    expected = train_losses(whole)
    got = train_losses(resumed)
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in got] == pytest.approx([expected[s] for s in got], rel=1e-6, abs=1e-7)
    assert adapter_dtypes(resumed) == adapter_dtypes(whole) == {"BF16"}  # TRL's cast for a quantized base
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed adapter differs from the uninterrupted one"
