"""The adapter's README.md: what it was trained from, how, and how well."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from trainer.config.run_config import RunConfig, resolved_target_modules
from trainer.run.launch import processes_per_machine


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(cfg: RunConfig, base: str, facts: dict[str, Any]) -> str:
    a, q, t, d = cfg.adapter, cfg.quantization, cfg.training, cfg.data
    quant = "none (16/32-bit base)" if q.mode == "none" else q.mode
    if q.mode == "4bit":
        quant += f" {q.quant_type}, double quant {'on' if q.double_quant else 'off'}, compute {q.compute_dtype}"
    rank = f"init_r {a.init_r} -> target_r {a.target_r}" if a.method == "adalora" else f"r {a.r}"
    rows = {
        "Base model": base,
        "Adapter method": a.method,
        "Rank": rank,
        "lora_alpha / dropout": f"{a.lora_alpha} / {a.lora_dropout}",
        "Target modules": resolved_target_modules(cfg),
        "Quantization": quant,
        "Training data": f"{d.source} ({facts.get('train_rows')} rows, format {facts.get('data_format')})",
        "Max length / packing": f"{d.max_length} / {t.packing}",
        "Steps / epochs": f"{facts.get('steps')} / {_fmt(facts.get('epoch'))}",
        "Learning rate / schedule": f"{t.learning_rate} / {t.lr_scheduler}",
        "Effective batch": t.per_device_batch_size * t.gradient_accumulation_steps * processes_per_machine(cfg),
        "Optimizer / precision": f"{t.optimizer} / {facts.get('precision')}",
        "Trainable parameters": f"{facts.get('trainable_params'):,} of {facts.get('total_params'):,} "
        f"({facts.get('trainable_percent')}%)",
        "Final train loss": _fmt(facts.get("final_train_loss")),
        "Final eval loss": _fmt(facts.get("final_eval_loss")),
        "Trained": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    return f"""---
base_model: {base}
library_name: peft
tags: [lora-workbench, {a.method}, sft, trl]
---

# {cfg.output.run_name or "LoRA Workbench adapter"}

A {a.method} adapter for `{base}`, trained with LoRA Workbench (TRL SFTTrainer + PEFT).

| | |
|---|---|
{table}

## Use

```python
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/adapter")
```

The full run configuration is in `workbench_config.yaml`; `lora-workbench train workbench_config.yaml` repeats the run.
"""
