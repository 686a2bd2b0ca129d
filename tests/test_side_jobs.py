"""Export and evaluate as the UI queues and shows them: requests checked before queueing, views of the results."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from app.context import AppContext
from app.export_tab import export_view, submit_export
from app.runs_tab import evaluation_view, submit_evaluate
from app.views.side_jobs import eval_rows, export_result_md, progress_md
from tests.conftest import ROOT
from trainer.jobs.queue import JobManager
from trainer.jobs.registry import Job
from trainer.run_dir import write_json_atomic


@pytest.fixture
def ctx(tmp_path: Path) -> AppContext:
    return AppContext(tmp_path / "runs", JobManager(tmp_path / "runs", max_running=0))  # nothing starts


def adopt(ctx: AppContext, run_dir: Path) -> str:
    """Register a run trained elsewhere, as the server does for runs it finds on disk."""
    ctx.manager.registry.add(run_dir.name, None, "train", run_dir / "config.yaml", run_dir, state="completed")
    return run_dir.name


def job_in(path: Path, kind: str, state: str, error: str | None = None) -> Job:
    return Job(1, path.name, None, kind, state, None, None, 0.0, None, None, "", str(path), None, error, None)


def test_export_is_checked_then_queued_as_a_typed_request(ctx: AppContext, trained_adapter):
    run_dir = trained_adapter("lora")
    msg, job_id = submit_export(ctx, str(run_dir / "adapter"), "", "", "", "fp16", "1GB", "16bit", False, "")
    assert job_id is not None and msg.startswith("Queued export"), msg
    job = ctx.manager.registry.get(job_id)
    request = json.loads((Path(job.run_dir) / "job.json").read_text())
    out = ctx.runs_dir / "exports" / f"{run_dir.name}-merged"
    assert request["kind"] == "export" and request["name"] == run_dir.name
    assert request["adapter"] == str(run_dir / "adapter") and request["out"] == str(out)
    assert (request["dtype"], request["max_shard_size"], request["merge_into"]) == ("fp16", "1GB", "16bit")
    assert request["out_root"] == str(ctx.runs_dir / "exports") and "status_dir" not in request
    assert ctx.manager._argv(job)[-3:] == ["export", "--job-dir", job.run_dir]  # no argv rebuilt from the request
    assert "queued" in export_view(ctx, job_id)[0]


def test_bad_export_requests_are_not_queued(ctx: AppContext, trained_adapter, tmp_path: Path):
    adapter = str(trained_adapter("lora") / "adapter")
    msg, job_id = submit_export(ctx, adapter, "", "", "/tmp/elsewhere", "bf16", "2GB", "16bit", False, "")
    assert job_id is None and "outside the directories" in msg
    msg, job_id = submit_export(ctx, adapter, "", "", "", "bf16", "lots", "dequantized", False, "")
    assert job_id is None and "--max-shard-size" in msg and "nothing to dequantize" in msg
    taken = ctx.runs_dir / "exports" / "taken"
    taken.mkdir(parents=True)
    (taken / "mine.txt").write_text("keep me")
    msg, job_id = submit_export(ctx, adapter, "", "", str(taken), "bf16", "2GB", "16bit", False, "")
    assert job_id is None and "not empty" in msg and (taken / "mine.txt").read_text() == "keep me"
    assert submit_export(ctx, None, "", "", "", "bf16", "2GB", "16bit", False, "")[0].startswith("Pick a run")
    assert ctx.manager.registry.all() == []


def test_evaluate_is_queued_for_a_finished_run_with_held_out_data(ctx: AppContext, make_config):
    from trainer.run.train import run_training

    cfg = make_config({"data": {"eval_source": str(ROOT / "data/sentiment_heldout.jsonl")}})
    assert run_training(str(cfg)) == 0
    run_dir = next(p for p in (ctx.runs_dir).iterdir() if (p / "adapter").is_dir())
    run_id = adopt(ctx, run_dir)
    assert submit_evaluate(ctx, run_id).startswith("Queued evaluation")
    (job,) = ctx.jobs_newest_first("evaluate")
    request = json.loads(Path(job.config_path).read_text())
    assert job.name == run_id and request["kind"] == "evaluate" and request["run_dir"] == str(run_dir)
    assert "queued" in evaluation_view(ctx, run_id)[0]
    result = {"rows": 8, "data": "heldout", "base": _score(0.0), "adapter": _score(0.875)}
    (run_dir / "eval_results.json").write_text(json.dumps(result))
    _, rows, figure, answers = evaluation_view(ctx, run_id)
    assert rows == [["base", "0.0%", 3.1, 22.2], ["adapter", "87.5%", 3.1, 22.2]]
    assert [t.name for t in figure.data] == ["exact match (%)", "loss"] and answers == []
    facts = {"base": _score(0.0) | {"facts": 0.0}, "adapter": _score(0.5) | {"facts": 1.0}}
    row = {"question": "Who are you?", "reference": "I'm Quill.", "facts": [["Quill"]], "base": "I'm SmolLM."}
    row |= {"adapter": "I'm Quill.", "base_hit": False, "adapter_hit": True}
    (run_dir / "eval_results.json").write_text(json.dumps(result | facts | {"examples": [row]}))
    _, rows, figure, answers = evaluation_view(ctx, run_id)
    assert rows[1] == ["adapter", "50.0%", 3.1, 22.2, "100.0%"]
    assert [t.name for t in figure.data] == ["exact match (%)", "facts stated (%)", "loss"]
    assert answers == [["Who are you?", "Quill", "I'm SmolLM.", "no", "I'm Quill.", "yes"]]
    assert submit_evaluate(ctx, None) == "Pick a run first."


def _score(exact: float) -> dict:
    return {"exact_match": exact, "loss": 3.1, "perplexity": 22.2}


def test_evaluate_refuses_runs_without_an_adapter_or_held_out_data(ctx: AppContext, tmp_path: Path):
    run_dir = ctx.runs_dir / "20260101-000000-x"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("data: {}\n")
    run_id = adopt(ctx, run_dir)
    assert "no saved adapter" in submit_evaluate(ctx, run_id)
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    assert "no held-out data" in submit_evaluate(ctx, run_id)


def test_progress_and_fidelity_text(tmp_path: Path):
    write_json_atomic(tmp_path / "status.json", {"state": "running", "step": 1, "max_steps": 4, "phase": "merging"})
    assert progress_md(job_in(tmp_path, "export", "running")).endswith("running, step 2/4: merging")
    write_json_atomic(tmp_path / "status.json", {"state": "running", "step": 4, "max_steps": 4, "phase": "done"})
    assert progress_md(job_in(tmp_path, "export", "running")).endswith("running, finishing")  # never "step 5/4"
    assert "boom" in progress_md(job_in(tmp_path, "export", "failed", error="boom"))
    report = {
        "out": "/x/merged",
        "shards": ["model.safetensors"],
        "size_bytes": 2_000_000,
        "dtype": "bf16",
        "merge_into": "16bit",
        "fidelity": {
            "passed": True,
            "max_abs_logit_diff": 0.05,
            "tolerance": 1.2,
            "mean_abs_logit_diff": 0.01,
            "greedy_agreement": 0.99,
        },
    }
    write_json_atomic(tmp_path / "result.json", report)
    text = export_result_md(job_in(tmp_path, "export", "completed"))
    assert "`/x/merged` (1 shard(s), 2.0 MB, bf16" in text and "passed: max |logit diff| 0.05 (tolerance 1.2)" in text
    (tmp_path / "result.json").unlink()
    report["fidelity"]["passed"] = False
    write_json_atomic(tmp_path / "export_report.json", report)  # a failed check leaves only this
    assert "Fidelity check FAILED" in export_result_md(job_in(tmp_path, "export", "failed"))
    assert eval_rows(None) == []


def test_preflight_from_the_form_runs_as_a_job_and_reports(tmp_path: Path):
    from app.train_tab import preflight_md, start_preflight
    from app.views.form import default_values

    ctx = AppContext(tmp_path / "runs", JobManager(tmp_path / "runs", max_running=1, cwd=ROOT))
    values = default_values(str(ctx.runs_dir), "examples/tiny-lora.yaml")
    msg, job_id = start_preflight(ctx, values)
    assert job_id is not None and msg.startswith("Pre-flight"), msg
    assert Path(ctx.manager.registry.get(job_id).run_dir, "config.yaml").is_file()
    deadline = time.monotonic() + 120
    while ctx.manager.registry.get(job_id).state not in ("completed", "failed") and time.monotonic() < deadline:
        ctx.manager.tick()
        time.sleep(0.2)
    text = preflight_md(ctx, job_id)
    assert ": completed" in text and "as configured: ok" in text and "ETA of the full run" in text, text
    assert start_preflight(ctx, {**values, "training.max_steps": "x"})[1] is None
