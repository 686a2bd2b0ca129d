"""The job layer with real `lora-workbench train` subprocesses: queue order, stop, crash, pid reuse, re-attach."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from trainer.config.presets import load_config
from trainer.jobs.queue import JobManager
from trainer.jobs.requests import EvaluateJob, TrainJob
from trainer.run_dir import read_metrics, read_status


def wait_until(predicate, timeout: float = 90.0, manager: JobManager | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if manager is not None:
            manager.tick()
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture
def manager(tmp_path: Path) -> JobManager:
    return JobManager(tmp_path / "runs", max_running=1, cwd=ROOT)


def long_job(make_config, manager: JobManager) -> str:
    cfg = load_config(make_config({"training": {"max_steps": 5000, "save_steps": 10000}}))
    job_id = manager.submit(cfg)
    run = Path(manager.registry.get(job_id).run_dir)
    wait_until(
        lambda: (
            (run / "metrics.jsonl").exists() and any(x["kind"] == "train" for x in read_metrics(run / "metrics.jsonl"))
        ),
        manager=manager,
    )
    return job_id


def test_queue_runs_jobs_in_order_one_at_a_time(make_config, manager: JobManager) -> None:
    cfg = load_config(make_config({"training": {"max_steps": 2}}))
    ids = [manager.submit(cfg) for _ in range(3)]
    assert [manager.queue_position(i) for i in ids] == [1, 2, 3]
    most_running = 0

    def all_done() -> bool:
        nonlocal most_running
        most_running = max(most_running, len(manager.registry.all("running")))
        return all(manager.registry.get(i).state == "completed" for i in ids)

    wait_until(all_done, timeout=180, manager=manager)
    jobs = [manager.registry.get(i) for i in ids]
    assert most_running == 1
    assert jobs[0].started_at < jobs[1].started_at < jobs[2].started_at
    assert jobs[0].ended_at <= jobs[1].started_at and jobs[1].ended_at <= jobs[2].started_at
    assert all(j.exit_code == 0 and (Path(j.run_dir) / "adapter").is_dir() for j in jobs)


def test_a_queued_job_is_launched_once_when_two_queues_race(make_config, manager: JobManager) -> None:
    """Launching is compare-and-set on the registry: two queues that both read the job as queued (two ticks, or
    two servers on one runs dir despite the lock) start one process, not two."""
    job_id = manager.submit(load_config(make_config({"training": {"max_steps": 1, "save_steps": 100}})))
    other = JobManager(manager.runs_dir, max_running=1, cwd=ROOT)
    stale = manager.registry.get(job_id)  # what both queues read before either launched
    assert manager._launch(stale) is True
    assert other._launch(stale) is False and job_id not in other._children
    wait_until(lambda: manager.registry.get(job_id).state == "completed", manager=manager)
    assert manager.registry.get(job_id).exit_code == 0


def test_stop_saves_adapter_and_leaves_no_process(make_config, manager: JobManager) -> None:
    job_id = long_job(make_config, manager)
    pid = manager.registry.get(job_id).pid
    pgid = os.getpgid(pid)
    manager.stop(job_id)
    wait_until(lambda: manager.registry.get(job_id).state == "stopped", manager=manager)
    wait_until(lambda: not psutil.pid_exists(pid), timeout=30, manager=manager)  # it exits; a tick reaps it
    job = manager.registry.get(job_id)
    assert job.exit_code == 143 and (Path(job.run_dir) / "adapter" / "adapter_model.safetensors").is_file()
    assert not group_alive(pgid) and not psutil.pid_exists(pid)  # reaped: no zombie either


def test_forced_stop_kills_the_process_group(make_config, manager: JobManager) -> None:
    job_id = long_job(make_config, manager)
    pgid = os.getpgid(manager.registry.get(job_id).pid)
    os.killpg(pgid, signal.SIGSTOP)  # a job that cannot react to SIGTERM (hung in a kernel, say)
    manager.stop(job_id, grace_s=0.5)
    wait_until(lambda: manager.registry.get(job_id).state == "stopped", manager=manager)
    assert "killed after not stopping" in manager.registry.get(job_id).error
    assert not group_alive(pgid)
    assert read_status(Path(manager.registry.get(job_id).run_dir))["state"] == "stopped"


def test_stopping_a_queued_job_means_it_never_starts(make_config, manager: JobManager) -> None:
    cfg = load_config(make_config({"training": {"max_steps": 5000}}))
    first, second = manager.submit(cfg), manager.submit(cfg)
    manager.stop(second)
    assert manager.registry.get(second).state == "stopped" and manager.queue_position(second) is None
    manager.stop(first)
    wait_until(lambda: manager.registry.get(first).state == "stopped", manager=manager)
    assert manager.registry.get(second).started_at is None


def test_killed_trainer_is_failed_with_log_tail(make_config, manager: JobManager) -> None:
    job_id = long_job(make_config, manager)
    os.kill(manager.registry.get(job_id).pid, signal.SIGKILL)
    wait_until(lambda: manager.registry.get(job_id).state == "failed", manager=manager)
    job = manager.registry.get(job_id)
    assert "the training process died (exit code -9)" in job.error and "trainable" in job.error
    status = read_status(Path(job.run_dir))
    assert status["state"] == "failed" and status["failure"]["kind"] == "killed"
    assert "out-of-memory killer" in status["failure"]["hint"]


def test_recycled_pid_is_not_taken_for_our_job(make_config, manager: JobManager, tmp_path: Path) -> None:
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        cfg = load_config(make_config())
        job_id = manager.submit(cfg)
        start = psutil.Process(stranger.pid).create_time()
        manager.registry.update(job_id, state="running", pid=stranger.pid, proc_start=start - 100)
        restarted = JobManager(tmp_path / "runs", cwd=ROOT)  # a server restart sees the stale row
        job = restarted.registry.get(job_id)
        assert job.state == "failed" and "while nobody was watching" in job.error
        restarted.stop(job_id)
        assert stranger.poll() is None  # the stranger was neither signalled nor killed
    finally:
        stranger.kill()
        stranger.wait()


def test_restarted_manager_reattaches_a_live_job(make_config, manager: JobManager, tmp_path: Path) -> None:
    job_id = long_job(make_config, manager)
    restarted = JobManager(tmp_path / "runs", cwd=ROOT)
    assert restarted.registry.get(job_id).state == "running"
    restarted.stop(job_id)  # the new server can stop a job it did not start
    wait_until(lambda: restarted.registry.get(job_id).state == "stopped", manager=restarted)
    assert restarted.registry.get(job_id).exit_code == 143
    manager.tick()  # the old manager reaps its child


def test_registry_reads_while_jobs_write(make_config, manager: JobManager) -> None:
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                manager.registry.all()
                manager.queue_position("x")
            except BaseException as e:  # noqa: BLE001 (any failure fails the test)
                errors.append(e)
            time.sleep(0.001)  # still hundreds of reads a second, without four threads taking a core from the jobs

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    cfg = load_config(make_config({"training": {"max_steps": 2}}))
    ids = [manager.submit(cfg) for _ in range(2)]
    wait_until(lambda: all(manager.registry.get(i).state == "completed" for i in ids), timeout=180, manager=manager)
    done.set()
    for t in threads:
        t.join()
    assert errors == []


def test_delete_and_rename(make_config, manager: JobManager) -> None:
    cfg = load_config(make_config({"training": {"max_steps": 5000}}))
    job_id = manager.submit(cfg)
    manager.tick()
    with pytest.raises(ValueError, match="stop it before deleting"):
        manager.delete(job_id)
    manager.rename(job_id, "better-name")
    assert manager.registry.get(job_id).name == "better-name"
    with pytest.raises(ValueError, match="may hold only"):
        manager.rename(job_id, "../x")
    manager.stop(job_id)
    wait_until(lambda: manager.registry.get(job_id).state == "stopped", manager=manager)
    run_dir = Path(manager.registry.get(job_id).run_dir)
    manager.delete(job_id)
    assert manager.registry.get(job_id) is None and not run_dir.exists()


def test_side_jobs_queue_behind_training_and_report_their_result(make_config, manager: JobManager) -> None:
    from trainer.job_status import read_result

    train_id = manager.submit(load_config(make_config({"training": {"max_steps": 4}})))
    run_dir = manager.registry.get(train_id).run_dir
    heldout = str(ROOT / "data/sentiment_heldout.jsonl")
    eval_id = manager.submit_side_job(EvaluateJob(Path(run_dir), data=heldout, limit=4), name="tiny")
    job = manager.registry.get(eval_id)
    assert job.kind == "evaluate" and Path(job.run_dir).parent.name == ".jobs" and eval_id.endswith("evaluate-tiny")
    manager.tick()
    assert manager.registry.get(train_id).state == "running" and manager.registry.get(eval_id).state == "queued"
    wait_until(lambda: manager.registry.get(eval_id).state in ("completed", "failed"), manager=manager)
    job = manager.registry.get(eval_id)
    assert job.state == "completed", job.error
    status = read_status(Path(job.run_dir))
    assert status["step"] == status["max_steps"] == 4
    result = read_result(Path(job.run_dir))
    assert result["rows"] == 4 and set(result) >= {"base", "adapter"}
    assert "[evaluate] 4/4 scoring the adapter" in (Path(job.run_dir) / "job.log").read_text()
    assert (Path(run_dir) / "eval_results.json").is_file()


def test_a_failing_side_job_is_failed_with_its_message(tmp_path: Path, manager: JobManager) -> None:
    job_id = manager.submit_side_job(EvaluateJob(tmp_path / "no-such-run"))
    wait_until(lambda: manager.registry.get(job_id).state in ("completed", "failed"), manager=manager)
    job = manager.registry.get(job_id)
    assert job.state == "failed" and job.exit_code == 1
    assert "no-such-run" in read_status(Path(job.run_dir))["error"]
    with pytest.raises(ValueError, match="not a side job: train"):
        manager.submit_side_job(TrainJob())


def test_a_forced_kill_reaches_a_launcher_in_a_session_of_its_own() -> None:
    """A multi-process run's `accelerate launch` runs in its own session (trainer/run/launch.py): the kill after
    the grace period must reach it and its ranks, not only the job's process group."""
    from trainer.jobs.queue import _kill_tree

    parent = subprocess.Popen(["sh", "-c", "setsid sleep 300 & wait"], start_new_session=True)

    def launcher_in_own_session() -> bool:  # `setsid` is exec'd first and leaves the session a moment later
        children = psutil.Process(parent.pid).children()
        return bool(children) and os.getsid(children[0].pid) != os.getsid(parent.pid)

    deadline = time.monotonic() + 30
    while not launcher_in_own_session() and time.monotonic() < deadline:
        time.sleep(0.05)
    (launcher,) = psutil.Process(parent.pid).children()
    assert os.getsid(launcher.pid) != os.getsid(parent.pid)  # out of reach of the group signal
    _kill_tree(parent.pid)
    parent.wait(timeout=10)
    launcher.wait(timeout=10)
    assert not launcher.is_running()
