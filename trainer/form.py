"""The Train tab's form as data: one FormField per RunConfig knob (kind, choices, help from the field's
description, group), and the two conversions between a RunConfig and the flat values the widgets hold.

Generated from the pydantic model, so a knob added to RunConfig appears in the UI with its help text.
"""

from __future__ import annotations

import shlex
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from trainer.config import ConfigError, RunConfig, validate_config
from trainer.presets import deep_merge, load_preset

SECTIONS = ("model", "quantization", "adapter", "data", "training", "output", "hardware")
GROUPS = ("Model & quantization", "Adapter", "Data", "Training", "Advanced")
_SECTION_GROUP = {
    "model": "Model & quantization",
    "quantization": "Model & quantization",
    "adapter": "Adapter",
    "data": "Data",
    "training": "Training",
    "output": "Advanced",
    "hardware": "Advanced",
}
# Knobs most runs never touch: kept under Advanced so the main groups stay short.
ADVANCED = {
    "model.revision",
    "model.trust_remote_code",
    "model.chat_template",
    "model.module_groups",
    "adapter.bias",
    "adapter.modules_to_save",
    "adapter.loftq_bits",
    "adapter.loftq_iter",
    "data.columns",
    "data.subset",
    "data.split",
    "data.system_prompt",
    "training.weight_decay",
    "training.max_grad_norm",
    "training.seed",
    "training.save_total_limit",
    "training.resume_from_checkpoint",
    "training.padding_free",
    "training.group_by_length",
    "training.dataloader_num_workers",
    "training.torch_compile",
    "training.use_liger_kernel",
    "training.tf32",
}
# Runs dir is the server's, not the form's: every UI run lives under it.
HIDDEN = {"output.runs_dir"}

Kind = Literal["choice", "bool", "int", "float", "text", "yaml"]


@dataclass(frozen=True)
class FormField:
    path: str
    kind: Kind
    label: str
    help: str
    group: str
    choices: tuple[Any, ...] = ()
    optional: bool = False
    empty: Any = None  # what an emptied YAML box means ({} / [] for collections)


def _kind(annotation: Any) -> tuple[Kind, tuple[Any, ...], bool]:
    args = typing.get_args(annotation)
    optional = type(None) in args
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) > 1:  # e.g. str | list[str]: edited as YAML text
            return "yaml", (), optional
        annotation = rest[0]
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "choice", typing.get_args(annotation), optional
    if origin in (dict, list):
        return "yaml", (), optional
    if annotation is bool:
        return "bool", (), optional
    if annotation is int:
        return "int", (), optional
    if annotation is float:
        return "float", (), optional
    return "text", (), optional


def form_fields() -> list[FormField]:
    out = []
    for section in SECTIONS:
        model: type[BaseModel] = RunConfig.model_fields[section].annotation  # type: ignore[assignment]
        for name, info in model.model_fields.items():
            path = f"{section}.{name}"
            if path in HIDDEN:
                continue
            kind, choices, optional = _kind(info.annotation)
            group = "Advanced" if path in ADVANCED else _SECTION_GROUP[section]
            default = info.get_default(call_default_factory=True)
            empty = None if optional else type(default)() if isinstance(default, (dict, list)) else ""
            out.append(FormField(path, kind, path, info.description or "", group, choices, optional, empty))
    return out


FIELDS = form_fields()


def _get(cfg: dict[str, Any], path: str) -> Any:
    section, name = path.split(".", 1)
    return (cfg.get(section) or {}).get(name)


def to_widget(field: FormField, value: Any) -> Any:
    """A config value as its widget holds it (YAML text for lists/dicts, '' for an unset text)."""
    if field.kind == "yaml":
        if isinstance(value, str) and _reads_back(value):
            return value
        if isinstance(value, str):  # e.g. a regex such as '[qv]_proj': quoted, so it reads back as this string
            return yaml.safe_dump(value, default_style="'", width=10**6).strip()
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip() if value else ""
    if field.kind == "text" and value is None:
        return ""
    if field.kind == "int" and field.optional and value is None:
        return 0
    return value


def _reads_back(text: str) -> bool:
    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def form_values(cfg: RunConfig) -> dict[str, Any]:
    """path -> widget value for every form field, plus the two preset names."""
    data = cfg.model_dump(mode="json")
    values = {f.path: to_widget(f, _get(data, f.path)) for f in FIELDS}
    values["recipe"], values["model_preset"] = cfg.recipe, cfg.model_preset
    return values


def _from_widget(field: FormField, value: Any, problems: list[str]) -> Any:
    if field.kind == "yaml":
        text = (value or "").strip()
        if not text:
            return field.empty
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            problems.append(f"{field.path}: not valid YAML ({getattr(e, 'problem', e)})")
            return None
    if field.kind == "text":
        text = "" if value is None else str(value).strip()
        return None if (field.optional and not text) else text
    if field.kind == "int" and field.optional and not value:
        return None  # an optional count left at 0 means "no limit", as its help text says
    if field.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_from_form(values: dict[str, Any], runs_dir: str) -> RunConfig:
    """Validate the form's values as one RunConfig (raises ConfigError naming every bad field)."""
    problems: list[str] = []
    data: dict[str, Any] = {s: {} for s in SECTIONS}
    for f in FIELDS:
        if f.path not in values:
            continue
        v = _from_widget(f, values[f.path], problems)
        if v is None and not f.optional:
            problems.append(f"{f.path}: required")
            continue
        section, name = f.path.split(".", 1)
        data[section][name] = v
    if problems:
        raise ConfigError(problems)
    data["output"]["runs_dir"] = runs_dir
    data["recipe"], data["model_preset"] = values.get("recipe") or None, values.get("model_preset") or None
    # The form shows the presets already applied: its values are the whole config, validated as they are.
    return validate_config(data)


def apply_preset(values: dict[str, Any], kind: str, name: str | None) -> dict[str, Any]:
    """The form values with the fields a recipe/model preset sets replaced by the preset's values."""
    key = "recipe" if kind == "recipes" else "model_preset"
    out = {**values, key: name or None}
    if not name:
        return out
    preset = load_preset(kind, name)
    by_path = {f.path: f for f in FIELDS}
    for section, body in preset.items():
        if not isinstance(body, dict):
            continue
        for knob, value in body.items():
            f = by_path.get(f"{section}.{knob}")
            if f is not None:
                out[f.path] = to_widget(f, value)
    return out


def default_values(runs_dir: str, example: str | None = None) -> dict[str, Any]:
    """The form a fresh page starts with: the example config (relative to the cwd or the project) or defaults."""
    from trainer.config import read_yaml
    from trainer.paths import resolve_local
    from trainer.presets import build_config, layer

    user: dict[str, Any] = {}
    path = resolve_local(example) if example else None
    if path is not None and path.is_file():
        user = read_yaml(path)
    cfg = build_config(deep_merge(layer(user), {"output": {"runs_dir": runs_dir}}))
    return form_values(cfg)


def cli_command(config_path: str) -> str:
    """The shell command that runs the same config headless."""
    return f"lora-workbench train {shlex.quote(config_path)}"
