"""Presets: partial RunConfigs layered recipe -> model preset -> user edits.

Recipes (presets/recipes/*.yaml) set the adapter method and its usual knobs; model presets
(presets/models/*.yaml) set the model id, its module groups and target layers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from trainer.config.paths import PRESETS_DIR
from trainer.config.run_config import ConfigError, RunConfig, read_yaml, validate_config


def list_presets(kind: str) -> list[str]:
    """Names of the presets of one kind ('recipes' or 'models')."""
    return sorted(p.stem for p in (PRESETS_DIR / kind).glob("*.yaml"))


def load_preset(kind: str, name: str) -> dict[str, Any]:
    path = PRESETS_DIR / kind / f"{name}.yaml"
    if name not in list_presets(kind):  # by name only: no paths out of presets/
        field = "recipe" if kind == "recipes" else "model_preset"
        raise ConfigError([f"{field}: unknown preset {name!r} (available: {', '.join(list_presets(kind))})"])
    return read_yaml(path)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge mappings; lists and scalars in override replace those in base."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def layer(user: dict[str, Any]) -> dict[str, Any]:
    """Apply the recipe and model preset a user dict names, under the user's own values."""
    merged: dict[str, Any] = {}
    problems: list[str] = []
    for kind, key in (("recipes", "recipe"), ("models", "model_preset")):
        name = user.get(key)
        if name is None:
            continue
        try:
            merged = deep_merge(merged, load_preset(kind, str(name)))
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return deep_merge(merged, user)


def build_config(user: dict[str, Any], source: str | None = None) -> RunConfig:
    try:
        return validate_config(layer(user), source)
    except ConfigError as e:
        raise ConfigError(e.problems, source) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a user's YAML, apply `section.field=value` overrides, layer its presets and validate: the one way a
    config file becomes a RunConfig."""
    return build_config(deep_merge(read_yaml(path), parse_overrides(overrides or [])), str(path))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`training.max_steps=20 adapter.target_modules=[q_proj,v_proj]` as a nested mapping; values are YAML."""
    import yaml

    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected section.field=value, e.g. training.max_steps=20")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            problems.append(f"override {item!r}: the value is not valid YAML (quote it: {key}='...')")
            continue
        *sections, field = key.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {section} was given a value above")
                break
        else:
            node[field] = value
    if problems:
        raise ConfigError(problems)
    return out
