"""The `lora-workbench` command (also `python -m trainer`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-workbench", description="Point-and-click LoRA/QLoRA fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)

    ui = sub.add_parser("ui", help="serve the web UI (default http://127.0.0.1:7860, runs in ./runs)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind; any non-loopback one needs --auth")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--runs-dir", default="runs", help="where runs, uploads and the job registry live")
    ui.add_argument("--auth", help="USER:PASS required to open the page (also: --auth-file, $LORA_WORKBENCH_AUTH)")
    ui.add_argument("--auth-file", help="file holding one USER:PASS line")
    ui.add_argument("--insecure-no-auth", action="store_true", help="serve a non-loopback address without auth")
    ui.add_argument("--max-running", type=int, default=1, help="jobs that train at the same time (default 1)")
    ui.add_argument(
        "--data-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory the page may read data files from (repeatable); always allowed: the runs dir, the "
        "project's data/ and examples/",
    )
    ui.add_argument(
        "--example",
        default="examples/smollm2-persona.yaml",
        help="config a fresh page starts with (default: the real model on the persona task)",
    )

    train = sub.add_parser("train", help="run one fine-tuning config (exit 0 done, 1 failed, 130/143 stopped)")
    train.add_argument("config", nargs="?", help="YAML run config (e.g. examples/tiny-qlora.yaml)")
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="change a field of the config for this run, e.g. training.max_steps=20 (values are YAML)",
    )
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    train.add_argument("--run-dir", help="train into this existing run directory (set by the multi-process launcher)")
    add_job_dir(train, "runs/<run_id>: train that queued run (its config.yaml and job.json) instead of CONFIG")
    machines = train.add_argument_group("several machines (accelerate's flags; num_gpus is per machine)")
    machines.add_argument("--num-machines", type=int, default=1)
    machines.add_argument("--machine-rank", type=int, default=0, help="0 on the main machine, 1.. on the others")
    machines.add_argument("--main-process-ip", help="address of machine 0, reachable from all machines")
    machines.add_argument("--main-process-port", type=int, help="a free port on machine 0 (default 29500)")

    est = sub.add_parser("estimate", help="trainable parameters, adapter size and peak GPU memory, without weights")
    est.add_argument("config")
    est.add_argument(
        "--gpu-memory", type=float, help="check the fit against a GPU of this many GB (default: this one's)"
    )

    pre = sub.add_parser("preflight", help="train a few steps on the longest rows: peak memory, tokens/s, ETA")
    pre.add_argument("config", nargs="?")
    pre.add_argument("--steps", type=int, default=6, help="optimizer steps of each short run (default 6)")
    pre.add_argument("--status-dir", help="also write status.json and result.json there (a job dir without job.json)")
    add_job_dir(pre)

    tiny = sub.add_parser("make-tiny-model", help="build the offline tiny model with tokenizer + chat template")
    tiny.add_argument("out_dir")

    prep = sub.add_parser("prepare-model", help="fetch and convert a built-in model now (else on first use)")
    prep.add_argument("model_id", help="e.g. builtin:smollm2-135m")
    prep.add_argument("--runs-dir", default="runs", help="its cache is <runs-dir>/.cache unless $LORA_WORKBENCH_CACHE")

    llama = sub.add_parser("build-llama-cpp", help="compile llama.cpp's llama-quantize (k-quant GGUF exports), once")
    llama.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    llama.add_argument(
        "--runs-dir", default="runs", help="its cache is <runs-dir>/.cache unless $LORA_WORKBENCH_CACHE"
    )

    ev = sub.add_parser("evaluate", help="score base vs adapter on a held-out file (exact match + loss)")
    ev.add_argument("run_dir", nargs="?", help="a finished run directory (runs/<run_id>)")
    ev.add_argument("--data", help="held-out data file (default: the run's eval data)")
    ev.add_argument("--max-new-tokens", type=int, default=32, help="longest greedy answer (default 32)")
    ev.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    ev.add_argument("--status-dir", help="also write status.json and result.json there (a job dir without job.json)")
    add_job_dir(ev)

    ex = sub.add_parser("export", help="merge an adapter into its base and save a plain transformers model")
    ex.add_argument("--adapter", help="adapter directory (runs/<run_id>/adapter); required without --job-dir")
    ex.add_argument("--out", help="directory to write the merged model to; required without --job-dir")
    ex.add_argument("--base", help="base model id or path (default: the one the adapter was trained on)")
    ex.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of the saved weights")
    ex.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 2GB or 500MB")
    ex.add_argument(
        "--merge-into",
        default="16bit",
        choices=["16bit", "dequantized"],
        help="16bit: merge into the unquantized base; dequantized: into the 4/8-bit base as trained, dequantized",
    )
    ex.add_argument(
        "--format", default="safetensors", choices=["safetensors", "gguf"], help="gguf: for llama.cpp and Ollama"
    )
    ex.add_argument(
        "--quant",
        help="GGUF type (--format gguf only): f16, bf16, q8_0; q4_k_m, q5_k_m, q6_k where llama-quantize is built; "
        "case does not matter (default q8_0)",
    )
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the export passed")
    ex.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the export (token: HF_TOKEN or `hf auth login`)")
    ex.add_argument("--status-dir", help="also write status.json, result.json and export_report.json there")
    add_job_dir(ex)

    bench = sub.add_parser("bench", help="speed and memory of the workbench against plain TRL on the same runs")
    bench.add_argument(
        "--matrix",
        choices=["cpu", "gpu", "real"],
        help="cases to run (default: gpu if CUDA is present; real: SmolLM2)",
    )
    bench.add_argument("--steps", type=int, help="optimizer steps per run (default: cpu 60, gpu 10)")
    bench.add_argument("--out", default="benchmarks/RESULTS.md", help="markdown file to append to; '-' prints only")
    bench.add_argument("--only", help="comma-separated case names or prefixes, e.g. tiny-lora-64 or small")
    bench.add_argument("--repeat", type=int, default=1, help="runs per variant; the table shows medians")
    bench.add_argument("--variants", default="abcd", help="which of a, b, c, d to run (a always runs)")
    bench.add_argument("--threads", type=int, default=2, help="CPU threads of each training process")
    bench.add_argument("--work-dir", help="where the runs go (default runs/.bench/<time>)")
    bench.add_argument("--cache-dir", default="runs/.cache", help="built bench models and data")
    return p


def add_job_dir(
    sub: argparse.ArgumentParser,
    what: str = "run the request in DIR/job.json (how the UI's queue starts a job), writing status.json there",
) -> None:
    sub.add_argument("--job-dir", metavar="DIR", help=what)


JOB_ARGS = {"train": ["config"], "preflight": ["config"], "evaluate": ["run_dir"], "export": ["adapter", "out"]}
POSITIONAL = {"config", "run_dir", "overrides"}
MACHINE_FLAGS = {"num_machines", "machine_rank", "main_process_ip", "main_process_port"}  # not part of a request


def job_form_problem(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """--job-dir or the plain form's arguments, never both, never neither."""
    if args.job_dir:
        defaults = vars(parser.parse_args([args.command, "--job-dir", args.job_dir]))
        given = [k for k, v in vars(args).items() if k not in MACHINE_FLAGS and v != defaults[k]]
        if given:
            names = ", ".join(k if k in POSITIONAL else "--" + k.replace("_", "-") for k in given)
            return f"--job-dir takes no other request arguments (the request is DIR/job.json): {names}"
        return None
    missing = [name for name in JOB_ARGS[args.command] if getattr(args, name) is None]
    if missing:
        flags = ", ".join(n.upper() if args.command != "export" else f"--{n}" for n in missing)
        return f"the following arguments are required: {flags}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in JOB_ARGS and (problem := job_form_problem(parser, args)):
        print(f"lora-workbench {args.command}: error: {problem}", file=sys.stderr)
        return 2
    if args.command == "train" and argv is None:  # this process is the command (not a test calling main)
        from trainer.run.lean_memory import use_lean_allocator

        use_lean_allocator()  # once, before torch loads: re-executes on tcmalloc/jemalloc where installed
    if args.command == "ui":
        from app.server import LaunchError, read_auth, serve

        try:
            auth = read_auth(args.auth, args.auth_file)
            serve(
                args.host,
                args.port,
                args.runs_dir,
                auth,
                args.insecure_no_auth,
                args.max_running,
                args.example,
                data_dirs=args.data_dir,
            )
        except LaunchError as e:
            print(f"lora-workbench ui: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command in JOB_ARGS:
        return run_job(args)
    if args.command == "estimate":
        from trainer.plan.estimate import estimate_command

        return estimate_command(args.config, args.gpu_memory)
    if args.command == "make-tiny-model":
        from trainer.model.tiny_model import make_tiny_model

        print(f"tiny model written to {make_tiny_model(args.out_dir)}")
        return 0
    if args.command == "prepare-model":
        from trainer.model.builtin_models import prepare_command

        return prepare_command(args.model_id, args.runs_dir)
    if args.command == "build-llama-cpp":
        from trainer.export.llama_cpp import build_command

        return build_command(args.runs_dir, args.jobs)
    if args.command == "bench":
        from trainer.bench.bench import bench_command

        return bench_command(args)
    return 2


def run_job(args: argparse.Namespace) -> int:
    """train, export, evaluate, preflight: the request from DIR/job.json (--job-dir) or built from the flags, run
    by one function either way (trainer/jobs/requests.py)."""
    from trainer.jobs import requests

    machines = None
    if args.command == "train":
        from trainer.run.launch import Machines

        machines = Machines(args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port)
        if args.num_machines > 1 and not args.main_process_ip:
            print(
                "lora-workbench train: --num-machines > 1 needs --main-process-ip (machine 0's address)",
                file=sys.stderr,
            )
            return 2
    if args.job_dir:
        return requests.run_job_dir(args.command, Path(args.job_dir), machines)
    if args.command == "train":  # the plain form makes its run dir first (or resumes the config's own)
        from trainer.run.train import run_training

        return run_training(
            args.config, resume=args.resume, run_dir=args.run_dir, machines=machines, overrides=args.overrides
        )
    try:
        request = plain_request(args)
    except ValueError as e:  # ExportError: --quant without --format gguf
        print(f"lora-workbench {args.command}: {e}", file=sys.stderr)
        return 1
    return requests.run_request(request, Path(args.status_dir) if args.status_dir else None)


def plain_request(args: argparse.Namespace):
    """The request a job's job.json would hold, from the plain form's flags."""
    from trainer.jobs.requests import EvaluateJob, PreflightJob

    if args.command == "export":
        from trainer.export.job import request_from_args

        return request_from_args(args)
    if args.command == "evaluate":
        return EvaluateJob(Path(args.run_dir), args.data, args.max_new_tokens, args.limit)
    return PreflightJob(Path(args.config), args.steps)


if __name__ == "__main__":
    sys.exit(main())
