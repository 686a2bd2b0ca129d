"""Export's Replace / --overwrite deletes nothing but an earlier export, and only once the new one has passed."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.context import AppContext
from app.export_tab import submit_export
from tests.conftest import ROOT
from trainer.cli import main
from trainer.export.job import run_export
from trainer.export.merge import ExportError, ExportRequest, move_into_place
from trainer.export.target import MARKER
from trainer.jobs.queue import JobManager


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root with the sha256 of each file: equal snapshots mean byte-identical trees."""
    tree = {}
    for p in sorted(root.rglob("*")):
        tree[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return tree


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def fake_run(run_dir: Path, state: str) -> Path:
    """Another run's directory as training leaves it: config, status, metrics, log and adapter."""
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: {name_or_path: tiny}\n")
    (run_dir / "status.json").write_text(json.dumps({"state": state, "pid": 1, "step": 3, "max_steps": 30}))
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "time": 0, "kind": "train", "loss": 2.0}\n')
    (run_dir / "train.log").write_text("step 1\n")
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    return run_dir


@pytest.fixture
def ctx(tmp_path: Path) -> AppContext:
    """A page whose jobs never start (max_running=0), with uploads, a finished and a running run on disk."""
    runs = tmp_path / "runs"
    (runs / "uploads").mkdir(parents=True)
    (runs / "uploads" / "20260101-000000-ab12-mine.jsonl").write_text('{"text": "my data"}\n')
    fake_run(runs / "20260101-000000-done", "completed")
    fake_run(runs / "20260101-000001-busy", "running")
    (runs / "exports" / "notes").mkdir(parents=True)
    (runs / "exports" / "notes" / "todo.txt").write_text("not an export")
    return AppContext(runs, JobManager(runs, max_running=0))


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("uploads", "outside the directories the page may export to"),
        ("20260101-000000-done", "outside the directories the page may export to"),
        ("20260101-000001-busy", "outside the directories the page may export to"),
        ("exports/notes", f"not an export this workbench wrote (no {MARKER} marker"),
        ("exports", "outside the directories the page may export to"),
    ],
)
def test_the_page_refuses_to_replace_anything_but_an_earlier_export(
    ctx: AppContext, trained_adapter, target: str, why: str
) -> None:
    adapter = str(trained_adapter("lora") / "adapter")
    before = snapshot(ctx.runs_dir)
    msg, job_id = submit_export(ctx, adapter, "", "", str(ctx.runs_dir / target), "bf16", "2GB", "16bit", True, "")

    assert job_id is None and msg.startswith("**Not queued.**"), msg
    assert str((ctx.runs_dir / target).resolve()) in msg and why in msg, msg
    if target != "exports/notes":
        assert str((ctx.runs_dir / "exports").resolve()) in msg  # the one place the page exports to
    assert snapshot(ctx.runs_dir) == before and ctx.jobs_newest_first("export") == []


def test_the_page_refuses_the_bundled_data_and_a_symlink_out_of_the_exports_dir(
    ctx: AppContext, trained_adapter
) -> None:
    adapter = str(trained_adapter("lora") / "adapter")
    data_before = snapshot(ROOT / "data")
    msg, job_id = submit_export(ctx, adapter, "", "", str(ROOT / "data"), "bf16", "2GB", "16bit", True, "")
    assert job_id is None and f"--out {ROOT / 'data'}: outside the directories" in msg, msg

    (ctx.runs_dir / "exports" / "sneaky").symlink_to(ctx.runs_dir / "uploads")
    msg, job_id = submit_export(ctx, adapter, "", "", str(ctx.runs_dir / "exports" / "sneaky"), "bf16", "2GB",
                                "16bit", True, "")  # fmt: skip
    assert job_id is None and f"--out {(ctx.runs_dir / 'uploads').resolve()}: outside" in msg, msg
    assert snapshot(ROOT / "data") == data_before and (ctx.runs_dir / "uploads").is_dir()
    assert ctx.jobs_newest_first("export") == []


def test_cli_overwrite_refuses_a_non_empty_dir_it_did_not_write(trained_adapter, tmp_path: Path, capsys) -> None:
    """The CLI may write anywhere its user may, but --overwrite never replaces a run, data or a user's dir."""
    adapter = trained_adapter("lora") / "adapter"
    run_dir = fake_run(tmp_path / "runs" / "20260101-000001-busy", "running")
    data = shutil.copytree(ROOT / "data", tmp_path / "data")
    for target, why in [
        (run_dir, "it is a training run's directory"),
        (data, "it is not an export this workbench wrote"),
    ]:
        before = snapshot(target)
        assert main(["export", "--adapter", str(adapter), "--out", str(target), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert f"--out {target}: is not empty and {why} (no {MARKER} marker in it)" in err, err
        assert "never replaced, --overwrite or not; nothing was changed" in err and "Traceback" not in err
        assert snapshot(target) == before and not leftovers(target)


def test_a_dir_filled_while_the_model_merged_is_not_replaced(tmp_path: Path) -> None:
    """The rule holds again at the final rename: a run that started writing into --out meanwhile keeps its files."""
    new, out = tmp_path / ".out.partial-1", fake_run(tmp_path / "out", "running")
    new.mkdir()
    (new / "config.json").write_text("{}")
    before = snapshot(out)
    with pytest.raises(ExportError, match="training run's directory"):
        move_into_place(new, out, overwrite=True)
    assert snapshot(out) == before


def test_an_earlier_export_is_replaced_only_after_the_new_one_passed(
    trained_adapter, tmp_path: Path, monkeypatch
) -> None:
    import trainer.export.merge as export_module

    request = ExportRequest(adapter=trained_adapter("lora") / "adapter", out=tmp_path / "exports" / "merged")
    first = run_export(request)
    out = request.out
    marker = json.loads((out / MARKER).read_text())
    assert marker["adapter"] == first["adapter"] and marker["created"] == first["created"]
    assert set(marker["files"]) == {p.name for p in out.iterdir()} and "model.safetensors" in marker["files"]
    with pytest.raises(ExportError, match="is an earlier export and not empty.*--overwrite"):
        run_export(request)  # Replace not ticked

    def drop_the_adapter(model, source, req, cuda):  # a broken merge: the base without the update
        return model.unload().to(torch.bfloat16)

    before = snapshot(out)
    with monkeypatch.context() as m:
        m.setattr(export_module, "merge_adapter", drop_the_adapter)
        with pytest.raises(ExportError, match="fidelity check failed"):
            run_export(replace(request, overwrite=True))
    assert snapshot(out) == before and not leftovers(out)  # the earlier export stands, byte for byte

    (out / "my-eval.txt").write_text("notes I added")
    with pytest.raises(ExportError, match=r"holds files the export did not write \(my-eval.txt\)"):
        run_export(replace(request, overwrite=True))
    assert (out / "my-eval.txt").read_text() == "notes I added" and snapshot(out) != {}
    (out / "my-eval.txt").unlink()

    second = run_export(replace(request, overwrite=True))
    assert second["fidelity"]["passed"] and json.loads((out / "export_report.json").read_text()) == second
    assert json.loads((out / MARKER).read_text())["created"] == second["created"] and not leftovers(out)
