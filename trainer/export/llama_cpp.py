"""llama.cpp's own GGUF tools, fetched the way the built-in model is: its converter from PyPI, its quantizer if built.

The `llama-cpp-python` source distribution (76 MB) vendors llama.cpp. Its Python half, `convert_hf_to_gguf.py`
with the `conversion/` package and `gguf-py`, needs no compiler: it is extracted once into
<cache>/llama.cpp-VERSION and run as a subprocess on a saved checkpoint. Where it comes from, first found wins:
$LLAMA_CPP_DIR (a llama.cpp checkout, e.g. in the Docker image), the extracted copy, an sdist already in
<cache>/downloads, else `pip download --no-deps --no-binary :all: llama-cpp-python==VERSION` (checked against its
sha256). k-quants (q4_k_m, ...) need the compiled `llama-quantize`: $LLAMA_QUANTIZE, on PATH, else the one
`lora-workbench build-llama-cpp` compiled from the same sdist into <cache>/llama.cpp-VERSION-build/bin
(trainer/export/llama_cpp_build.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from trainer.export.llama_cpp_build import TARGETS, check_tools, compile_llama_cpp, extract_members
from trainer.model.builtin_models import Log, _locked, cache_root, check_sha256, print_log

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_MB = 76
VENDORED = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
# The converter's Python files: the script, its per-architecture package and the gguf library it was written with.
PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
CONVERTER = "convert_hf_to_gguf.py"
BUILD = f"llama.cpp-{VERSION}-build"  # in the cache: bin/llama-quantize, bin/llama-completion
BUILD_HINT = (
    "build it once with `lora-workbench build-llama-cpp` (needs cmake and a C++ compiler; about 5 min on 2 cores, download included), "
    "or set $LLAMA_QUANTIZE or put llama-quantize on PATH; the Docker image has it"
)


class LlamaCppError(RuntimeError):
    """llama.cpp's converter or quantizer is missing or failed; the message says what to do."""


def ensure_converter(cache: Path, log: Log = print_log) -> Path:
    """The directory holding convert_hf_to_gguf.py; fetched and extracted once, safe with several processes."""
    if env := os.environ.get("LLAMA_CPP_DIR"):
        if not (Path(env) / CONVERTER).is_file():
            raise LlamaCppError(f"$LLAMA_CPP_DIR={env} holds no {CONVERTER}; point it at a llama.cpp checkout")
        return Path(env)
    target = cache / f"llama.cpp-{VERSION}"
    if (target / CONVERTER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f".llama.cpp-{VERSION}.lock", log):
        if (target / CONVERTER).is_file():  # another process extracted it while we waited
            return target
        extract(fetch_sdist(cache, log), target, log)
    return target


def fetch_sdist(cache: Path, log: Log) -> Path:
    """<cache>/downloads/SDIST, downloaded if missing and checked against its sha256."""
    sdist = cache / "downloads" / SDIST
    if not sdist.is_file():
        download_sdist(sdist.parent, log)
    check_sha256(sdist, SDIST_SHA256)
    return sdist


def download_sdist(downloads: Path, log: Log) -> None:
    log(f"downloading llama-cpp-python=={VERSION} ({SDIST_MB} MB source, for llama.cpp's converter) into {downloads}")
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--progress-bar", "off"]
    proc = subprocess.run([*cmd, "-d", str(downloads), f"llama-cpp-python=={VERSION}"], capture_output=True, text=True)
    if proc.returncode != 0 or not (downloads / SDIST).is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise LlamaCppError(
            f"could not download llama-cpp-python=={VERSION} (llama.cpp's GGUF converter) from PyPI:\n{tail}\n"
            f"Fix: on a machine with access run `pip download --no-deps --no-binary :all: "
            f"llama-cpp-python=={VERSION}` and copy {SDIST} into {downloads}, or set $LLAMA_CPP_DIR to a llama.cpp "
            "checkout."
        )


def extract(sdist: Path, target: Path, log: Log) -> None:
    """Only the converter's Python files, into a temp dir renamed into place when whole."""
    log(f"extracting llama.cpp's converter from {sdist.name} into {target}")
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        with tarfile.open(sdist) as tar:
            wanted = [m for m in tar.getmembers() if m.name.removeprefix(VENDORED).startswith(PARTS)]
            for m in wanted:
                m.name = m.name.removeprefix(VENDORED)
            extract_members(tar, tmp, wanted)
        tmp.chmod(0o755)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_tool(cmd: list[str], what: str, log: Log, env: dict[str, str] | None = None) -> None:
    """Run a llama.cpp tool, its output into the log; a failure raises with the output's last lines."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip() and "Writing:" not in x]
    for line in [x for x in lines if x.startswith(("INFO:hf-to-gguf", "WARNING", "ERROR"))][-4:]:
        log(line)  # the converter's own summary; its other lines (the whole chat template, per tensor) stay out
    if proc.returncode != 0:
        tail = "\n".join(lines[-6:])
        raise LlamaCppError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def convert(converter: Path, model_dir: Path, outfile: Path, outtype: str, log: Log = print_log) -> None:
    """llama.cpp's convert_hf_to_gguf.py on a saved transformers checkpoint."""
    env = os.environ | {"PYTHONPATH": str(converter)}  # its `conversion` package; gguf-py it puts on sys.path itself
    cmd = [sys.executable, str(converter / CONVERTER), str(model_dir), "--outfile", str(outfile)]
    try:
        run_tool([*cmd, "--outtype", outtype], f"llama.cpp's {CONVERTER} --outtype {outtype}", log, env)
    except LlamaCppError as e:
        raise LlamaCppError(f"{unsupported(str(e))}{e}") from None


def unsupported(output: str) -> str:
    """The converter's two refusals of a model it does not know, said first in words (its output follows)."""
    if "pre-tokenizer was not recognized" in output:
        return (
            f"llama.cpp {VERSION}'s converter does not know this model's tokenizer (its BPE pre-tokenizer): no GGUF "
            "can be made of it; --format safetensors works.\n"
        )
    if "is not supported" in output and "Model " in output:
        return (
            f"llama.cpp {VERSION}'s converter does not support this model's architecture; --format safetensors "
            "works.\n"
        )
    return ""


def find_quantizer(cache: Path) -> str | None:
    """The compiled llama-quantize: $LLAMA_QUANTIZE, else on PATH, else the one built into the cache."""
    built = cache / BUILD / "bin" / "llama-quantize"
    if chosen := os.environ.get("LLAMA_QUANTIZE"):  # the user's choice, or nothing: never another one silently
        return chosen if os.path.isfile(chosen) and os.access(chosen, os.X_OK) else None
    found = shutil.which("llama-quantize")
    return found or (str(built) if built.is_file() else None)


def quantize(source: Path, outfile: Path, quant: str, cache: Path, log: Log = print_log) -> None:
    quantizer = find_quantizer(cache)
    if quantizer is None:
        raise LlamaCppError(f"--quant {quant}: needs llama.cpp's llama-quantize: {BUILD_HINT}")
    run_tool([quantizer, str(source), str(outfile), quant.upper()], f"llama-quantize {quant}", log)


def build_llama_cpp(cache: Path, jobs: int, log: Log) -> Path:
    """<cache>/llama.cpp-VERSION-build, compiled once: safe with several processes, renamed into place when whole."""
    target = cache / BUILD
    if (target / "bin" / TARGETS[0]).is_file():
        log(f"llama.cpp is already built: {target / 'bin'}")
        return target
    check_tools()  # before the 76 MB sdist is fetched
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f".{BUILD}.lock", log):
        if (target / "bin" / TARGETS[0]).is_file():  # another process built it while we waited
            return target
        sdist = fetch_sdist(cache, log)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{BUILD}.partial-"))
        try:
            stats = compile_llama_cpp(sdist, tmp, jobs, log)
            tmp.chmod(0o755)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(
        f"built in {stats['seconds']:.0f} s: {', '.join(TARGETS)} in {target / 'bin'} ({stats['kept_mb']:.0f} MB "
        f"kept; the build needed {stats['peak_disk_mb']:.0f} MB beside the sdist, now deleted)"
    )
    return target


def build_command(runs_dir: str, jobs: int | None) -> int:
    """The CLI: build into the model cache; exit 1 with the reason when it cannot."""

    def log(msg: str) -> None:
        print(f"[build-llama-cpp] {msg}", flush=True)

    try:
        build_llama_cpp(cache_root(runs_dir), jobs or os.cpu_count() or 1, log)
    except (RuntimeError, OSError) as e:  # LlamaCppError, a failed compile or sha256 check, disk full
        print(f"lora-workbench build-llama-cpp: {e}", file=sys.stderr)
        return 1
    return 0
