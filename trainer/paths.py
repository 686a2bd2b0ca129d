"""Where the project's bundled files live, and how relative paths in a config are resolved."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = PROJECT_ROOT / "presets"
DATA_DIR = PROJECT_ROOT / "data"


def resolve_local(path: str) -> Path | None:
    """A config path relative to the cwd, else to the project root (bundled data); None if neither exists."""
    for candidate in (Path(path), PROJECT_ROOT / path):
        if candidate.exists():
            return candidate.resolve()
    return None
