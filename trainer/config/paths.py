"""Where the project's bundled files live, how relative paths in a config are resolved, and which directories
a page user may name (the roots the server was started with)."""

from __future__ import annotations

import os
import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # trainer/config/paths.py -> the repo
PRESETS_DIR = PROJECT_ROOT / "presets"
DATA_DIR = PROJECT_ROOT / "data"
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # a hub repo id: Org/name, or a bare one such as imdb
BUNDLED_DIRS = (DATA_DIR, PROJECT_ROOT / "examples")  # what the page may always read besides the runs dir


def resolve_local(path: str) -> Path | None:
    """A config path relative to the cwd, else to the project root (bundled data); None if neither exists."""
    for candidate in (Path(path), PROJECT_ROOT / path):
        if candidate.exists():
            return candidate.resolve()
    return None


def page_roots(runs_dir: Path, data_dirs: list[Path] | tuple[Path, ...] = ()) -> list[Path]:
    """The directories paths typed into the page must lie in: the runs dir (uploads too), the bundled data/ and
    examples/, and every `lora-workbench ui --data-dir`; resolved, symlinks followed."""
    return [Path(os.path.realpath(p)) for p in (runs_dir, *BUNDLED_DIRS, *data_dirs)]


def inside_roots(text: str, roots: list[Path], base: Path | None = None) -> Path | None:
    """The real path of text (relative to base, else the cwd) when it lies inside one of roots, else None.

    Symlinks and `..` are resolved first, and nothing outside the roots is looked at: whether such a path exists
    never shows in what the caller is told."""
    typed = Path(text.strip()).expanduser()
    path = Path(os.path.realpath(typed if base is None or typed.is_absolute() else base / typed))
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    return path if any(path == r or path.is_relative_to(r) for r in real_roots) else None


def refusal(what: str, text: str, roots: list[Path]) -> str:
    """The one message for a typed path outside the roots, whether or not it exists."""
    shown = ", ".join(os.path.realpath(r) for r in roots)
    return (
        f"{what} {text.strip()}: outside the directories this server may read ({shown}); "
        "start it with `lora-workbench ui --data-dir DIR` to allow another"
    )
