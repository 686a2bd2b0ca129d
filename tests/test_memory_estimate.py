"""The memory estimate's arithmetic on known architectures (config.json only, meta device), and its advice."""

from __future__ import annotations

import pytest

from trainer.cli import main
from trainer.config.presets import build_config
from trainer.model.model_configs import kept_config_dir, kept_names
from trainer.plan.estimate import estimate
from trainer.plan.memory import CUDA_CONTEXT_BYTES, GB, variants

# Llama-2-7B: 32 layers of q,k,v,o (4096x4096) and gate,up,down (4096x11008); 32000-token vocab, untied head.
L2_LINEAR = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
L2_OTHER = 2 * 32000 * 4096 + (2 * 32 + 1) * 4096  # embeddings + lm_head + RMSNorm weights
RTX_4090 = (24 * GB, "RTX 4090")


def cfg_for(model: str, recipe: str = "lora", **sections) -> object:
    user = {"recipe": recipe, "model": {"name_or_path": model}, "adapter": {"r": 16, "target_modules": "all-linear"}}
    for name, values in sections.items():
        user.setdefault(name, {}).update(values)
    return build_config(user)


def test_kept_configs_are_the_published_architectures():
    from transformers import AutoConfig, AutoModelForCausalLM

    published = {  # parameter counts as their model cards state them
        "qwen2.5-0.5b": 494_032_768,
        "qwen2.5-7b": 7_615_616_512,
        "llama-3.1-8b": 8_030_261_248,
        "llama-2-7b": 6_738_415_616,
    }
    import torch

    for name, count in published.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(kept_config_dir(name)))
        assert sum(p.numel() for p in model.parameters()) == count, name
    assert kept_config_dir("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b"
    assert {"qwen2.5-1.5b", "llama-3.1-8b"} <= set(kept_names())


def test_nf4_bytes_of_a_7b_model_with_and_without_double_quant():
    dq = estimate(cfg_for("meta-llama/Llama-2-7b-hf", "qlora", quantization={"double_quant": True}), RTX_4090)
    plain = estimate(cfg_for("meta-llama/Llama-2-7b-hf", "qlora", quantization={"double_quant": False}), RTX_4090)
    blocks = L2_LINEAR // 64
    # half a byte per quantized weight; unquantized params upcast to fp32 by prepare_model_for_kbit_training
    assert dq.memory.parts["base weights"] == L2_LINEAR // 2 + 4 * L2_OTHER
    assert plain.memory.parts["quant constants"] == 4 * blocks  # an fp32 absmax per 64 weights: 0.5 bit/param
    assert dq.memory.parts["quant constants"] == blocks + 4 * (blocks // 256)  # 8-bit + fp32 per 256 blocks
    saved_bits = 8 * (plain.memory.parts["quant constants"] - dq.memory.parts["quant constants"]) / L2_LINEAR
    assert saved_bits == pytest.approx(0.373, abs=0.001)  # the QLoRA paper's ~0.37 bit per parameter
    assert 3.0 * GB < dq.memory.parts["base weights"] - 4 * L2_OTHER < 3.1 * GB  # 6.5B weights in ~3 GB


def test_adapter_params_of_r16_all_linear_on_llama_7b_match_peft():
    est = estimate(cfg_for("meta-llama/Llama-2-7b-hf"), RTX_4090)
    per_layer = 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # r * (in + out) per targeted layer
    assert est.trainable_params == 32 * per_layer == 39_976_960  # counted by PEFT itself on the meta device
    mem = est.memory.parts
    assert mem["adapter weights"] == mem["adapter gradients"] == 4 * est.trainable_params  # fp32 adapters
    assert mem["optimizer states"] == 8 * est.trainable_params  # AdamW: two fp32 moments


def test_memory_knobs_move_the_parts_they_should():
    base = cfg_for("Qwen/Qwen2.5-0.5B", training={"gradient_checkpointing": False, "per_device_batch_size": 4})
    ckpt = cfg_for("Qwen/Qwen2.5-0.5B", training={"gradient_checkpointing": True, "per_device_batch_size": 4})
    eight = cfg_for("Qwen/Qwen2.5-0.5B", training={"optimizer": "paged_adamw_8bit", "per_device_batch_size": 4})
    longer = cfg_for("Qwen/Qwen2.5-0.5B", data={"max_length": 2048}, training={"per_device_batch_size": 4})
    e = {
        name: estimate(c, RTX_4090).memory.parts for name, c in [("b", base), ("c", ckpt), ("8", eight), ("l", longer)]
    }
    assert e["c"]["activations"] < e["b"]["activations"] / 5
    assert e["8"]["optimizer states"] * 4 == e["b"]["optimizer states"]
    assert e["l"]["logits + loss"] == 2 * e["b"]["logits + loss"]  # max_length 1024 -> 2048
    assert e["b"]["logits + loss"] == 4 * 1024 * 151936 * (2 + 4 + 4)  # bf16 logits + fp32 log-softmax + its grad


def test_a_run_that_does_not_fit_gets_a_change_that_fits():
    cfg = cfg_for("Qwen/Qwen2.5-7B-Instruct", data={"max_length": 2048}, training={"per_device_batch_size": 8})
    est = estimate(cfg, RTX_4090).memory
    assert est.fits is False and est.suggestions
    assert est.needed_bytes == int(est.peak_bytes * 1.1) + CUDA_CONTEXT_BYTES
    # the advice is one of the variants, and that variant fits
    fixes = {text: c for text, c in variants(cfg)}
    chosen = est.suggestions[0].split(" -> ")[0]
    if chosen in fixes:
        assert estimate(fixes[chosen], RTX_4090).memory.fits
    else:
        assert est.suggestions[-1].startswith("together")
    small = estimate(cfg_for("Qwen/Qwen2.5-0.5B-Instruct", "qlora"), RTX_4090).memory
    assert small.fits and small.suggestions == []


def test_hopeless_runs_say_so():
    cfg = cfg_for("meta-llama/Llama-3.1-8B", data={"max_length": 4096}, training={"per_device_batch_size": 16})
    est = estimate(cfg, (4 * GB, "tiny GPU")).memory
    assert est.fits is False and "use a smaller model" in est.suggestions[-1]


def test_estimate_command_checks_a_named_gpu_size(make_config, capsys):
    assert main(["estimate", str(make_config()), "--gpu-memory", "8"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak GPU memory" in out and "fits on a 8 GB GPU" in out


def test_every_run_records_its_prediction(make_config, tmp_path):
    from app.views.runs_index import summarize
    from tests.conftest import only_run
    from trainer.run.train import run_training
    from trainer.run_dir import read_metrics

    assert run_training(str(make_config({"training": {"max_steps": 2}}))) == 0
    run = only_run(tmp_path / "runs")
    (event,) = [m for m in read_metrics(run / "metrics.jsonl") if m.get("event") == "memory_estimate"]
    assert event["predicted_peak_gb"] > 0 and sum(event["parts"].values()) > 0
    assert summarize(run).predicted_gb == event["predicted_peak_gb"]  # the Runs tab's column


def test_auto_checkpointing_is_off_where_the_run_fits_without_it():
    h100 = (80 * GB, "H100")
    small = estimate(cfg_for("Qwen/Qwen2.5-0.5B-Instruct", data={"max_length": 512}), h100).memory
    assert small.checkpointing is False and small.checkpointing_note.startswith("off: needs")

    def qwen_7b(checkpointing: object) -> object:  # batch 4 x 2048 tokens
        training = {"per_device_batch_size": 4, "gradient_checkpointing": checkpointing}
        return cfg_for("Qwen/Qwen2.5-7B-Instruct", data={"max_length": 2048}, training=training)

    big_cfg = qwen_7b("auto")
    big = estimate(big_cfg, h100).memory
    assert big.checkpointing is True and big.checkpointing_note.startswith("on: needs")
    # the 'on' prediction is the explicit-true one, and the 'off' one would have needed more than 85% of the GPU
    explicit = estimate(qwen_7b(True), h100)
    assert explicit.memory.parts == big.parts and explicit.memory.checkpointing_note == ""
    off = estimate(qwen_7b(False), h100)
    assert off.memory.needed_bytes > 0.85 * h100[0] and off.memory.checkpointing is False
    # no GPU: nothing to fit, so the faster setting
    assert estimate(big_cfg, (None, None)).memory.checkpointing is False
    # a pre-flight that ran out of memory under 'auto' tries checkpointing on first
    assert variants(cfg_for("Qwen/Qwen2.5-0.5B-Instruct"))[0][0].startswith("training.gradient_checkpointing: true")


def test_a_run_decides_auto_checkpointing_and_says_why(make_config, tmp_path):
    from tests.conftest import only_run
    from trainer.run.train import run_training
    from trainer.run_dir import read_metrics

    cfg = make_config({"training": {"max_steps": 1, "gradient_checkpointing": "auto"}})
    assert run_training(str(cfg)) == 0
    run = only_run(tmp_path / "runs")
    (event,) = [m for m in read_metrics(run / "metrics.jsonl") if m.get("event") == "gradient_checkpointing"]
    assert event["enabled"] is False and "CPU" in event["reason"]
    assert "gradient_checkpointing: auto" in (run / "config.yaml").read_text()  # the user's choice is kept
