"""Where an export may be written, and what it may replace: only a directory an earlier export wrote.

Every export directory carries MARKER, a small JSON file written last into it (the source adapter, the base, the
time, and the names of the files the export wrote). A non-empty --out is replaced only when it carries the marker
and holds nothing else the user added; a run dir, the uploads, the registry or any other directory never does, so
--overwrite cannot delete it. From the page an export also has to lie inside <runs_dir>/exports/.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trainer.run_dir import write_json_atomic

MARKER = ".lora-workbench-export"


def write_marker(export_dir: Path, adapter: Path, base: str, created: str) -> None:
    """Mark export_dir as written by lora-workbench export; call it after every other file is in place."""
    files = sorted({p.name for p in export_dir.iterdir()} | {MARKER})
    info = {"written_by": "lora-workbench export", "adapter": str(adapter), "base": base, "created": created}
    write_json_atomic(export_dir / MARKER, info | {"files": files})


def read_marker(out: Path) -> dict[str, Any] | None:
    """The marker of an export directory, or None when it has none (or one that is not ours)."""
    try:
        info = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(info, dict) and isinstance(info.get("files"), list)
    return info if ok and info.get("written_by") == "lora-workbench export" else None


def what_it_is(out: Path) -> str:
    """Why a directory is not an export, in a few words, for the refusal message."""
    if (out / "status.json").is_file() or (out / "config.yaml").is_file():
        return "it is a training run's directory"
    if (out / "registry.sqlite").exists():
        return "it holds the job registry"
    return "it is not an export this workbench wrote"


def replace_control(page: bool) -> str:
    """How the user asks for a replace, in the words of where they are: the page's checkbox or the CLI's flag."""
    return "Replace ticked" if page else "--overwrite"


def replace_problem(out: Path, page: bool = False) -> str | None:
    """Why a non-empty --out must never be replaced, or None when it is empty, absent or a clean marked export."""
    if out.exists() and not out.is_dir():
        return f"--out {out}: is a file; choose a directory"
    if not out.is_dir() or not any(out.iterdir()):
        return None
    keep = "nothing was changed. Choose a new or empty directory"
    marker = read_marker(out)
    if marker is None:
        why = f"{what_it_is(out)} (no {MARKER} marker in it)"
        return f"--out {out}: is not empty and {why}, so it is never replaced, {replace_control(page)} or not; {keep}"
    added = sorted({p.name for p in out.iterdir()} - set(marker["files"]))
    if added:
        shown = ", ".join(added[:5]) + (", ..." if len(added) > 5 else "")
        return f"--out {out}: is an export, but holds files the export did not write ({shown}); {keep}"
    return None


def give_plain_modes(export_dir: Path) -> None:
    """Give every file the mode a plain open() gets under the umask: files written through a temp file (the atomic
    JSON writes, safetensors' shards) come out 0600 while the rest are, e.g., 0644."""
    probe = export_dir / ".mode-probe"
    probe.touch()  # 0o666 minus the umask, as open() creates files
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in export_dir.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def outside_root(out: Path, root: Path) -> str | None:
    """The page's rule: an export lies in a directory strictly inside root (<runs_dir>/exports)."""
    root = root.expanduser().resolve()
    if out.is_relative_to(root) and out != root:
        return None
    return (
        f"--out {out}: outside the directories the page may export to; choose a directory inside {root} "
        "(blank: a new one there named after the run)"
    )


def partial_dir(out: Path) -> Path:
    """This process's temp dir beside out (same filesystem: the final rename is atomic), fresh; the ones left by
    exports to out whose process is gone (SIGKILL, a crash, a power cut) are removed first."""
    for stale in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def unwritable(out: Path) -> str | None:
    """Why out cannot be created and written (a file on its path, a read-only or foreign directory), found before
    any model loads by writing a probe file where out would be made."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"--out {out}: {parent} is a file, not a directory"
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".lora-workbench-probe-"):
            pass
    except OSError as e:
        return f"--out {out}: cannot write in {parent} ({e.strerror or e}); choose a directory you can write to"
    return None
