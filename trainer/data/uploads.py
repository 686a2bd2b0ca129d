"""Datasets uploaded from the page: checked (type, size), stored under <runs_dir>/uploads with a generated
name, and listed with the bundled samples. They are read later as data only (trainer/data/files.py)."""

from __future__ import annotations

import re
import shutil
import time
import uuid
from pathlib import Path

from trainer.config.paths import DATA_DIR
from trainer.data.files import SUFFIXES, DataError

UPLOAD_LIMIT_MB = 200


def uploads_dir(runs_dir: Path) -> Path:
    return runs_dir / "uploads"


def store_upload(src: Path, original_name: str, runs_dir: Path, limit_mb: int = UPLOAD_LIMIT_MB) -> Path:
    """Copy an uploaded file to <runs_dir>/uploads/<time>-<random>-<name><ext>; never overwrites anything."""
    suffix = Path(original_name).suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            original_name, [f"unsupported file type {suffix or '(none)'!r} (expected {', '.join(SUFFIXES)})"]
        )
    size = src.stat().st_size
    if size > limit_mb * 2**20:
        raise DataError(original_name, [f"{size / 2**20:.1f} MB is over the upload limit of {limit_mb} MB"])
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(original_name).stem)[:40].strip("._") or "data"
    dest_dir = uploads_dir(runs_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}-{stem}{suffix}"
    with open(src, "rb") as fin, open(dest, "xb") as fout:  # "x": fail rather than overwrite
        shutil.copyfileobj(fin, fout)
    return dest


def dataset_choices(runs_dir: Path) -> list[str]:
    """Bundled sample files (as data/<name>) and uploads (as full paths), newest upload first."""
    bundled = [f"data/{p.name}" for p in sorted(DATA_DIR.iterdir()) if p.suffix in SUFFIXES]
    up = uploads_dir(runs_dir)
    uploaded = sorted((str(p) for p in up.iterdir() if p.suffix in SUFFIXES), reverse=True) if up.is_dir() else []
    return bundled + uploaded
