"""bf16 mixed precision on a CPU against fp32: speed of one LoRA step by model width, and what it does to learning.

    python benchmarks/cpu_bf16.py                       # both parts (a quiet machine: ~15 minutes on 2 cores)
    python benchmarks/cpu_bf16.py --part steps          # step times only (tiny model and SmolLM2-135M)
    python benchmarks/cpu_bf16.py --part runs --seeds 0 1 2

Part `steps` (what `precision: auto` decides by, trainer/model/device.py CPU_BF16_MIN_HIDDEN): one LoRA step (r 16, all
linear layers, AdamW) of 8 rows x 128 tokens, in fp32 and with the base in bf16 under torch.autocast("cpu",
bfloat16), adapter and optimizer in fp32, as the workbench trains; median of the steps after the first two.

Part `runs` (what it does to the product's default run, examples/smollm2-persona.yaml, end to end through
`lora-workbench train`): per seed, `training.precision=fp32` against `auto` (bf16 where the CPU has native bf16);
the training part's time (model_loaded event to the last train line), real tokens/s, the held-out eval loss at the
last step, and `lora-workbench evaluate`'s persona facts. Prints markdown tables; asserts nothing. The built-in
model must be cached (`lora-workbench prepare-model builtin:smollm2-135m`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def step_times(model_dir: str, bf16: bool, steps: int) -> list[float]:
    """Seconds per LoRA step of 8 x 128 random tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (8, 128))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return times


def part_steps(cache: Path) -> None:
    from trainer.model.tiny_model import ensure_tiny_model

    models = {"tiny test model": str(ensure_tiny_model(cache)), "SmolLM2-135M": str(cache / "smollm2-135m-instruct")}
    print("| model | hidden size | fp32 s/step | bf16 s/step | bf16 speed-up |\n|---|---|---|---|---|")
    for name, path in models.items():
        hidden = json.loads((Path(path) / "config.json").read_text())["hidden_size"]
        steps = 12 if name.startswith("tiny") else 6
        fp32, bf16 = (statistics.median(step_times(path, b, steps)[2:]) for b in (False, True))
        print(f"| {name} | {hidden} | {fp32:.3f} | {bf16:.3f} | {fp32 / bf16:.2f}x |", flush=True)


def one_run(config: Path, work: Path, seed: int, precision: str) -> dict[str, float]:
    runs = work / f"{precision}-{seed}"
    overrides = [f"training.seed={seed}", f"training.precision={precision}", f"output.runs_dir={runs}"]
    cmd = [sys.executable, "-m", "trainer", "train", str(config), *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = next(p for p in runs.iterdir() if (p / "metrics.jsonl").is_file())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    loaded = next(x["time"] for x in lines if x.get("event") == "model_loaded")
    train = [x for x in lines if x["kind"] == "train"]
    chosen = next((x["precision"] for x in lines if x.get("event") == "precision"), precision)
    subprocess.run([sys.executable, "-m", "trainer", "evaluate", str(run)], cwd=ROOT, check=True, capture_output=True)
    facts = json.loads((run / "eval_results.json").read_text())["adapter"]["facts"]
    return {
        "precision": chosen,
        "train_s": train[-1]["time"] - loaded,
        "tokens_per_s": statistics.median(x["tokens_per_second"] for x in train[2:]),
        "eval_loss": [x for x in lines if x["kind"] == "eval"][-1]["eval_loss"],
        "facts": facts,
    }


def part_runs(config: Path, seeds: list[int]) -> None:
    work = Path(tempfile.mkdtemp(prefix="cpu-bf16-"))
    print(f"\nthe default run ({config.relative_to(ROOT)}), fp32 against auto, per seed:\n")
    print(
        "| seed | precision | training part | real tokens/s | final eval loss | adapter facts |\n|---|---|---|---|---|---|"
    )
    for seed in seeds:
        for precision in ("fp32", "auto"):
            r = one_run(config, work, seed, precision)
            print(
                f"| {seed} | {precision} -> {r['precision']} | {r['train_s']:.1f} s | {r['tokens_per_s']:.1f} | "
                f"{r['eval_loss']:.4f} | {r['facts']:.1%} |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["steps", "runs", "both"], default="both")
    ap.add_argument("--config", default=str(ROOT / "examples/smollm2-persona.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    import torch

    from trainer.model.builtin_models import cache_root
    from trainer.model.device import cpu_bf16_flags

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, native bf16: "
        f"{cpu_bf16_flags() or 'none'}; torch {torch.__version__}, load {os.getloadavg()}\n"
    )
    if args.part in ("steps", "both"):
        part_steps(cache_root("runs"))
    if args.part in ("runs", "both"):
        part_runs(Path(args.config).resolve(), args.seeds)


if __name__ == "__main__":
    main()
