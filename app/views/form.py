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

from trainer.config.presets import build_config, deep_merge, layer
from trainer.config.run_config import ConfigError, RunConfig, validate_config

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
# Labels in words; the config path stays in the help line. Fields not named here read as their name in words.
LABELS = {
    "model.name_or_path": "Model (hub id or local path)",
    "model.dtype": "Weights dtype",
    "model.attn_implementation": "Attention implementation",
    "model.trust_remote_code": "Run the model's own code",
    "model.module_groups": "Module groups",
    "quantization.mode": "Quantize the base",
    "quantization.quant_type": "4-bit type",
    "quantization.double_quant": "Double quantization",
    "quantization.compute_dtype": "4-bit compute dtype",
    "adapter.method": "Adapter method",
    "adapter.r": "Rank r",
    "adapter.lora_alpha": "LoRA alpha",
    "adapter.lora_dropout": "LoRA dropout",
    "adapter.init_r": "Initial rank",
    "adapter.target_r": "Target average rank",
    "adapter.tinit": "Warm-up steps before pruning",
    "adapter.tfinal": "Final steps with ranks frozen",
    "adapter.delta_t": "Steps between reallocations",
    "adapter.loftq_bits": "LoftQ bits",
    "adapter.loftq_iter": "LoftQ iterations",
    "data.source": "Training data",
    "data.format": "Row format",
    "data.subset": "Hub subset",
    "data.split": "Hub split",
    "data.eval_source": "Evaluation data",
    "data.max_samples": "Use only the first N rows",
    "data.val_size": "Held-out share",
    "data.max_length": "Max tokens per row",
    "data.overlength": "Rows over max length",
    "training.num_epochs": "Epochs",
    "training.lr_scheduler": "LR schedule",
    "training.warmup_ratio": "Warm-up share",
    "training.per_device_batch_size": "Batch size per device",
    "training.gradient_accumulation_steps": "Gradient accumulation steps",
    "training.padding_free": "Padding-free batches",
    "training.dataloader_num_workers": "Data loader workers",
    "training.use_liger_kernel": "Liger kernels",
    "training.tf32": "TF32 matmuls",
    "training.max_grad_norm": "Gradient clipping norm",
    "training.save_total_limit": "Checkpoints to keep",
    "hardware.num_gpus": "GPUs",
    "hardware.cpu_processes": "CPU processes",
}
# Knobs that mean something only for some adapter methods / quantization modes: hidden for the others.
ONLY_FOR = {
    **{f"adapter.{k}": ("adapter.method", ("adalora",)) for k in ("init_r", "target_r", "tinit", "tfinal", "delta_t")},
    **{f"adapter.{k}": ("adapter.method", ("loftq",)) for k in ("loftq_bits", "loftq_iter")},
    **{f"quantization.{k}": ("quantization.mode", ("4bit",)) for k in ("quant_type", "double_quant", "compute_dtype")},
}

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

    @property
    def info(self) -> str:
        """The widget's help line: the field's description, then its config path for YAML and CLI users."""
        return f"{self.help} ({self.path})"


def label_of(path: str) -> str:
    """A field's label in words, e.g. 'training.max_steps' -> 'Max steps'."""
    return LABELS.get(path) or path.split(".", 1)[1].replace("_", " ").capitalize()


def shown_fields(values: dict[str, Any]) -> dict[str, bool]:
    """path -> whether the form shows it for the method and quantization mode in values."""
    return {f.path: f.path not in ONLY_FOR or values.get(ONLY_FOR[f.path][0]) in ONLY_FOR[f.path][1] for f in FIELDS}


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
            out.append(FormField(path, kind, label_of(path), info.description or "", group, choices, optional, empty))
    return out


FIELDS = form_fields()
BY_PATH = {f.path: f for f in FIELDS}


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


def edited_after(edited: set[str], path: str) -> set[str]:
    """The fields the user has set by hand, after they edit one more (presets never override these)."""
    return edited | {path}


def _user_dict(values: dict[str, Any], edited: set[str]) -> dict[str, Any]:
    """The edited fields as a partial config, the way a user's YAML file holds them; unparsable ones left out."""
    user: dict[str, Any] = {}
    for path in sorted(edited & BY_PATH.keys()):
        problems: list[str] = []
        value = _from_widget(BY_PATH[path], values.get(path), problems)
        if not problems:
            section, name = path.split(".", 1)
            user.setdefault(section, {})[name] = value
    return user


def apply_preset(values: dict[str, Any], edited: set[str], kind: str, name: str | None) -> dict[str, Any]:
    """The form after picking a recipe/model preset: what the CLI builds (defaults -> recipe -> model preset ->
    the user's fields), where the user's fields are those in edited, kept exactly as typed."""
    key = "recipe" if kind == "recipes" else "model_preset"
    names = {"recipe": values.get("recipe") or None, "model_preset": values.get("model_preset") or None}
    names[key] = name or None
    merged = layer({**names, **_user_dict(values, edited)})  # raises ConfigError for an unknown preset
    defaults = RunConfig().model_dump(mode="json")
    # A field set in a layer replaces the default whole (as pydantic does), so sections merge one level deep.
    data = {s: {**defaults[s], **(merged.get(s) or {})} for s in SECTIONS}
    out = {f.path: to_widget(f, _get(data, f.path)) for f in FIELDS}
    out |= {p: values[p] for p in edited if p in values}
    return {**out, **names}


def after_data_change(values: dict[str, Any], edited: set[str]) -> tuple[dict[str, Any], set[str], str]:
    """(values, edited, note) once the training data changed: an eval file chosen for the old data is cleared
    and a 10% held-out split of the new data offered instead, and the note says so."""
    old = (values.get("data.eval_source") or "").strip()
    if not old:
        return values, edited, ""
    out = {**values, "data.eval_source": ""}
    split = "no held-out split (set data.val_size for one)"
    if not values.get("data.val_size"):
        out["data.val_size"] = 0.1
        split = "10% of the new data held out instead (data.val_size 0.1)"
    note = (
        f"The training data changed, so the evaluation file `{old}` (chosen for the old data) was cleared: "
        f"{split}. Set data.eval_source to evaluate on a file of your own."
    )
    return out, edited | {"data.source", "data.eval_source", "data.val_size"}, note


# A run that sees each row more than this many times mostly memorises it: said before Start, not refused.
MANY_PASSES = 10


def passes_warning(cfg: RunConfig, rows: int) -> str:
    """A warning when the run will pass over its training rows more than MANY_PASSES times, else ''."""
    d, t = cfg.data, cfg.training
    held = 0 if d.eval_source else int(d.val_size) if d.val_size >= 1 else round(rows * d.val_size)
    train_rows = max(rows - held, 1)
    per_step = t.per_device_batch_size * t.gradient_accumulation_steps * max(cfg.hardware.num_gpus, 1)
    if t.max_steps > 0:
        passes = t.max_steps * per_step / train_rows
        how = f"{t.max_steps} steps × {per_step} sequences = about {passes:.0f} passes over the {train_rows} training rows"
    else:
        passes = t.num_epochs
        how = f"{t.num_epochs:g} epochs over the {train_rows} training rows"
    if passes <= MANY_PASSES:
        return ""
    return (
        f"**Warning:** {how}: a run that sees each row more than {MANY_PASSES} times mostly memorises it. "
        "Lower training.max_steps (or training.num_epochs), or add rows."
    )


def _example_user(example: str | None) -> dict[str, Any]:
    """The example config file as the user wrote it (relative to the cwd or the project), or {}."""
    from trainer.config.paths import resolve_local
    from trainer.config.run_config import read_yaml

    path = resolve_local(example) if example else None
    return read_yaml(path) if path is not None and path.is_file() else {}


def default_form(runs_dir: str, example: str | None = None) -> tuple[dict[str, Any], set[str]]:
    """(values, edited) a fresh page starts with: the example's fields count as the user's, as in its file."""
    user = _example_user(example)
    cfg = build_config(deep_merge(layer(user), {"output": {"runs_dir": runs_dir}}))
    edited = {f"{s}.{k}" for s, body in user.items() if isinstance(body, dict) for k in body} & BY_PATH.keys()
    return form_values(cfg), edited


def default_values(runs_dir: str, example: str | None = None) -> dict[str, Any]:
    """The form a fresh page starts with: the example config (relative to the cwd or the project) or defaults."""
    return default_form(runs_dir, example)[0]


def cli_command(config_path: str) -> str:
    """The shell command that runs the same config headless."""
    return f"lora-workbench train {shlex.quote(config_path)}"
