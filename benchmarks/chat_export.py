"""Measure the chat and export paths: base load, time to first token and tokens/s (base vs adapter), adapter
switching on one base, and merge-and-export time, size and fidelity for LoRA, DoRA and QLoRA adapters.

Real parts only: adapters trained with `run_training` from the example configs (shortened), `ChatEngine` as the
chat tab uses it, `run_export` as `lora-workbench export` runs it. Prints markdown tables; asserts nothing.

    HF_HUB_OFFLINE=1 python benchmarks/chat_export.py [--prompts 20] [--threads 2] [--write benchmarks/RESULTS.md]
    python benchmarks/chat_export.py --adapter lora=runs/<id>/adapter --adapter qlora=runs/<id>/adapter
    python benchmarks/chat_export.py --lora-config examples/qwen2.5-0.5b-instruct-qlora.yaml ...  # on a GPU

The DoRA adapter is the LoRA config with adapter.method: dora. Training and export logs go to <tmp>/bench.log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("lora", "dora", "qlora")


def med_p95(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    return statistics.median(values), statistics.quantiles(values, n=20)[18]


def print_and_append(text: str, path: Path | str | None) -> None:
    """Print a markdown section and, when a file is named, append it there."""
    print(text)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n" + text)


def machine_lines(threads: int) -> list[str]:
    import bitsandbytes
    import peft
    import torch
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [
        f"{datetime.now().isoformat(timespec='minutes')} on {platform.node()}: {cpu}, {os.cpu_count()} cores "
        f"({threads} torch threads), GPU: {gpu}",
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}, Python {platform.python_version()}",
    ]


# --- adapters ----------------------------------------------------------------------------------------------------
def train_adapter(method: str, config: Path, runs: Path, max_steps: int) -> tuple[Path, float]:
    """Train one adapter from an example config with max_steps shortened; returns (adapter dir, seconds)."""
    from trainer.config.presets import deep_merge
    from trainer.run.train import run_training

    override: dict[str, Any] = {
        "training": {"max_steps": max_steps, "save_steps": max_steps, "eval_steps": max_steps},
        "output": {"runs_dir": str(runs), "run_name": f"bench-{method}"},
    }
    if method == "dora":
        override["adapter"] = {"method": "dora"}
    path = runs.parent / f"{method}.yaml"
    path.write_text(yaml.safe_dump(deep_merge(yaml.safe_load(config.read_text()), override)))
    before = set(runs.iterdir()) if runs.is_dir() else set()
    t0 = time.perf_counter()
    if run_training(str(path)) != 0:
        raise SystemExit(f"training {method} from {path} failed; see {runs.parent / 'bench.log'}")
    seconds = time.perf_counter() - t0
    (run,) = [p for p in set(runs.iterdir()) - before if p.is_dir() and not p.name.startswith(".")]
    return run / "adapter", seconds


# --- chat --------------------------------------------------------------------------------------------------------
def user_prompts(n: int) -> list[list[dict[str, str]]]:
    """First user turn of each bundled instruction conversation, cycled to n prompts."""
    rows = [json.loads(ln) for ln in (ROOT / "data/instructions_messages.jsonl").read_text().splitlines() if ln]
    users = [next(m for m in r["messages"] if m["role"] == "user")["content"] for r in rows]
    return [[{"role": "user", "content": users[i % len(users)]}] for i in range(n)]


def chat_rows(engine: Any, target: str, prompts: list, max_tokens: tuple[int, ...]) -> list[str]:
    """Base and adapter answer each prompt in turn (the compare path); one row per target x setting."""
    from trainer.chat.engine import BASE, GenerationSettings

    for _ in engine.compare([(BASE, prompts[0]), (target, prompts[0])], GenerationSettings(max_new_tokens=16)):
        pass  # warm-up
    rows = []
    for n in max_tokens:
        for temp in (0.0, 0.7):
            settings = GenerationSettings(temperature=temp, max_new_tokens=n)
            stats: dict[str, list] = {BASE: [], target: []}
            for messages in prompts:
                for _ in engine.compare([(BASE, messages), (target, messages)], settings):
                    pass
                for s in engine.last_stats:
                    stats[s.target].append(s)
            for name, replies in stats.items():
                ttft = med_p95([s.first_token_s for s in replies if s.first_token_s is not None])
                tps = med_p95([s.tokens_per_second for s in replies])
                toks = statistics.mean(s.new_tokens for s in replies)
                mode = "greedy" if temp == 0 else f"sampled t={temp}"
                rows.append(
                    f"| {name} | {mode} | {n} | {ttft[0] * 1000:.1f} | {ttft[1] * 1000:.1f} | {tps[0]:.1f} "
                    f"| {tps[1]:.1f} | {toks:.1f} | {len(replies)} |"
                )
    return rows


def switch_rows(engine: Any, reps: int) -> list[str]:
    """set_adapter / disable_adapter timed on the engine's PeftModel, and the same seen from 1-token replies."""
    from trainer.chat.engine import BASE, GenerationSettings

    model, names = engine.loaded.model, list(engine.loaded.peft_names.values())
    direct = []
    for i in range(reps * 10):
        t0 = time.perf_counter()
        model.set_adapter(names[i % len(names)])  # always a different adapter than the call before
        direct.append(time.perf_counter() - t0)
    disable = []
    for _ in range(reps * 10):
        t0 = time.perf_counter()
        with model.disable_adapter():
            pass
        disable.append(time.perf_counter() - t0)
    one = GenerationSettings(temperature=0, max_new_tokens=1)
    prompt = user_prompts(1)[0]
    a, b = engine.adapter_names[:2]

    def reply(target: str) -> float:
        list(engine.stream(prompt, one, target))
        return engine.last_stats[0].seconds

    switched, same = [], []
    for _ in range(reps):
        reply(b)
        switched.append(reply(a))  # a after b
        same.append(reply(a))  # a after a
    rows = [
        ("`model.set_adapter`, to a different adapter", direct),
        ("`model.disable_adapter()` enter + exit (to the base)", disable),
        (f"1-token reply to {a} after {b}", switched),
        (f"1-token reply to {a} after {a}", same),
    ]
    out = [f"| {what} | {med_p95(v)[0] * 1000:.3f} | {med_p95(v)[1] * 1000:.3f} | {len(v)} |" for what, v in rows]
    diff = statistics.median(switched) - statistics.median(same)
    out.append(f"| switch overhead seen by a reply (median difference of the two above) | {diff * 1000:.3f} | | |")
    for _ in engine.compare([(BASE, prompt)], one):
        pass
    return out


# --- export ------------------------------------------------------------------------------------------------------
def export_row(label: str, adapter: Path, out: Path, dtype: str, merge_into: str) -> str:
    from trainer.export.job import run_export
    from trainer.export.merge import ExportRequest

    t0 = time.perf_counter()
    report = run_export(ExportRequest(adapter=adapter, out=out, dtype=dtype, merge_into=merge_into, overwrite=True))
    wall = time.perf_counter() - t0
    shutil.rmtree(out)  # a merged 8B model is 16 GB: keep only the numbers
    s, f = report["seconds"], report["fidelity"]
    phases = " / ".join(f"{s.get(p, 0):.2f}" for p in ("load", "merge", "save", "fidelity"))
    return (
        f"| {label} | {merge_into} | {dtype} | {wall:.2f} | {phases} | {report['size_bytes'] / 2**20:.2f} "
        f"| {f['max_abs_logit_diff']:.3g} | {f['tolerance']:.3g} | {f['greedy_agreement']:.1%} "
        f"| {'yes' if f['passed'] else 'NO'} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora-config", type=Path, default=ROOT / "examples/tiny-lora.yaml", help="LoRA + DoRA runs")
    ap.add_argument("--qlora-config", type=Path, default=ROOT / "examples/tiny-qlora.yaml", help="the 4-bit run")
    ap.add_argument("--max-steps", type=int, default=60, help="training steps of each benchmark adapter")
    ap.add_argument("--adapter", action="append", default=[], metavar="METHOD=DIR", help="reuse (lora|dora|qlora)")
    ap.add_argument("--prompts", type=int, default=20, help="chat prompts per setting")
    ap.add_argument("--max-new-tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--switch-reps", type=int, default=20, help="1-token reply pairs (x10 for the direct calls)")
    ap.add_argument("--export-dtypes", nargs="+", default=["bf16", "fp32"], help="of the LoRA export")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    ap.add_argument("--write", type=Path, help="append the tables to this markdown file")
    args = ap.parse_args()
    given = {m: Path(d).resolve() for m, d in (a.split("=", 1) for a in args.adapter)}
    if set(given) - set(METHODS):
        ap.error(f"--adapter: methods are {', '.join(METHODS)}; got {', '.join(sorted(set(given) - set(METHODS)))}")
    lora, qlora = args.lora_config.resolve(), args.qlora_config.resolve()
    configs = {"lora": lora, "dora": lora, "qlora": qlora}
    os.chdir(ROOT)  # the example configs name data/ relative to the repo root
    import torch

    torch.set_num_threads(args.threads)
    from trainer.chat.adapter_source import read_adapter
    from trainer.chat.engine import ChatEngine

    tmp = Path(tempfile.mkdtemp(prefix="lwb-chat-export-"))
    log = tmp / "bench.log"
    adapters, setup = dict(given), []
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        for m in METHODS:
            if m not in adapters:
                adapters[m], secs = train_adapter(m, configs[m], tmp / "runs", args.max_steps)
                setup.append(f"| train {m} ({args.max_steps} steps, {configs[m].name}) | {secs:.1f} s |")

        engine = ChatEngine()
        base = read_adapter(adapters["lora"]).base
        t0 = time.perf_counter()
        engine.load({}, base=base, quantization="none")
        seconds = time.perf_counter() - t0
        warm = "imports warm from training" if len(given) < len(METHODS) else "first load, includes imports"
        setup.append(f"| load base {Path(base).name} alone (`engine.load`, 16/32-bit; {warm}) | {seconds:.2f} s |")
        for m in METHODS:
            if read_adapter(adapters[m]).base == base:  # a 4-bit run's adapter also fits its unquantized base
                setup.append(f"| `engine.add_adapter({m!r})` | {engine.add_adapter(m, str(adapters[m])):.3f} s |")
        setup.append(f"| memory of base + adapters | {engine.memory_bytes() / 2**20:.1f} MiB |")
        chat = chat_rows(engine, "lora", user_prompts(args.prompts), tuple(args.max_new_tokens))
        switch = switch_rows(engine, args.switch_reps)
        setup.append(f"| `engine.base_loads` after all of the above | {engine.base_loads} |")
        loaded = ", ".join(engine.adapter_names)
        engine.unload()

        exports = [
            export_row("lora", adapters["lora"], tmp / f"export-lora-{d}", d, "16bit") for d in args.export_dtypes
        ]
        exports.append(export_row("dora", adapters["dora"], tmp / "export-dora", "bf16", "16bit"))
        for merge in ("16bit", "dequantized"):
            exports.append(
                export_row("qlora (4-bit)", adapters["qlora"], tmp / f"export-qlora-{merge}", "bf16", merge)
            )

    text = "\n".join(
        [
            "## Chat and export (`benchmarks/chat_export.py`)",
            "",
            *machine_lines(args.threads),
            "",
            "| setup | value |",
            "|---|---|",
            *setup,
            "",
            f"Chat, `engine.compare([(base, m), (lora, m)])` per prompt, {args.prompts} prompts from "
            "data/instructions_messages.jsonl, seed 0. TTFT = `first_token_s`, the first non-empty text chunk "
            "(the streamer holds text back to a word boundary); tok/s = `new_tokens / seconds` of the whole reply, so "
            "a reply that ends early at EOS (see mean new tokens) is dominated by the prompt's forward pass.",
            "",
            "| target | decoding | max new | TTFT median ms | TTFT p95 ms | tok/s median | tok/s p95 "
            "| mean new tokens | replies |",
            "|---|---|---|---|---|---|---|---|---|",
            *chat,
            "",
            f"Adapter switch on one base ({loaded} loaded).",
            "",
            "| measure | median ms | p95 ms | n |",
            "|---|---|---|---|",
            *switch,
            "",
            "Export (`run_export`): phases load / merge (includes the reference logits) / save / fidelity, in seconds; "
            "size of the saved safetensors.",
            "",
            "| adapter | merge into | dtype | wall s | phases s | size MiB | max abs logit diff | tolerance "
            "| greedy agreement | passed |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *exports,
            "",
        ]
    )
    print(f"(training and export logs: {log})\n")
    print_and_append(text, args.write)


if __name__ == "__main__":
    main()
