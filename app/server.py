"""`lora-workbench ui`: build the Gradio app around a runs dir and serve it.

The job queue runs on a thread of this process; training runs in subprocesses that outlive it, so the
server can be restarted at any time and picks its runs up again (trainer/jobs/queue.py).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from app.chat_tab import build_chat_tab
from app.context import DEFAULT_EXAMPLE, AppContext
from app.export_tab import build_export_tab
from app.live_views import POKE_CLASS, LiveViews, StampRoute
from app.log_widget import FOLLOW_NEWEST_JS
from app.login_guard import LoginGuard
from app.runs_tab import build_runs_tab
from app.train_tab import build_train_tab
from trainer.data.uploads import UPLOAD_LIMIT_MB
from trainer.jobs.queue import JobManager
from trainer.jobs.runs_lock import LOCK_NAME, RunsDirBusy, hold_runs_dir
from trainer.model.builtin_models import cache_root

AUTH_ENV = "LORA_WORKBENCH_AUTH"  # USER:PASS
CSS = (
    ".lwb-progress{margin:4px 0 8px} #estimate{min-height:3em} .lwb-log textarea{font-family:monospace} "
    f".{POKE_CLASS}{{display:none !important}}"
)


class LaunchError(ValueError):
    """The server refuses to start as asked (e.g. a public address without credentials)."""


def build_app(ctx: AppContext, live: LiveViews) -> gr.Blocks:
    """The page; each tab registers its live views (app/live_views.py) in `live` while it is laid out."""
    with gr.Blocks(title="LoRA Workbench", analytics_enabled=False) as demo:
        gr.Markdown(
            "## LoRA Workbench\nFine-tune an LLM with LoRA / QLoRA from the browser. Runs live in "
            f"`{ctx.runs_dir}`; each one is also a `lora-workbench train` config you can run headless."
        )
        with gr.Tabs():
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                build_train_tab(demo, ctx, live)
            with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                build_runs_tab(demo, ctx, live)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                build_chat_tab(demo, ctx)
            with gr.Tab("Export", id="export", elem_id="tab-export"):
                build_export_tab(demo, ctx, live)
    return demo


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise LaunchError("--auth must be USER:PASS (both non-empty)")
    return user, password


def read_auth(auth: str | None, auth_file: str | None) -> tuple[str, str] | None:
    """Credentials from --auth, else --auth-file (one USER:PASS line), else $LORA_WORKBENCH_AUTH."""
    if auth:
        return parse_auth(auth)
    if auth_file:
        try:
            return parse_auth(Path(auth_file).read_text(encoding="utf-8").strip())
        except OSError as e:
            raise LaunchError(f"--auth-file {auth_file}: {e.strerror}") from None
    return parse_auth(os.environ.get(AUTH_ENV))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def check_exposure(host: str, auth: tuple[str, str] | None, insecure_no_auth: bool) -> None:
    if not is_loopback(host) and auth is None and not insecure_no_auth:
        raise LaunchError(
            f"refusing to serve on {host} without credentials: anyone who can reach it could start jobs. "
            f"Pass --auth USER:PASS, --auth-file FILE or set {AUTH_ENV}; or --insecure-no-auth if you mean it."
        )


def check_example(example: str | None) -> None:
    """The config the page opens on must exist and be valid: a typo should stop the server, not blank the form."""
    from trainer.config.paths import resolve_local
    from trainer.config.presets import load_config
    from trainer.config.run_config import ConfigError

    path = resolve_local(example) if example else None
    if example and path is None:
        raise LaunchError(f"--example {example}: no such file (relative to the working dir or the project)")
    try:
        if path is not None:
            load_config(path)
    except ConfigError as e:
        raise LaunchError(f"--example {example}: {e}") from None


def served_files(runs_dir: Path) -> dict[str, list[str]]:
    """Gradio's file access: only the adapter zips the page offers (run files, the job registry, model caches and
    the hub token stay unreachable through /file=, even for a signed-in user who guesses a path)."""
    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    caches = [runs_dir / ".cache", cache_root(runs_dir)]
    blocked = [runs_dir / "registry.sqlite", runs_dir / ".jobs", runs_dir / LOCK_NAME, *caches, hf_home]
    blocked.append(Path.home() / ".ssh")
    return {
        "allowed_paths": [str(runs_dir / ".downloads")],
        "blocked_paths": [str(p.resolve()) for p in blocked],
    }


def app_kwargs(auth: tuple[str, str] | None, live: LiveViews) -> dict[str, Any]:
    """The stamp route of the live views (app/live_views.py) before Gradio's routes; with auth on, the login guard
    around both: only the login page before login, slower wrong passwords (app/login_guard.py)."""
    guard = [Middleware(LoginGuard)] if auth else []
    return {"middleware": [*guard, Middleware(StampRoute, live=live)]}


def page_js(live: LiveViews) -> str:
    """The page's one script: its log boxes follow the newest line, and its live views ask for their stamps."""
    return f"() => {{ ({FOLLOW_NEWEST_JS})(); ({live.script()})(); }}"


def prepare_default_model(ctx: AppContext) -> None:
    """Start building the default example's built-in model now, so the first Start does not wait for it."""
    from app.views.form import default_values
    from trainer.model.builtin_models import start_prepare

    model_id = default_values(str(ctx.runs_dir), ctx.example).get("model.name_or_path")
    log = start_prepare(str(model_id), ctx.runs_dir) if model_id else None
    if log is not None:
        print(f"preparing the built-in model {model_id} in the background (log: {log})", flush=True)


def import_model_libraries() -> None:
    """Import peft and transformers once, on this thread, before the page is served. A fresh page's load handlers
    (live estimate, data preview) run on several worker threads at once, and transformers' lazy module is not safe
    to import from two of them at a time: one got "cannot import name 'AutoModel' from 'transformers'"."""
    import peft  # noqa: F401  (pulls in torch and transformers' model classes)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def check_port(host: str, port: int) -> None:
    """LaunchError naming --port when host:port is taken (Gradio would say it only after the queue started)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socket.create_server((host, port), family=family).close()  # SO_REUSEADDR, as uvicorn: TIME_WAIT is free
    except OSError as e:
        raise LaunchError(
            f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); another server (or program) has it: "
            "stop it, or choose another port with --port"
        ) from None


def serve(
    host: str = "127.0.0.1",
    port: int = 7860,
    runs_dir: str = "runs",
    auth: tuple[str, str] | None = None,
    insecure_no_auth: bool = False,
    max_running: int = 1,
    example: str | None = DEFAULT_EXAMPLE,
    data_dirs: list[str] | None = None,
) -> None:
    check_exposure(host, auth, insecure_no_auth)
    check_example(example)
    missing = [d for d in data_dirs or [] if not Path(d).is_dir()]
    if missing:
        raise LaunchError(f"--data-dir {missing[0]}: no such directory")
    check_port(host, port)  # before the lock and the registry: a refused server leaves nothing in the runs dir
    root = Path(runs_dir).resolve()
    try:  # before the queue starts: a second server must not launch the first one's queued jobs
        runs_lock = hold_runs_dir(root, f"http://{host}:{port}")
    except RunsDirBusy as e:
        raise LaunchError(str(e)) from None
    manager = JobManager(root, max_running=max_running)
    manager.adopt_runs_on_disk()
    manager.start()
    ctx = AppContext(runs_dir=root, manager=manager, example=example, data_dirs=[Path(d) for d in data_dirs or []])
    prepare_default_model(ctx)
    live = LiveViews()
    demo = build_app(ctx, live)
    demo.queue(default_concurrency_limit=4)
    import_model_libraries()
    # uvicorn believes X-Forwarded-For from loopback by default, so anyone on this host (or through an SSH tunnel)
    # could name a new client address per login and escape the back-off; behind a proxy, set it to the proxy.
    os.environ.setdefault("FORWARDED_ALLOW_IPS", "")
    print(f"LoRA Workbench on http://{host}:{port} (runs dir {root})", flush=True)
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            auth=auth,
            share=False,
            show_error=True,
            **served_files(root),
            max_file_size=f"{UPLOAD_LIMIT_MB}mb",
            ssr_mode=False,
            css=CSS,
            js=page_js(live),
            app_kwargs=app_kwargs(auth, live),
        )
    finally:
        manager.shutdown()  # running jobs go on; the next server re-attaches them
        runs_lock.close()
