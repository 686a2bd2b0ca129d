"""An adapter on disk: where it is, which run config made it, which base it belongs to, and whether a base fits.

Used by the chat tab and the export job. Everything here reads small files (JSON, YAML, the safetensors header);
no model weights are loaded, so a wrong path or a mismatched base is reported before any model is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config.run_config import ConfigError, RunConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter that cannot be used as asked, with what to do about it."""

    failure_kind = "model"  # trainer/failure.py's kind: the adapter or its base could not be loaded


@dataclass(frozen=True)
class AdapterSource:
    path: Path
    cfg: RunConfig | None  # the run config it was trained with, when it came from a workbench run
    peft_config: dict[str, Any]
    base: str  # what to load as the base: the override, the run's model, or adapter_config's base

    @property
    def method(self) -> str:
        if self.cfg is not None:
            return self.cfg.adapter.method
        return str(self.peft_config.get("peft_type", "lora")).lower()

    @property
    def quantization(self) -> str:
        return self.cfg.quantization.mode if self.cfg is not None else "none"


def run_config_of(adapter_dir: Path) -> RunConfig | None:
    """The workbench config saved with the adapter, or the run's config.yaml for a checkpoint inside a run dir."""
    from trainer.config.presets import load_config

    saved = adapter_dir / "workbench_config.yaml"
    if saved.is_file():
        return load_config(saved)
    for run in (adapter_dir.parent, adapter_dir.parent.parent):  # runs/<id>/adapter, runs/<id>/checkpoints/ckpt-N
        # only a run dir's config.yaml (beside its status.json): any other project's config.yaml is not the run's
        if (run / "config.yaml").is_file() and (run / "status.json").is_file():
            return load_config(run / "config.yaml")
    return None


def read_adapter(adapter_dir: str | Path, base_override: str | None = None) -> AdapterSource:
    """Check an adapter directory and find its base; AdapterError names the file and the fix."""
    from trainer.model.load import model_path

    path = Path(adapter_dir).expanduser()
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter directory")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{cfg_file}: missing; this is not a PEFT adapter directory (has the run saved one?)")
    if not (path / ADAPTER_WEIGHTS).is_file():
        found = ", ".join(sorted(p.name for p in path.glob("adapter_model.*"))) or "no weights"
        raise AdapterError(f"{path / ADAPTER_WEIGHTS}: missing ({found}); adapters load from safetensors only")
    check_weights_file(path / ADAPTER_WEIGHTS)
    try:
        peft_config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: not valid JSON (line {e.lineno}: {e.msg})") from e
    try:
        cfg = run_config_of(path)
    except ConfigError as e:
        raise AdapterError(f"{path}: its run config is invalid:\n{e}") from e
    base = base_override or (model_path(cfg) if cfg is not None else peft_config.get("base_model_name_or_path"))
    if not base:
        raise AdapterError(f"{path}: the adapter does not name its base model; choose the base explicitly")
    return AdapterSource(path.resolve(), cfg, peft_config, str(base))


def check_weights_file(weights: Path) -> None:
    """The safetensors header parses and its tensors' offsets fit the file (safetensors checks that on open):
    a truncated or corrupt file is named here, before a model loads, instead of failing the load."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        size = weights.stat().st_size
        raise AdapterError(
            f"{weights}: not a readable safetensors file ({size:,} bytes; {e}); it is truncated or corrupt "
            "(copied only in part, or the disk filled while it was saved); save or copy the adapter again"
        ) from None


def adapter_shapes(source: AdapterSource) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors header alone."""
    from safetensors import safe_open

    with safe_open(str(source.path / ADAPTER_WEIGHTS), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def shape_problems(shapes: dict[str, list[int]], modules: dict[str, tuple[int, int]]) -> list[str]:
    """Adapter tensors that do not fit the base: a module the base lacks, or other in/out features.

    modules maps a base module name to its (in_features, out_features).
    """
    problems = []
    for key, shape in sorted(shapes.items()):
        for part, dim, side in ((".lora_A", 1, 0), (".lora_B", 0, 1)):
            if not key.removesuffix(".weight").endswith(part):  # AdaLoRA saves lora_A without ".weight"
                continue
            name = key.removeprefix("base_model.model.").removesuffix(".weight").removesuffix(part)
            if name not in modules:
                problems.append(f"{name}: the adapter has weights for it, the base has no such layer")
            elif shape[dim] != modules[name][side]:
                what = "in_features" if side == 0 else "out_features"
                problems.append(f"{name}: adapter {what} {shape[dim]}, base {modules[name][side]}")
    return problems


def rank_problems(shapes: dict[str, list[int]], peft_config: dict[str, Any]) -> list[str]:
    """LoRA tensors whose rank is not the one adapter_config.json names (r, or its rank_pattern entry): PEFT would
    build layers of that rank and then fail to load the weights into them, after the base model has loaded."""
    if str(peft_config.get("peft_type", "LORA")).upper() != "LORA" or not isinstance(peft_config.get("r"), int):
        return []  # AdaLoRA's ranks are its own budget; other types name no r
    pattern = peft_config.get("rank_pattern") or {}
    problems = []
    for key, shape in sorted(shapes.items()):
        if not key.endswith(".lora_A.weight") or len(shape) != 2:
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        want = next((r for k, r in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), peft_config["r"])
        if shape[0] != want:
            problems.append(f"{name}: adapter_config.json says rank {want}, its weights have rank {shape[0]}")
    return problems


def base_linear_shapes(base: str) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear layer of a base model, built on the meta device from its config.json.
    Never with the model repo's own code: this runs in the UI server too (the chat and export checks)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return {
        name: (m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }


def check_fits_base(source: AdapterSource) -> None:
    """Raise AdapterError when the adapter was made for another base (checked without loading weights).
    A base that is only defined by its own code (trust_remote_code) is not checked here; its job finds out."""
    trust = bool(source.cfg and source.cfg.model.trust_remote_code)
    try:
        modules = base_linear_shapes(source.base)
    except OSError as e:
        raise AdapterError(f"base model {source.base}: cannot read its config.json ({e})") from e
    except (ValueError, KeyError) as e:
        if trust:  # an architecture transformers does not know without the repo's code
            return
        if "custom code" in str(e):
            raise AdapterError(
                f"base model {source.base} ships its own Python code (auto_map in its config.json), which this "
                "server never runs; tick model.trust_remote_code in the run's config so its jobs may"
            ) from None
        raise
    shapes = adapter_shapes(source)
    if mismatched := rank_problems(shapes, source.peft_config):
        raise AdapterError(
            f"adapter {source.path}: adapter_config.json does not match its weights (edited, or copied from "
            f"another adapter):\n{listed(mismatched)}\nRestore the adapter_config.json saved with these weights."
        )
    problems = shape_problems(shapes, modules)
    if problems:
        trained_on = source.peft_config.get("base_model_name_or_path") or "another model"
        raise AdapterError(
            f"adapter {source.path} does not fit base {source.base}: it was trained on {trained_on}.\n"
            f"{listed(problems)}\nChoose the base it was trained on."
        )


def listed(problems: list[str], shown: int = 5) -> str:
    """The first problems as a list, and how many more there are."""
    more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
    return "\n".join(f"  - {p}" for p in problems[:shown]) + more
