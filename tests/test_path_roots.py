"""What a page user may name, and what the server process runs (issue 14: nothing lost, nothing leaked).

Paths typed into the page resolve inside the server's roots (runs dir, bundled data/ and examples/,
`--data-dir`), with one refusal whether the file exists or not; the CLI stays free. A JSON file nested 10,000
levels deep is a DataError naming the file and line, in the page and in `lora-workbench train`. A model with
trust_remote_code never runs its own code in the server process (estimate, preview, Start, chat, export).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.chat_tab import load_models
from app.context import AppContext
from app.export_tab import submit_export
from app.train_tab import estimate_md, preview_outputs, start_run
from app.views.form import default_values
from trainer.config.run_config import RunConfig
from trainer.data.uploads import store_upload
from trainer.jobs.queue import JobManager

ROOT = Path(__file__).resolve().parent.parent
ROWS = (ROOT / "data" / "sentiment_train.jsonl").read_text().splitlines()[:8]


def make_ctx(tmp_path: Path, data_dirs: list[Path] | None = None) -> AppContext:
    runs = tmp_path / "runs"
    return AppContext(runs, JobManager(runs, max_running=0), data_dirs=data_dirs or [])  # nothing starts


@pytest.fixture
def ctx(tmp_path: Path) -> AppContext:
    return make_ctx(tmp_path)


def form(ctx: AppContext, model: Path, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The page's form on the tiny example (with this model), some fields changed as the user would."""
    values = default_values(str(ctx.runs_dir), "examples/tiny-lora.yaml")
    return {**values, "model.name_or_path": str(model), **(changes or {})}


def write_rows(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(ROWS) + "\n")
    return path


def page_says(ctx: AppContext, values: dict[str, Any]) -> tuple[str, str]:
    """(preview verdict + errors, Start's message), as the page shows them."""
    verdict, _, _, errors = preview_outputs(ctx, values)
    message, run_id = start_run(ctx, values)
    assert run_id is None, message
    return verdict + "\n" + errors, message


# --- 5: data paths stay inside the roots ---------------------------------------------------------------------
def test_a_data_file_outside_the_roots_gets_one_refusal_whether_or_not_it_exists(ctx, tiny_model, tmp_path):
    existing = write_rows(tmp_path / "private" / "secret.jsonl")
    missing = tmp_path / "private" / "missing.jsonl"
    seen = {}
    for name, path in (("existing", existing), ("missing", missing)):
        preview, start = page_says(ctx, form(ctx, tiny_model, {"data.source": str(path)}))
        seen[name] = (preview.replace(str(path), "PATH"), start.replace(str(path), "PATH"))
        assert "Data OK" not in preview and "positive" not in preview  # nothing of the file's rows is shown
        for text in (preview, start):
            assert "outside the directories this server may read" in text, text
            assert str(ctx.runs_dir.resolve()) in text and str(ROOT / "data") in text and "--data-dir" in text
    assert seen["existing"] == seen["missing"]  # the page cannot tell whether a file outside exists
    _, start = page_says(ctx, form(ctx, tiny_model, {"data.eval_source": str(existing)}))  # the held-out file too
    assert "outside the directories" in start and str(existing) in start
    assert ctx.manager.registry.all() == []


def test_a_symlink_out_of_the_runs_dir_and_dotdot_are_refused(ctx, tiny_model, tmp_path):
    secret = write_rows(tmp_path / "secret.jsonl")
    link = ctx.runs_dir / "uploads" / "link.jsonl"
    link.parent.mkdir(parents=True)
    link.symlink_to(secret)
    dotdot = ctx.runs_dir / "uploads" / ".." / ".." / "secret.jsonl"
    for typed in (str(link), str(dotdot), "../" * 12 + str(secret).lstrip("/")):
        preview, start = page_says(ctx, form(ctx, tiny_model, {"data.source": typed}))
        assert "outside the directories" in preview and "outside the directories" in start, typed
    assert ctx.manager.registry.all() == []


def test_a_file_under_a_data_dir_is_previewed_and_started_as_checked(tiny_model, tmp_path):
    mine = write_rows(tmp_path / "mydata" / "reviews.jsonl")
    allowed = make_ctx(tmp_path, data_dirs=[tmp_path / "mydata"])
    values = form(allowed, tiny_model, {"data.source": str(mine)})
    verdict, rows, _, errors = preview_outputs(allowed, values)
    assert verdict.startswith("**Data OK**") and not errors and rows, verdict
    message, run_id = start_run(allowed, values)
    assert run_id is not None, message
    saved = yaml.safe_load((allowed.runs_dir / run_id / "config.yaml").read_text())["data"]
    assert saved["source"] == str(mine.resolve())  # the job reads the file the page checked
    assert saved["eval_source"] == str(ROOT / "data" / "sentiment_heldout.jsonl")  # bundled, pinned the same way
    other = make_ctx(tmp_path / "other")  # the same file on a server started without --data-dir
    assert "outside the directories" in preview_outputs(other, values)[3]


def test_hub_ids_and_bundled_relative_paths_stay_allowed(ctx, tiny_model):
    verdict, _, _, _ = preview_outputs(ctx, form(ctx, tiny_model, {"data.source": "data/sentiment_train.jsonl"}))
    assert verdict.startswith("**Data OK**"), verdict
    _, _, _, errors = preview_outputs(ctx, form(ctx, tiny_model, {"data.source": "someone/some-dataset"}))
    assert "no hub dataset of that name could be loaded" in errors  # offline: not found, and the page says so


def test_a_name_under_the_servers_cwd_reads_the_same_as_a_missing_one(ctx, tiny_model, monkeypatch):
    """Hub-id-looking names are what datasets would read from the cwd: whether one exists there must not show."""
    monkeypatch.chdir(ROOT)  # holds trainer/cli.py and tests/, outside the roots
    texts = []
    for name in ("trainer/cli.py", "trainer/nope.py", "tests", "nopex", "imdb"):
        _, _, _, errors = preview_outputs(ctx, form(ctx, tiny_model, {"data.source": name}))
        texts.append(errors.replace(name, "NAME"))
    assert len(set(texts)) == 1 and "no hub dataset of that name could be loaded" in texts[0], texts


def test_the_cli_reads_a_data_file_anywhere(make_config, tmp_path):
    """The machine's user runs `lora-workbench train`: no roots. A bad last line proves the file was read (and
    stops the run at the data step, before any training)."""
    outside = write_rows(tmp_path / "elsewhere" / "rows.jsonl")
    with outside.open("a") as f:
        f.write('{"text": \n')
    code, err = cli_train(make_config({"data": {"source": str(outside)}}))
    assert code == 1 and f"bad data in {outside}" in err and f"line {len(ROWS) + 1}: invalid JSON" in err, err
    assert "outside the directories" not in err


# --- 6: deeply nested JSON -----------------------------------------------------------------------------------
def deep_json(path: Path, levels: int = 10_000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('[{"text": "fine"},\n{"text": ' + "[" * levels + "]" * levels + "}]\n")
    return path


def test_deeply_nested_json_is_a_data_error_in_the_page_not_a_stale_data_ok(ctx, tiny_model, tmp_path):
    good = store_upload(write_rows(tmp_path / "good.jsonl"), "good.jsonl", ctx.runs_dir)
    assert preview_outputs(ctx, form(ctx, tiny_model, {"data.source": str(good)}))[0].startswith("**Data OK**")
    deep = store_upload(deep_json(tmp_path / "deep.json"), "deep.json", ctx.runs_dir)
    verdict, rows, hist, errors = preview_outputs(ctx, form(ctx, tiny_model, {"data.source": str(deep)}))
    assert "Data OK" not in verdict and f"Cannot use {deep}" in verdict and rows == [] and hist is None
    assert str(deep) in errors and "line 2: nested too deeply" in errors, errors
    deep_lines = store_upload(deep_json(tmp_path / "deep.jsonl"), "deep.jsonl", ctx.runs_dir)
    deep_lines.write_text(ROWS[0] + "\n" + "[" * 10_000 + "]" * 10_000 + "\n")
    message, run_id = start_run(ctx, form(ctx, tiny_model, {"data.source": str(deep_lines)}))
    assert run_id is None and "line 2: nested too deeply" in message and str(deep_lines) in message, message


def test_deeply_nested_json_fails_lora_workbench_train_with_a_message_not_a_traceback(make_config, tmp_path):
    deep = deep_json(tmp_path / "deep.json")
    code, err = cli_train(make_config({"data": {"source": str(deep)}}))
    assert code == 1 and "Traceback" not in err and "RecursionError" not in err, err
    assert f"bad data in {deep}:\n  - line 2: nested too deeply" in err, err


def cli_train(config: Path) -> tuple[int, str]:
    """`lora-workbench train CONFIG` in its own process, as a user runs it: (exit code, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "train", str(config)], capture_output=True, text=True, timeout=120
    )
    return done.returncode, done.stderr


# --- 9: trust_remote_code never runs in the server -------------------------------------------------------------
@pytest.fixture
def remote_model(tmp_path: Path) -> tuple[Path, Path]:
    """(a local model dir whose config.json maps to its own Python file, the file that file's import writes)."""
    marker = tmp_path / "remote-code-ran"
    model = tmp_path / "remote-model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "lwb-remote-test",
                "architectures": ["RemoteModel"],
                "auto_map": {
                    "AutoConfig": "remote_code.RemoteConfig",
                    "AutoModelForCausalLM": "remote_code.RemoteModel",
                    "AutoTokenizer": ["remote_code.RemoteTokenizer", None],
                },
            }
        )
    )
    (model / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["remote_code.T", None]}}))
    (model / "remote_code.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class RemoteConfig(PretrainedConfig):\n    model_type = 'lwb-remote-test'\n"
    )
    return model, marker


def test_the_estimate_and_preview_never_run_the_models_own_code(ctx, remote_model):
    model, marker = remote_model
    values = form(ctx, model, {"model.trust_remote_code": True})
    estimate = estimate_md(ctx, values)
    assert "model.trust_remote_code is on" in estimate and "runs only in the training process" in estimate
    verdict, rows, _, errors = preview_outputs(ctx, values)
    assert verdict.startswith("**Data read**") and "model.trust_remote_code is on" in verdict and not errors
    assert " rows as **prompt_completion** from " in verdict, verdict  # the data itself is still checked
    message, run_id = start_run(ctx, values)  # Start is the user's go-ahead: the job, not the server, runs it
    assert run_id is not None, message
    assert not marker.exists()


def test_a_model_with_its_own_code_and_trust_unticked_is_a_clear_problem(ctx, remote_model):
    """transformers refuses an auto_map model without trust_remote_code: the page says so, never raises."""
    model, marker = remote_model
    values = form(ctx, model, {})
    estimate = estimate_md(ctx, values)
    assert "ships its own Python code" in estimate and "model.trust_remote_code" in estimate, estimate
    message, run_id = start_run(ctx, values)
    assert run_id is None and "ships its own Python code" in message, message
    assert not marker.exists()


def test_chat_refuses_and_export_checks_without_running_the_models_own_code(ctx, remote_model):
    from safetensors.torch import save_file

    model, marker = remote_model
    adapter = ctx.runs_dir / "handmade" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    save_file({}, str(adapter / "adapter_model.safetensors"))  # a readable header; the weights never load here
    cfg = RunConfig.model_validate({"model": {"name_or_path": str(model), "trust_remote_code": True}})
    (adapter / "workbench_config.yaml").write_text(cfg.to_yaml())
    text, _ = load_models(ctx, [], str(adapter), "", "as trained", False)
    assert text.startswith("**Not loaded.**") and "trust_remote_code on" in text and "Runs tab" in text, text
    message, job_id = submit_export(ctx, None, str(adapter), "", "", "bf16", "2GB", "16bit", False, "")
    assert job_id is not None, message  # queued: the export job, in its own process, may run the code
    assert not marker.exists()


def test_a_typed_base_under_the_servers_cwd_reads_the_same_as_a_missing_one(ctx, monkeypatch):
    """The chat/export base override: a directory under the cwd (outside the roots) and a made-up hub id get one
    message, so the page cannot probe which names exist where the server was started."""
    from app.views.adapter_choices import resolve_base
    from trainer.chat.adapter_source import AdapterError

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = []
    for name in ("tests", "trainer", "nopex", "nobody/nothing"):
        with pytest.raises(AdapterError) as e:
            resolve_base(name, ctx.roots)
        texts.append(str(e.value).replace(name, "NAME"))
    assert len(set(texts)) == 1 and "no hub model of that name can be loaded here" in texts[0], texts
