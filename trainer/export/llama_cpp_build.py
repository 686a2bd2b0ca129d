"""`lora-workbench build-llama-cpp`: compile llama.cpp's llama-quantize (for k-quant GGUF exports) and
llama-completion (to run a GGUF) from the C++ source vendored in the pinned llama-cpp-python sdist; CPU only, once.

    lora-workbench build-llama-cpp [--jobs N] [--runs-dir runs]    # -> <cache>/llama.cpp-VERSION-build/bin

Needs cmake and a C++ compiler (Debian/Ubuntu: apt-get install cmake g++ make). The sdist is the one the converter
comes from (trainer/export/llama_cpp.py: <cache>/downloads, fetched with pip if missing, sha256-checked). Measured on the
project's 2-core machine while it was shared and busy (load 6-8), `--jobs 2`: 562 s wall (391 s user CPU), the build
tree 60 MB beside the 76 MB sdist, 18 MB kept (the two static binaries); the source and build tree are deleted.
The compiling half uses only the standard library and runs as a script in the Docker image's build stage:

    python3 trainer/export/llama_cpp_build.py SDIST DEST [--jobs N]       # -> DEST/bin/llama-quantize, llama-completion
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

TARGETS = ("llama-quantize", "llama-completion")
# CPU only and portable: no CUDA, no OpenMP runtime to ship, static libraries so the binaries stand alone,
# GGML_NATIVE off so a binary built in an image runs on another x86-64 CPU (ggml's default baseline: AVX2).
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_OPENMP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",  # llama-cli is built on the server (and its web UI): llama-completion runs a GGUF
    "-DLLAMA_BUILD_APP=OFF",
)
# Vendored directories the two targets never read (docs and test vocabularies are 113 of its 176 MB).
NOT_NEEDED = ("docs/", "models/", "media/", "tools/ui/", "examples/", "tests/", "pocs/", "benches/", ".github/")
PROGRESS = re.compile(r"^\[\s*(\d+)(?:/(\d+)|%)\]")  # ninja's [12/134], make's [ 9%]

Log = Callable[[str], None]


def check_tools() -> None:
    """cmake and a C++ compiler on PATH, else a RuntimeError saying what to install."""
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(
            f"building llama.cpp needs {' and '.join(missing)} on PATH (cmake and a C++ compiler): "
            "apt-get install cmake g++ make (Debian/Ubuntu), then run this again"
        )


def compile_llama_cpp(sdist: Path, dest: Path, jobs: int, log: Log) -> dict[str, float]:
    """TARGETS built from the sdist's vendored llama.cpp into dest/bin; returns seconds and peak disk (MB)."""
    check_tools()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.work-"))
    try:
        src, build = extract_source(sdist, work / "src", log), work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        env = os.environ | {"GIT_CEILING_DIRECTORIES": str(work)}  # its version stamp: not a repo the cache lies in
        run_cmake(["cmake", "-S", str(src), "-B", str(build), *generator, *CMAKE_FLAGS], env, log)
        log(f"compiling {', '.join(TARGETS)} with {jobs} jobs (minutes: the ggml CPU kernels are most of it)")
        run_cmake(["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs)], env, log)
        peak_mb = disk_mb(work)
        (dest / "bin").mkdir(parents=True, exist_ok=True)
        for target in TARGETS:
            shutil.copy2(build / "bin" / target, dest / "bin" / target)
        shutil.copy2(src / "LICENSE", dest / "LICENSE")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_disk_mb": peak_mb, "kept_mb": disk_mb(dest)}


def extract_source(sdist: Path, src: Path, log: Log) -> Path:
    """The sdist's vendor/llama.cpp, less what the build never reads, as src."""
    log(f"extracting llama.cpp's C++ source from {sdist.name}")
    with tarfile.open(sdist) as tar:
        members = tar.getmembers()
        vendored = members[0].name.split("/")[0] + "/vendor/llama.cpp/"
        wanted = [m for m in members if m.name.startswith(vendored)]
        wanted = [m for m in wanted if not m.name.removeprefix(vendored).startswith(NOT_NEEDED)]
        for m in wanted:
            m.name = m.name.removeprefix(vendored)
        extract_members(tar, src, wanted)
    return src


def extract_members(tar: tarfile.TarFile, dest: Path, members: list[tarfile.TarInfo]) -> None:
    """tar's "data" filter (no links out, no absolute paths) where this Python has it: 3.11.4+, 3.10.12+; Debian
    bookworm's 3.11.2 has not. Without it the sha256 pin on the sdist is what vouches for its member names."""
    tar.extractall(dest, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def run_cmake(cmd: list[str], env: dict[str, str], log: Log) -> None:
    """Run cmake, logging progress every 10%; a failure raises with the output's last lines."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    shown = -10
    for line in proc.stdout:
        tail = [*tail[-29:], line.rstrip()]
        if (m := PROGRESS.match(line)) and (pct := progress_pct(m)) >= shown + 10:
            shown = pct - pct % 10
            log(f"compiling llama.cpp: {pct}%" + (f" ({m.group(1)}/{m.group(2)} steps)" if m.group(2) else ""))
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def progress_pct(m: re.Match) -> int:
    done, total = int(m.group(1)), m.group(2)
    return done if total is None else done * 100 // int(total)


def disk_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6, 1)


def main() -> None:
    """The Docker build stage's entry: compile from an sdist already fetched and checked."""
    ap = argparse.ArgumentParser(description="compile llama.cpp's llama-quantize and llama-completion (CPU)")
    ap.add_argument("sdist", type=Path, help="llama_cpp_python-VERSION.tar.gz")
    ap.add_argument("dest", type=Path, help="gets bin/llama-quantize, bin/llama-completion and LICENSE")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    stats = compile_llama_cpp(args.sdist, args.dest, args.jobs, lambda msg: print(msg, flush=True))
    print(f"built in {stats['seconds']:.0f} s into {args.dest} (build tree {stats['peak_disk_mb']:.0f} MB, deleted)")


if __name__ == "__main__":
    main()
