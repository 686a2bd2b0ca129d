"""The Docker image: built from the real Dockerfile with podman on a local Debian base, run under chroot.

    python -m pytest -q tests/test_container.py        # root, podman, debootstrap (.ci/run installs them)
    python -m pytest -q -m "not container"             # everything else

Cold (no caches) this takes a few minutes: debootstrap, apt-get and pip inside the build. The debootstrap
tarball and the wheels stay in ~/.cache/lora-workbench-container/ and podman keeps its layers, so a warm run
only rebuilds the layers after `COPY . /app` when the source changed (tests/container_support.py).
The compose file is checked statically: no Docker engine or GPU here to run it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.container_support import (
    CACHE,
    IMAGE,
    ROOT,
    build_image,
    chroot_argv,
    container_rootfs,
    image_config,
    missing_prerequisites,
    passwd_entry,
)

WHY_NOT = missing_prerequisites()
# HF_HUB_OFFLINE: nothing in these runs may reach a hub (the tiny model is built offline).
TEST_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[dict, Path]]:
    """The built image's inspect data and a container's filesystem made from it."""
    build_image(CACHE / "build.log")  # timestamped log of the last build: which step took the time
    with container_rootfs(IMAGE) as rootfs:
        yield image_config(IMAGE), rootfs


@pytest.fixture
def volumes(tmp_path: Path) -> dict[str, Path]:
    """Fresh host dirs on the image's volumes, as `docker run -v` or compose's named volumes give."""
    vols = {"/data/runs": tmp_path / "runs", "/data/hf-cache": tmp_path / "hf-cache"}
    for path in vols.values():
        path.mkdir()
    return vols


def run_in(image: tuple[dict, Path], argv: list[str], volumes=None, env=None, timeout=300):
    config, rootfs = image
    cmd = chroot_argv(rootfs, config, argv, env={**TEST_ENV, **(env or {})}, volumes=volumes)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(image, argv: list[str], url: str, log: Path, volumes, env=None) -> Iterator[None]:
    """Start argv in the image in the background, wait until url answers 200, stop it (its whole group) after."""
    config, rootfs = image
    cmd = chroot_argv(rootfs, config, argv, env={**TEST_ENV, **(env or {})}, volumes=volumes)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no answer from {url}:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=3) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@pytest.mark.container
@pytest.mark.skipif(WHY_NOT is not None, reason=f"container test: {WHY_NOT}")
class TestImage:
    def test_runs_the_ui_as_a_non_root_user_with_volumes_and_no_secrets(self, image):
        config, rootfs = image
        cfg = config["Config"]
        assert passwd_entry(rootfs, cfg["User"])[0] != 0
        assert cfg["Cmd"] == [
            *("lora-workbench", "ui", "--host", "0.0.0.0", "--runs-dir", "/data/runs", "--data-dir", "/data/datasets")
        ]
        assert "7860/tcp" in cfg["ExposedPorts"]
        assert set(cfg["Volumes"]) == {"/data/runs", "/data/hf-cache"}
        env = dict(item.split("=", 1) for item in cfg["Env"])
        assert env["HF_HOME"] == "/data/hf-cache"
        assert not {"LORA_WORKBENCH_AUTH", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} & env.keys()
        assert config["Healthcheck"]["Test"][0] == "CMD"

    def test_cli_help(self, image):
        result = run_in(image, ["lora-workbench", "--help"])
        assert result.returncode == 0, result.stderr
        assert "train" in result.stdout and "ui" in result.stdout

    def test_the_bundled_example_trains_into_the_runs_volume(self, image, volumes):
        config, rootfs = image
        # The image's own copy of the example (so examples/, data/ and presets/ are in it), fewer steps.
        example = yaml.safe_load((rootfs / "app/examples/tiny-lora.yaml").read_text())
        example["training"]["max_steps"] = 20
        (rootfs / "data/tiny-lora-20.yaml").write_text(yaml.safe_dump(example))

        # Relative to the image's WORKDIR /data: the config there, the runs into /data/runs.
        result = run_in(image, ["lora-workbench", "train", "tiny-lora-20.yaml"], volumes=volumes)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

        runs = [p for p in volumes["/data/runs"].iterdir() if not p.name.startswith(".")]
        assert len(runs) == 1, runs
        status = json.loads((runs[0] / "status.json").read_text())
        assert status["state"] == "completed" and status["step"] == 20
        assert (runs[0] / "adapter/adapter_model.safetensors").is_file()
        metrics = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if m["kind"] == "train" and "loss" in m]
        assert losses and all(math.isfinite(x) for x in losses)
        # Written by the image's non-root user, as on a named volume.
        assert runs[0].stat().st_uid == passwd_entry(rootfs, config["Config"]["User"])[0] != 0

    def test_ui_answers_on_loopback_and_the_healthcheck_passes(self, image, volumes, tmp_path):
        port = free_port()
        argv = ["lora-workbench", "ui", "--host", "127.0.0.1", "--port", str(port), "--runs-dir", "/data/runs"]
        with serving(image, argv, f"http://127.0.0.1:{port}/", tmp_path / "ui.log", volumes):
            # The image's HEALTHCHECK command as it is, aimed at this test's port instead of 7860.
            check = [arg.replace(":7860/", f":{port}/") for arg in image[0]["Healthcheck"]["Test"][1:]]
            result = run_in(image, check, timeout=60)
            assert result.returncode == 0, result.stderr

    def test_the_image_command_needs_auth_and_serves_with_it(self, image, volumes, tmp_path):
        port = free_port()
        cmd = [*image[0]["Config"]["Cmd"], "--port", str(port)]  # exactly the CMD on 0.0.0.0, another port
        refused = run_in(image, cmd, volumes=volumes, timeout=120)
        assert refused.returncode != 0
        assert "LORA_WORKBENCH_AUTH" in refused.stdout + refused.stderr
        auth = {"LORA_WORKBENCH_AUTH": "tester:not-a-real-secret"}
        with serving(image, cmd, f"http://127.0.0.1:{port}/", tmp_path / "ui.log", volumes, env=auth):
            pass  # the login page answers 200, which is what the healthcheck relies on


def test_compose_reserves_the_gpus_and_takes_secrets_from_the_host():
    """No Docker engine or GPU here: the compose file's contract is checked as data."""
    service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["workbench"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "7860:7860" in service["ports"]
    targets = {v.split(":")[1] for v in service["volumes"]}
    assert targets == {"/data/runs", "/data/hf-cache"}
    # Passed through by name from the host env / .env: a value written here would be a baked secret.
    assert {"LORA_WORKBENCH_AUTH", "HF_TOKEN"} <= set(service["environment"])
    assert service["restart"] and service["healthcheck"]["test"]
