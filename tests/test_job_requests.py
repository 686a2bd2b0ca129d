"""One job protocol: every job is a typed job.json in its dir, run as `lora-workbench <kind> --job-dir DIR`; a bad
request fails the job with kind `config`; the registry is an index rebuilt from the dirs; two queues on one runs
dir launch each job once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.test_jobs import wait_until
from trainer.cli import main
from trainer.config.presets import load_config
from trainer.export.merge import ExportRequest
from trainer.jobs.queue import JobManager
from trainer.jobs.requests import EvaluateJob, PreflightJob
from trainer.run_dir import RunDir, read_metrics, read_status, write_json_atomic


def queued_dir(tmp_path: Path, request: dict) -> Path:
    """A job dir as the queue leaves it (queued status), holding the given job.json."""
    job_dir = tmp_path / "runs" / ".jobs" / "20260101-000000-job"
    job_dir.mkdir(parents=True)
    RunDir(job_dir).write_status(state="queued", submitted_at=time.time())
    write_json_atomic(job_dir / "job.json", request)
    return job_dir


def test_a_queued_train_job_runs_from_its_job_dir_in_this_process(make_config, tmp_path: Path) -> None:
    """`train --job-dir` is what the queue spawns; run here in-process it trains the queued run itself, and the
    registry takes the state from the run's status.json."""
    manager = JobManager(tmp_path / "runs", max_running=0)  # nothing starts on its own
    run_id = manager.submit(load_config(make_config({"training": {"max_steps": 2}})))
    run = Path(manager.registry.get(run_id).run_dir)
    assert json.loads((run / "job.json").read_text()) == {
        "kind": "train",
        "name": None,
        "resume": False,
        "overrides": [],
    }
    assert manager._argv(manager.registry.get(run_id))[2:] == ["trainer", "train", "--job-dir", str(run)]
    assert main(["train", "--job-dir", str(run)]) == 0
    assert read_status(run)["state"] == "completed" and (run / "adapter" / "adapter_config.json").is_file()
    assert manager.registry.get(run_id).state == "completed"
    assert [x["event"] for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "event"].count("start") == 1
    assert main(["train", "--job-dir", str(run)]) == 1  # a run is trained once; --resume continues it


def test_an_export_job_runs_from_its_typed_request(trained_adapter, tmp_path: Path) -> None:
    manager = JobManager(tmp_path / "runs", max_running=1, cwd=ROOT)
    out = tmp_path / "runs" / "exports" / "merged"
    job_id = manager.submit_side_job(ExportRequest(trained_adapter("lora") / "adapter", out), name="lora")
    wait_until(lambda: manager.registry.get(job_id).state in ("completed", "failed"), timeout=180, manager=manager)
    job = manager.registry.get(job_id)
    assert job.state == "completed", (Path(job.run_dir) / "job.log").read_text()
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))
    assert json.loads((Path(job.run_dir) / "result.json").read_text())["out"] == str(out.resolve())
    assert "[export] done" in (Path(job.run_dir) / "job.log").read_text()


BAD_REQUESTS = [
    ("export", {"kind": "export", "adapter": "a"}, "out: Field required"),
    ("export", {"kind": "export", "adapter": "a", "out": "b", "dtype": "fp8"}, "dtype: Input should be 'bf16'"),
    ("evaluate", {"kind": "evaluate", "run_dir": "r", "limit": "many"}, "limit: Input should be a valid integer"),
    ("evaluate", {"kind": "evaluate", "run_dir": "r", "colour": 1}, "colour: unknown field (known: data, limit"),
    ("preflight", {"kind": "preflight", "steps": "six"}, "steps: Input should be a valid integer"),
    ("train", {"kind": "train", "resume": "perhaps"}, "resume: Input should be a valid boolean"),
    ("train", {"kind": "export", "adapter": "a", "out": "b"}, "kind: 'export', but this is `lora-workbench train`"),
    ("evaluate", ["r"], "job.json: expected an object of fields"),
]


@pytest.mark.parametrize(("kind", "request_", "problem"), BAD_REQUESTS)
def test_a_bad_request_file_names_file_and_field_and_fails_the_job_as_config(
    tmp_path: Path, capsys, kind: str, request_: dict, problem: str
) -> None:
    job_dir = queued_dir(tmp_path, request_)
    assert main([kind, "--job-dir", str(job_dir)]) == 1
    err = capsys.readouterr().err
    assert f"invalid config in {job_dir / 'job.json'}" in err and problem in err, err
    status = read_status(job_dir)
    assert status["state"] == "failed" and status["exit_code"] == 1 and problem in status["error"]
    assert status["failure"]["kind"] == "config" and "Fix the config fields" in status["failure"]["hint"]


def test_a_missing_or_unreadable_request_file_fails_the_job(tmp_path: Path, capsys) -> None:
    job_dir = queued_dir(tmp_path, {})
    (job_dir / "job.json").unlink()
    assert main(["export", "--job-dir", str(job_dir)]) == 1
    assert "job.json: missing" in capsys.readouterr().err and read_status(job_dir)["failure"]["kind"] == "config"
    (job_dir / "job.json").write_text("{not json")
    assert main(["export", "--job-dir", str(job_dir)]) == 1
    assert "job.json: not readable JSON" in capsys.readouterr().err


def test_a_request_made_bad_after_queueing_fails_through_the_queue(tmp_path: Path) -> None:
    manager = JobManager(tmp_path / "runs", max_running=1, cwd=ROOT)
    job_id = manager.submit_side_job(EvaluateJob(tmp_path / "some-run", limit=4))
    request = Path(manager.registry.get(job_id).run_dir) / "job.json"
    request.write_text(request.read_text().replace('"limit": 4', '"limit": "four"'))
    wait_until(lambda: manager.registry.get(job_id).state == "failed", manager=manager)
    status = read_status(request.parent)
    assert status["failure"]["kind"] == "config" and "limit: Input should be a valid integer" in status["error"]
    assert "limit: Input should be a valid integer" in (request.parent / "job.log").read_text()


def test_job_dir_and_the_plain_form_do_not_mix(tmp_path: Path, capsys) -> None:
    assert main(["export", "--job-dir", str(tmp_path), "--adapter", "a", "--dtype", "fp16"]) == 2
    assert "--job-dir takes no other request arguments (the request is DIR/job.json): --adapter, --dtype" in (
        capsys.readouterr().err
    )
    assert main(["train", "--job-dir", str(tmp_path), "--resume", "training.max_steps=2"]) == 2
    assert "job.json): config, --resume" in capsys.readouterr().err
    assert main(["evaluate", "--job-dir", str(tmp_path), "--status-dir", str(tmp_path)]) == 2
    assert "job.json): --status-dir" in capsys.readouterr().err
    assert main(["export", "--adapter", "a"]) == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err
    assert main(["train"]) == 2
    assert "the following arguments are required: CONFIG" in capsys.readouterr().err


def listing(manager: JobManager) -> list[tuple]:
    """What the page lists: every job in queue order with its kind, name, dir, state and queue position."""
    return [
        (j.id, j.kind, j.name, j.run_dir, j.state, j.exit_code, manager.queue_position(j.id))
        for j in manager.registry.all()
    ]


def test_deleting_the_registry_rebuilds_the_same_list(make_config, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    manager = JobManager(runs, max_running=0)
    cli_run = RunDir(runs / "20250101-000000-by-hand")  # trained with `lora-workbench train`, outside the UI
    cli_run.path.mkdir(parents=True)
    cli_run.write_status(state="completed", exit_code=0, started_at=1.0e9, ended_at=1.0e9 + 60)
    manager.adopt_runs_on_disk()
    cfg = load_config(make_config())
    first, stopped, third = (manager.submit(cfg) for _ in range(3))
    evaluate = manager.submit_side_job(EvaluateJob(runs / first), name=first)
    preflight = manager.submit_side_job(PreflightJob(), name="pf", inputs={"config.yaml": cfg.to_yaml()})
    last = manager.submit(cfg)
    manager.stop(stopped)
    manager.rename(third, "renamed-on-the-page")
    live = runs / first
    sleeper = subprocess.Popen(  # stands in for the first run's trainer: its status names it, its argv the run
        [sys.executable, "-c", "import time; time.sleep(120)", str(live)], start_new_session=True
    )
    try:
        started = psutil.Process(sleeper.pid).create_time() + 0.5
        RunDir(live).write_status(state="running", pid=sleeper.pid, started_at=started)
        before = listing(manager)
        assert [row[0] for row in before] == [cli_run.path.name, first, stopped, third, evaluate, preflight, last]
        assert [row[4] for row in before] == [
            "completed",
            "running",
            "stopped",
            "queued",
            "queued",
            "queued",
            "queued",
        ]
        assert [row[6] for row in before if row[6]] == [1, 2, 3, 4]
        assert before[3][2] == "renamed-on-the-page"
        for name in ("registry.sqlite", "registry.sqlite-wal", "registry.sqlite-shm"):
            (runs / name).unlink(missing_ok=True)
        restarted = JobManager(runs, max_running=0)
        assert listing(restarted) == before
        restarted.stop(first)  # the rebuilt registry knows the live job's process from its status.json
        assert sleeper.wait(timeout=10) == -15
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_unreadable_registry_is_kept_aside_and_rebuilt(make_config, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    manager = JobManager(runs, max_running=0)
    ids = [manager.submit(load_config(make_config())) for _ in range(2)]
    before = listing(manager)
    for name in ("registry.sqlite-wal", "registry.sqlite-shm"):
        (runs / name).unlink(missing_ok=True)
    (runs / "registry.sqlite").write_bytes(b"not a database, whatever wrote it" * 100)
    restarted = JobManager(runs, max_running=0)
    assert listing(restarted) == before and [row[0] for row in before] == ids
    (aside,) = runs.glob("registry.sqlite.unreadable-*")
    assert aside.read_bytes().startswith(b"not a database")


def test_two_queues_on_one_runs_dir_launch_each_job_once(make_config, tmp_path: Path) -> None:
    """Two servers on one runs dir (as if the runs-dir lock were bypassed), each ticking its own queue as fast as it
    can: every job is launched by exactly one of them, once (one `start` event, one trainer process)."""
    runs = tmp_path / "runs"
    a, b = (JobManager(runs, max_running=2, cwd=ROOT) for _ in range(2))
    cfg = load_config(make_config({"training": {"max_steps": 1, "save_steps": 100}}))
    ids = [m.submit(cfg) for m in (a, b, a, b)]
    done, errors = threading.Event(), []

    def race(manager: JobManager) -> None:
        while not done.is_set():
            try:
                manager.tick()
            except Exception as e:  # noqa: BLE001 (any failure fails the test)
                errors.append(e)
            time.sleep(0.01)

    threads = [threading.Thread(target=race, args=(m,)) for m in (a, b)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(a.registry.get(i).state in ("completed", "failed") for i in ids), timeout=300)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert errors == [] and [a.registry.get(i).state for i in ids] == ["completed"] * 4
    for run_id in ids:
        run = runs / run_id
        events = [x["event"] for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "event"]
        assert events.count("start") == 1, run_id
        assert (run / "train.log").read_text().count(f"run {run_id} in ") == 1
    for child in [*a._children.values(), *b._children.values()]:
        child.wait(timeout=60)


@pytest.mark.parametrize("state", ["completed", "failed", "running", "not a job"])
def test_a_refused_job_dir_leaves_a_status_it_did_not_queue_alone(tmp_path: Path, state: str, capsys) -> None:
    """--job-dir on a finished run, a running one or any dir that is not a queued job: refused with the reason,
    and that dir's status.json (the run's real outcome, or a user's own file) is left as it was."""
    job_dir = tmp_path / "some-dir"
    job_dir.mkdir()
    status = {"mine": True} if state == "not a job" else {"state": state, "exit_code": 0, "ended_at": 1.0}
    (job_dir / "status.json").write_text(json.dumps(status))
    write_json_atomic(job_dir / "job.json", {"kind": "train"})
    before = (job_dir / "status.json").read_bytes()
    for kind in ("export", "evaluate", "preflight", "train"):
        assert main([kind, "--job-dir", str(job_dir)]) == 1, kind
        assert capsys.readouterr().err.strip()  # said why
        assert (job_dir / "status.json").read_bytes() == before, kind


def test_a_job_launched_again_after_the_registry_was_lost_runs_once(make_config, tmp_path: Path) -> None:
    """A server killed while its job still imports, its registry deleted, a new server: the new queue sees the job
    queued and launches it again. The second process finds the job held (runs/<id>/.job.lock), leaves without
    writing anything, and the new queue watches the first one: one training, completed, never marked dead."""
    runs = tmp_path / "runs"
    first = JobManager(runs, cwd=ROOT)
    run_id = first.submit(load_config(make_config({"training": {"max_steps": 3, "save_steps": 100}})))
    first.tick()
    pid = first.registry.get(run_id).pid
    (runs / "registry.sqlite").unlink()
    second = JobManager(runs, cwd=ROOT)  # rebuilt from the dirs: the job reads as queued or running
    second.tick()
    wait_until(lambda: second.registry.get(run_id).state in ("completed", "failed"), manager=second, timeout=300)
    assert second.registry.get(run_id).state == "completed", read_status(runs / run_id)
    run = runs / run_id
    events = [x["event"] for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "event"]
    assert events.count("start") == 1 and (run / "train.log").read_text().count(f"run {run_id} in ") == 1
    assert second.registry.get(run_id).pid == pid  # the new queue watched the first process
    for child in [*first._children.values(), *second._children.values()]:
        child.wait(timeout=60)


def test_a_queued_run_trained_by_hand_while_its_job_runs_is_left_alone(make_config, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    manager = JobManager(runs, cwd=ROOT)
    run_id = manager.submit(load_config(make_config({"training": {"max_steps": 40, "save_steps": 100}})))
    manager.tick()
    wait_until(lambda: (runs / run_id / ".job.lock").is_file() and (runs / run_id / ".job.lock").read_text())
    by_hand = subprocess.run(
        [sys.executable, "-m", "trainer", "train", str(runs / run_id / "config.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = by_hand.stderr + by_hand.stdout  # held (still queued when it looked) or already running: refused either way
    assert by_hand.returncode == 1 and ("already being trained by pid" in said or "is already running" in said)
    wait_until(lambda: manager.registry.get(run_id).state in ("completed", "failed"), manager=manager, timeout=300)
    assert manager.registry.get(run_id).state == "completed"


def test_a_job_process_inside_its_re_execution_is_still_its_own(tmp_path: Path) -> None:
    """Another server (or a restarted one) tells a job's process by its pid, start time and command line; inside
    execve the command line reads empty, and a job taken for dead then was failed before it had started (seen once
    in test_two_queues_on_one_runs_dir_launch_each_job_once)."""
    from trainer.jobs.processes import is_our_process
    from trainer.jobs.registry import Job

    script = tmp_path / "job.py"  # re-executes itself once, as `lora-workbench train` does at start (tcmalloc)
    script.write_text(
        "import os, sys, time\n"
        "if 'again' not in sys.argv:\n"
        "    os.execv(sys.executable, [sys.executable, *sys.argv, 'again'])\n"
        "time.sleep(0.2)\n"
    )
    job_dir = str(tmp_path / "20261207-job")
    seen_empty = taken_for_dead = 0
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, str(script), job_dir])
        start = psutil.Process(proc.pid).create_time()
        job = Job(
            0, "j", None, "train", "running", proc.pid, start, start, start, None, "c.yaml", job_dir, *[None] * 3
        )
        while proc.poll() is None:
            try:
                seen_empty += psutil.Process(proc.pid).cmdline() == []
            except psutil.Error:
                pass
            if not is_our_process(job) and proc.poll() is None:  # alive after the check: it was alive during it
                taken_for_dead += 1
        assert not is_our_process(Job(**{**job.__dict__, "proc_start": start - 1.0}))  # another start: not ours
    assert taken_for_dead == 0
    if seen_empty == 0:  # then the window this test is about was never hit: say so rather than pass
        pytest.skip("RE-EXECUTION WINDOW NOT HIT: no read saw the empty command line on this machine; nothing tested")
