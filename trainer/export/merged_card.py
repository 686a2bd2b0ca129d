"""The README.md of a merged export: which base and adapter it came from, how it was merged, and how faithfully."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.chat.adapter_source import AdapterSource
from trainer.run_dir import read_status


def adapter_rows(source: AdapterSource) -> dict[str, Any]:
    """How the adapter was trained, from its run config (or adapter_config.json for a foreign adapter)."""
    pc = source.peft_config
    if source.cfg is None:
        return {
            "Rank": pc.get("r", pc.get("init_r")),
            "lora_alpha / dropout": f"{pc.get('lora_alpha')} / {pc.get('lora_dropout')}",
            "Target modules": pc.get("target_modules"),
            "Quantization during training": "unknown (not a LoRA Workbench run)",
        }
    from trainer.config.run_config import resolved_target_modules

    a, q, d = source.cfg.adapter, source.cfg.quantization, source.cfg.data
    quant = "none (16/32-bit base)" if q.mode == "none" else q.mode
    if q.mode == "4bit":
        quant += f" {q.quant_type}, double quant {'on' if q.double_quant else 'off'}"
    status = read_status(source.path.parent) or {}  # runs/<id>/status.json, when the adapter sits in its run dir
    return {
        "Rank": f"init_r {a.init_r} -> target_r {a.target_r}" if a.method == "adalora" else f"r {a.r}",
        "lora_alpha / dropout": f"{a.lora_alpha} / {a.lora_dropout}",
        "Target modules": resolved_target_modules(source.cfg),
        "Quantization during training": quant,
        "Training data": d.source,
        "Training steps": status.get("step", "unknown"),
    }


def merge_note(source: AdapterSource, merge_into: str) -> str:
    """One sentence on what the merged weights are, which matters for adapters trained on a quantized base."""
    if source.quantization == "none":
        return "The adapter's update was added to the full-precision base weights."
    if merge_into == "dequantized":
        return (
            f"The base was loaded in {source.quantization} as in training and dequantized before the merge, so the "
            "merged weights are exactly the weights the adapter was trained against."
        )
    return (
        f"The adapter was trained on a {source.quantization} base and merged into the unquantized base "
        "(the usual QLoRA practice), so outputs differ from the quantized model it was trained with (by how much: "
        "the table); `--merge-into dequantized` keeps the trained behaviour."
    )


def is_hub_id(name: str) -> bool:
    return not Path(name).expanduser().exists() and name.count("/") == 1


def merged_card(source: AdapterSource, report: dict[str, Any]) -> str:
    """README.md for the export directory (report: the export report, fidelity numbers included)."""
    f = report["fidelity"]
    rows = {
        "Base model": source.base,
        "Adapter": str(source.path),
        "Adapter method": source.method,
        **adapter_rows(source),
        "Merged into": report["merge_into"],
        "Saved dtype": report["dtype"],
        "Fidelity (logits vs base + adapter)": f"max abs diff {f['max_abs_logit_diff']:.3g}, mean "
        f"{f['mean_abs_logit_diff']:.3g}, tolerance {f['tolerance']:.3g}, greedy agreement "
        f"{f['greedy_agreement']:.1%} over {f['positions']} positions: {'passed' if f['passed'] else 'FAILED'}",
    }
    if t := report.get("against_trained_model"):
        rows[f"Against the model it was trained with ({source.quantization} base + adapter)"] = (
            f"max abs diff {t['max_abs_logit_diff']:.3g}, mean {t['mean_abs_logit_diff']:.3g}, greedy agreement "
            f"{t['greedy_agreement']:.1%} over {t['positions']} positions (reported, not a check)"
        )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    base_meta = f"base_model: {source.base}\n" if is_hub_id(source.base) else ""  # the hub rejects local paths
    return f"""---
{base_meta}library_name: transformers
tags: [lora-workbench, {source.method}, merged]
---

# Merged {source.method} model

`{source.base}` with a {source.method} adapter merged in by LoRA Workbench (`lora-workbench export`).
{merge_note(source, report["merge_into"])} It loads as a plain transformers model, no PEFT needed.

| | |
|---|---|
{table}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/model")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/model")
```

The fidelity check runs {f["prompts"]} chat prompts through base + adapter (unmerged) and through this model
reloaded from disk, teacher-forced; `export_report.json` holds every number.
"""
