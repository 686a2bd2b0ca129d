"""How many optimizer steps a run takes: needed up front by AdaLoRA's rank schedule and by the pre-flight."""

from __future__ import annotations

import math

from trainer.config.run_config import RunConfig


def total_optimizer_steps(cfg: RunConfig, n_train: int, world_size: int) -> int:
    """Optimizer steps the Trainer will run (its own formula), needed up front by AdaLoRA's schedule."""
    t = cfg.training
    if t.max_steps > 0:
        return t.max_steps
    batches = math.ceil(n_train / (t.per_device_batch_size * world_size))
    per_epoch = max(batches // t.gradient_accumulation_steps + int(batches % t.gradient_accumulation_steps > 0), 1)
    return math.ceil(t.num_epochs * per_epoch)
