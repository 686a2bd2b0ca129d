"""Where a real-model LoRA run's memory goes on a CPU, phase by phase: plain TRL, a plain transformers Trainer and
the workbench, each in a fresh process.

    python benchmarks/memory_phases.py                                # the issue-17 case: 16 steps, all three
    python benchmarks/memory_phases.py --steps 3 --only workbench trl
    python benchmarks/memory_phases.py --lean     # all three on trainer/run/lean_memory.py's allocator and head tiles
    python benchmarks/memory_phases.py --malloc MALLOC_MMAP_THRESHOLD_=1048576   # every process under that env
    python benchmarks/memory_phases.py --malloc LD_PRELOAD=libjemalloc.so.2 --only trl
    python benchmarks/memory_phases.py --profile 2    # + torch.profiler(profile_memory=True) over step 2
    python benchmarks/memory_phases.py --tracemalloc  # + Python-side allocations (tracemalloc) per phase

Needs the built-in model offline: LORA_WORKBENCH_CACHE=~/.cache/lora-workbench-tests HF_HUB_OFFLINE=1.

The case (issue 17): builtin:smollm2-135m in fp32, LoRA r 8 / alpha 16 / dropout 0 on every linear layer but the
head, batch 4, no accumulation, max_length 256, lr 1e-4 cosine without warm-up, seed 0, no gradient checkpointing,
on 64 alpaca rows with long answers, generated here from the bundled data's text so that every row is cut to 256
tokens. benchmarks/reference_trl.py has no scheduler flag, so its schedule is TRL's default (linear): that moves
no memory. The workbench runs `lora-workbench train`'s run_training in-process (training.precision fp32 pinned):
its allocator is the one this script starts it on, glibc's unless --lean (which is what the training command's
own re-execution onto tcmalloc gives, trainer/run/lean_memory.py); its head tile is TRL's unless --lean or
trainer/run/train.py sets it. The summary names both for each process.

Measured inside each process: a thread samples /proc/self/statm every 5 ms (RSS); each phase mark records the RSS
then and the peak since the previous mark. Marks: imports, model loaded, data tokenized, training begins, and per
step: forward+backward (at on_pre_optimizer_step), optimizer (its state is created in step 1), step end. Per step
also the minor page faults and the process's CPU seconds (user + system): on a busy machine those move far less
than wall time, and the faults count the allocator's cost of mapping fresh memory. ru_maxrss is the process's
true peak (a sample can miss one). Prints tables only; its files live in a temporary directory it removes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1024**3
VARIANTS = ("trl", "trainer", "workbench")
MODEL = "builtin:smollm2-135m"
ROWS, MAX_LENGTH, BATCH, R, ALPHA, LR, SEED = 64, 256, 4, 8, 16, 1e-4, 0


def make_rows(path: Path) -> Path:
    """64 alpaca rows: a short instruction, an answer of ~2,000 characters (over 256 tokens) of the bundled text."""
    sys.path.insert(0, str(ROOT))
    from trainer.model.tiny_model import corpus_lines

    lines = [x for x in corpus_lines() if len(x) > 40]
    rng = random.Random(SEED)
    with path.open("w", encoding="utf-8") as f:
        for i in range(ROWS):
            start = rng.randrange(len(lines))
            answer = ""
            for line in lines[start:] + lines[:start]:
                if len(answer) > 2000:
                    break
                answer += line.strip() + " "
            row = {"instruction": f"Write passage {i} of the notes, in full.", "input": "", "output": answer}
            f.write(json.dumps(row) + "\n")
    return path


def workbench_config(work: Path, data: Path, steps: int) -> Path:
    import yaml

    cfg = {
        "recipe": "lora",
        "model_preset": "smollm2",
        "adapter": {"r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0},
        "data": {"source": str(data), "format": "alpaca", "max_length": MAX_LENGTH},
        "training": {
            "max_steps": steps,
            "learning_rate": LR,
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.0,
            "per_device_batch_size": BATCH,
            "gradient_accumulation_steps": 1,
            "packing": False,
            "gradient_checkpointing": False,
            "precision": "fp32",
            "seed": SEED,
            "logging_steps": 1,
            "save_steps": 10_000,
            "optimizer": "adamw_torch",
            "weight_decay": 0.0,
            "padding_free": False,
            "group_by_length": False,
            "dataloader_num_workers": 0,
        },
        "output": {"runs_dir": str(work / "runs"), "run_name": "memory-phases"},
    }
    path = work / "workbench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def reference_args(work: Path, data: Path, steps: int, name: str) -> list[str]:
    args = ["--model", MODEL, "--data", str(data), "--r", str(R), "--alpha", str(ALPHA), "--dropout", "0"]
    args += ["--steps", str(steps), "--batch", str(BATCH), "--accum", "1", "--max-length", str(MAX_LENGTH)]
    args += ["--seed", str(SEED), "--lr", str(LR), "--no-gradient-checkpointing", "--logging-steps", "1"]
    args += ["--output-dir", str(work / name)]
    return args + (["--lr-scheduler", "cosine"] if name == "trainer" else [])


class Phases:
    """RSS marks with the sampled peak since the previous one, page faults and CPU seconds."""

    def __init__(self, traced: bool):
        self.marks: list[dict] = []
        self.peak = self.rss()
        self.traced = traced
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def mark(self, name: str, **extra) -> None:
        now, usage = self.rss(), resource.getrusage(resource.RUSAGE_SELF)
        entry = {"phase": name, "rss": now, "peak": max(self.peak, now), "minflt": usage.ru_minflt}
        entry["cpu_s"] = usage.ru_utime + usage.ru_stime
        if self.traced:
            import tracemalloc

            entry["py_now"], entry["py_peak"] = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
        self.marks.append(entry | extra)
        self.peak = now


def instrument(phases: Phases, variant: str, profile_step: int) -> None:
    """Phase marks around the points every variant passes (a benchmark's patches: nothing here is trained)."""
    from transformers import PreTrainedModel, Trainer, TrainerCallback

    def after(owner, name: str, label: str, classmethod_: bool = False) -> None:
        original = getattr(owner, name).__func__ if classmethod_ else getattr(owner, name)

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            phases.mark(label)
            return out

        setattr(owner, name, classmethod(wrapped) if classmethod_ else wrapped)

    after(PreTrainedModel, "from_pretrained", "model loaded", classmethod_=True)
    if variant == "workbench":
        import trainer.data.prepare

        after(trainer.data.prepare, "prepare_data", "data tokenized")
    elif variant == "trl":
        from trl import SFTTrainer

        after(SFTTrainer, "_prepare_dataset", "data tokenized")
    else:  # reference_trainer has tokenized its rows when it loads the model
        import reference_trainer

        load_model = reference_trainer.load_model

        def marked_load(*args, **kwargs):
            phases.mark("data tokenized")
            return load_model(*args, **kwargs)

        reference_trainer.load_model = marked_load

    class Marks(TrainerCallback):
        profiler = None

        def on_train_begin(self, args, state, control, **kwargs):
            phases.mark("training begins")

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == profile_step:
                from torch.profiler import ProfilerActivity, profile

                self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True)
                self.profiler.__enter__()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            phases.mark(f"step {state.global_step + 1}: forward+backward")

        def on_optimizer_step(self, args, state, control, **kwargs):
            phases.mark(f"step {state.global_step + 1}: optimizer")

        def on_step_end(self, args, state, control, **kwargs):
            phases.mark(f"step {state.global_step}: end")
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                print_profile(self.profiler, state.global_step)
                self.profiler = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                phases.marks[-1]["loss"] = logs["loss"]

    init = Trainer.__init__

    def init_with_marks(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(Marks())

    Trainer.__init__ = init_with_marks


def print_profile(prof, step: int) -> None:
    """The ops that allocate most in the step (self CPU memory: allocated less freed inside the op)."""
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_memory_usage", row_limit=14)
    print(f"PROFILE step {step} (torch.profiler, profile_memory=True):\n{table}", file=sys.stderr)


def child(args: argparse.Namespace) -> None:
    """One variant in this process; prints its marks as one 'PHASES {json}' line."""
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start()
    phases = Phases(args.tracemalloc)
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import torch  # noqa: F401
    import trl  # noqa: F401

    from trainer.run.lean_memory import loaded_allocator, small_head_tiles

    if args.lean:  # the allocator came with the environment (run_variant)
        small_head_tiles()
    phases.mark("imports")
    instrument(phases, args.child, args.profile)
    work, data = Path(args.work), Path(args.work) / "rows.jsonl"
    if args.child == "workbench":
        from trainer.run.train import run_training

        code = run_training(str(workbench_config(work, data, args.steps)))
        if code:
            sys.exit(f"memory_phases: the workbench run failed (exit {code})")
    else:
        main = __import__("reference_trl" if args.child == "trl" else "reference_trainer").main
        main(reference_args(work, data, args.steps, args.child))
    from trl.kernels import chunked_logprob

    tile, events = chunked_logprob.TOKEN_CHUNK_SIZE, workbench_events(work)
    phases.mark("end", head_tile_tokens=tile, allocator=loaded_allocator() or "glibc", events=events)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("PHASES " + json.dumps({"variant": args.child, "marks": phases.marks, "ru_maxrss": maxrss}))


def workbench_events(work: Path) -> list[dict]:
    """The workbench run's lean_memory and precision events, to show which settings it trained under."""
    found = []
    for path in (work / "runs").glob("*/metrics.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("kind") == "event" and row.get("event") in ("lean_memory", "precision"):
                found.append(row)
    return found


def gb(n: float) -> str:
    return f"{n / GB:.3f}"


def setup_table(result: dict) -> list[str]:
    traced = "py_peak" in result["marks"][0]
    head = "| phase | RSS GB | peak since previous GB |" + (" Python peak MB |" if traced else "")
    lines = [head, "|---|---|---|" + ("---|" if traced else "")]
    for m in result["marks"]:
        if m["phase"].startswith("step "):
            continue
        row = f"| {m['phase']} | {gb(m['rss'])} | {gb(m['peak'])} |"
        lines.append(row + (f" {m['py_peak'] / 2**20:.1f} |" if traced else ""))
    return lines


def steps_of(result: dict) -> list[dict]:
    """Per step: peaks of forward+backward and optimizer, RSS at its end, faults and CPU seconds, loss."""
    steps, marks = [], result["marks"]
    for i, m in enumerate(marks):
        if m["phase"].startswith("step ") and m["phase"].endswith(": end"):
            fwd, opt, prev = marks[i - 2], marks[i - 1], marks[i - 3]
            steps.append(
                {
                    "step": int(m["phase"].split()[1].rstrip(":")),
                    "fwd_bwd_peak": fwd["peak"],
                    "opt_peak": max(opt["peak"], m["peak"]),
                    "rss_end": m["rss"],
                    "minflt": m["minflt"] - prev["minflt"],
                    "cpu_s": m["cpu_s"] - prev["cpu_s"],
                    "loss": m.get("loss"),
                }
            )
    return steps


def step_table(steps: list[dict]) -> list[str]:
    lines = ["| step | fwd+bwd peak GB | optimizer peak GB | RSS at end GB | minor faults | CPU s | loss |"]
    lines.append("|---|---|---|---|---|---|---|")
    for s in steps:
        loss = f"{s['loss']:.4f}" if s["loss"] is not None else ""
        lines.append(
            f"| {s['step']} | {gb(s['fwd_bwd_peak'])} | {gb(s['opt_peak'])} | {gb(s['rss_end'])} | "
            f"{s['minflt']:,} | {s['cpu_s']:.1f} | {loss} |"
        )
    return lines


def summary_row(result: dict) -> str:
    steps = steps_of(result)
    later = steps[1:] or steps
    marks = {m["phase"]: m for m in result["marks"]}
    end = result["marks"][-1]
    losses = [s["loss"] for s in steps if s["loss"] is not None]
    return (
        f"| {result['variant']} | {end['allocator']}, tile {end['head_tile_tokens']} | {gb(marks['model loaded']['rss'])} | {gb(marks['training begins']['rss'])} | "
        f"{gb(max(s['fwd_bwd_peak'] for s in steps))} | {gb(max(s['rss_end'] for s in steps))} | "
        f"{gb(result['ru_maxrss'])} | {sum(s['minflt'] for s in later) / len(later):,.0f} | "
        f"{sum(s['cpu_s'] for s in later) / len(later):.1f} | {losses[0]:.4f} | {losses[-1]:.4f} |"
    )


SUMMARY_HEAD = [
    "| variant | allocator, head tile | model loaded GB | training begins GB | max step peak GB | max RSS at step end GB | ru_maxrss GB | "
    "faults/step (2..) | CPU s/step (2..) | first loss | last loss |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def run_variant(variant: str, work: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--work", str(work), "--steps", str(args.steps)]
    cmd += ["--profile", str(args.profile)] + (["--lean"] if args.lean else [])
    cmd += ["--tracemalloc"] if args.tracemalloc else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(item.split("=", 1) for item in args.malloc)
    if args.lean:
        from trainer.run.lean_memory import allocator_env

        env |= allocator_env()
    log = work / f"{variant}.log"
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    for text in log.read_text().split("PROFILE ")[1:]:
        print(f"\n{variant}: PROFILE {text.split('Self CPU time total')[0]}")
    lines = [x for x in done.stdout.splitlines() if x.startswith("PHASES ")]
    if done.returncode or not lines:
        sys.exit(f"memory_phases: {variant} failed (exit {done.returncode}):\n{log.read_text()[-3000:]}")
    return json.loads(lines[-1].removeprefix("PHASES "))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="memory-phases-") as tmp:
        work = Path(tmp)
        make_rows(work / "rows.jsonl")
        for variant in args.only:
            result = run_variant(variant, work, args)
            results.append(result)
            settings = " ".join(args.malloc) or "glibc defaults"
            print(f"\n## {variant} ({settings}{', lean' if args.lean else ''}; {args.steps} steps)\n")
            print("\n".join(setup_table(result) + [""] + step_table(steps_of(result))), flush=True)
            for event in result["marks"][-1]["events"]:
                print(f"workbench event: {event}")
    print(f"\n## Summary ({' '.join(args.malloc) or 'glibc defaults'}{', lean' if args.lean else ''})\n")
    print("\n".join(SUMMARY_HEAD + [summary_row(r) for r in results]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Per-phase CPU memory of plain TRL, plain Trainer and the workbench.")
    ap.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--malloc", action="append", default=[], metavar="MALLOC_X_=N", help="glibc env for each run")
    ap.add_argument("--lean", action="store_true", help="trainer/run/lean_memory.py's allocator and tiles everywhere")
    ap.add_argument("--profile", type=int, default=0, metavar="STEP", help="torch.profiler over this step")
    ap.add_argument("--tracemalloc", action="store_true", help="Python-side allocations per phase")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


if __name__ == "__main__":
    main()
