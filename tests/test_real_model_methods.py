"""Each adapter method trains the built-in real model (SmolLM2-135M-Instruct) a few steps: 4-bit QLoRA, DoRA and
AdaLoRA through the same entry point as `lora-workbench train`.

Apart from tests/test_real_model.py so that the two run on two xdist workers (tests/conftest.py's FIRST_FILES).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import only_run
from tests.test_real_model import real_config, train_lines

# Two short rows a step, no accumulation: each method's whole path (load, quantize, wrap, train, save) at a fraction
# of the usual steps' cost.
SMALL_STEPS = {
    "data": {"max_length": 48, "max_samples": 6},
    "training": {"per_device_batch_size": 2, "gradient_accumulation_steps": 1},
}


@pytest.mark.parametrize(
    "overrides",
    [
        {"recipe": "qlora"},
        {"adapter": {"method": "dora"}},
        {"recipe": "adalora", "adapter": {"init_r": 8, "target_r": 4}, "training": {"max_steps": 4}},
    ],
    ids=["qlora-4bit", "dora", "adalora"],
)
def test_each_method_trains_the_real_model(real_model: Path, tmp_path: Path, overrides: dict) -> None:
    from trainer.config.presets import deep_merge
    from trainer.run.train import run_training

    assert run_training(str(real_config(tmp_path, deep_merge(SMALL_STEPS, overrides)))) == 0
    run = only_run(tmp_path / "runs")
    losses = [x["loss"] for x in train_lines(run)]
    assert len(losses) >= 3 and all(0 < x < 20 for x in losses)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
