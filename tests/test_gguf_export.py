"""GGUF export of the built-in real model: llama.cpp's own converter, then the check (logits per quant type, tokenizer
round-trip, embedded chat template, greedy reply ending in EOS); a broken export (adapter dropped or mis-scaled,
template missing) fails it and leaves nothing.

One short real-model adapter is shared by the file; llama.cpp's converter is fetched once into the shared test cache
($LORA_WORKBENCH_CACHE), like the built-in model. If it cannot be fetched, these tests skip and say why. The k-quant
export runs where llama-quantize is built (`lora-workbench build-llama-cpp`, into that cache) and skips loudly else.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.views.side_jobs import export_result_md
from tests.conftest import ROOT
from tests.test_side_jobs import job_in
from trainer.export.job import run_export
from trainer.export.merge import ExportError, ExportRequest
from trainer.export.target import MARKER
from trainer.model.builtin_models import cache_root


@pytest.fixture(scope="module")
def converter() -> Path:
    from trainer.export.llama_cpp import LlamaCppError, ensure_converter

    try:
        return ensure_converter(cache_root("runs"))
    except LlamaCppError as e:
        pytest.skip(f"GGUF EXPORT NOT TESTED: llama.cpp's converter could not be fetched: {e}")


@pytest.fixture(scope="module")
def gguf_run(converter: Path, real_run: Path) -> Path:
    """The session's short LoRA run of the real model (a style the base never has, conftest's real_run); after the
    converter, so that a missing converter skips before any training."""
    return real_run


@pytest.fixture(scope="module")
def reference(gguf_run: Path) -> dict[str, Any]:
    """What the check compares a GGUF with, as the export computes it: the run's tokenizer and the unmerged fp32
    base + adapter's logits on the check's prompts; beside them the logits of two broken merges of the same model,
    the adapter dropped and the adapter at twice its scale (lora_alpha read wrong)."""
    from trainer.chat.adapter_source import read_adapter
    from trainer.export.fidelity import forward_logits, prompt_inputs
    from trainer.export.merge import load_tokenizer_for, load_unmerged

    source = read_adapter(gguf_run / "adapter")
    req = ExportRequest(adapter=source.path, out=source.path.parent / "unused", dtype="fp32")
    tokenizer = load_tokenizer_for(source, req)
    model, _ = load_unmerged(source, req, cuda=False)
    inputs = prompt_inputs(tokenizer)
    refs = {"tokenizer": tokenizer, "logits": forward_logits(model, inputs)}
    with model.disable_adapter():
        refs["dropped"] = forward_logits(model, inputs)
    for m in model.modules():
        if isinstance(getattr(m, "scaling", None), dict):
            m.scaling = {k: 2 * v for k, v in m.scaling.items()}
    return refs | {"scaled x2": forward_logits(model, inputs)}


@pytest.fixture(scope="module")
def quantizer() -> str:
    from trainer.export.llama_cpp import find_quantizer

    if (found := find_quantizer(cache_root("runs"))) is None:
        pytest.skip(
            "K-QUANT EXPORT NOT TESTED: llama.cpp's llama-quantize is not built in the test cache; run "
            "`LORA_WORKBENCH_CACHE=~/.cache/lora-workbench-tests lora-workbench build-llama-cpp` (about 5 min on "
            "2 cores) or set $LLAMA_QUANTIZE"
        )
    return found


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


def test_a_gguf_of_the_base_alone_fails_the_logit_check(
    reference, converter, real_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dropped adapter (the GGUF made from the base checkpoint) against base + adapter: the check catches it,
    having parsed the file once (transformers' loader asks for it three times: parsed_once)."""
    import gguf as gguf_module

    from trainer.export.gguf import check_gguf
    from trainer.export.llama_cpp import convert

    parses: list[str] = []
    real_reader = gguf_module.GGUFReader

    def counted(path: Any, mode: str = "r") -> Any:
        parses.append(str(path))
        return real_reader(path, mode)

    tokenizer = reference["tokenizer"]
    gguf = tmp_path / "base.q8_0.gguf"
    convert(converter, real_model, gguf, "q8_0")
    monkeypatch.setattr(gguf_module, "GGUFReader", counted)
    checks = check_gguf(gguf, tokenizer, reference["logits"], "q8_0", [tokenizer.eos_token_id])
    assert parses == [str(gguf)], parses
    assert [f.split(":")[0] for f in checks["failures"]] == ["logits"], checks["failures"]
    assert "differs from base + adapter by up to" in checks["failures"][0]


def test_the_logit_tolerances_tell_a_dropped_or_mis_scaled_adapter_from_the_right_one(reference) -> None:
    """The check's logit gate (compare with GGUF_TOLERANCE) against base + adapter: the adapter dropped or at twice
    its scale fails at f16, bf16 and q8_0. A k-quant's merge is checked on the f16 GGUF it is quantized from
    (check_source, at f16's tolerance), since at 4-6 bits the built-in model's rounding noise reaches a broken
    merge's distance (benchmarks/gguf_tolerance.py, the module comment of trainer/export/gguf.py)."""
    from trainer.export.fidelity import compare
    from trainer.export.gguf import GGUF_TOLERANCE
    from trainer.export.gguf_types import CONVERTER_QUANTS

    for quant in CONVERTER_QUANTS:
        for broken in ("dropped", "scaled x2"):
            f = compare(reference["logits"], reference[broken], quant, GGUF_TOLERANCE)
            assert not f["passed"], (quant, broken, f)
    assert compare(reference["logits"], reference["logits"], "f16", GGUF_TOLERANCE)["passed"]


def test_the_check_parses_its_gguf_once_and_leaves_the_gguf_module_as_it_was(tmp_path: Path) -> None:
    """Inside parsed_once a GGUFReader of the checked file is one parse, any other file is read as usual; after it
    (an error inside too) gguf's reader and name map are the library's own again."""
    import gguf
    import numpy as np

    from trainer.export.gguf import read_gguf_fields
    from trainer.model.gguf_load import parsed_once

    paths = [tmp_path / "checked.gguf", tmp_path / "other.gguf"]
    for path in paths:
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_chat_template("{{ messages }}")
        writer.add_eos_token_id(7)
        writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
        for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
            write()
        writer.close()
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pytest.raises(RuntimeError), parsed_once(paths[0]):
        assert gguf.GGUFReader(str(paths[0])) is gguf.GGUFReader(str(tmp_path / "." / "checked.gguf"))
        assert gguf.GGUFReader(str(paths[1])) is not gguf.GGUFReader(str(paths[1]))
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert read_gguf_fields(paths[0]) == {"chat_template": "{{ messages }}", "eos_token_id": 7}
        raise RuntimeError("a failed load inside the check")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (real_reader, real_map)


def test_a_k_quant_whose_f16_source_is_off_fails_naming_the_merge() -> None:
    from trainer.export.gguf import failures

    ok = {"passed": True, "tolerance_rule": "0.3 x max |reference logit| (37.9), q4_k_m"}
    checks = {
        "logits": ok,  # the k-quant itself within its (loose) tolerance
        "source_logits": {"passed": False, "max_abs_logit_diff": 16.4, "tolerance": 0.379, "tolerance_rule": "f16"},
        "tokenizer": {"passed": True},
        "chat_template": {"passed": True, "embedded": True},
        "eos": {"gguf_eos_token_id": 2, "model_eos_token_ids": [2], "passed": True},
    }
    [line] = failures(checks)
    assert "f16 GGUF the k-quant was quantized from" in line and "16.4" in line and "not the quantization" in line
    assert failures(checks | {"source_logits": ok}) == []


def test_q4_k_m_export_quantizes_with_llama_cpp_and_passes_the_check(
    gguf_run: Path, quantizer: str, tmp_path: Path
) -> None:
    from gguf import GGUFReader, LlamaFileType

    out, status = tmp_path / "q4", tmp_path / "job"
    report = run_export(
        ExportRequest(adapter=gguf_run / "adapter", out=out, format="gguf", quant="q4_k_m", status_dir=status)
    )
    assert report["failures"] == [] and report["logits"]["tolerance_rule"].endswith("q4_k_m"), report["logits"]
    source = report["source_logits"]  # the merge, checked on the f16 GGUF it was quantized from (then deleted)
    assert source["passed"] and source["tolerance_rule"].endswith("f16"), source
    assert report["eos"]["passed"] and report["eos"]["reply"].startswith("Ahoy"), report["eos"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "Modelfile", "export_report.json", "q4.q4_k_m.gguf"]
    )
    file_type = GGUFReader(str(out / "q4.q4_k_m.gguf")).fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == LlamaFileType.MOSTLY_Q4_K_M  # llama-quantize's, not f16
    assert list(report["seconds"]) == ["load", "merge", "convert", "quantize", "check"]
    assert json.loads((status / "status.json").read_text())["max_steps"] == 5


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
    from trainer.export.merge import validate_request

    adapter = trained_adapter("lora") / "adapter"
    without_quantizer(monkeypatch, tmp_path)
    with pytest.raises(ExportError) as e:
        validate_request(ExportRequest(adapter=adapter, out=tmp_path / "a", format="gguf", quant="q9"))
    assert "--quant: 'q9' is not one of f16, bf16, q8_0, q4_k_m" in str(e.value)
    with pytest.raises(ExportError) as e:
        validate_request(ExportRequest(adapter=adapter, out=tmp_path / "b", format="gguf", quant="q4_k_m"))
    assert "--quant q4_k_m: needs llama.cpp's compiled llama-quantize: build it once with `lora-workbench " in str(
        e.value
    )
    assert "build-llama-cpp`" in str(e.value) and "use f16, bf16, q8_0" in str(e.value)
    assert not (tmp_path / "b").exists()


def without_quantizer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No llama-quantize anywhere the export looks: not in $LLAMA_QUANTIZE, on PATH or built into the cache."""
    monkeypatch.delenv("LLAMA_QUANTIZE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("LORA_WORKBENCH_CACHE", str(tmp_path / "empty-cache"))


def test_build_llama_cpp_without_cmake_says_what_to_install_and_fetches_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from trainer.export.llama_cpp import build_command

    monkeypatch.setenv("LORA_WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, no compiler
    assert build_command("runs", 2) == 1
    err = capsys.readouterr().err
    assert "building llama.cpp needs cmake and c++ on PATH" in err and "apt-get install cmake g++ make" in err
    assert not (tmp_path / "cache").exists()  # no sdist fetched, no partial build left


def test_the_page_queues_a_gguf_export_and_refuses_an_unbuilt_k_quant(
    trained_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.context import AppContext
    from app.export_tab import submit_export
    from trainer.jobs.queue import JobManager

    adapter = str(trained_adapter("lora") / "adapter")
    without_quantizer(monkeypatch, tmp_path)
    ctx = AppContext(tmp_path / "runs", JobManager(tmp_path / "runs", max_running=0))  # nothing starts
    form = [ctx, adapter, "", "", "", "bf16", "2GB", "16bit", False, "", "gguf"]
    msg, job_id = submit_export(*form, "q4_k_m")
    assert job_id is None and msg.startswith("**Not queued.**") and "needs llama.cpp's compiled llama-quantize" in msg
    assert "lora-workbench build-llama-cpp" in msg
    msg, job_id = submit_export(*form, "q8_0")
    assert job_id is not None, msg
    request = json.loads(Path(ctx.manager.registry.get(job_id).config_path).read_text())
    assert (request["format"], request["quant"]) == ("gguf", "q8_0")


def test_a_wrong_llama_quantize_path_is_refused_before_any_model_loads(monkeypatch, tmp_path: Path) -> None:
    from trainer.export.gguf_types import gguf_problems

    monkeypatch.setenv("LLAMA_QUANTIZE", str(tmp_path / "nonexistent"))
    [problem] = gguf_problems("q4_k_m", None, tmp_path)
    assert "$LLAMA_QUANTIZE=" in problem and "nonexistent" in problem and "not an executable file" in problem
    assert gguf_problems("q8_0", None, tmp_path) == []  # the converter's types need no quantizer
