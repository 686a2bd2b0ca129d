"""The on-disk cache of tokenized data: <runs_dir>/.cache/data/<key>/ holds one source's rows as tokenized under
one set of settings (a datasets.Dataset saved with save_to_disk, and meta.json), so that the Start check, the
pre-flight and the training process, which are separate processes, tokenize the same data once.

The key is a hash of everything the tokens depend on: the source's content (the file's bytes and type, or the hub
dataset's datasets fingerprint), the data settings that shape rows and tokens, the tokenizer (its serialized
vocabulary, merges, normalizer and special tokens), the chat template, and this package's own code and the
libraries' versions. It lives beside the runs made from the data, with the same owner, and goes when they go.

An entry is written into a temporary directory and renamed into place: a reader never sees half an entry, and two
processes filling the same entry at once both succeed (the second rename finds the first's, which holds the same).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any

from trainer.config.run_config import DataSection
from trainer.data.files import Source

META = "meta.json"
# The settings that change which rows are read, what they say, or their tokens (not val_size: that splits later).
KEY_FIELDS = {"format", "columns", "system_prompt", "max_samples", "max_length", "overlength"}
_tokenizer_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cache_dir(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / ".cache" / "data"


def data_key(src: Source, cfg: DataSection, tokenizer: Any, template: str) -> str:
    """The cache key of src tokenized under cfg by tokenizer with template."""
    import datasets
    import tokenizers
    import transformers

    parts = {
        "source": source_digest(src),
        "data": cfg.model_dump(include=KEY_FIELDS),
        "tokenizer": tokenizer_digest(tokenizer),
        "template": template,
        "code": _code_digest(),
        "versions": [datasets.__version__, tokenizers.__version__, transformers.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def source_digest(src: Source) -> str:
    if src.path is None:  # datasets fingerprints a hub dataset from its cached files
        return f"hub:{src.name}:{src.hub._fingerprint}"
    st = src.path.stat()
    # ctime too: any write changes it and, unlike mtime, no tool can set it back (a same-size edit under `touch -r`)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    return f"file{src.path.suffix.lower()}:{_file_sha256(str(src.path), *stamp)}"


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """The file's sha256, remembered while its size, times and inode stay (the page looks again on every edit)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """What the tokenizer does to text: its serialized form, without the padding/truncation state a call leaves."""
    known = _tokenizer_digests.get(tokenizer)
    if known is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            spec = json.loads(backend.to_str())
            spec.pop("padding", None)
            spec.pop("truncation", None)
        else:  # a slow (Python) tokenizer: its vocabulary and special tokens
            spec = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map}
        spec["class"] = type(tokenizer).__name__
        known = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        _tokenizer_digests[tokenizer] = known
    return f"{known}:{len(tokenizer)}:{tokenizer.eos_token_id}"  # tokens added later change these two


@functools.cache
def _code_digest() -> str:
    """This package's code: a change to how rows are read, converted or tokenized makes earlier entries stale."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))).hexdigest()


def load(root: Path, key: str) -> tuple[Any, dict] | None:
    """(the datasets.Dataset, its meta) of the entry, or None when there is none."""
    from datasets import Dataset

    entry = root / key
    if not (entry / META).is_file():
        return None
    return Dataset.load_from_disk(str(entry / "rows")), json.loads((entry / META).read_text(encoding="utf-8"))


def discard(root: Path, key: str) -> None:
    """Remove an entry that cannot be used (it is derived data: the next store writes it again)."""
    shutil.rmtree(root / key, ignore_errors=True)


def store(root: Path, key: str, rows: Any, meta: dict) -> None:
    """Save the entry through a temporary directory renamed into place; a failure to write only warns."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=root))
    except OSError as e:  # the cache saves time; a full or read-only disk must not fail the data step
        print(f"warning: tokenized data not cached ({e})", file=sys.stderr)
        return
    try:
        rows.save_to_disk(str(tmp / "rows"))
        (tmp / META).write_text(json.dumps(meta), encoding="utf-8")
        os.rename(tmp, root / key)
    except OSError as e:
        if not (root / key / META).is_file():  # else another process renamed the same entry in first
            print(f"warning: tokenized data not cached ({e})", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a rename
