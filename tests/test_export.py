"""`lora-workbench export`: the merged model loads with plain transformers and matches base + adapter; --out is safe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from trainer.chat.adapter_source import AdapterError
from trainer.cli import main
from trainer.export.job import run_export
from trainer.export.merge import ExportError, ExportRequest, forward_logits, prompt_inputs
from trainer.run_dir import read_status


def export(run_dir: Path, out: Path, **kwargs) -> dict:
    return run_export(ExportRequest(adapter=run_dir / "adapter", out=out, **kwargs))


def leftovers(out: Path) -> list[str]:
    """Temp / moved-aside dirs an export left next to --out."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def reference_logits(run_dir: Path, base: Path, quantized: bool = False) -> tuple[list, list]:
    """(prompt ids, logits) of base + adapter, computed here the way training sees it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=bnb if quantized else None, device_map={"": "cpu"}
    )
    model = PeftModel.from_pretrained(model, str(run_dir / "adapter"))
    model.train(quantized)  # training's 4-bit path (dropout is 0 in these runs); eval otherwise
    inputs = prompt_inputs(AutoTokenizer.from_pretrained(run_dir / "adapter"))
    return inputs, forward_logits(model, inputs)


def max_diff_to_export(out: Path, inputs: list, reference: list) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no PEFT
    return max(float((r - g).abs().max()) for r, g in zip(reference, forward_logits(model, inputs), strict=True))


@pytest.mark.parametrize(("method", "dtype"), [("lora", "bf16"), ("dora", "fp16"), ("qlora", "fp32")])
def test_merged_export_is_a_plain_model_matching_base_plus_adapter(
    trained_adapter, tiny_model: Path, tmp_path: Path, method: str, dtype: str
) -> None:
    run_dir = trained_adapter(method)
    out = tmp_path / "merged"
    report = export(run_dir, out, dtype=dtype)

    fidelity = report["fidelity"]
    assert fidelity["passed"] and fidelity["prompts"] == 4
    inputs, reference = reference_logits(run_dir, tiny_model)  # qlora: merged into the unquantized base
    assert max_diff_to_export(out, inputs, reference) <= fidelity["tolerance"]
    if dtype == "fp32":
        assert fidelity["greedy_agreement"] == 1.0 and fidelity["max_abs_logit_diff"] < 1e-4

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md", "export_report.json"} <= names
    assert report["shards"] == ["model.safetensors"] and "adapter_config.json" not in names
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    assert "quantization_config" not in config
    from transformers import AutoTokenizer

    assert "<|im_start|>" in AutoTokenizer.from_pretrained(out).chat_template
    card = (out / "README.md").read_text()
    assert str(tiny_model) in card and f"| Adapter method | {method if method != 'qlora' else 'lora'} |" in card
    assert ("4bit nf4" in card) == (method == "qlora") and "passed" in card
    assert json.loads((out / "export_report.json").read_text())["fidelity"] == fidelity
    assert not leftovers(out)


def test_dequantized_merge_of_a_qlora_run_reproduces_the_quantized_model(
    trained_adapter, tiny_model: Path, tmp_path: Path
) -> None:
    run_dir = trained_adapter("qlora")
    out = tmp_path / "merged"
    report = export(run_dir, out, dtype="fp32", merge_into="dequantized")

    assert report["fidelity"]["passed"] and report["merge_into"] == "dequantized"
    inputs, quantized = reference_logits(run_dir, tiny_model, quantized=True)
    assert max_diff_to_export(out, inputs, quantized) < 1e-3  # fp32 rounding only: the NF4 weights themselves
    _, unquantized = reference_logits(run_dir, tiny_model)
    assert max_diff_to_export(out, inputs, unquantized) > 1e-2  # ... which are not the full-precision ones
    assert "exactly the weights the adapter was trained against" in (out / "README.md").read_text()


def test_small_shard_size_writes_several_shards_and_an_index(trained_adapter, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    report = export(trained_adapter("lora"), out, dtype="fp32", max_shard_size="200KB")

    assert len(report["shards"]) >= 3 and report["fidelity"]["passed"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report["shards"])
    assert all((out / s).stat().st_size <= 200_000 for s in report["shards"])
    assert report["size_bytes"] == sum((out / s).stat().st_size for s in report["shards"])


def test_an_existing_out_dir_that_is_no_export_is_kept_even_with_overwrite(trained_adapter, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    for overwrite in (False, True):  # replacing an earlier export: tests/test_export_replace.py
        with pytest.raises(ExportError, match="is not empty and it is not an export this workbench wrote"):
            export(trained_adapter("lora"), out, overwrite=overwrite)
        assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert not leftovers(out)


def test_a_failed_fidelity_check_leaves_nothing_behind(trained_adapter, tmp_path: Path, monkeypatch) -> None:
    import trainer.export.merge as export_module

    def drop_the_adapter(model, source, req, cuda):  # a broken merge: the base without the update
        return model.unload().to(torch.bfloat16)

    monkeypatch.setattr(export_module, "merge_adapter", drop_the_adapter)
    out, status_dir = tmp_path / "merged", tmp_path / "job"
    with pytest.raises(ExportError, match="fidelity check failed") as err:
        export(trained_adapter("lora"), out, status_dir=status_dir)
    assert not out.exists() and not leftovers(out)
    assert not err.value.report["fidelity"]["passed"] and err.value.report["fidelity"]["greedy_agreement"] < 0.5
    status = read_status(status_dir)
    assert status["state"] == "failed" and "fidelity check failed" in status["error"]
    assert json.loads((status_dir / "export_report.json").read_text())["fidelity"]["passed"] is False


def other_base(tiny_model: Path, path: Path) -> Path:
    """A tiny Llama of another width (hidden 96) with the tiny model's tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=768, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model / name, path / name)
    return path


def test_an_adapter_for_another_base_is_refused_before_any_weights_load(
    trained_adapter, tiny_model: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from transformers import AutoModelForCausalLM

    base = other_base(tiny_model, tmp_path / "wide")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    adapter = trained_adapter("lora") / "adapter"
    with pytest.raises(AdapterError, match="does not fit base"):
        run_export(ExportRequest(adapter=adapter, out=tmp_path / "out", base=str(base)))

    argv = ["export", "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--base", str(base)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "does not fit base" in err and "in_features 64, base 96" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_requests_list_every_problem_and_touch_nothing(trained_adapter, tmp_path: Path) -> None:
    run_dir = trained_adapter("lora")
    adapter_files = sorted(p.name for p in (run_dir / "adapter").iterdir())
    with pytest.raises(ExportError) as err:
        export(run_dir, run_dir / "adapter" / "merged", dtype="int4", max_shard_size="lots", merge_into="dequantized")
    message = str(err.value)
    assert "--dtype: 'int4'" in message and "--max-shard-size: 'lots'" in message
    assert "nothing to dequantize; use --merge-into 16bit" in message and "inside it" in message
    with pytest.raises(ExportError, match="contains the adapter"):
        export(run_dir, run_dir, overwrite=True)  # replacing the run dir would delete the adapter
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == adapter_files


def test_push_to_hub_needs_the_network_and_a_token_before_merging(
    trained_adapter, tmp_path: Path, monkeypatch, capsys
) -> None:
    import huggingface_hub

    out = tmp_path / "merged"
    argv = ["export", "--adapter", str(trained_adapter("lora") / "adapter"), "--out", str(out)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([*argv, "--push-to-hub", "me/tiny-merged"]) == 1
    assert "offline (HF_HUB_OFFLINE=1)" in capsys.readouterr().err and not out.exists()

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main([*argv, "--push-to-hub", "me/tiny-merged"]) == 1
    err = capsys.readouterr().err
    assert "no hub token: set HF_TOKEN" in err and "Traceback" not in err and not out.exists()


class FakeHub:
    """Stands in for HfApi: records uploads; `refuse` makes create_repo answer 403 like a read-only token."""

    refuse = False
    uploads: list[tuple[str, list[str]]] = []

    def __init__(self, token: str | None = None):
        assert token == "hf_secret_token"

    def whoami(self) -> dict:
        return {"name": "me"}

    def create_repo(self, repo_id: str, exist_ok: bool, repo_type: str) -> str:
        if FakeHub.refuse:
            import httpx2
            from huggingface_hub.errors import HfHubHTTPError

            request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
            raise HfHubHTTPError("403 Forbidden", response=httpx2.Response(403, request=request))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id: str, folder_path: str, commit_message: str) -> None:
        FakeHub.uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir())))


def test_push_to_hub_uploads_the_checked_export_and_never_shows_the_token(
    trained_adapter, tmp_path: Path, monkeypatch, capsys
) -> None:
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret_token")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    out, status_dir = tmp_path / "merged", tmp_path / "job"
    argv = ["export", "--adapter", str(trained_adapter("lora") / "adapter"), "--out", str(out)]
    assert main([*argv, "--push-to-hub", "me/tiny-merged", "--status-dir", str(status_dir)]) == 0
    assert FakeHub.uploads == [("me/tiny-merged", sorted(p.name for p in out.iterdir()))]
    assert read_status(status_dir)["step"] == read_status(status_dir)["max_steps"] == 5

    monkeypatch.setattr(FakeHub, "refuse", True)
    assert main([*argv, "--push-to-hub", "me/tiny-merged", "--overwrite", "--status-dir", str(status_dir)]) == 1
    captured = capsys.readouterr()
    assert "may not write to me/tiny-merged (403)" in captured.err and "Traceback" not in captured.err
    assert (out / "config.json").is_file()  # the export itself stands; only the upload failed
    assert "403" in read_status(status_dir)["error"] and read_status(status_dir)["state"] == "failed"
    assert json.loads((status_dir / "export_report.json").read_text())["fidelity"]["passed"]
    written = "".join(p.read_text(errors="ignore") for p in [*out.iterdir(), *status_dir.iterdir()])
    assert "hf_secret_token" not in captured.out + captured.err + written


def test_cli_export_writes_status_and_report_for_the_job_view(trained_adapter, tmp_path: Path, capsys) -> None:
    out, status_dir = tmp_path / "merged", tmp_path / "jobs" / "export-1"
    argv = ["export", "--adapter", str(trained_adapter("lora") / "adapter"), "--out", str(out)]
    assert main([*argv, "--dtype", "fp16", "--max-shard-size", "500KB", "--status-dir", str(status_dir)]) == 0

    stdout = capsys.readouterr().out
    assert "[export] 1/4 loading base" in stdout and "[export] 4/4 fidelity" in stdout and "fidelity passed" in stdout
    status = read_status(status_dir)
    assert status["state"] == "completed" and status["exit_code"] == 0 and status["step"] == status["max_steps"] == 4
    report = json.loads((status_dir / "export_report.json").read_text())
    assert report == json.loads((out / "export_report.json").read_text())
    assert report["dtype"] == "fp16" and set(report["seconds"]) == {"load", "merge", "save", "fidelity"}
    assert json.loads((status_dir / "result.json").read_text())["out"] == str(out.resolve())


def test_a_16bit_merge_of_a_qlora_run_reports_how_far_it_is_from_the_model_it_was_trained_with(
    trained_adapter, tiny_model: Path, tmp_path: Path, capsys
) -> None:
    """The fidelity check compares with the 16-bit base + adapter; the 4-bit one the adapter trained on is reported."""
    run_dir = trained_adapter("qlora")
    out, status_dir = tmp_path / "merged", tmp_path / "jobs" / "export-1"
    argv = ["export", "--adapter", str(run_dir / "adapter"), "--out", str(out), "--dtype", "fp32"]
    assert main([*argv, "--status-dir", str(status_dir)]) == 0

    report = json.loads((out / "export_report.json").read_text())
    assert report["fidelity"]["passed"]  # still the gate: the merge did what it says
    trained = report["against_trained_model"]
    inputs, quantized = reference_logits(run_dir, tiny_model, quantized=True)  # plain PEFT on the 4-bit base
    assert trained["max_abs_logit_diff"] == pytest.approx(max_diff_to_export(out, inputs, quantized), rel=1e-4)
    assert trained["max_abs_logit_diff"] > 10 * report["fidelity"]["max_abs_logit_diff"]
    assert trained["reference"] == "the 4bit base + adapter, loaded as training loaded it"
    stdout = capsys.readouterr().out
    drift = f"{trained['max_abs_logit_diff']:.4g}"
    assert f"against the model it was trained with (the 4bit base + adapter): max |logit diff| {drift}" in stdout
    assert f"{trained['greedy_agreement']:.1%}" in stdout and "--merge-into dequantized keeps" in stdout

    from app.views.side_jobs import export_result_md
    from trainer.jobs.registry import Job

    job = Job(1, "export-1", None, "export", "completed", None, None, 0.0, None, None, "", str(status_dir), None,
              None, None)  # fmt: skip
    page = export_result_md(job)
    assert f"Against the model it was trained with (the 4bit base + adapter): max |logit diff| {drift[:4]}" in page
    assert "Merge into: dequantized keeps" in page and "--merge-into" not in page
    assert "Against the model it was trained with" in (out / "README.md").read_text()


def test_a_dequantized_merge_reports_the_trained_model_as_its_fidelity_reference(
    trained_adapter, tmp_path: Path
) -> None:
    report = export(trained_adapter("qlora"), tmp_path / "merged", dtype="fp32", merge_into="dequantized")
    trained = report["against_trained_model"]
    assert trained["max_abs_logit_diff"] == report["fidelity"]["max_abs_logit_diff"] < 1e-3
    assert "against_trained_model" not in export(trained_adapter("lora"), tmp_path / "lora", dtype="fp32")


def test_every_file_of_an_export_gets_the_mode_the_umask_gives(trained_adapter, tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        export(trained_adapter("lora"), tmp_path / "merged")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "merged").iterdir()}
    assert modes == dict.fromkeys(modes, "0o644"), modes  # model.safetensors and export_report.json too


def test_the_page_names_its_replace_checkbox_not_the_cli_flag(trained_adapter, tmp_path: Path) -> None:
    from app.context import AppContext
    from app.export_tab import submit_export
    from trainer.jobs.queue import JobManager

    ctx = AppContext(tmp_path / "runs", JobManager(tmp_path / "runs", max_running=0))
    adapter = str(trained_adapter("lora") / "adapter")
    earlier = ctx.runs_dir / "exports" / "earlier"
    export(trained_adapter("lora"), earlier)
    msg, job_id = submit_export(ctx, adapter, "", "", str(earlier), "bf16", "2GB", "16bit", False, "")
    assert job_id is None and "tick Replace" in msg and "--overwrite" not in msg, msg

    mine = ctx.runs_dir / "exports" / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    msg, job_id = submit_export(ctx, adapter, "", "", str(mine), "bf16", "2GB", "16bit", True, "")
    assert job_id is None and "never replaced, Replace ticked or not" in msg and "--overwrite" not in msg, msg
    assert (mine / "notes.txt").read_text() == "mine"
