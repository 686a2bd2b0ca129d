"""What watching a run costs: training throughput with 0, 1 and 10 pages watching it, the UI server's CPU per
live-view poll, and the latency from a metrics.jsonl line being written to its point in the page's loss chart.

    python benchmarks/ui_latency.py                                   # the real model, 0 / 1 / 10 pages
    python benchmarks/ui_latency.py --config examples/smollm2-persona.yaml --config examples/tiny-lora.yaml=200
                                                                      # a second row: the tiny model, 200 steps
    python benchmarks/ui_latency.py --browser-nice 19 --browser-idle  # the pages' Chromium only on idle cores
    python benchmarks/ui_latency.py --ticks-only                      # the per-tick CPU table alone (no browser)

Real parts only. The poll table asks each live view's stamp (app/live_views.py) and, when it changed, fires the
redraw its page's poller clicks through Gradio's own process_api in this process (input
preprocessing, the handler, output postprocessing, then the redraw its state change triggers, as the page does),
on a registered run whose metrics.jsonl grows, timing each with time.process_time: no HTTP, no browser. The pages
table runs the `lora-workbench ui` server, queues the run on its job queue (the registry the page submits to), and
watches it from Debian's Chromium through Playwright, each page in its own browser context (its own session).
Needs the built-in model cached (LORA_WORKBENCH_CACHE, HF_HUB_OFFLINE=1). Prints markdown; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, Server  # noqa: E402

# Each page notes when every step first shows in its loss chart (100 ms resolution: a finer poll costs the browser
# CPU that, on a small machine, the training run would miss).
RECORDER_JS = """() => {
  window.__seen = {};
  setInterval(() => {
    const d = document.querySelector('#loss-plot .js-plotly-plot')?.data?.[0];
    if (!d || !d.x) return;
    const now = Date.now() / 1000;
    for (const s of d.x) if (!(s in window.__seen)) window.__seen[s] = now;
  }, 100);
}"""
RUN_OVERRIDES = ["training.logging_steps=1", "training.eval_steps=1000000", "training.save_steps=1000000"]


# --- the server's CPU per tick, in this process --------------------------------------------------------------
def _growing_run(runs: Path):
    from app.context import AppContext
    from trainer.jobs.queue import JobManager
    from trainer.run_dir import RunDir

    ctx = AppContext(runs, JobManager(runs, max_running=0), example="examples/tiny-lora.yaml")
    ctx.watchers.min_interval_s = 0.0  # each tick polls: the cost of the poll is counted every time
    run = RunDir(runs / "watched")
    run.path.mkdir(parents=True)
    run.config.write_text("model: {name_or_path: builtin:tiny}\n")
    ctx.manager.registry.add("watched", "watched", "train", run.config, run.path, state="running")
    run.write_status(state="running", started_at=time.time(), max_steps=100000)
    log = open(run.log_file, "a")  # noqa: SIM115 (the run's log, open while it grows)

    def step(n: int) -> None:  # what a logged step writes: a train and a system line, the step, a log line
        run.append_metric("train", n, loss=2.0 / n, learning_rate=1e-4, grad_norm=0.5, tokens_per_second=900.0)
        run.append_metric("system", n, cpu_rss_gb=1.2)
        run.write_status(step=n)
        log.write(f"{{'loss': {2.0 / n:.4f}, 'step': {n}}}\n")
        log.flush()

    return ctx, step


class Page:
    """One browser session as the server sees it: its state, and each event fired as its page fires it."""

    loop = asyncio.new_event_loop()  # one loop for every call, as in the server: its worker threads are reused

    def __init__(self, demo):
        from gradio.state_holder import SessionState

        self.demo, self.state = demo, SessionState(demo)

    def _call(self, fn, values: dict[str, object]) -> dict:
        inputs = [None if b.stateful else values.get(b.elem_id, getattr(b, "value", None)) for b in fn.inputs]
        return self.loop.run_until_complete(self.demo.process_api(fn, inputs, state=self.state))

    def fire(self, fn, values: dict[str, object]) -> float:
        """CPU seconds of the event and of the listeners its state changes trigger (the redraws)."""
        start = time.process_time()
        result = self._call(fn, values)
        for state_id in result["changed_state_ids"]:
            for listener in self.demo.fns.values():
                if (state_id, "change") in listener.targets:
                    self._call(listener, values)
        return time.process_time() - start


def tick_costs(history: int = 500) -> list[tuple[str, float, float, float]]:
    """(live view, ms per stamp request that finds nothing new, ms per stamp + redraw after one new step, the same
    per page when ten pages watch) for each live view of the page (app/live_views.py)."""
    from app.live_views import LiveViews
    from app.server import build_app

    ctx, step = _growing_run(Path(tempfile.mkdtemp(prefix="lwb-ticks-")) / "runs")
    for n in range(1, history + 1):
        step(n)
    live = LiveViews()
    demo = build_app(ctx, live)
    values = {"watch-run": "watched", "open-run": "watched", "export-job": None}
    rows, n = [], history
    pages = [Page(demo) for _ in range(10)]

    def ask(view) -> tuple[float, str]:
        start = time.process_time()
        answer = live.answer(view.name, values.get(view.key_from) if view.key_from else None)
        return time.process_time() - start, answer["stamp"]

    def poll(view, page: Page, last: str) -> tuple[float, str]:
        """What one page's poll costs: the stamp, and the redraw its poller clicks when the stamp changed."""
        cpu, stamp = ask(view)
        return cpu + (page.fire(fn, values) if stamp != last else 0.0), stamp

    for view in live.views.values():
        fn = next(f for f in demo.fns.values() if ("click" in {t[1] for t in f.targets}) and _clicks(demo, f, view))
        for page in pages:  # the first draws (a dropdown takes a value once a redraw gave it its choices)
            for shown in ({}, {}, values, values):
                page.fire(fn, shown)
        idle = [ask(view)[0] for _ in range(30)]
        new, last = [], ask(view)[1]
        for _ in range(10):
            n += 1
            step(n)
            cpu, last = poll(view, pages[0], last)
            new.append(cpu)
        n += 1
        step(n)
        ten = sum(poll(view, page, last)[0] for page in pages) / len(pages)
        rows.append((view.name, 1000 * statistics.median(idle), 1000 * statistics.median(new), 1000 * ten))
    return rows


def _clicks(demo, fn, view) -> bool:
    """The event the view's hidden redraw button runs."""
    poke = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == view.poke)
    return (poke._id, "click") in fn.targets


# --- pages watching a real run -------------------------------------------------------------------------------
def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _chromium() -> list[psutil.Process]:
    return [c for c in psutil.Process().children(recursive=True) if "chrom" in c.name().lower()]


def _lower_browser(nice: int, idle: bool) -> None:
    """Every Chromium process at nice `nice` (and SCHED_IDLE: it runs only on a core nothing else wants). Chromium
    resets its renderers' priority itself (foreground pages to 0, its GPU process to -8), so this is re-applied."""
    for proc in _chromium():
        try:
            if idle:
                os.sched_setscheduler(proc.pid, os.SCHED_IDLE, os.sched_param(0))
            if nice and proc.nice() != nice:
                proc.nice(nice)
        except (psutil.NoSuchProcess, PermissionError, ProcessLookupError):
            pass


def _keep_browser_low(nice: int, idle: bool, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        _lower_browser(nice, idle)


def watch_run(config: str, steps: int, pages: int, warmup: int, nice: int = 0, idle: bool = False) -> dict:
    """Queue one run of `config` on a fresh server with `pages` pages watching; what it measured. nice > 0 runs
    Chromium at that lower priority: on a small machine the browser's own CPU (Gradio's frontend) then takes less
    from training, closer to a page on another machine, while the server's cost is what it is."""
    from playwright.sync_api import sync_playwright

    from trainer.config.presets import load_config
    from trainer.jobs.queue import JobManager

    tmp = Path(tempfile.mkdtemp(prefix="lwb-bench-"))
    server = Server(tmp / "runs", tmp / "server.log")
    server.start()
    server_proc = psutil.Process(server.proc.pid)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        stop_lowering = threading.Event()
        if nice or idle:
            threading.Thread(target=_keep_browser_low, args=(nice, idle, stop_lowering), daemon=True).start()
        try:
            opened = []
            for _ in range(pages):
                page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
                page.set_default_timeout(180_000)
                page.goto(server.url)
                page.wait_for_selector("#start-btn")
                page.evaluate(RECORDER_JS)
                opened.append(page)
            time.sleep(8)  # the first load's estimate and data preview settle
            cfg = load_config(config, [f"training.max_steps={steps}", *RUN_OVERRIDES])
            run = server.runs_dir / JobManager(server.runs_dir).submit(cfg)  # the server's queue starts it
            metrics = run / "metrics.jsonl"
            while not metrics.exists() or '"kind": "train"' not in metrics.read_text():
                time.sleep(0.2)
            browser_procs = _chromium()
            t0, s0, b0 = time.monotonic(), _cpu_s([server_proc]), _cpu_s(browser_procs)
            while json.loads((run / "status.json").read_text()).get("state") in ("queued", "running"):
                time.sleep(0.25)
            wall, server_s, browser_s = time.monotonic() - t0, _cpu_s([server_proc]) - s0, _cpu_s(browser_procs) - b0
            time.sleep(2)  # the last points reach the pages
            seen = [page.evaluate("() => window.__seen") for page in opened]
        finally:
            stop_lowering.set()
            browser.close()
            server.stop()
    lines = [m for m in map(json.loads, metrics.read_text().splitlines()) if m["kind"] == "train"]
    timed = lines[warmup:]
    written = {m["step"]: m["time"] for m in lines}
    latencies = sorted(t - written[int(float(s))] for ps in seen for s, t in ps.items() if int(float(s)) in written)
    return {
        "state": json.loads((run / "status.json").read_text())["state"],
        "steps": len(lines),
        "steps_per_s": (len(timed) - 1) / (timed[-1]["time"] - timed[0]["time"]),
        "tokens_per_s": statistics.mean(m["tokens_per_second"] for m in timed if m.get("tokens_per_second")),
        "server_cpu": 100 * server_s / wall,
        "browser_cpu": 100 * browser_s / wall,
        "latencies": latencies,
        "expected_points": len(lines) * pages,
    }


def _latency(values: list[float]) -> str:
    if not values:
        return "-"
    p95 = statistics.quantiles(values, n=20)[18] if len(values) > 1 else values[0]
    return f"{statistics.median(values):.2f} / {p95:.2f} / {values[-1]:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", help="CONFIG[=STEPS], repeatable (default: the real-model example)")
    ap.add_argument("--steps", type=int, default=24, help="training steps per run (a metrics line per step)")
    ap.add_argument("--warmup", type=int, default=4, help="first steps left out of the throughput")
    ap.add_argument("--pages", default="0,1,10", help="page counts, comma-separated")
    ap.add_argument("--browser-nice", type=int, default=0, help="run Chromium at this nice level (0-19)")
    ap.add_argument(
        "--browser-idle", action="store_true", help="run Chromium as SCHED_IDLE: only on cores training leaves idle"
    )
    ap.add_argument("--ticks-only", action="store_true", help="print the per-tick table only")
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"\nUI cost on {platform.node()} ({psutil.cpu_count()} CPUs, {platform.platform()}), load {load[0]:.1f}")
    print(
        "\nServer CPU per live-view poll: the stamp (app/live_views.py) and, when it changed, the redraw through "
        "Gradio's process_api, in this process (HTTP transport not included)\n"
    )
    print("| live view | stamp, nothing new | stamp + redraw, one new step | the same, per page of ten |")
    print("|---|---|---|---|")
    for name, idle, new, ten in tick_costs():
        print(f"| {name} | {idle:.2f} ms | {new:.2f} ms | {ten:.2f} ms |")
    if args.ticks_only:
        return
    results = []
    for item in args.config or ["examples/smollm2-persona.yaml"]:
        config, _, steps = item.partition("=")
        for pages in map(int, args.pages.split(",")):
            r = watch_run(config, int(steps or args.steps), pages, args.warmup, args.browser_nice, args.browser_idle)
            results.append((config, pages, r))
            print(f"  {config}, {pages} page(s): {r['steps_per_s']:.3f} steps/s ({r['state']})", file=sys.stderr)
    print(
        f"\nA metrics line each step, the first {args.warmup} left out of the rates; load after: {os.getloadavg()[0]:.1f}\n"
    )
    head = "| config | steps | pages | steps/s | vs no page | tokens/s | server CPU | Chromium CPU | line → page"
    print(head + ", median / p95 / max |\n" + "|---" * 9 + "|")
    base: dict[str, float] = {}
    for config, pages, r in results:
        if pages == 0:
            base[config] = r["steps_per_s"]
        rel = f"{100 * (r['steps_per_s'] / base[config] - 1):+.1f}%" if config in base else "-"
        points = f" ({len(r['latencies'])}/{r['expected_points']} points)" if pages else ""
        print(
            f"| {Path(config).name} | {r['steps']} | {pages} | {r['steps_per_s']:.3f} | {rel} | {r['tokens_per_s']:.0f} | "
            f"{r['server_cpu']:.1f}% | {r['browser_cpu']:.0f}% | {_latency(r['latencies'])}{points} |"
        )
    where = f"at nice {args.browser_nice}" if args.browser_nice else "at the training's priority"
    where += ", SCHED_IDLE" if args.browser_idle else ""
    print(f"\nCPU in % of one core over the run's training; Chromium runs on this machine, {where}.")


if __name__ == "__main__":
    main()
