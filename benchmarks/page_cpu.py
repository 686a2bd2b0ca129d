"""What one open page costs its browser: Chromium's CPU, per process type, while the page sits idle on the Train
tab and while it watches a fast tiny run (a metrics line every `--logging-steps` steps, several a second).

    python benchmarks/page_cpu.py                  # 15 s idle, then 20 s of a running tiny run
    python benchmarks/page_cpu.py --seconds 60
    python benchmarks/page_cpu.py --example examples/smollm2-persona.yaml --logging-steps 1   # the default run

The real `lora-workbench ui` server and Debian's Chromium through Playwright (tests/browser_support.py). CPU is
read from /proc for every Chromium process, in cores (1.0 = one core busy). Prints markdown; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, Server, kill_leftover_trainers, set_number  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def chromium_cpu() -> dict[str, float]:
    """CPU seconds so far of every running Chromium process, summed per process type (renderer, gpu, ...)."""
    total: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()  # children rewrite theirs
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if not cmd or b"chrom" not in Path(cmd[0].decode(errors="replace")).name.encode():
            continue
        kind = next((a.split(b"=", 1)[1].decode() for a in cmd if a.startswith(b"--type=")), "browser")
        total[kind] = total.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return total


def cores_over(seconds: float) -> dict[str, float]:
    before, start = chromium_cpu(), time.time()
    time.sleep(seconds)
    after, took = chromium_cpu(), time.time() - start
    return {kind: round((cpu - before.get(kind, 0.0)) / took, 3) for kind, cpu in sorted(after.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="how long the running run is watched")
    ap.add_argument("--logging-steps", type=int, default=2)
    ap.add_argument("--example", default="examples/tiny-lora.yaml", help="the config the page opens on and starts")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp) / "runs", Path(tmp) / "server.log", example=args.example)
        server.start()
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
                page.goto(server.url)
                page.wait_for_selector("#start-btn")
                time.sleep(5)
                idle = cores_over(15.0)
                set_number(page, "training.max_steps", 100000)
                set_number(page, "training.logging_steps", args.logging_steps)
                page.click("#start-btn")
                page.wait_for_function(
                    "() => document.querySelector('.lwb-progress')?.dataset.state === 'running'", timeout=300_000
                )
                time.sleep(5)
                running = cores_over(args.seconds)
                page.click("#stop-btn")
                time.sleep(3)
                browser.close()
        finally:
            server.stop()
            kill_leftover_trainers(server.runs_dir)
    print(f"Chromium CPU in cores, one page on the Train tab ({platform.node()}, {os.cpu_count()} cores)\n")
    print("| page | " + " | ".join(sorted(running)) + " |")
    print("|---|" + "---|" * len(running))
    watching = f"{Path(args.example).stem}, a line every {args.logging_steps} steps"
    for name, row in (("idle, no run", idle), (watching, running)):
        print(f"| {name} | " + " | ".join(f"{row.get(k, 0.0):.2f}" for k in sorted(running)) + " |")


if __name__ == "__main__":
    main()
