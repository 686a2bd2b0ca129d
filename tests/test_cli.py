"""The command line: make-tiny-model, estimate, evaluate (the synthetic task's base vs adapter score)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, only_run
from trainer.cli import main
from trainer.run.train import run_training


def test_make_tiny_model_is_loadable_and_refuses_to_overwrite(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "make-tiny-model", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 1_000_000
    assert model.config.model_type == "llama"
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    again = subprocess.run(
        [sys.executable, "-m", "trainer", "make-tiny-model", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert again.returncode != 0 and "not empty" in again.stderr


def test_estimate_prints_trainable_params(make_config, capsys) -> None:
    assert main(["estimate", str(make_config())]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters: " in out and "adapter size: " in out


def test_evaluate_scores_base_and_adapter(make_config, capsys) -> None:
    cfg = make_config(
        {
            "data": {"eval_source": str(ROOT / "data/sentiment_heldout.jsonl")},
            "training": {"max_steps": 30, "save_steps": 100, "eval_steps": 30},
        }
    )
    assert run_training(str(cfg)) == 0
    run = only_run(cfg.parent / "runs")
    assert main(["evaluate", str(run), "--limit", "8"]) == 0
    result = json.loads((run / "eval_results.json").read_text())
    assert result["rows"] == 8 and result["base"]["exact_match"] == 0.0
    assert result["adapter"]["loss"] < result["base"]["loss"]
    assert "exact match" in capsys.readouterr().out


def test_evaluate_without_adapter_is_a_clear_error(tmp_path: Path, capsys) -> None:
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model_preset: tiny\n")
    assert main(["evaluate", str(run), "--data", str(ROOT / "data/sentiment_heldout.jsonl")]) == 1
    assert "no saved adapter" in capsys.readouterr().err


def test_train_takes_section_field_overrides_and_records_them(make_config, tmp_path: Path, capsys) -> None:
    """DESIGN's `train CONFIG.yaml [section.field=value ...]`: the run trains and records the changed fields."""
    import yaml

    cfg = make_config({"training": {"max_steps": 6}})
    assert main(["train", str(cfg), "training.max_steps=2", "adapter.target_modules=[q_proj, v_proj]"]) == 0
    run = only_run(tmp_path / "runs")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["training"]["max_steps"] == 2 and saved["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert max(steps) == 2
    assert yaml.safe_load(cfg.read_text())["training"]["max_steps"] == 6  # the user's file is left as it was


def test_bad_overrides_name_themselves_before_anything_loads(make_config, tmp_path: Path, capsys) -> None:
    cfg = make_config()
    assert main(["train", str(cfg), "training.max_stepz=2", "max_steps", "data.max_length=[1"]) == 1
    err = capsys.readouterr().err
    assert "override 'max_steps': expected section.field=value" in err
    assert "override 'data.max_length=[1': the value is not valid YAML" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert main(["train", str(cfg), "training.max_stepz=2"]) == 1
    assert "training.max_stepz" in capsys.readouterr().err  # pydantic's unknown-key problem names the field
