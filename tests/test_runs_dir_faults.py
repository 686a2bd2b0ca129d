"""Whatever lies in the runs dir (corrupt, foreign, half-deleted or vanished run directories), the server starts,
the queue moves on and every page lists the readable runs; an unreadable one says why. Adapter zips hold only
the adapter's own files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest

from app.context import AppContext
from app.runs_tab import not_listed_md, table_rows, zip_note
from app.train_tab import monitor_update
from app.views.adapter_choices import adapter_choices
from app.views.monitor import Watchers, progress
from app.views.runs_index import COLUMNS, adapter_zip
from tests.conftest import ROOT
from trainer.jobs.queue import JobManager
from trainer.jobs.requests import EvaluateJob
from trainer.run_dir import FINAL_STATES, RunDir

STATE = COLUMNS.index("state")
TRAIN_LOSS = COLUMNS.index("train loss")


def make_run(runs: Path, name: str, state: str = "completed", adapter: bool = True) -> Path:
    """A finished run as `lora-workbench train` leaves it: config, status, two metrics lines, an adapter."""
    run = RunDir(runs / name)
    run.path.mkdir(parents=True)
    run.config.write_text("model: {name_or_path: tiny}\nadapter: {method: lora, r: 4}\n", encoding="utf-8")
    run.write_status(state=state, step=2, max_steps=2, started_at=1000.0, ended_at=1010.0, exit_code=0)
    run.append_metric("train", 1, loss=2.0, tokens_per_second=10.0)
    run.append_metric("train", 2, loss=1.0, tokens_per_second=12.0)
    run.close()
    if adapter:
        run.adapter.mkdir()
        (run.adapter / "adapter_config.json").write_text('{"r": 4}', encoding="utf-8")
    return run.path


def rows_by_id(ctx: AppContext) -> dict[str, list]:
    return {row[0]: row for row in table_rows(ctx)}


def context(runs: Path) -> AppContext:
    """What `lora-workbench ui` builds at startup (app/server.py serve), without serving it."""
    manager = JobManager(runs, cwd=ROOT)
    manager.adopt_runs_on_disk()
    return AppContext(runs_dir=runs.resolve(), manager=manager, example=None)


def test_startup_on_corrupt_foreign_and_half_deleted_dirs_lists_every_readable_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "good")
    bad = {
        "not-utf8": b'{"state": "completed", "error": "\xff\xfe"}',
        "stray-list": b"[]",
        "bad-step": b'{"state": "completed", "step": "abc"}',
        "cut-off": b'{"state": "compl',
        "deep": b"[" * 100_000,
    }
    for name, raw in bad.items():
        (runs / name).mkdir()
        (runs / name / "status.json").write_bytes(raw)
    (runs / "status-is-a-dir" / "status.json").mkdir(parents=True)
    (runs / "half-deleted").mkdir()
    (runs / "half-deleted" / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n')
    (runs / "notes.txt").write_text("not a run")
    foreign_cfg = make_run(runs, "foreign-config") / "config.yaml"
    foreign_cfg.write_bytes(b"adapter: [1, 2]\nmodel: \xff\n")  # a config that is neither UTF-8 nor sections

    manager = JobManager(runs, cwd=ROOT)
    skipped = manager.adopt_runs_on_disk()
    manager.start(interval_s=0.05)
    try:
        ctx = AppContext(runs_dir=runs.resolve(), manager=manager, example=None)
        rows = rows_by_id(ctx)
        assert set(rows) == {"good", "foreign-config"}
        assert rows["good"][STATE] == "completed" and rows["good"][TRAIN_LOSS] == 1.0
        reasons = "\n".join(skipped)
        for name in [*bad, "status-is-a-dir"]:
            assert f"{name}: not listed: status.json" in reasons
        page = not_listed_md(ctx.manager.not_listed)  # the Runs tab names them too, not only the server log
        assert page.startswith("**Not listed**") and all(f"{name}: not listed" in page for name in bad)
        assert "not-utf8: not listed: status.json is not UTF-8" in reasons
        assert "stray-list: not listed: status.json holds a list, expected an object" in reasons
        assert "bad-step: not listed: status.json: step must be a whole number of steps (found text)" in reasons
        assert [path for _, path in adapter_choices(ctx.jobs_newest_first())] == [
            str(runs.resolve() / n / "adapter") for n in ("good", "foreign-config")
        ]
        for run_id in rows:  # the monitor of each run renders too
            assert monitor_update(ctx, run_id, {})[1] is not None
    finally:
        manager.shutdown()


def test_server_process_starts_on_a_corrupt_runs_dir(tmp_path: Path) -> None:
    from tests.browser_support import Server

    runs = tmp_path / "runs"
    make_run(runs, "good")
    for name, raw in {"not-utf8": b"\xff\xfe\x00", "stray-list": b"[]"}.items():
        (runs / name).mkdir()
        (runs / name / "status.json").write_bytes(raw)
    server = Server(runs, tmp_path / "server.log")
    try:
        server.start()  # fails with the log's tail if the process exits or never answers
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "not-utf8: not listed: status.json is not UTF-8" in log


def test_an_unreadable_registered_run_is_one_row_saying_why(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for name in ("a", "b", "c"):
        make_run(runs, name)
    ctx = context(runs)
    assert len(table_rows(ctx)) == 3
    (runs / "a" / "status.json").write_text('{"state": "completed", "step": "abc"}')
    (runs / "b" / "status.json").write_bytes(b'{"state": "\xff"}')
    rows = rows_by_id(ctx)
    assert rows["a"][STATE] == "unreadable: status.json: step must be a whole number of steps (found text)"
    assert rows["b"][STATE] == "unreadable: status.json is not UTF-8"
    assert rows["c"][STATE] == "completed" and rows["c"][TRAIN_LOSS] == 1.0
    watch = Watchers(min_interval_s=0).get(runs / "b")
    assert watch.status["state"] == "unreadable: status.json is not UTF-8"
    assert progress(watch.status).text().startswith("unreadable: status.json is not UTF-8")
    (runs / "a" / "status.json").write_text('{"state": "completed", "step": 2}')  # fixed: the row comes back
    assert rows_by_id(ctx)["a"][STATE] == "completed"


def test_metrics_lines_with_wrong_types_are_skipped_and_a_fixed_file_is_read_again(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run = make_run(runs, "r", state="running")
    make_run(runs, "other")
    metrics = run / "metrics.jsonl"
    bad = '{"step": 3, "time": 1.0, "kind": "train", "loss": "abc", "tokens_per_second": "fast"}\n'
    with open(metrics, "a") as f:
        f.write(bad + '{"step": 4, "time": 1.0, "kind": "system", "gpus": [{"index": "x"}]}\n')
    watchers, ctx = Watchers(min_interval_s=0), context(runs)
    ctx.manager.registry.add("r", None, "train", run / "config.yaml", run, state="running")  # as the UI queued it
    rows = rows_by_id(ctx)
    assert set(rows) == {"r", "other"} and rows["r"][TRAIN_LOSS] == 1.0  # the bad lines are ignored
    assert watchers.get(run).series.train["loss"] == [2.0, 1.0]
    metrics.write_text(
        metrics.read_text().replace('"abc", "tokens_per_second": "fast"', "0.5")
    )  # the user fixes the line in place
    assert watchers.get(run).series.train["loss"] == [2.0, 1.0, 0.5]
    assert rows_by_id(ctx)["r"][TRAIN_LOSS] == 0.5
    metrics.write_text('{"step": 1, "time": 1.0, "kind": "train", "loss": 9.0}\n')  # shorter: started over
    assert watchers.get(run).series.train["loss"] == [9.0]
    assert rows_by_id(ctx)["r"][TRAIN_LOSS] == 9.0


def test_a_same_size_edit_in_place_is_read_again(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs", "r", state="running")
    watchers = Watchers(min_interval_s=0)
    assert watchers.get(run).series.train["loss"] == [2.0, 1.0]
    metrics = run / "metrics.jsonl"
    with open(metrics, "r+b") as f:  # same bytes count, same inode: only the first loss differs
        data = f.read()
        f.seek(0)
        f.write(data.replace(b'"loss": 2.0', b'"loss": 3.0', 1))
    st = metrics.stat()
    os.utime(metrics, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # coarse clocks: make the edit visible
    assert watchers.get(run).series.train["loss"] == [3.0, 1.0]


def _dead_pid() -> tuple[int, float]:
    proc = subprocess.Popen(["true"])
    start = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, start


def _removed_running_job(manager: JobManager, runs: Path, name: str, pid: int, start: float) -> Path:
    """A job the registry says is running (its process gone), whose run directory a user then removed."""
    path = make_run(runs, name, state="running", adapter=False)
    manager.registry.add(name, None, "train", path / "config.yaml", path, state="running")
    manager.registry.update(name, pid=pid, proc_start=start)
    shutil.rmtree(path)
    return path


def _wait_final(manager: JobManager, job_id: str, timeout: float = 60.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        manager.tick()
        if (state := manager.registry.get(job_id).state) in FINAL_STATES:
            return state
        time.sleep(0.1)
    raise AssertionError(f"{job_id} still {manager.registry.get(job_id).state}")


def test_a_removed_run_dir_fails_its_job_and_the_next_queued_job_starts(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    manager = JobManager(runs, cwd=ROOT)
    _removed_running_job(manager, runs, "gone-running", *_dead_pid())
    queued = make_run(runs, "gone-queued", state="queued", adapter=False)
    manager.registry.add("gone-queued", None, "train", queued / "config.yaml", queued)
    shutil.rmtree(queued)
    side = manager.submit_side_job(EvaluateJob(tmp_path / "no-such-run"))
    manager.tick()
    gone = manager.registry.get("gone-running")
    assert gone.state == "failed" and "run directory removed" in gone.error
    never = manager.registry.get("gone-queued")
    assert never.state == "failed" and never.error == "run directory removed before the job started"
    assert manager.registry.get(side).started_at is not None  # the queue moved on
    _wait_final(manager, side)
    assert rows_by_id(AppContext(runs_dir=runs, manager=manager, example=None))["gone-running"][STATE] == (
        "unreadable: run directory removed"
    )


def test_a_restart_with_a_removed_run_dir_starts_and_settles_it(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _removed_running_job(JobManager(runs, cwd=ROOT), runs, "gone", *_dead_pid())
    restarted = JobManager(runs, cwd=ROOT)  # what a server restart does first (re-attach)
    restarted.adopt_runs_on_disk()
    job = restarted.registry.get("gone")
    assert job.state == "failed" and "run directory removed" in job.error


def test_a_live_job_whose_dir_is_removed_is_stopped_and_frees_its_slot(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    manager = JobManager(runs, cwd=ROOT)
    path = runs / "live"
    sleeper = subprocess.Popen(  # stands in for a trainer stuck before its next write; its argv names its dir
        [sys.executable, "-c", "import time; time.sleep(60)", str(path)], start_new_session=True
    )
    try:
        _removed_running_job(manager, runs, "live", sleeper.pid, psutil.Process(sleeper.pid).create_time())
        assert _wait_final(manager, "live", timeout=20) == "failed"
        assert sleeper.wait(timeout=10) == -15  # SIGTERM, not left running
        assert "run directory removed" in manager.registry.get("live").error
    finally:
        sleeper.kill()
        sleeper.wait()


def test_adapter_zip_leaves_out_symlinks_and_says_so(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs", "r")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00weights")
    (run / "adapter" / "sub").mkdir()
    (run / "adapter" / "sub" / "extra.txt").write_text("kept")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "token").write_text("hf_SECRET")
    (run / "adapter" / "token").symlink_to(secret / "token")
    (run / "adapter" / "linked").symlink_to(secret, target_is_directory=True)
    made = adapter_zip(run, tmp_path / "zips")
    with zipfile.ZipFile(made.path) as z:
        assert sorted(z.namelist()) == ["adapter_config.json", "adapter_model.safetensors", "sub/extra.txt"]
        assert not any(b"hf_SECRET" in z.read(n) for n in z.namelist())
    assert made.skipped == ["linked", "token"]
    note = zip_note("r", made.skipped)
    assert "zipped" in note and "`linked`, `token`" in note and "symlinks" in note
    assert zip_note("r", []) == "Adapter of `r` zipped."
    assert not [p for p in (tmp_path / "zips").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("payload", ['"running"', "123"])
def test_read_status_values_never_reach_the_registry(tmp_path: Path, payload: str) -> None:
    runs = tmp_path / "runs"
    manager = JobManager(runs, cwd=ROOT)
    path = make_run(runs, "r", state="running", adapter=False)
    manager.registry.add("r", None, "train", path / "config.yaml", path, state="running")
    manager.registry.update("r", pid=_dead_pid()[0], proc_start=0.0)
    (path / "status.json").write_text(payload)
    manager.tick()  # the process is gone and its status unusable: it died, say so
    job = manager.registry.get("r")
    assert job.state == "failed" and "died" in job.error
    assert json.loads((path / "status.json").read_text())["state"] == "failed"
