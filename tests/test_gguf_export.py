"""GGUF export of the built-in real model: llama.cpp's own converter, then the check (logits per quant type, tokenizer
round-trip, embedded chat template, greedy reply ending in EOS); a broken export fails it and leaves nothing.

One short real-model adapter is shared by the file; llama.cpp's converter is fetched once into the shared test cache
($LORA_WORKBENCH_CACHE), like the built-in model. If it cannot be fetched, these tests skip and say why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_side_jobs import job_in
from trainer.builtin_models import cache_root
from trainer.export import ExportError, ExportRequest, run_export
from trainer.export_target import MARKER
from trainer.side_jobs import export_result_md


@pytest.fixture(scope="module")
def converter() -> Path:
    from trainer.llama_cpp import LlamaCppError, ensure_converter

    try:
        return ensure_converter(cache_root("runs"))
    except LlamaCppError as e:
        pytest.skip(f"GGUF EXPORT NOT TESTED: llama.cpp's converter could not be fetched: {e}")


@pytest.fixture(scope="module")
def gguf_run(converter: Path, real_run: Path) -> Path:
    """The session's short LoRA run of the real model (a style the base never has, conftest's real_run); after the
    converter, so that a missing converter skips before any training."""
    return real_run


def test_cli_exports_q8_0_with_modelfile_and_the_check_passes(gguf_run: Path, tmp_path: Path) -> None:
    out, status = tmp_path / "exports" / "pirate", tmp_path / "job"
    cmd = [sys.executable, "-m", "trainer", "export", "--adapter", str(gguf_run / "adapter"), "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--format", "gguf", "--quant", "q8_0", "--status-dir", str(status)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"[export] done: {out}/pirate.q8_0.gguf" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "Modelfile", "export_report.json", "pirate.q8_0.gguf"]
    )
    report = json.loads((out / "export_report.json").read_text())
    assert report["failures"] == [] and report["logits"]["passed"] and report["tokenizer"]["passed"]
    assert report["chat_template"]["passed"] and report["eos"]["passed"]
    assert report["eos"]["reply"].startswith("Ahoy"), report["eos"]  # the GGUF answers in the trained style
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./pirate.q8_0.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>" in modelfile and "SYSTEM" in modelfile
    job = json.loads((status / "status.json").read_text())
    assert job["state"] == "completed" and job["max_steps"] == 4  # load, merge, convert, check


def test_f16_export_passes_the_check_closer_than_q8_0(gguf_run: Path, tmp_path: Path) -> None:
    report = run_export(ExportRequest(adapter=gguf_run / "adapter", out=tmp_path / "f16", format="gguf", quant="f16"))
    logits = report["logits"]
    assert report["failures"] == [] and logits["passed"], logits
    assert logits["greedy_agreement"] >= 0.95 and logits["tolerance_rule"].endswith("f16")
    assert (tmp_path / "f16" / "f16.f16.gguf").stat().st_size > 250e6  # 135M parameters at 2 bytes


def test_a_gguf_of_the_base_alone_fails_the_logit_check(gguf_run: Path, real_model: Path, tmp_path: Path) -> None:
    """A dropped adapter (the GGUF made from the base checkpoint) against base + adapter: the check catches it."""
    from trainer.adapter_source import read_adapter
    from trainer.export import load_tokenizer_for, load_unmerged
    from trainer.export_fidelity import forward_logits, prompt_inputs
    from trainer.gguf_export import check_gguf
    from trainer.llama_cpp import convert, ensure_converter

    source = read_adapter(gguf_run / "adapter")
    req = ExportRequest(adapter=source.path, out=tmp_path / "unused", dtype="fp32")
    tokenizer = load_tokenizer_for(source, req)
    model, _ = load_unmerged(source, req, cuda=False)
    reference = forward_logits(model, prompt_inputs(tokenizer))
    del model
    gguf = tmp_path / "base.q8_0.gguf"
    convert(ensure_converter(cache_root("runs")), real_model, gguf, "q8_0")
    checks = check_gguf(gguf, tokenizer, reference, "q8_0", [tokenizer.eos_token_id])
    assert [f.split(":")[0] for f in checks["failures"]] == ["logits"], checks["failures"]
    assert "differs from base + adapter by up to" in checks["failures"][0]


def test_an_adapter_without_a_chat_template_fails_and_leaves_nothing(gguf_run: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(gguf_run / "adapter", adapter)
    (adapter / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (adapter / "tokenizer_config.json").write_text(json.dumps(config))
    out, status = tmp_path / "exports" / "no-template", tmp_path / "job"
    with pytest.raises(ExportError) as e:
        run_export(ExportRequest(adapter=adapter, out=out, format="gguf", quant="q8_0", status_dir=status))
    assert f"GGUF check failed; nothing was written to {out}" in str(e.value)
    assert "chat template: the GGUF's is missing (tokenizer.chat_template)" in str(e.value)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no partial dir either
    assert json.loads((status / "export_report.json").read_text())["chat_template"]["embedded"] is False
    shown = export_result_md(job_in(status, "export", "failed"))  # what the Export tab shows for this job
    assert "GGUF check FAILED" in shown and "- chat template: the GGUF's is missing" in shown


def test_unknown_or_unbuilt_quant_types_are_refused_before_any_model_loads(
    trained_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.export import validate_request

    monkeypatch.delenv("LLAMA_QUANTIZE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-quantize on it
    adapter = trained_adapter("lora") / "adapter"
    with pytest.raises(ExportError) as e:
        validate_request(ExportRequest(adapter=adapter, out=tmp_path / "a", format="gguf", quant="q9"))
    assert "--quant: 'q9' is not one of f16, bf16, q8_0, q4_k_m" in str(e.value)
    with pytest.raises(ExportError) as e:
        validate_request(ExportRequest(adapter=adapter, out=tmp_path / "b", format="gguf", quant="q4_k_m"))
    assert "--quant q4_k_m: needs llama.cpp's compiled llama-quantize" in str(e.value)
    assert "use f16, bf16, q8_0" in str(e.value) and not (tmp_path / "b").exists()


def test_the_page_queues_a_gguf_export_and_refuses_an_unbuilt_k_quant(
    trained_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.context import AppContext
    from app.export_tab import submit_export
    from trainer.jobs import JobManager

    monkeypatch.delenv("LLAMA_QUANTIZE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    ctx = AppContext(tmp_path / "runs", JobManager(tmp_path / "runs", max_running=0))  # nothing starts
    adapter = str(trained_adapter("lora") / "adapter")
    form = [ctx, adapter, "", "", "", "bf16", "2GB", "16bit", False, "", "gguf"]
    msg, job_id = submit_export(*form, "q4_k_m")
    assert job_id is None and msg.startswith("**Not queued.**") and "needs llama.cpp's compiled llama-quantize" in msg
    msg, job_id = submit_export(*form, "q8_0")
    assert job_id is not None, msg
    args = json.loads(Path(ctx.manager.registry.get(job_id).config_path).read_text())["args"]
    assert args[-4:] == ["--format", "gguf", "--quant", "q8_0"]
