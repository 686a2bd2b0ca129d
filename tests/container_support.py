"""Build the Dockerfile with podman on a local Debian base and run the image's filesystem under chroot.

This machine has no Docker engine and `podman run` fails (rlimit/cgroup permissions), while `podman build`
works and registries (Debian, PyPI) are reachable but image registries are not. So:
  1. a Debian bookworm base from debootstrap, imported as localhost/lwb-debian-base;
  2. pip wheels downloaded on the host (the CPU torch and every dependency) and mounted into the build;
  3. `podman build --build-arg BASE_IMAGE=localhost/lwb-debian-base ...` of the real Dockerfile;
  4. `podman create` + `podman mount` of a container's filesystem, and commands run there under chroot, as
     the image's user, with its env and working dir, volumes bind-mounted, in a private mount namespace
     (`unshare`), so /proc, /dev and the volumes vanish with the process even if a test dies half way.
The debootstrap tarball and the wheels are kept in ~/.cache/lora-workbench-container/ (LWB_CONTAINER_CACHE),
and podman keeps its layer cache, so a second run only rebuilds the layers whose input changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LWB_CONTAINER_CACHE", Path.home() / ".cache" / "lora-workbench-container"))
BASE_IMAGE = "localhost/lwb-debian-base"
IMAGE = "localhost/lora-workbench:test"
DEBIAN_SUITE = "bookworm"  # its python3 is 3.11: the wheels below are fetched for that
PYTHON_TAG = ("3.11", "cp311")
GLIBC_MINOR = 36  # bookworm's glibc 2.36: manylinux wheels up to manylinux_2_36 run on it
# The CPU build: the GPU image's default (PyPI's torch) is the CUDA one. It lies on disk on these machines
# (pip's find-links); download.pytorch.org is not reachable from here or CI.
TORCH_SPEC = "torch==2.13.0+cpu"
# cgroupfs and chroot isolation: what podman can do on these machines (no systemd, no nested namespaces).
PODMAN = ["podman", "--cgroup-manager=cgroupfs"]


def missing_prerequisites() -> str | None:
    """Why the container test cannot run here, or None."""
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot and mounts)"
    tools = ["podman", "debootstrap", "unshare", "chroot", "tar"]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (apt-get install podman debootstrap; .ci/run installs them)"
    return None


def run(argv: list[str], log: Path | None = None, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    """Run a command, appending its output (with a timestamp per line) to log; raise with the tail on failure."""
    start = time.monotonic()
    lines: list[str] = []
    with open(log or os.devnull, "a") as sink:
        sink.write(f"{time.strftime('%H:%M:%S')} $ {shlex.join(argv)}\n")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
        for line in proc.stdout:
            lines.append(line)
            sink.write(f"[{time.monotonic() - start:7.1f}s] {line}")
        proc.wait(timeout=timeout)
    if proc.returncode != 0:
        tail = "".join(lines[-40:])
        raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}:\n{tail}")
    return subprocess.CompletedProcess(argv, 0, "".join(lines))


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """One builder at a time: two pytest runs on one machine share the cache and podman's image names."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def image_exists(name: str) -> bool:
    return subprocess.run([*PODMAN, "image", "exists", name]).returncode == 0


def ensure_base_image(log: Path) -> None:
    """localhost/lwb-debian-base: podman's copy, else the cached debootstrap tarball, else a new debootstrap."""
    if image_exists(BASE_IMAGE):
        return
    tarball = CACHE / f"debian-{DEBIAN_SUITE}-minbase.tar"
    if not tarball.exists():
        rootfs = CACHE / "debootstrap.tmp"
        shutil.rmtree(rootfs, ignore_errors=True)
        run(["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(rootfs), "http://deb.debian.org/debian"], log)
        for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):  # already unpacked: 40 MB saved
            deb.unlink()
        run(["tar", "-C", str(rootfs), "-cf", f"{tarball}.part", "."], log)
        os.replace(f"{tarball}.part", tarball)
        shutil.rmtree(rootfs)
    run([*PODMAN, "import", str(tarball), BASE_IMAGE], log)


def requirements() -> list[str]:
    """What the Dockerfile installs after torch: pyproject's build requirements and dependencies."""
    import tomllib  # Python 3.11+, like the image's; imported here so collection works on 3.10

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return project["build-system"]["requires"] + project["project"]["dependencies"]


def ensure_wheelhouse(log: Path) -> Path:
    """Wheels for bookworm's Python of the CPU torch and every dependency, fetched again only when they change."""
    reqs = [TORCH_SPEC, *requirements()]
    arch = platform.machine()
    stamp = hashlib.sha256(json.dumps([reqs, PYTHON_TAG, arch]).encode()).hexdigest()
    wheels = CACHE / "wheels"
    if (wheels / ".stamp").exists() and (wheels / ".stamp").read_text() == stamp:
        return wheels
    fresh = CACHE / "wheels.tmp"
    shutil.rmtree(fresh, ignore_errors=True)
    # The image's Python and glibc, not this host's: --only-binary makes pip pick wheels for that target.
    platforms = [f"manylinux_2_{m}_{arch}" for m in range(GLIBC_MINOR, 16, -1)] + [f"manylinux2014_{arch}"]
    target = ["--python-version", PYTHON_TAG[0], "--implementation", "cp", "--abi", PYTHON_TAG[1]]
    target += ["--only-binary=:all:", *(a for p in platforms for a in ("--platform", p))]
    run([sys.executable, "-m", "pip", "download", "-q", "-d", str(fresh), *target, *reqs], log)
    (fresh / ".stamp").write_text(stamp)
    shutil.rmtree(wheels, ignore_errors=True)
    fresh.rename(wheels)
    return wheels


def build_image(log: Path) -> str:
    """Build the repo's Dockerfile on the Debian base with the CPU torch from the wheel cache; returns the id."""
    with cache_lock():
        log.write_text("")
        ensure_base_image(log)
        wheels = ensure_wheelhouse(log)
        args = {
            "BASE_IMAGE": BASE_IMAGE,
            "TORCH_SPEC": TORCH_SPEC,
            "PIP_EXTRA_ARGS": "--no-index --find-links /tmp/wheels",  # offline from the mounted wheels
            "LLAMA_CPP": "",  # skip compiling llama.cpp's quantizer (~5 min on 2 cores; proven by hand, issue 19)
        }
        argv = [*PODMAN, "build", "--isolation=chroot", "--format=docker", "--layers", "-t", IMAGE]
        argv += [a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")]
        # docker format keeps HEALTHCHECK (OCI drops it). The wheels are a build-time volume, not a layer
        # (podman leaves an empty /tmp/wheels mount point in this test image; a docker build has none).
        previous = image_config(IMAGE)["Id"] if image_exists(IMAGE) else None
        run([*argv, "-v", f"{wheels}:/tmp/wheels:ro", "-f", str(ROOT / "Dockerfile"), str(ROOT)], log)
        current = image_config(IMAGE)["Id"]
        if previous and previous != current:  # the image this build replaced; its shared layers stay cached
            subprocess.run([*PODMAN, "rmi", previous], capture_output=True)
    return current


def image_config(image: str) -> dict:
    """podman's inspect of an image: Config (User, Env, Cmd, WorkingDir, ...), Healthcheck, Id."""
    out = run([*PODMAN, "image", "inspect", image]).stdout
    return json.loads(out)[0]


@contextlib.contextmanager
def container_rootfs(image: str) -> Iterator[Path]:
    """A container's root filesystem, read-write, as `docker run` would see it; discarded afterwards.

    `podman create` + `podman mount` give the same tree as `podman export` of that container, but as an
    overlay on the image's layers: instant, and `podman rm` drops what the tests wrote, where exporting and
    deleting the ~2 GB tree took ~2 minutes per run here. The container never runs (`podman run` fails here).
    """
    create = [*PODMAN, "create", "--no-healthcheck", image, "true"]
    cid = subprocess.run(create, check=True, capture_output=True, text=True).stdout.strip()
    try:
        rootfs = Path(run([*PODMAN, "mount", cid]).stdout.strip())
        # A container runtime provides /etc/hosts; the image's is empty, and Gradio looks up localhost.
        (rootfs / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
        yield rootfs
    finally:
        run([*PODMAN, "rm", "--force", cid])


def passwd_entry(rootfs: Path, user: str) -> tuple[int, int, str]:
    """uid, gid and home of a user (name or uid) in the image's /etc/passwd."""
    for line in (rootfs / "etc/passwd").read_text().splitlines():
        name, _, uid, gid, _, home, _ = line.split(":")
        if user in (name, uid):
            return int(uid), int(gid), home
    raise KeyError(f"user {user!r} not in the image's /etc/passwd")


def chroot_argv(
    rootfs: Path,
    config: dict,
    argv: list[str],
    env: dict[str, str] | None = None,
    volumes: dict[str, Path] | None = None,
) -> list[str]:
    """A command line that runs argv in a container's filesystem like `docker run` would: the image's user, env
    and working dir, /proc, /sys, /dev and a fresh /tmp mounted, host dirs bind-mounted on its volumes.
    The network namespace is the host's, so a server bound to 127.0.0.1 inside is reachable from the test."""
    cfg = config["Config"]
    uid, gid, home = passwd_entry(rootfs, cfg.get("User") or "root")
    image_env = dict(item.split("=", 1) for item in cfg.get("Env", []))
    full_env = {"HOME": home, "HOSTNAME": "lwb-test", **image_env, **(env or {})}
    mounts = [
        ["mount", "-t", "proc", "proc", f"{rootfs}/proc"],
        ["mount", "-t", "sysfs", "-o", "ro", "sysfs", f"{rootfs}/sys"],
        ["mount", "--rbind", "/dev", f"{rootfs}/dev"],
        ["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", f"{rootfs}/tmp"],
    ]
    for target, source in (volumes or {}).items():
        os.chown(source, uid, gid)  # as a named volume: owned by the image's user
        mounts.append(["mount", "--bind", str(source), f"{rootfs}{target}"])
    chroot = ["chroot", f"--userspec={uid}:{gid}", str(rootfs)]
    script = " && ".join(shlex.join(m) for m in mounts) + f' && exec {shlex.join(chroot)} "$@"'
    inside = ["/usr/bin/env", "-i", "-C", cfg.get("WorkingDir") or "/", *(f"{k}={v}" for k, v in full_env.items())]
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *inside, *argv]
