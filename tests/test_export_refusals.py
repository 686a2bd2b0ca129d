"""What an export refuses before any model loads, and what it leaves when it is stopped: nothing.

The tiny model's adapter, so each check takes seconds; a model load here is a failure (load_unmerged is replaced by
one that fails the test) wherever the refusal must come first.
"""

from __future__ import annotations

import os
import signal
import subprocess
from argparse import Namespace
from pathlib import Path

import pytest

import trainer.export.gguf as gguf_module
import trainer.export.merge as export_module
from trainer.chat.adapter_source import AdapterError, read_adapter
from trainer.cli import main
from trainer.export.job import cli_quant, run_export
from trainer.export.merge import ExportError, ExportRequest
from trainer.run_dir import read_status


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the request was refused")

    monkeypatch.setattr(export_module, "load_unmerged", refuse)
    monkeypatch.setattr(gguf_module, "load_unmerged", refuse)


def partials(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.partial-*"))


def test_sigterm_during_an_export_leaves_no_temp_dir_and_says_stopped(
    trained_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The page's Stop (SIGTERM to the job) while the merged model is being written: the half-written temp dir is
    removed, --out is not made, status.json says stopped, the exit code is 143."""
    real_save = export_module.save_model
    seen: list[list[str]] = []

    def save_then_sigterm(model, tokenizer, tmp, max_shard_size):
        real_save(model, tokenizer, tmp, max_shard_size)
        seen.append(partials(out))  # the temp dir holds the shards now
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the main thread, as from the queue
        raise AssertionError("SIGTERM did not stop the export")

    monkeypatch.setattr(export_module, "save_model", save_then_sigterm)
    out, status_dir = tmp_path / "merged", tmp_path / "job"
    before = signal.getsignal(signal.SIGTERM)
    argv = ["export", "--adapter", str(trained_adapter("lora") / "adapter"), "--out", str(out)]
    assert main([*argv, "--status-dir", str(status_dir)]) == 128 + signal.SIGTERM
    assert seen == [[f".merged.partial-{os.getpid()}"]]
    assert not out.exists() and partials(out) == []
    status = read_status(status_dir)
    assert status["state"] == "stopped" and status["exit_code"] == 143 and "SIGTERM" in status["error"]
    err = capsys.readouterr().err
    assert "export stopped" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) == before  # the CLI's handler is not left behind


def test_the_temp_dir_of_a_killed_export_is_removed_by_the_next_one(trained_adapter, tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "merged"
    stale = tmp_path / f".merged.partial-{dead.pid}"  # what an export killed with SIGKILL leaves
    (stale / "merged").mkdir(parents=True)
    (stale / "merged" / "model.safetensors").write_bytes(b"\0" * 1024)
    live = tmp_path / f".merged.partial-{os.getppid()}"  # a running export's (our parent is alive): kept
    live.mkdir()
    run_export(ExportRequest(adapter=trained_adapter("lora") / "adapter", out=out))
    assert (out / "model.safetensors").is_file()
    assert partials(out) == [live.name]


def test_an_out_that_cannot_be_written_is_refused_before_any_model_loads(
    trained_adapter, tmp_path: Path, no_model_load
) -> None:
    adapter = trained_adapter("lora") / "adapter"
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(ExportError, match=r"a-file is a file, not a directory"):
        run_export(ExportRequest(adapter=adapter, out=tmp_path / "a-file" / "merged"))
    with pytest.raises(ExportError, match=r"cannot write in /proc .*choose a directory you can write to"):
        run_export(ExportRequest(adapter=adapter, out=Path("/proc/lora-workbench-export")))


def test_a_truncated_adapter_file_is_named_before_any_model_loads(trained_adapter, tmp_path: Path) -> None:
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter("lora") / "adapter", adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy that stopped half way
    with pytest.raises(AdapterError) as err:
        read_adapter(adapter)
    assert str(weights) in str(err.value) and "truncated or corrupt" in str(err.value)
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_quant_is_for_gguf_only_and_any_case_is_taken(
    trained_adapter, tmp_path: Path, capsys: pytest.CaptureFixture, no_model_load
) -> None:
    argv = ["export", "--adapter", str(trained_adapter("lora") / "adapter"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--quant", "q4_k_m"]) == 1  # --format safetensors by default: the quant would be ignored
    assert "--quant q4_k_m: only for --format gguf (this is safetensors)" in capsys.readouterr().err
    assert cli_quant(Namespace(quant="Q4_K_M", format="gguf")) == "q4_k_m"  # as llama.cpp's docs spell it
    assert cli_quant(Namespace(quant=None, format="gguf")) == "q8_0"
    assert not (tmp_path / "out").exists()


def test_a_gguf_of_a_tiny_model_adapter_is_refused_before_any_model_loads(
    trained_adapter, tmp_path: Path, no_model_load
) -> None:
    """llama.cpp's converter does not know the tiny model's test tokenizer: said up front, not after the merge."""
    from trainer.model.builtin_models import cache_root
    from trainer.model.tiny_model import ensure_tiny_model

    out, run_dir = tmp_path / "gguf", trained_adapter("lora")
    base = str(ensure_tiny_model(cache_root(run_dir / "runs")))  # the cached builtin:tiny (same seed, same weights)
    with pytest.raises(ExportError) as err:
        run_export(ExportRequest(adapter=run_dir / "adapter", out=out, base=base, format="gguf", quant="q8_0"))
    assert "llama.cpp's converter does not know" in str(err.value) and "--format safetensors works" in str(err.value)
    assert not out.exists()


def test_ctrl_c_during_an_export_says_stopped_without_a_traceback(
    trained_adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Ctrl-C (SIGINT to the process group) unwinds like the page's Stop: temp dir gone, status stopped, exit 130."""
    real_save = export_module.save_model

    def save_then_sigint(model, tokenizer, tmp, max_shard_size):
        real_save(model, tokenizer, tmp, max_shard_size)
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("SIGINT did not stop the export")

    monkeypatch.setattr(export_module, "save_model", save_then_sigint)
    out, status_dir = tmp_path / "merged", tmp_path / "job"
    argv = ["export", "--adapter", str(trained_adapter("lora") / "adapter"), "--out", str(out)]
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (xdist workers ignore it)
    try:
        assert main([*argv, "--status-dir", str(status_dir)]) == 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGINT, before)
    assert not out.exists() and partials(out) == []
    status = read_status(status_dir)
    assert status["state"] == "stopped" and status["exit_code"] == 130 and "SIGINT" in status["error"]
    err = capsys.readouterr().err
    assert "export stopped" in err and "Traceback" not in err and "KeyboardInterrupt" not in err


def test_an_adapter_config_whose_rank_is_not_its_weights_is_refused_before_any_model_loads(
    trained_adapter, tmp_path: Path, no_model_load
) -> None:
    """An edited adapter_config.json (r 8 on rank-4 weights) made PEFT fail after the base loaded, with a
    420-line state_dict error: now it is one message that names the file and the layers."""
    import json
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter("lora") / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = config["r"] * 2
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"adapter_config.json does not match its weights") as err:
        run_export(ExportRequest(adapter=adapter, out=tmp_path / "out"))
    assert f"says rank {config['r']}, its weights have rank {config['r'] // 2}" in str(err.value)
    config["rank_pattern"] = {"q_proj": config["r"] // 2}  # a rank_pattern entry is the rank of its layers
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError) as err:
        run_export(ExportRequest(adapter=adapter, out=tmp_path / "out"))
    assert "q_proj" not in str(err.value).split("weights (")[1] and "k_proj" in str(err.value)


def test_a_config_yaml_beside_an_adapter_outside_a_run_dir_is_not_its_run_config(
    trained_adapter, tmp_path: Path
) -> None:
    """A PEFT adapter copied into a project that has its own config.yaml: that file is not the adapter's run."""
    import shutil

    adapter = tmp_path / "project" / "adapter"
    shutil.copytree(trained_adapter("lora") / "adapter", adapter)
    (adapter / "workbench_config.yaml").unlink()
    (adapter.parent / "config.yaml").write_text("server: {port: 8080}\n")
    source = read_adapter(adapter)
    assert source.cfg is None and source.base  # the base comes from adapter_config.json
    (adapter.parent / "status.json").write_text('{"state": "completed"}')  # now it is a run dir: its config counts
    with pytest.raises(AdapterError, match=r"its run config is invalid"):
        read_adapter(adapter)
