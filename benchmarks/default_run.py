"""The product's default run, timed: train examples/smollm2-persona.yaml headless, then evaluate it.

    python benchmarks/default_run.py                    # prints the numbers the README quotes
    python benchmarks/default_run.py --config examples/smollm2-persona.yaml --work-dir /tmp/default-run

Measures (prints, asserts nothing): the process's time to its first logged train line (what the page's first
loss point waits for, less the page's poll interval), the whole `lora-workbench train` wall time, the training
part (`model_loaded` event to the last train line), and `lora-workbench evaluate`'s wall time and facts scores.
The built-in model must already be cached (`lora-workbench prepare-model builtin:smollm2-135m`), so its one-time
conversion is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def first_train_line(runs: Path, started: float, found: dict[str, float], done: threading.Event) -> None:
    """Poll the run's metrics.jsonl for its first train line, as the page does."""
    while not done.is_set():
        for metrics in runs.glob("*/metrics.jsonl"):
            if '"kind": "train"' in metrics.read_text(errors="replace"):
                found["first_loss_s"] = time.time() - started
                return
        time.sleep(0.2)


def train(config: Path, runs: Path) -> tuple[Path, dict[str, float]]:
    cfg = yaml.safe_load(config.read_text())
    cfg.setdefault("output", {})["runs_dir"] = str(runs)
    runs.mkdir(parents=True, exist_ok=True)
    tmp_cfg = runs.parent / "config.yaml"
    tmp_cfg.write_text(yaml.safe_dump(cfg))
    found: dict[str, float] = {}
    done = threading.Event()
    started = time.time()
    watcher = threading.Thread(target=first_train_line, args=(runs, started, found, done), daemon=True)
    watcher.start()
    cmd = [sys.executable, "-m", "trainer", "train", str(tmp_cfg)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    found["train_wall_s"] = time.time() - started
    done.set()
    run = next(p for p in runs.iterdir() if (p / "metrics.jsonl").is_file())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    loaded = next(x["time"] for x in lines if x.get("event") == "model_loaded")
    found["training_part_s"] = max(x["time"] for x in lines if x["kind"] == "train") - loaded
    return run, found


def evaluate(run: Path) -> tuple[dict, float]:
    started = time.time()
    cmd = [sys.executable, "-m", "trainer", "evaluate", str(run)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((run / "eval_results.json").read_text()), time.time() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples/smollm2-persona.yaml"))
    ap.add_argument("--work-dir", help="where the run goes (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="default-run-"))
    run, times = train(Path(args.config), work / "runs")
    result, eval_s = evaluate(run)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    print(f"config: {args.config}; run: {run}")
    print(f"first train line after start: {times['first_loss_s']:.1f} s")
    print(f"train wall time: {times['train_wall_s']:.1f} s (training part {times['training_part_s']:.1f} s)")
    print(f"evaluate wall time: {eval_s:.1f} s on {result['rows']} held-out rows")
    for who in ("base", "adapter"):
        m = result[who]
        print(f"  {who:8} facts stated {m.get('facts', float('nan')):.1%}  answer loss {m['loss']:.3f}")


if __name__ == "__main__":
    main()
