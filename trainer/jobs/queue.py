"""The job queue: jobs start in order as `lora-workbench <kind>` subprocesses, are stopped by process group,
and are re-attached (or marked failed) when the server that started them restarts.

Kinds: `train` (runs/<run_id>/, its config.yaml the argument) and the side jobs `export` and `evaluate`
(runs/.jobs/<job_id>/ holding job.json, the command's arguments, plus status.json and job.log).
Files stay the contract: a job writes its own status.json; the registry mirrors it for listing and ordering.
"""

from __future__ import annotations

import json
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
from trainer.jobs.registry import Job, Registry
from trainer.run.log_tee import CAPTURED_ENV
from trainer.run_dir import FINAL_STATES, RunDir, StatusError, load_status, new_run_id, read_status, write_json_atomic

STOP_GRACE_S = 30.0
SIDE_KINDS = ("export", "evaluate", "preflight")
JOBS_SUBDIR = ".jobs"


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


def is_our_process(job: Job) -> bool:
    """True if the job's pid is alive and is still the process we started (not a recycled pid)."""
    if not job.pid or job.proc_start is None:
        return False
    try:
        proc = psutil.Process(job.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
        return abs(proc.create_time() - job.proc_start) < 0.01 and (
            job.config_path in cmdline or job.run_dir in cmdline  # train gets its config, side jobs their dir
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


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
        self.reattach()

    # --- submitting -----------------------------------------------------------------------------------
    def submit(self, cfg: RunConfig) -> str:
        """Write runs/<run_id>/config.yaml (queued) and register it; returns the run id."""
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"runs_dir": str(self.runs_dir)})})
        with self._lock:
            run_id = new_run_id(cfg.output.run_name, self.runs_dir)
            run = RunDir(self.runs_dir / run_id)
            run.path.mkdir(parents=True)
            run.config.write_text(cfg.to_yaml(), encoding="utf-8")
            write_json_atomic(run.status_file, run.status)
            self.registry.add(run_id, cfg.output.run_name, "train", run.config, run.path)
        return run_id

    def submit_side_job(
        self, kind: str, args: list[str], name: str | None = None, inputs: dict[str, str] | None = None
    ) -> str:
        """Queue `lora-workbench <kind> ARGS --status-dir <job dir>`; returns the job id.

        inputs are files written into the job dir first (e.g. a config); an argument equal to one of their
        names becomes that file's path."""
        if kind not in SIDE_KINDS:
            raise ValueError(f"unknown job kind {kind!r} (one of {', '.join(SIDE_KINDS)})")
        root = self.runs_dir / JOBS_SUBDIR
        root.mkdir(exist_ok=True)
        with self._lock:
            job_id = new_run_id(f"{kind}-{name}" if name else kind, root)
            path = root / job_id
            path.mkdir()
            for file_name, text in (inputs or {}).items():
                (path / Path(file_name).name).write_text(text, encoding="utf-8")
            args = [str(path / a) if a in (inputs or {}) else a for a in args]
            write_json_atomic(path / "job.json", {"kind": kind, "args": args})
            RunDir(path).write_status(state="queued")
            self.registry.add(job_id, name, kind, path / "job.json", path)
        return job_id

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
            running = len(self.registry.all("running"))
            for job in self.registry.all("queued"):
                if running >= self.max_running:
                    break
                running += self._launch(job)  # one that cannot start does not take a slot

    def _argv(self, job: Job) -> list[str]:
        """The job's command line: always a list (no shell), built from files this server wrote."""
        if job.kind == "train":  # as on the command line: the trainer decides on `accelerate launch` itself
            return [sys.executable, "-m", "trainer", "train", job.config_path]
        request = json.loads(Path(job.config_path).read_text(encoding="utf-8"))
        return [sys.executable, "-m", "trainer", job.kind, *request["args"], "--status-dir", job.run_dir]

    def _launch(self, job: Job) -> bool:
        """Start a queued job; one that cannot start (its dir removed, its request unreadable) is failed, so the
        jobs behind it still start. True if it started."""
        if not Path(job.run_dir).is_dir():
            self._settle(job, "failed", "run directory removed before the job started")
            return False
        if not self.registry.claim(job.id, pid=None, started_at=time.time()):
            return False  # no longer queued: stopped meanwhile, or launched by someone else
        try:
            self._spawn(job)
        except (OSError, ValueError, KeyError, TypeError) as e:  # job.json unreadable or malformed, no executable
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
        """Take the final state of a job whose process has ended, from its status.json or its death."""
        child = self._children.get(job.id)
        if child is not None:
            if child.poll() is None:
                return self._stop_if_removed(job)
            del self._children[job.id]
            exit_code = child.returncode
        elif is_our_process(job):
            return self._stop_if_removed(job)
        else:
            exit_code = None
        status = read_status(Path(job.run_dir)) or {}  # an unreadable one is no final state: the job died
        if status.get("state") in FINAL_STATES:
            self.registry.update(
                job.id,
                state=status["state"],
                exit_code=status.get("exit_code", exit_code),
                error=status.get("error"),
                ended_at=status.get("ended_at") or time.time(),
            )
            return
        self._mark_dead(job, exit_code)

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
        """A final state the job's process did not write itself: into its status.json and the registry."""
        now = time.time()
        structured = why.to_status() if why is not None else None
        try:
            RunDir(Path(job.run_dir)).write_status(
                state=state, error=error, exit_code=exit_code, failure=structured, ended_at=now
            )
        except FileNotFoundError:  # its directory was removed: the registry alone keeps the outcome
            pass
        self.registry.update(job.id, state=state, error=error, exit_code=exit_code, ended_at=now)

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
            if not (job.id in self._children or is_our_process(job)):
                return
            _signal_group(job.pid, signal.SIGTERM)
        threading.Timer(grace_s, self._force_kill, args=(job_id,)).start()

    def _force_kill(self, job_id: str) -> None:
        job = self.registry.get(job_id)
        if job is not None and job.state == "running" and (job.id in self._children or is_our_process(job)):
            _kill_tree(job.pid)
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

    def adopt_runs_on_disk(self) -> list[str]:
        """Register finished run directories made by `lora-workbench train` outside the UI. A directory whose
        status.json cannot be used is left alone and named, with the reason, in the returned (and printed) list."""
        known, skipped = {j.id for j in self.registry.all()}, self.not_listed
        skipped.clear()
        for path in sorted(self.runs_dir.iterdir()):
            if path.name in known or not path.is_dir():
                continue
            try:
                status = load_status(path)
            except StatusError as e:
                skipped.append(f"{path}: not listed: {e}")
                print(skipped[-1], file=sys.stderr, flush=True)
                continue
            if status is None or status["state"] not in FINAL_STATES:
                continue
            self.registry.add(path.name, None, "train", path / "config.yaml", path, state=status["state"])
            self.registry.update(
                path.name,
                exit_code=status.get("exit_code"),
                error=status.get("error"),
                started_at=status.get("started_at"),
                ended_at=status.get("ended_at"),
            )
        return skipped

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


def _kill_tree(pid: int | None) -> None:
    """SIGKILL a job's process group and everything below it: a multi-process run's `accelerate launch` runs in
    a session of its own (trainer/run/launch.py), which the group signal does not reach."""
    try:
        below = psutil.Process(pid).children(recursive=True) if pid else []
    except psutil.NoSuchProcess:
        below = []
    _signal_group(pid, signal.SIGKILL)
    for proc in below:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _signal_group(pid: int | None, sig: int) -> None:
    if not pid:
        return
    try:
        os.killpg(os.getpgid(pid), sig)
    except ProcessLookupError:
        pass
