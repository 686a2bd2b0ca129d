"""The job queue: jobs start in order as `lora-workbench <kind> --job-dir DIR` subprocesses, are stopped by process
group, and are re-attached (or marked failed) when the server that started them restarts.

Every job is a dir holding its typed request, job.json (trainer/jobs/requests.py): `train` in runs/<run_id>/ (with
its config.yaml), the side jobs `export`, `evaluate` and `preflight` in runs/.jobs/<job_id>/ (with job.log). Files
stay the contract: the job's process writes running/completed/failed/stopped into its status.json; the queue
writes only `queued`, `stopped before it started`, and the final state of a job whose process is gone without
one. The registry (trainer/jobs/registry.py) indexes the dirs and caches their states.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from trainer.config.run_config import RunConfig
from trainer.failure import Failure, died, failure
from trainer.jobs.from_disk import JOBS_SUBDIR, adopt_runs_on_disk, rebuild_from_disk
from trainer.jobs.processes import is_our_process, kill_tree, signal_group, status_process
from trainer.jobs.registry import Job, Registry
from trainer.jobs.requests import REQUEST_FILE, Request, TrainJob, kind_of, rename_request, write_request
from trainer.run.log_tee import CAPTURED_ENV
from trainer.run_dir import FINAL_STATES, RunDir, job_holder, new_run_id, read_status

_kill_tree = kill_tree  # the name tests and older callers know

STOP_GRACE_S = 30.0
STARTING_GRACE_S = 30.0  # from another server's claim of a job to its recording the pid it spawned
SIDE_KINDS = ("export", "evaluate", "preflight")


def log_file(job: Job) -> Path:
    return Path(job.run_dir) / ("train.log" if job.kind == "train" else "job.log")


def log_tail(run_dir: Path, lines: int = 30, name: str = "train.log") -> str:
    """The last lines of a job's log (read from the end, not the whole file)."""
    path = run_dir / name
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:  # no log yet, or its run dir was removed
        return ""


class JobManager:
    """Submit, start, stop, reconcile. tick() advances the queue; start() runs it on a daemon thread."""

    def __init__(self, runs_dir: Path, max_running: int = 1, cwd: Path | None = None):
        self.runs_dir = runs_dir.resolve()
        self.not_listed: list[str] = []  # dirs adopt_runs_on_disk could not read, each with the reason
        self.registry = Registry(self.runs_dir)
        self.max_running = max_running
        self.cwd = cwd or Path.cwd()
        self._children: dict[str, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        if self.registry.fresh:  # a new registry.sqlite (first start, or the old one lost): list the job dirs
            rebuild_from_disk(self.registry, self.runs_dir, self.not_listed)
        self.reattach()

    # --- submitting -----------------------------------------------------------------------------------
    def submit(self, cfg: RunConfig) -> str:
        """Write runs/<run_id>/config.yaml and job.json (queued) and register it; returns the run id."""
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"runs_dir": str(self.runs_dir)})})
        with self._lock:
            run_id = new_run_id(cfg.output.run_name, self.runs_dir)
            path = self.runs_dir / run_id
            path.mkdir(parents=True)
            (path / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
            return self._queue(path, TrainJob(), cfg.output.run_name, path / "config.yaml")

    def submit_side_job(self, request: Request, name: str | None = None, inputs: dict[str, str] | None = None) -> str:
        """Queue an export, evaluate or preflight request in runs/.jobs/<job_id>/; returns the job id. inputs are
        files written into the job dir first (a preflight's config.yaml)."""
        kind = kind_of(request)
        if kind not in SIDE_KINDS:
            raise ValueError(f"not a side job: {kind} (one of {', '.join(SIDE_KINDS)})")
        root = self.runs_dir / JOBS_SUBDIR
        root.mkdir(exist_ok=True)
        with self._lock:
            job_id = new_run_id(f"{kind}-{name}" if name else kind, root)
            path = root / job_id
            path.mkdir()
            for file_name, text in (inputs or {}).items():
                (path / Path(file_name).name).write_text(text, encoding="utf-8")
            return self._queue(path, request, name, path / REQUEST_FILE)

    def _queue(self, path: Path, request: Request, name: str | None, config_path: Path) -> str:
        """The request file, then the queued status (submitted_at orders a rebuilt queue), then the index."""
        write_request(path, request, name)
        now = time.time()
        RunDir(path).write_status(state="queued", submitted_at=now)
        self.registry.add(path.name, name, kind_of(request), config_path, path, created_at=now)
        return path.name

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next job to start; None when the job is not queued."""
        queued = [j.id for j in self.registry.all("queued")]
        return queued.index(job_id) + 1 if job_id in queued else None

    # --- the queue --------------------------------------------------------------------------------------
    def tick(self) -> None:
        """Reconcile running jobs with their processes, then start queued ones while slots are free."""
        with self._lock:
            for job in self.registry.all("running"):
                self._reconcile(job)
            running_ids = {j.id for j in self.registry.all("running")}
            self._reap(running_ids)
            # a slot is a process: one that wrote its final state but has yet to exit (freeing its GPU memory)
            # still holds it
            running = len(running_ids | set(self._children))
            for job in self.registry.all("queued"):
                if running >= self.max_running:
                    break
                running += self._launch(job)  # one that cannot start does not take a slot

    def _reap(self, running_ids: set[str]) -> None:
        """Forget children that exited after writing their final state (no zombies left); a running job's child is
        _reconcile's, which needs its exit code."""
        for job_id, child in list(self._children.items()):
            if job_id not in running_ids and child.poll() is not None:
                del self._children[job_id]

    def _argv(self, job: Job) -> list[str]:
        """The same for every kind: the job reads its request from its dir (and `train` decides on `accelerate
        launch` itself). A list, never a shell string."""
        return [sys.executable, "-m", "trainer", job.kind, "--job-dir", job.run_dir]

    def _launch(self, job: Job) -> bool:
        """Start a queued job; one that cannot start (its dir removed, no executable) is failed, so the jobs behind
        it still start. A bad request file is the job's own to report (failure kind `config`). True if started."""
        if not Path(job.run_dir).is_dir():
            self._settle(job, "failed", "run directory removed before the job started")
            return False
        if not self.registry.claim(job.id, pid=None, started_at=time.time()):
            return False  # no longer queued: stopped meanwhile, or launched by someone else
        try:
            self._spawn(job)
        except OSError as e:
            self._settle(job, "failed", f"the {job.kind} job could not start: {type(e).__name__}: {e}")
            return False
        return True

    def _spawn(self, job: Job) -> None:
        env = {**os.environ, CAPTURED_ENV: "1", "PYTHONUNBUFFERED": "1"}
        argv = self._argv(job)
        with open(log_file(job), "ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self._children[job.id] = proc
        start = psutil.Process(proc.pid).create_time()
        self.registry.update(job.id, pid=proc.pid, proc_start=start)

    def _reconcile(self, job: Job) -> None:
        """A job whose process has ended: its final state is the one its status.json holds (the registry reads it
        from there), or, when it wrote none, the one the queue writes for it here."""
        child = self._children.get(job.id)
        if child is not None:
            if child.poll() is None:
                return self._stop_if_removed(job)
            del self._children[job.id]
            exit_code = child.returncode
            other = status_process(Path(job.run_dir)) or job_holder(Path(job.run_dir))
            if other is not None and other != child.pid:  # ours was a second launch, refused: the process that
                return self._adopt(job, other)  # holds the job runs it (trainer/run_dir.py job_held); watch it
        elif is_our_process(job) or status_process(Path(job.run_dir)):
            return self._stop_if_removed(job)
        elif self._just_claimed(job):
            return
        else:
            exit_code = None
        status = read_status(Path(job.run_dir)) or {}  # an unreadable one is no final state: the job died
        if status.get("state") not in FINAL_STATES:
            self._mark_dead(job, exit_code)

    def _adopt(self, job: Job, pid: int) -> None:
        try:
            self.registry.update(job.id, pid=pid, proc_start=psutil.Process(pid).create_time())
        except psutil.NoSuchProcess:  # it ended meanwhile: the next tick reads what it wrote
            pass

    def _just_claimed(self, job: Job) -> bool:
        """Claimed by another server a moment ago, which has yet to record the pid it spawned."""
        status = read_status(Path(job.run_dir)) or {}
        fresh = time.time() - (job.started_at or 0) < STARTING_GRACE_S
        return job.pid is None and job.id not in self._children and status.get("state") == "queued" and fresh

    def _stop_if_removed(self, job: Job) -> None:
        """A live job whose directory was removed can save nothing: stop it (once), so its slot frees up."""
        if job.stop_requested is None and not Path(job.run_dir).is_dir():
            self.stop(job.id)

    def _mark_dead(self, job: Job, exit_code: int | None) -> None:
        """The process ended without writing a final state (killed, crashed hard): say so, with the log tail."""
        log = log_file(job)
        if not Path(job.run_dir).is_dir():
            state, error = "failed", f"run directory removed ({job.run_dir}) while the job ran"
        elif job.stop_requested and job.kind == "train":
            state, error = "stopped", "killed after not stopping within the grace period; adapter not saved"
        elif job.stop_requested:
            state, error = "stopped", f"{job.kind} stopped by the user"
        else:
            how = f"exit code {exit_code}" if exit_code is not None else "while nobody was watching"
            process = "training" if job.kind == "train" else job.kind
            state, error = "failed", f"the {process} process died ({how}). Last lines of {log.name}:\n"
            error += log_tail(log.parent, name=log.name)
            return self._settle(job, state, error, exit_code, died(exit_code, error))
        self._settle(job, state, error, exit_code, failure("killed", error) if state == "failed" else None)

    def _settle(
        self, job: Job, state: str, error: str, exit_code: int | None = None, why: Failure | None = None
    ) -> None:
        """A final state the job's process did not write itself: into its status.json, which the registry reads."""
        now = time.time()
        structured = why.to_status() if why is not None else None
        try:
            RunDir(Path(job.run_dir)).write_status(
                state=state, error=error, exit_code=exit_code, failure=structured, ended_at=now
            )
        except FileNotFoundError:  # its directory was removed: the registry alone keeps the outcome
            self.registry.update(job.id, state=state, error=error, exit_code=exit_code, ended_at=now)
        self.registry.refresh(job.id)

    def reattach(self) -> None:
        """After a server restart: keep jobs whose process still runs, settle the ones that ended meanwhile."""
        with self._lock:
            for job in self.registry.all("running"):
                self._reconcile(job)

    # --- stopping ---------------------------------------------------------------------------------------
    def stop(self, job_id: str, grace_s: float = STOP_GRACE_S) -> None:
        """Queued: never starts. Running: SIGTERM to its process group (it saves the adapter), SIGKILL after
        grace_s. Returns at once; the queue thread settles the final state."""
        with self._lock:
            job = self.registry.get(job_id)
            if job is None or job.state in FINAL_STATES:
                return
            if job.state == "queued":
                self._settle(job, "stopped", "stopped before it started")
                return
            self.registry.update(job_id, stop_requested=time.time())
            pid = self._live_pid(job)
            if pid is None:
                return
            signal_group(pid, signal.SIGTERM)
        threading.Timer(grace_s, self._force_kill, args=(job_id,)).start()

    def _live_pid(self, job: Job) -> int | None:
        """The job's running process: the one this or another server spawned, else the one its status.json names
        (a job listed again after the registry was rebuilt)."""
        if job.id in self._children or is_our_process(job):
            return job.pid
        return status_process(Path(job.run_dir))

    def _force_kill(self, job_id: str) -> None:
        job = self.registry.get(job_id)
        pid = self._live_pid(job) if job is not None and job.state == "running" else None
        if pid is not None:
            kill_tree(pid)
            child = self._children.get(job_id)
            if child is not None:
                child.wait(timeout=30)  # reap it: no zombie
            self.tick()

    # --- housekeeping -----------------------------------------------------------------------------------
    def delete(self, job_id: str) -> None:
        """Remove a finished run's directory and registry row (the UI asks the user first)."""
        import shutil

        job = self.registry.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state not in FINAL_STATES:
            raise ValueError(f"run {job_id} is {job.state}; stop it before deleting it")
        shutil.rmtree(job.run_dir, ignore_errors=True)
        self.registry.delete(job_id)

    def rename(self, job_id: str, name: str) -> None:
        from trainer.config.run_config import RUN_NAME_RE

        if not RUN_NAME_RE.match(name):
            raise ValueError(f"run name {name!r} may hold only letters, digits, '.', '_' and '-'")
        self.registry.update(job_id, name=name)
        job = self.registry.get(job_id)
        if job is not None:
            rename_request(Path(job.run_dir), name)

    def adopt_runs_on_disk(self) -> list[str]:
        """Register finished run directories made by `lora-workbench train` outside the UI. A directory whose
        status.json cannot be used is left alone and named, with the reason, in the returned (and printed) list."""
        self.not_listed.clear()
        adopt_runs_on_disk(self.registry, self.runs_dir, self.not_listed)
        return self.not_listed

    # --- the background thread --------------------------------------------------------------------------
    def start(self, interval_s: float = 1.0) -> None:
        def loop() -> None:
            while not self._stop_event.wait(interval_s):
                try:
                    self.tick()
                except Exception:  # e.g. the registry's disk is full: keep the queue alive, try again next tick
                    import traceback

                    traceback.print_exc()

        self.tick()
        self._thread = threading.Thread(target=loop, name="job-queue", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the queue thread; running jobs go on and are re-attached by the next server."""
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
