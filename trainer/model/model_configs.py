"""config.json files of real architectures kept in presets/configs/, so estimates and benchmarks work offline.

presets/configs/index.yaml maps each directory to the hub ids it stands for; the directories hold only shapes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from trainer.config.paths import PROJECT_ROOT

CONFIGS_DIR = PROJECT_ROOT / "presets" / "configs"


@functools.cache
def _index() -> dict[str, str]:
    """hub id (lower case) -> directory name."""
    data = yaml.safe_load((CONFIGS_DIR / "index.yaml").read_text(encoding="utf-8")) or {}
    return {hub_id.lower(): name for name, ids in data.items() for hub_id in ids}


def kept_config_dir(name_or_path: str) -> Path | None:
    """The presets/configs directory standing for a hub id (or named directly), if there is one."""
    name = _index().get(name_or_path.lower(), name_or_path)
    path = CONFIGS_DIR / name
    return path if (path / "config.json").is_file() else None


def kept_names() -> list[str]:
    return sorted(p.name for p in CONFIGS_DIR.iterdir() if (p / "config.json").is_file())


class RemoteCodeRefused(ValueError):
    """Asked, in the UI server's process, for something only the model repo's own Python code can compute."""


def refuse_remote_code(trust_remote_code: bool, what: str) -> None:
    """Raise RemoteCodeRefused when trust_remote_code is on: that code runs only in a job the user started."""
    if trust_remote_code:
        raise RemoteCodeRefused(
            f"model.trust_remote_code is on: {what} needs the model's own code, which runs only in the training "
            "process, never in this server; press Start"
        )
