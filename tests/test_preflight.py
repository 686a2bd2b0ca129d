"""Pre-flight: a few real steps on the data's longest rows; after an out-of-memory, a proposed change is confirmed."""

from __future__ import annotations

from pathlib import Path

from trainer.cli import main
from trainer.config.presets import load_config
from trainer.plan.preflight import Trial, longest_examples, preflight, short_config


def test_preflight_measures_the_longest_rows_and_reports_an_eta(make_config, tmp_path: Path):
    cfg = load_config(make_config({"training": {"max_steps": 40}}))
    examples, longest, rows = longest_examples(cfg)
    assert rows == 64 and len(examples) == 64  # max_samples 64 of the bundled data, none dropped
    report = preflight(cfg, steps=3)
    (trial,) = report.trials
    assert trial.ok and trial.change is None and trial.memory_kind == "cpu"
    assert trial.peak_gb > 0 and trial.tokens_per_second > 0 and trial.step_seconds > 0
    assert report.longest_tokens == longest and report.full_steps == 40
    assert report.eta_seconds == trial.step_seconds * 40
    assert "ETA of the full run" in "\n".join(report.lines())
    assert list((tmp_path / "runs" / ".preflight").iterdir()) == []  # the short runs are cleaned up
    assert not [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]  # and are not runs


def test_short_config_keeps_the_run_settings_but_saves_nothing(make_config, tmp_path: Path):
    cfg = load_config(make_config({"adapter": {"r": 8}, "data": {"val_size": 0.1}}))
    short = short_config(cfg, tmp_path / "longest.jsonl", tmp_path / "pf", steps=4)
    assert short.adapter == cfg.adapter and short.quantization == cfg.quantization
    assert short.training.per_device_batch_size == cfg.training.per_device_batch_size
    assert short.training.max_steps == 4 and short.training.save_steps > 10**6
    assert short.data.source == str(tmp_path / "longest.jsonl") and short.data.val_size == 0
    assert short.data.max_length == cfg.data.max_length


def test_out_of_memory_leads_to_a_change_that_is_confirmed(make_config):
    """The short runs here stand in for a GPU that fits only one sequence per step."""
    cfg = load_config(make_config({"training": {"per_device_batch_size": 4, "gradient_checkpointing": True}}))
    seen = []

    def gpu_with_room_for_one_sequence(run_cfg, workdir) -> Trial:
        seen.append(run_cfg.training.per_device_batch_size)
        if run_cfg.training.per_device_batch_size > 1:
            return Trial(
                None, False, error="out of memory: CUDA out of memory. Tried to allocate 2.00 GiB", failure_kind="oom"
            )
        return Trial(None, True, peak_gb=7.5, tokens_per_second=900.0, step_seconds=0.5)

    report = preflight(cfg, steps=2, runner=gpu_with_room_for_one_sequence)
    assert report.trials[0].out_of_memory and report.final.ok
    assert seen[0] == 4 and seen[-1] == 1
    assert (
        "per_device_batch_size: 1" in report.final.change and "gradient_accumulation_steps: 4" in report.final.change
    )
    assert "the run fits with: training.per_device_batch_size: 1" in "\n".join(report.lines())


def test_preflight_command(make_config, capsys):
    assert main(["preflight", str(make_config()), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "longest rows:" in out and "as configured: ok" in out
