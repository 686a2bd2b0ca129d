"""The log tail the Runs and Train tabs show: the newest lines at the bottom, as a terminal draws them, a warning
that a library repeats every step folded into one line with its count."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from app.context import AppContext
from app.runs_tab import open_run
from app.train_tab import monitor_update
from app.views.log_view import fold_repeats, log_view, screen_lines
from trainer.jobs.queue import JobManager

KERNELS = (
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure you "
    "already `pip install kernels` and the kernels >= 0.11.1"
)
CAST = "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization"
FUTURE = (
    "/venv/lib/python3.11/site-packages/transformers/modeling_utils.py:3312: FutureWarning: "
    "`is_gradient_checkpointing` is deprecated and will be removed in v6."
)


def eight_bit_log(steps: int = 168) -> str:
    """A train.log shaped like a real 8-bit CPU run's: bitsandbytes' kernels line first, a progress bar redrawn with
    carriage returns, a Python warning twice, and the cast warning on every step between the loss lines."""
    bar = "".join(f"Loading weights: {p:3d}%|{'#' * (p // 10):<10}| {p}/100\r" for p in range(0, 101, 20))
    lines = [KERNELS, "run r1 in runs/r1", bar, FUTURE, "  warnings.warn(", FUTURE, "  warnings.warn("]
    for step in range(1, steps + 1):
        lines.append(CAST)
        if step % 4 == 0:
            lines.append(json.dumps({"loss": round(2.0 - step / 100, 4), "step": step}))
    return "\n".join(lines) + "\n"


def test_repeats_fold_into_one_line_with_a_count_and_the_newest_line_is_last(tmp_path: Path):
    (tmp_path / "train.log").write_text(eight_bit_log(), encoding="utf-8")
    shown = log_view(tmp_path, lines=40).splitlines()
    assert shown[-1] == json.dumps({"loss": 0.32, "step": 168})  # the newest line, at the bottom
    assert [line for line in shown if "MatMul8bitLt" in line] == [f"{CAST}  [×168]"]
    assert shown[-2] == f"{CAST}  [×168]"  # where it last came: just before the newest loss
    assert len(shown) == 40 and sum('"loss"' in line for line in shown) == 39  # the rest are the newest losses


def test_a_short_log_keeps_its_order_and_a_warning_keeps_its_source_line(tmp_path: Path):
    (tmp_path / "train.log").write_text(eight_bit_log(steps=8), encoding="utf-8")
    shown = log_view(tmp_path).splitlines()
    assert shown[:6] == [
        KERNELS,
        "run r1 in runs/r1",
        "Loading weights: 100%|##########| 100/100",  # only the bar's last drawing
        f"{FUTURE}  [×2]",
        "  warnings.warn(",
        json.dumps({"loss": 1.96, "step": 4}),
    ]
    assert shown[6:] == [f"{CAST}  [×8]", json.dumps({"loss": 1.92, "step": 8})]  # where it last came


@pytest.mark.parametrize("text", ["", "\n\n", "\r\r\n", "a\n\nb\n\n"])
def test_blank_and_odd_logs(text: str):
    folded = fold_repeats(screen_lines(text))
    assert [line for line in folded if line.strip()] == [c for c in text if c.isalpha()]


def test_missing_log_is_empty(tmp_path: Path):
    assert log_view(tmp_path / "gone") == ""


def finished_run(runs: Path, log: str) -> str:
    """A run `lora-workbench train` finished outside the UI; the server adopts it at start."""
    run = runs / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name_or_path: tiny}\n", encoding="utf-8")
    (run / "train.log").write_text(log, encoding="utf-8")
    now = time.time()
    status = {"state": "completed", "pid": None, "started_at": now - 60, "ended_at": now, "exit_code": 0}
    (run / "status.json").write_text(json.dumps({**status, "error": None, "step": 168, "max_steps": 168}))
    return run.name


def test_the_runs_and_train_tabs_show_the_folded_tail(tmp_path: Path):
    runs = tmp_path / "runs"
    run_id = finished_run(runs, eight_bit_log())
    ctx = AppContext(runs, JobManager(runs))
    ctx.manager.adopt_runs_on_disk()
    _, runs_tab_log, _ = open_run(ctx, run_id)
    train_tab_log = monitor_update(ctx, run_id, {})[7]
    for shown in (runs_tab_log, train_tab_log):
        assert shown.splitlines()[-1] == json.dumps({"loss": 0.32, "step": 168})
        assert shown.count("MatMul8bitLt") == 1 and f"{CAST}  [×" in shown


def test_an_unquantized_run_log_does_not_open_with_the_bitsandbytes_kernel_warning(make_config, tmp_path: Path):
    """A LoRA run started as the page starts it (a job whose stdout+stderr go to train.log)."""
    from tests.conftest import ROOT
    from trainer.config.presets import load_config

    if "avx512_bf16" not in Path("/proc/cpuinfo").read_text():  # bitsandbytes' own condition for trying the kernel
        pytest.skip("bitsandbytes does not try its CPU 4-bit kernel on this CPU (no AVX512-BF16): nothing to hide")
    manager = JobManager(tmp_path / "runs", cwd=ROOT)
    job_id = manager.submit(load_config(make_config({"training": {"max_steps": 1, "save_steps": 100}})))
    deadline = time.monotonic() + 300
    while manager.registry.get(job_id).state not in ("completed", "failed") and time.monotonic() < deadline:
        manager.tick()
        time.sleep(0.5)
    log = log_view(Path(manager.registry.get(job_id).run_dir))
    assert manager.registry.get(job_id).state == "completed", log
    assert log.startswith("run ") and "gemm_4bit_forward" not in log
