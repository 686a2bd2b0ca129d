"""Several processes for one run: accelerate's command line per strategy, the presets, the hardware checks, and
real 2-rank data-parallel jobs on the CPU (gloo) through the same launcher as on GPUs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file

from app.plots import memory_figure
from app.views.monitor import Series
from tests.conftest import ROOT, only_run
from trainer.config.presets import build_config, load_config
from trainer.config.run_config import ConfigError
from trainer.jobs.queue import JobManager
from trainer.model.device import hardware_problems
from trainer.run.launch import Machines, launch_argv, preset_file
from trainer.run.train import run_training
from trainer.run_dir import RunDir, read_metrics, read_status

STRATEGIES = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
TWO_CPU_RANKS = {"hardware": {"cpu_processes": 2}, "training": {"max_steps": 3, "save_steps": 2}}


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_preset_yamls_parse_as_accelerate_configs(strategy: str) -> None:
    cfg = load_config_from_file(str(preset_file(strategy)))
    assert cfg.distributed_type.value == STRATEGIES[strategy]
    assert cfg.num_machines == 1 and not cfg.use_cpu
    if strategy.startswith("deepspeed"):
        assert cfg.deepspeed_config["zero_stage"] == int(strategy[-1])
    if strategy == "fsdp":
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the adapter is saved whole


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_launch_argv_per_strategy(strategy: str, tmp_path: Path) -> None:
    cfg = build_config({"hardware": {"num_gpus": 4, "strategy": strategy}})
    argv = launch_argv(cfg, tmp_path / "run/config.yaml", tmp_path / "run", resume=True)
    assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert flag(argv, "--config_file") == str(ROOT / "presets/accelerate" / f"{strategy}.yaml")
    assert flag(argv, "--num_processes") == "4" and flag(argv, "--num_machines") == "1"
    assert flag(argv, "--main_process_port") == "0"  # a free port: two runs on one machine do not collide
    assert "--machine_rank" not in argv
    tail = [
        "-m",
        "trainer",
        "train",
        str(tmp_path / "run/config.yaml"),
        "--run-dir",
        str(tmp_path / "run"),
        "--resume",
    ]
    assert argv[-len(tail) :] == tail


def test_launch_argv_for_several_machines(tmp_path: Path) -> None:
    cfg = build_config({"hardware": {"num_gpus": 8}})
    machines = Machines(num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29501)
    argv = launch_argv(cfg, tmp_path / "c.yaml", tmp_path, machines=machines)
    assert flag(argv, "--num_processes") == "16"  # accelerate counts the processes of all machines
    assert flag(argv, "--num_machines") == "2" and flag(argv, "--machine_rank") == "1"
    assert flag(argv, "--main_process_ip") == "10.0.0.1" and flag(argv, "--main_process_port") == "29501"


def test_impossible_requests_name_the_field() -> None:
    four = build_config({"hardware": {"num_gpus": 4}})
    assert any(
        p.startswith("hardware.num_gpus: 4 asked, this machine has 1 CUDA GPU(s)") and "at most 1" in p
        for p in hardware_problems(four, cuda=True, gpu_count=1, bf16_ok=True)
    )
    two = build_config({"hardware": {"num_gpus": 2}})
    assert any("no CUDA GPU" in p and "cpu_processes" in p for p in hardware_problems(two, False, 0, False))
    assert hardware_problems(two, cuda=True, gpu_count=2, bf16_ok=True) == []
    fsdp_4bit = build_config({"recipe": "qlora", "hardware": {"num_gpus": 2, "strategy": "fsdp"}})
    problems = hardware_problems(fsdp_4bit, cuda=True, gpu_count=2, bf16_ok=True)
    assert any(p.startswith("hardware.strategy: fsdp shards the weights") for p in problems)
    assert any(
        "needs CUDA GPUs" in p
        for p in hardware_problems(build_config({"hardware": {"strategy": "fsdp"}}), False, 0, False)
    )
    cpu_ranks = build_config({"hardware": {"cpu_processes": 2}})
    assert hardware_problems(cpu_ranks, False, 0, False) == []
    assert any(p.startswith("hardware.cpu_processes:") for p in hardware_problems(cpu_ranks, True, 2, True))
    with pytest.raises(ConfigError, match="hardware.cpu_processes: set either num_gpus"):
        build_config({"hardware": {"num_gpus": 2, "cpu_processes": 2}})


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is not None, reason="deepspeed is installed here"
)
def test_missing_deepspeed_is_refused_before_any_model_loads(make_config, tmp_path: Path) -> None:
    path = make_config({"hardware": {"strategy": "deepspeed_zero2"}})
    assert run_training(str(path)) == 1
    run = only_run(tmp_path / "runs")
    status = read_status(run)
    assert status["state"] == "failed"
    assert "hardware.strategy: deepspeed_zero2 needs DeepSpeed" in status["error"]
    assert "pip install 'lora-workbench[deepspeed]'" in status["error"]
    events = [m["event"] for m in read_metrics(run / "metrics.jsonl") if m["kind"] == "event"]
    assert "model_loaded" not in events and not (run / "adapter").exists()


def test_only_the_writer_rank_writes_run_files(tmp_path: Path) -> None:
    other_rank = RunDir(tmp_path, writer=False)
    other_rank.write_status(state="running", step=3)
    other_rank.event(0, "start")
    assert other_rank.status["step"] == 3  # kept in memory, for the rank's own decisions
    assert list(tmp_path.iterdir()) == []


def test_memory_chart_shows_every_gpu_of_a_multi_gpu_run() -> None:
    series = Series()
    for step in (1, 2):
        gpus = [{"index": i, "mem_used_gb": 10.0 + i, "mem_total_gb": 80.0, "util_percent": 90} for i in range(2)]
        series.add({"step": step, "time": 0, "kind": "system", "gpu_mem_allocated_gb": 9.0, "gpus": gpus})
    series.add({"step": 3, "time": 0, "kind": "system", "gpu_mem_allocated_gb": 9.0})  # a line from an older run
    traces = {t.name: list(t.y) for t in memory_figure(series).data}
    assert traces["GPU 0 in use"] == [10.0, 10.0, None] and traces["GPU 1 in use"] == [11.0, 11.0, None]


def test_token_counts_are_summed_over_the_ranks(tmp_path: Path) -> None:
    """Each rank counts its own tokens; the train line speaks for all (a real gloo all-reduce, 2 processes)."""
    script = tmp_path / "count.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            sys.path.insert(0, {str(ROOT)!r})
            from accelerate import PartialState
            from trainer.run.callbacks import TokenCounter
            from trainer.run.distributed import GlobalTokens

            rank = PartialState(cpu=True).process_index
            counter = GlobalTokens(TokenCounter(lambda rows: rows))
            counter.local([{{"input_ids": [0] * (10 + 5 * rank)}}])
            counter.sum_over_ranks()
            summed = counter.tokens
            counter.total = None
            out = {{"world": PartialState().num_processes, "summed": summed, "local": counter.tokens}}
            open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w").write(json.dumps(out))
            PartialState().destroy_process_group()  # else a rank may abort in gloo's teardown at exit
            """
        )
    )
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(preset_file("ddp"))]
    argv += ["--num_processes", "2", "--main_process_port", "0", str(script)]
    subprocess.run(argv, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in results] == [2, 2]
    assert [r["summed"] for r in results] == [25, 25] and [r["local"] for r in results] == [10, 15]


def check_two_rank_run(run: Path, max_steps: int, rows: int, batch: int) -> None:
    """One run dir written once: a train line per optimizer step, one adapter, completed, and both ranks ran."""
    status = read_status(run)
    assert status["state"] == "completed" and status["exit_code"] == 0 and status["step"] == max_steps
    lines = read_metrics(run / "metrics.jsonl")
    train = [m for m in lines if m["kind"] == "train"]
    assert [m["step"] for m in train] == list(range(1, max_steps + 1))
    assert train[0]["epoch"] == pytest.approx(batch * 2 / rows)  # each step took a batch from each of 2 ranks
    assert all(m["tokens_per_second"] > 0 for m in train)
    events = [m for m in lines if m["kind"] == "event"]
    assert [e["event"] for e in events].count("start") == 1 and [e["event"] for e in events].count("end") == 1
    assert next(e for e in events if e["event"] == "start")["world_size"] == 2
    # not anchored to line starts: the two ranks share one output pipe, so one rank's line can follow the other's
    # unfinished line (a print's text and its newline are two writes)
    pids = set(re.findall(rf"run {run.name} in .+? \(pid (\d+)\)", (run / "train.log").read_text()))
    assert len(pids) == 2  # both ranks started on this run dir, and no other
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["adapter", "checkpoints"]
    assert (run / "adapter/adapter_model.safetensors").is_file() and (run / "adapter/README.md").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_train_command_launches_two_cpu_ranks_on_one_run(make_config, tmp_path: Path) -> None:
    path = make_config(TWO_CPU_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "train", str(path)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "accelerate.commands.launch" in proc.stdout  # the command it ran is printed and logged
    run = only_run(tmp_path / "runs")
    check_two_rank_run(run, max_steps=3, rows=64, batch=4)


def test_job_queue_launches_two_cpu_ranks_on_one_run(make_config, tmp_path: Path) -> None:
    manager = JobManager(tmp_path / "runs", cwd=ROOT)
    job_id = manager.submit(load_config(make_config(TWO_CPU_RANKS)))
    manager.tick()
    run_dir = Path(manager.registry.get(job_id).run_dir)
    assert manager._children[job_id].args == [sys.executable, "-m", "trainer", "train", "--job-dir", str(run_dir)]
    manager._children[job_id].wait(timeout=180)  # the same `lora-workbench train` as on the command line
    manager.tick()
    job = manager.registry.get(job_id)
    assert job.state == "completed" and job.exit_code == 0, (Path(job.run_dir) / "train.log").read_text()[-3000:]
    check_two_rank_run(Path(job.run_dir), max_steps=3, rows=64, batch=4)
    assert "accelerate.commands.launch" in (run_dir / "train.log").read_text()  # it launched the ranks itself


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: QLoRA with one quantized model per GPU")
def test_qlora_on_two_gpus_puts_each_rank_on_its_own_device(make_config, tmp_path: Path) -> None:
    path = make_config({"recipe": "qlora", "hardware": {"num_gpus": 2}, "training": {"max_steps": 3}})
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "train", str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    run = only_run(tmp_path / "runs")
    check_two_rank_run(run, max_steps=3, rows=64, batch=4)
    gpus = [m["gpus"] for m in read_metrics(run / "metrics.jsonl") if m["kind"] == "system"][-1]
    assert len(gpus) >= 2 and all(g["mem_used_gb"] > 0 for g in gpus[:2])


def test_a_stop_signal_to_one_rank_stops_every_rank_after_the_same_step(make_config, tmp_path: Path) -> None:
    """The UI's Stop reaches every rank, but not at the same moment; they must agree on the step, or the ones
    still training wait forever for the one that left."""
    import psutil

    path = make_config({**TWO_CPU_RANKS, "training": {"max_steps": 5000, "save_steps": 100000}})
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK")}
    with open(tmp_path / "out.log", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer", "train", str(path)],
            cwd=ROOT,
            env={**env, "OMP_NUM_THREADS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def steps() -> int:
            runs = [p for p in (tmp_path / "runs").glob("*/metrics.jsonl")]
            return sum(m["kind"] == "train" for m in read_metrics(runs[0])) if runs else 0

        deadline = time.monotonic() + 180
        while steps() < 3:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.log").read_text()[-3000:]
            time.sleep(0.5)
        ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children(recursive=True)}
        ranks["1"].send_signal(signal.SIGTERM)  # rank 1 only; rank 0 learns of it from the agreement
        assert proc.wait(timeout=180) == 128 + signal.SIGTERM, (tmp_path / "out.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    run = only_run(tmp_path / "runs")
    status = read_status(run)
    assert status["state"] == "stopped" and status["exit_code"] == 143 and 3 <= status["step"] < 5000
    assert (run / "adapter/adapter_model.safetensors").is_file() and not (run / "adapter.partial").exists()
    train = [m["step"] for m in read_metrics(run / "metrics.jsonl") if m["kind"] == "train"]
    assert train == list(range(1, len(train) + 1)) and train[-1] == status["step"]
