"""Measure the UI's live path: latency from a metrics.jsonl line being written to its point appearing in
the browser's loss chart, and the UI server's CPU use while idle and while streaming a run.

Real parts only: the `lora-workbench ui` server, Debian's Chromium through Playwright, and a tiny-model run
started from the page with a metric line every step. Prints a markdown table; asserts nothing.

    python benchmarks/ui_latency.py [--steps 600] [--pages 1] [--idle-s 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, Server, set_number  # noqa: E402

RECORDER_JS = """() => {
  window.__seen = {};
  setInterval(() => {
    const d = document.querySelector('#loss-plot .js-plotly-plot')?.data?.[0];
    if (!d || !d.x) return;
    const now = Date.now() / 1000;
    for (const s of d.x) if (!(s in window.__seen)) window.__seen[s] = now;
  }, 10);
}"""


def cpu_percent(proc: psutil.Process, seconds: float) -> float:
    """Mean CPU use of a process (and its threads) over a window, in % of one core."""
    t0, c0 = time.monotonic(), sum(proc.cpu_times()[:2])
    time.sleep(seconds)
    return 100 * (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps of the streamed run (1 line/step)")
    ap.add_argument("--pages", type=int, default=1, help="browser pages watching the run at once")
    ap.add_argument("--idle-s", type=float, default=20.0, help="idle window for the CPU measurement")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="lwb-bench-"))
    server = Server(tmp / "runs", tmp / "server.log")
    server.start()
    proc = psutil.Process(server.proc.pid)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            pages = [browser.new_page(viewport={"width": 1500, "height": 1100}) for _ in range(args.pages)]
            for page in pages:
                page.set_default_timeout(120_000)
                page.goto(server.url)
                page.wait_for_selector("#start-btn")
            time.sleep(5)  # let the first load's estimate and preview settle
            idle_cpu = cpu_percent(proc, args.idle_s)

            main_page = pages[0]
            set_number(main_page, "training.max_steps", args.steps)
            set_number(main_page, "training.logging_steps", 1)
            for page in pages:
                page.evaluate(RECORDER_JS)
            main_page.click("#start-btn")
            main_page.wait_for_function("() => document.querySelector('#start-msg')?.innerText.startsWith('Run ')")
            run_id = main_page.inner_text("#start-msg").split()[1]
            run = server.runs_dir / run_id
            main_page.wait_for_function("() => Object.keys(window.__seen).length > 5")
            streaming_cpu = cpu_percent(proc, 5.0)
            while json.loads((run / "status.json").read_text()).get("state") == "running":
                time.sleep(0.5)
            time.sleep(2.5)  # the last points reach the page
            seen = [page.evaluate("() => window.__seen") for page in pages]
            browser.close()
    finally:
        server.stop()

    written = {
        m["step"]: m["time"]
        for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if m["kind"] == "train"
    }
    latencies = [
        t - written[int(float(s))] for page_seen in seen for s, t in page_seen.items() if int(float(s)) in written
    ]
    latencies.sort()
    q = statistics.quantiles(latencies, n=20)
    print(f"\nUI live path on {platform.node()} ({psutil.cpu_count()} CPUs, {platform.platform()})")
    print(f"{len(written)} metric lines over {args.steps} steps, {args.pages} page(s) watching\n")
    print("| measure | value |\n|---|---|")
    print(f"| metric line -> point in the page, median | {statistics.median(latencies):.2f} s |")
    print(f"| metric line -> point in the page, p95 | {q[18]:.2f} s |")
    print(f"| metric line -> point in the page, max | {latencies[-1]:.2f} s |")
    print(f"| points seen / lines written | {len(latencies)} / {len(written) * args.pages} |")
    print(f"| UI server CPU, idle with {args.pages} page(s) open | {idle_cpu:.1f} % of one core |")
    print(f"| UI server CPU, streaming to {args.pages} page(s) | {streaming_cpu:.1f} % of one core |")


if __name__ == "__main__":
    main()
