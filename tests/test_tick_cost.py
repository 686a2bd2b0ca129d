"""What a page's live views cost the server: a stamp that finds nothing new reads nothing again and changes not, a
redraw after a new metrics line sends only the charts it feeds, ten pages watching one run share one reader and
one build of each chart, and the stamp route answers the page's poller before Gradio (app/live_views.py;
benchmarks/ui_latency.py measures what that costs)."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from app import export_tab, runs_tab, train_tab
from app.context import AppContext
from app.live_views import LiveViews, StampRoute
from app.server import build_app
from app.views.monitor import Watchers
from trainer.export.merge import ExportRequest
from trainer.jobs.queue import JobManager
from trainer.run_dir import RunDir

SKIP = gr.skip()
OUT = {name: i for i, name in enumerate(train_tab.MONITOR_OUTPUTS)}
CHARTS = ("loss", "optim", "speed", "memory")


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AppContext:
    monkeypatch.setattr(train_tab, "CHART_EVERY_S", 0.0)  # every new line redraws its charts; the pace has its test
    runs = tmp_path / "runs"
    ctx = AppContext(runs, JobManager(runs, max_running=0), example=None)  # nothing starts: the files are written here
    ctx.watchers = Watchers(min_interval_s=0)  # every tick sees the files as they are now
    return ctx


@pytest.fixture
def live(ctx: AppContext) -> LiveViews:
    """The live views as the page registers them while it is built."""
    views = LiveViews()
    build_app(ctx, views)
    return views


def stamp(live: LiveViews, view: str, key: str | None) -> str:
    return live.answer(view, key)["stamp"]


def running_run(ctx: AppContext, steps: int = 5) -> RunDir:
    run = RunDir(ctx.runs_dir / "r1")
    run.path.mkdir(parents=True)
    run.config.write_text("model: {name_or_path: tiny}\n")
    ctx.manager.registry.add("r1", "r1", "train", run.config, run.path, state="running")
    run.write_status(state="running", started_at=1.0, max_steps=100)
    for step in range(1, steps + 1):
        train_step(run, step)
    return run


def train_step(run: RunDir, step: int) -> None:
    run.append_metric("train", step, loss=1.0 / step, learning_rate=1e-4, grad_norm=0.5, tokens_per_second=900.0)
    run.write_status(step=step)


def points(plot: gr.components.plot.PlotData, trace: int = 0) -> list:
    return json.loads(plot.plot)["data"][trace]["x"]


def drawn(out: list) -> set[str]:
    return {name for name in OUT if name != "seen" and out[OUT[name]] != SKIP}


def test_a_stamp_that_finds_nothing_new_reads_nothing_and_a_redraw_sends_nothing(
    ctx: AppContext, live: LiveViews
) -> None:
    run = running_run(ctx)
    first = stamp(live, "train", "r1")
    out = train_tab.monitor_update(ctx, "r1", dict(train_tab.UNSEEN))  # a page that has drawn nothing: everything
    assert drawn(out) == {"run", "progress", "error", *CHARTS, "log"} and points(out[OUT["loss"]]) == [1, 2, 3, 4, 5]
    seen = out[OUT["seen"]]
    watch = ctx.watchers.get(run.path)
    status, tail = watch.status, watch.tail
    for _ in range(3):
        assert stamp(live, "train", "r1") == first  # the page's poller clicks nothing
        assert drawn(train_tab.monitor_update(ctx, "r1", seen)) == set()  # a redraw fired anyway rebuilds nothing
    assert watch.status is status  # status.json unchanged: not read again
    assert tail.bytes_read == run.metrics_file.stat().st_size  # every byte of metrics.jsonl read once
    run.close()


def test_a_new_line_changes_the_stamp_and_redraws_only_the_charts_it_feeds(ctx: AppContext, live: LiveViews) -> None:
    run = running_run(ctx)
    seen = train_tab.monitor_update(ctx, "r1", dict(train_tab.UNSEEN))[OUT["seen"]]
    before = stamp(live, "train", "r1")

    run.append_metric("system", 5, cpu_rss_gb=1.5)  # a memory sample alone, a new peak: the progress line says it
    assert stamp(live, "train", "r1") != before
    out = train_tab.monitor_update(ctx, "r1", seen)
    assert drawn(out) == {"memory", "progress"} and json.loads(out[OUT["memory"]].plot)["data"][0]["y"] == [1.5]
    assert "peak 1.50 GB RAM" in out[OUT["progress"]]
    seen = out[OUT["seen"]]
    run.append_metric("system", 5, cpu_rss_gb=1.2)  # below the peak: only its chart changes
    out = train_tab.monitor_update(ctx, "r1", seen)
    assert drawn(out) == {"memory"}
    seen = out[OUT["seen"]]

    train_step(run, 6)  # a train line and the step in status.json
    out = train_tab.monitor_update(ctx, "r1", seen)
    assert drawn(out) == {"progress", "loss", "optim", "speed"} and points(out[OUT["loss"]])[-1] == 6
    assert 'data-step="6"' in out[OUT["progress"]]
    seen = out[OUT["seen"]]

    run.append_metric("eval", 6, eval_loss=0.9)
    out = train_tab.monitor_update(ctx, "r1", seen)
    assert drawn(out) == {"loss"} and points(out[OUT["loss"]], trace=2) == [6]
    seen = out[OUT["seen"]]

    with open(run.log_file, "a") as f:  # the trainer prints without a new metric
        f.write("saving checkpoint-6\n")
    out = train_tab.monitor_update(ctx, "r1", seen)
    assert drawn(out) == {"log"} and out[OUT["log"]].endswith("saving checkpoint-6")
    after = stamp(live, "train", "r1")
    assert stamp(live, "train", "r1") == after
    assert drawn(train_tab.monitor_update(ctx, "r1", out[OUT["seen"]])) == set()
    run.close()


def test_a_running_runs_charts_are_redrawn_at_their_pace_and_at_once_when_it_ends(
    ctx: AppContext, live: LiveViews, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines faster than CHART_EVERY_S move the progress line at once and the charts at that pace, in every page;
    the last lines of a run that ended are drawn at once."""
    monkeypatch.setattr(train_tab, "CHART_EVERY_S", 3600.0)  # no interval passes unless the test says so
    run = running_run(ctx)
    out = train_tab.monitor_update(ctx, "r1", dict(train_tab.UNSEEN))
    assert {"loss", "optim", "speed"} <= drawn(out)  # a page's first draw: at once
    seen, before = out[OUT["seen"]], stamp(live, "train", "r1")

    train_step(run, 6)
    assert stamp(live, "train", "r1") != before
    out = train_tab.monitor_update(ctx, "r1", seen)
    assert drawn(out) == {"progress"} and 'data-step="6"' in out[OUT["progress"]]  # the charts wait their turn
    seen, held = out[OUT["seen"]], stamp(live, "train", "r1")
    assert stamp(live, "train", "r1") == held and drawn(train_tab.monitor_update(ctx, "r1", seen)) == set()

    monkeypatch.setattr(train_tab, "CHART_EVERY_S", 0.0)  # their interval has passed: the next poll finds them due
    assert stamp(live, "train", "r1") != held
    out = train_tab.monitor_update(ctx, "r1", seen)
    assert drawn(out) == {"loss", "optim", "speed"} and points(out[OUT["loss"]])[-1] == 6
    seen = out[OUT["seen"]]

    monkeypatch.setattr(train_tab, "CHART_EVERY_S", 3600.0)
    train_step(run, 7)
    run.write_status(state="completed")  # the run ended: its last lines are drawn without waiting
    out = train_tab.monitor_update(ctx, "r1", seen)
    assert {"progress", "loss", "optim", "speed"} <= drawn(out) and points(out[OUT["loss"]])[-1] == 7
    run.close()


def test_ten_pages_share_one_reader_and_one_build_of_each_chart(ctx: AppContext, live: LiveViews) -> None:
    run = running_run(ctx)
    pages = [train_tab.monitor_update(ctx, None, dict(train_tab.UNSEEN))[OUT["seen"]] for _ in range(10)]
    assert {page["run"] for page in pages} == {"r1"}  # each page found the running job by itself
    before = stamp(live, "train", "r1")
    train_step(run, 6)
    with open(run.log_file, "a") as f:
        f.write("step 6\n")
    assert stamp(live, "train", "r1") != before  # every page's poller clicks its redraw
    outs = [train_tab.monitor_update(ctx, "r1", seen) for seen in pages]
    assert len(outs) == 10 and all(points(out[OUT["loss"]])[-1] == 6 for out in outs)
    for name in ("loss", "optim", "speed", "log"):  # built once, the same object sent to every page
        assert len({id(out[OUT[name]]) for out in outs}) == 1, name
    assert all(out[OUT["memory"]] == SKIP for out in outs)  # no new memory sample: not rebuilt
    watch = ctx.watchers.get(run.path)
    assert watch.tail.bytes_read == run.metrics_file.stat().st_size  # one reader, each byte read once
    run.close()


def test_a_redraw_asked_for_before_a_start_never_takes_the_page_back_to_the_old_run(ctx: AppContext) -> None:
    """The poller sees Start's job the moment it is queued and redraws for the run the page watched then (r1); that
    reply can come after Start's, which moved the page to the new run: it must not write r1 back into the dropdown
    (the page would watch r1 from then on, its stamp never changing: a frozen monitor)."""
    old = running_run(ctx)
    seen = train_tab.monitor_update(ctx, "r1", dict(train_tab.UNSEEN))[OUT["seen"]]
    new = RunDir(ctx.runs_dir / "r2")
    new.path.mkdir()
    new.config.write_text("model: {name_or_path: tiny}\n")
    ctx.manager.registry.add("r2", "r2", "train", new.config, new.path, state="queued")
    new.write_status(state="queued")

    started = train_tab.monitor_update(ctx, "r2", dict(train_tab.UNSEEN), pick=True)  # Start's reply
    assert started[OUT["run"]].constructor_args == {"choices": ["r2", "r1"], "value": "r2"}
    stale = train_tab.monitor_update(ctx, "r1", seen)  # the redraw asked for with r1, answered after Start
    assert stale[OUT["run"]].constructor_args == {"choices": ["r2", "r1"]}  # the choices, never the value
    # the page's dropdown still says r2: its poller asks for r2, and that redraw draws r2 over the stale one
    out = train_tab.monitor_update(ctx, "r2", stale[OUT["seen"]])
    assert out[OUT["seen"]]["run"] == "r2" and {"progress", "log"} <= drawn(out)
    assert out[OUT["run"]].constructor_args == {"choices": ["r2", "r1"]}
    assert 'data-run="r2"' in out[OUT["progress"]]
    # a page watching nothing, or a run deleted meanwhile, is given the run to watch
    for page_run in (None, "deleted"):
        out = train_tab.monitor_update(ctx, page_run, dict(train_tab.UNSEEN))
        assert out[OUT["run"]].constructor_args["value"] == out[OUT["seen"]]["run"] in ("r1", "r2")
    old.close()


def test_the_runs_tab_rebuilds_its_table_and_evaluation_only_on_change(ctx: AppContext, live: LiveViews) -> None:
    run = running_run(ctx)
    table_stamp, eval_stamp = stamp(live, "runs", None), stamp(live, "evaluation", "r1")
    rows, *_, table_seen = runs_tab.table_update(ctx, None, "r1")
    assert rows[0][0] == "r1"
    *view, eval_seen = runs_tab.eval_update(ctx, "r1", None)
    assert view[1] == [] and view[2] is None  # no evaluation yet
    assert (stamp(live, "runs", None), stamp(live, "evaluation", "r1")) == (table_stamp, eval_stamp)
    assert runs_tab.table_update(ctx, table_seen, "r1")[:3] == (SKIP,) * 3
    assert runs_tab.eval_update(ctx, "r1", eval_seen)[:4] == [SKIP] * 4

    result = {"rows": 2, "data": "held.jsonl", "base": {"exact_match": 0.0, "loss": 2.0, "perplexity": 7.4}}
    result["adapter"] = {"exact_match": 0.5, "loss": 1.0, "perplexity": 2.7}
    (run.path / "eval_results.json").write_text(json.dumps(result))
    assert stamp(live, "runs", None) == table_stamp  # the table did not change
    assert stamp(live, "evaluation", "r1") != eval_stamp
    eval_stamp = stamp(live, "evaluation", "r1")
    *view, eval_seen = runs_tab.eval_update(ctx, "r1", eval_seen)
    assert [r[0] for r in view[1]] == ["base", "adapter"] and view[2] is not None
    train_step(run, 6)
    assert stamp(live, "evaluation", "r1") == eval_stamp  # the evaluation did not change
    assert stamp(live, "runs", None) != table_stamp
    rows, picks, opened, table_seen = runs_tab.table_update(ctx, table_seen, "r1")
    assert rows[0][0] == "r1" and picks == opened == SKIP  # the same runs: their choices are not sent again

    # a new run: the choices change; the run the page had opened is left as it is (a newer pick may be on its
    # way), one that is gone is cleared
    ctx.manager.registry.add("r2", "r2", "train", run.config, ctx.runs_dir / "r2", state="queued")
    _, picks, opened, _ = runs_tab.table_update(ctx, table_seen, "r1")
    assert picks.constructor_args == opened.constructor_args == {"choices": ["r2", "r1"]}
    assert runs_tab.table_update(ctx, table_seen, "gone")[2].constructor_args == {
        "choices": ["r2", "r1"],
        "value": None,
    }
    run.close()


def test_the_export_tab_redraws_a_job_only_when_its_files_change(ctx: AppContext, live: LiveViews) -> None:
    nothing = stamp(live, "export", None)
    job_id = ctx.manager.submit_side_job(ExportRequest(Path("x"), ctx.runs_dir / "exports" / "x"), name="r1")
    assert stamp(live, "export", None) == nothing  # no job picked: nothing to draw, ever
    shown = stamp(live, "export", job_id)
    *view, seen = export_tab.export_update(ctx, job_id, None)
    assert f"`{job_id}`: queued" in view[0]
    assert stamp(live, "export", job_id) == shown
    assert export_tab.export_update(ctx, job_id, seen)[:3] == [SKIP] * 3
    job_dir = ctx.runs_dir / ".jobs" / job_id
    with open(job_dir / "job.log", "a") as f:
        f.write("merging\n")
    assert stamp(live, "export", job_id) != shown
    assert export_tab.export_update(ctx, job_id, seen)[1] == "merging"


def test_the_stamp_route_answers_the_poller_before_the_app(ctx: AppContext, live: LiveViews) -> None:
    running_run(ctx)
    inner = Starlette(routes=[Route("/{path:path}", lambda request: PlainTextResponse("the app"))])
    client = TestClient(Starlette(routes=inner.routes, middleware=[Middleware(StampRoute, live=live)]))
    answer = client.get("/lwb-stamp/train", params={"key": "r1"})
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    assert answer.json() == {"stamp": stamp(live, "train", "r1"), "next": train_tab.FAST_S}  # a job runs: fast
    assert client.get("/lwb-stamp/train").json()["stamp"] == stamp(live, "train", None)  # no key: the page follows
    assert client.get("/lwb-stamp/nope").status_code == 404
    assert client.get("/config").text == "the app"


def test_the_poller_names_parts_the_page_has(ctx: AppContext) -> None:
    """Each view's tab, redraw button and key dropdown exist in the page, and each redraw is one of its events."""
    views = LiveViews()
    demo = build_app(ctx, views)
    ids = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    clicks = {t[0] for f in demo.fns.values() for t in f.targets if t[1] == "click"}
    script = views.script()
    for view in views.views.values():
        assert view.panel in ids and view.poke in ids and (view.key_from is None or view.key_from in ids), view
        assert ids[view.poke]._id in clicks and f'"{view.poke}"' in script, view.name
