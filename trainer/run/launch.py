"""Several processes for one run: the `accelerate launch` command line, and the parent that waits for it.

    lora-workbench train CONFIG.yaml      # hardware.num_gpus: 4 -> re-executes itself as:
    python -m accelerate.commands.launch --config_file presets/accelerate/ddp.yaml --num_processes 4 \
        --num_machines 1 --main_process_port 0 -m trainer train RUN/config.yaml --run-dir RUN

The parent picks the run directory once and passes it to every rank (`--run-dir`); rank 0 alone writes the
run's files. Without CUDA, accelerate's MULTI_GPU launcher (torch.distributed.run) starts the same ranks on the
CPU with the gloo backend (`hardware.cpu_processes`, for testing the path): one code path for both. The job
queue starts a run as this same `lora-workbench train --job-dir RUN` process (trainer/jobs/queue.py), so a run
has one process tree however it was started, and the server never counts GPUs itself.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config.paths import PRESETS_DIR
from trainer.config.run_config import RunConfig
from trainer.failure import died
from trainer.model.device import process_problems
from trainer.run_dir import FINAL_STATES, RunDir, read_status

if TYPE_CHECKING:
    from trainer.run.stopping import StopRequest

ACCELERATE_DIR = PRESETS_DIR / "accelerate"


@dataclass(frozen=True)
class Machines:
    """accelerate's machine flags; the same on every machine except machine_rank."""

    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None


ONE_MACHINE = Machines()


def processes_per_machine(cfg: RunConfig) -> int:
    """GPUs to use, or CPU processes when the config asks for those (testing the multi-process path)."""
    return max(cfg.hardware.num_gpus, cfg.hardware.cpu_processes, 1)


def wants_launcher(cfg: RunConfig, machines: Machines = ONE_MACHINE) -> bool:
    return processes_per_machine(cfg) > 1 or cfg.hardware.strategy != "ddp" or machines.num_machines > 1


def inside_launch() -> bool:
    """True in a process started by a distributed launcher (torchrun and accelerate set these)."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def preset_file(strategy: str) -> Path:
    return ACCELERATE_DIR / f"{strategy}.yaml"


def launch_argv(
    cfg: RunConfig, config: Path, run_dir: Path, resume: bool = False, machines: Machines = ONE_MACHINE
) -> list[str]:
    """The command that starts every rank of this machine; an argv list, never a shell string."""
    argv = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(preset_file(cfg.hardware.strategy)),
        "--num_processes",  # accelerate counts the processes of all machines together
        str(processes_per_machine(cfg) * machines.num_machines),
        "--num_machines",
        str(machines.num_machines),
    ]
    if machines.num_machines > 1:
        argv += ["--machine_rank", str(machines.machine_rank), "--main_process_ip", str(machines.main_process_ip)]
        argv += ["--main_process_port", str(machines.main_process_port or 29500)]
    else:  # 0: a free port, so two runs on one machine do not collide on torchrun's default 29500
        argv += ["--main_process_port", str(machines.main_process_port or 0)]
    argv += ["-m", "trainer", "train", str(config), "--run-dir", str(run_dir)]
    return argv + (["--resume"] if resume else [])


def run_launcher(argv: list[str], log_file: Path | None, env: dict[str, str], stop: StopRequest | None = None) -> int:
    """Run the launcher, copying its output to the terminal and to train.log; a stop signal goes to it once
    (one this process got while the launcher started, too).

    The ranks do not tee themselves (env holds the log-captured flag): their output comes through here. The
    launcher gets its own session so that Ctrl-C reaches the ranks once, through torch.distributed.run."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)  # torch.distributed.run passes it on to every rank, which stops and saves

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    if stop is not None and stop.signum is not None:
        forward(stop.signum, None)
    try:
        with open(log_file or os.devnull, "ab") as log:
            for line in iter(proc.stdout.readline, b""):
                sys.stdout.write(line.decode("utf-8", "replace"))
                sys.stdout.flush()
                log.write(line)
                log.flush()
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def visible_gpus() -> tuple[bool, int]:
    """(CUDA present, GPUs visible) without creating a CUDA context in this parent process."""
    import torch

    return torch.cuda.is_available(), torch.cuda.device_count()


def launch_problems(cfg: RunConfig) -> list[str]:
    return process_problems(cfg, *visible_gpus())


def start_ranks(
    cfg: RunConfig, run: RunDir, resume: bool, machines: Machines, stop: StopRequest | None = None
) -> int | None:
    """`lora-workbench train` asked for several processes: launch this machine's ranks on `run` and wait for them.
    The one launch path: a run the job queue starts is the same `lora-workbench train` process, which comes here.

    Returns the run's exit code, or None when this machine cannot launch the config or a stop came first (the
    caller then fails the run in-process, naming the field, or marks it stopped)."""
    from trainer.run.log_tee import CAPTURED_ENV, tee_to

    if launch_problems(cfg) or (stop is not None and stop.signum is not None):
        return None
    argv = launch_argv(cfg, run.config, run.path, resume, machines)
    with tee_to(run.log_file):
        print(f"run {run.run_id}: {processes_per_machine(cfg)} process(es) per machine, {cfg.hardware.strategy}:")
        print(shlex.join(argv))
    log = None if os.environ.get(CAPTURED_ENV) else run.log_file  # else whoever captures us writes train.log
    started = time.time()
    code = run_launcher(argv, log, {**os.environ, CAPTURED_ENV: "1", "PYTHONUNBUFFERED": "1"}, stop)
    return settle(run, code, started, machines)


def settle(run: RunDir, code: int, started: float, machines: Machines) -> int:
    """The run's exit code from what rank 0 wrote; a launch that died before that is marked failed here."""
    status = read_status(run.path) or {}
    if status.get("state") in FINAL_STATES and (status.get("ended_at") or 0) >= started:
        return int(status.get("exit_code") or 0)
    if machines.machine_rank > 0:  # rank 0 runs on machine 0 and writes the run's files there
        return code
    error = f"the training processes ended (launcher exit code {code}) before rank 0 wrote a final state"
    run.write_status(
        state="failed", exit_code=1, error=error, failure=died(code, error).to_status(), ended_at=time.time()
    )
    return 1
