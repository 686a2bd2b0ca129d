"""RunConfig validation, presets and YAML round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.config.presets import build_config, list_presets, load_config
from trainer.config.run_config import ConfigError, RunConfig, resolved_target_modules
from trainer.model.device import cpu_bf16_flags, cpu_precision, hardware_problems, plan

ROOT = Path(__file__).resolve().parent.parent


def problems_of(user: dict) -> str:
    with pytest.raises(ConfigError) as e:
        build_config(user)
    return str(e.value)


@pytest.mark.parametrize("recipe", list_presets("recipes"))
@pytest.mark.parametrize("model", list_presets("models"))
def test_every_recipe_layers_with_every_model_preset(recipe: str, model: str) -> None:
    cfg = build_config({"recipe": recipe, "model_preset": model})
    assert cfg.adapter.method in ("lora", "dora", "rslora", "pissa", "adalora", "loftq")
    assert isinstance(resolved_target_modules(cfg), list)


def test_presets_carry_the_expected_targets() -> None:
    qwen = build_config({"model_preset": "qwen2"})
    assert resolved_target_modules(qwen) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    phi = build_config({"model_preset": "phi3", "adapter": {"target_modules": "attention"}})
    assert resolved_target_modules(phi) == ["qkv_proj", "o_proj"]
    qlora = build_config({"recipe": "qlora"})
    assert (qlora.quantization.mode, qlora.quantization.quant_type, qlora.quantization.double_quant) == (
        "4bit",
        "nf4",
        True,
    )
    assert qlora.training.optimizer.startswith("paged_")
    for recipe in list_presets("recipes"):
        a = build_config({"recipe": recipe}).adapter
        assert 8 <= (a.init_r if a.method == "adalora" else a.r) <= 16


def test_user_edits_win_over_model_preset_over_recipe() -> None:
    cfg = build_config(
        {"recipe": "qlora", "model_preset": "llama", "adapter": {"r": 64}, "quantization": {"mode": "8bit"}}
    )
    assert cfg.adapter.r == 64 and cfg.quantization.mode == "8bit"
    assert cfg.model.name_or_path.startswith("meta-llama/")


@pytest.mark.parametrize(
    "path", sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "presets").rglob("*.yaml"))
)
def test_every_shipped_yaml_loads(path: Path) -> None:
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), f"{path} should open with a comment saying how to run it"
    if "examples" in path.parts:
        load_config(path)


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = build_config({"recipe": "adalora", "model_preset": "gemma", "data": {"columns": {"q": "instruction"}}})
    again = RunConfig.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ({"adapter": {"r": 0}}, "adapter.r: Input should be greater than or equal to 1 (got 0)"),
        ({"adapter": {"lora_dropout": 1.0}}, "adapter.lora_dropout: Input should be less than 1"),
        (
            {"adapter": {"method": "qlora"}},
            "adapter.method: Input should be 'lora', 'dora', 'rslora', 'pissa', 'adalora' or 'loftq'",
        ),
        ({"adapter": {"rank": 8}}, "adapter.rank: unknown key (allowed: method, r, lora_alpha"),
        ({"quantization": {"mode": "3bit"}}, "quantization.mode: Input should be 'none', '8bit' or '4bit'"),
        ({"training": {"optimizer": "adam"}}, "training.optimizer: Input should be"),
        (
            {"model": {"dtype": "bfloat16"}, "training": {"precision": "fp16"}},
            "training.precision: fp16 mixed precision with bfloat16",
        ),
        ({"recipe": "adalora", "training": {"packing": True}}, "training.packing: AdaLoRA needs its total step count"),
        (
            {"recipe": "adalora", "adapter": {"init_r": 4, "target_r": 8}},
            "adapter.target_r: must be <= adapter.init_r (4)",
        ),
        ({"recipe": "pissa", "quantization": {"mode": "4bit"}}, "quantization.mode: pissa initialises the adapter"),
        ({"output": {"run_name": "../../etc"}}, "output.run_name: '../../etc' may hold only letters"),
        ({"adapter": {"target_modules": "attention"}}, "adapter.target_modules: 'attention' is not a module group"),
        ({"adapter": {"target_modules": "(unclosed"}}, "adapter.target_modules: '(unclosed' is not a valid regex"),
        ({"data": {"val_size": 0.1, "eval_source": "x.jsonl"}}, "data.val_size: set either val_size or eval_source"),
        ({"recipe": "nope"}, "recipe: unknown preset 'nope' (available: adalora"),
        ({"adapter": {"bias": "some"}}, "adapter.bias: Input should be 'none', 'all' or 'lora_only'"),
        ({"recipe": "../models/tiny"}, "recipe: unknown preset '../models/tiny'"),
        ({"training": {"num_epochs": float("inf")}}, "training.num_epochs: Input should be a finite number"),
        ({"adapter": {"target_modules": ""}}, "adapter.target_modules: empty"),
    ],
)
def test_validation_messages_name_field_and_rule(user: dict, expected: str) -> None:
    assert expected in problems_of(user)


def test_all_problems_reported_together() -> None:
    msg = problems_of({"adapter": {"r": 0, "lora_dropout": 2}, "training": {"learning_rate": -1}})
    assert "adapter.r" in msg and "adapter.lora_dropout" in msg and "training.learning_rate" in msg


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("adapter:\n  r: 8\n  lora_alpha: [16\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*\n.*line \d+, column \d+: not valid YAML"):
        load_config(path)


def test_hardware_problems_on_a_cpu_machine() -> None:
    loftq = build_config({"recipe": "loftq"})
    assert any("loftq needs a CUDA GPU" in p for p in hardware_problems(loftq, cuda=False, gpu_count=0, bf16_ok=False))
    bf16 = build_config({"training": {"precision": "bf16"}})
    assert any(
        "bf16 on this CPU would be emulated" in p for p in hardware_problems(bf16, False, 0, False, cpu_flags=[])
    )
    assert hardware_problems(bf16, False, 0, False, cpu_flags=["avx512_bf16"]) == []
    fp16 = build_config({"training": {"precision": "fp16"}})
    assert any("training.precision: fp16 needs a GPU" in p for p in hardware_problems(fp16, False, 0, False))
    fa = build_config({"model": {"attn_implementation": "flash_attention_2"}})
    assert hardware_problems(fa, False, 0, False)
    assert hardware_problems(build_config({}), False, 0, False) == []


def test_device_plan_picks_precision() -> None:
    cfg = build_config({"recipe": "qlora"})
    cpu = plan(cfg, cuda=False, bf16_ok=False)
    assert (cpu.precision, cpu.model_dtype, cpu.compute_dtype) == ("fp32", "float32", "float32")
    assert cpu.trainer_flags == {"use_cpu": True, "bf16": False, "fp16": False}
    gpu = plan(cfg, cuda=True, bf16_ok=True)
    assert (gpu.precision, gpu.compute_dtype) == ("bf16", "bfloat16")
    assert plan(cfg, cuda=True, bf16_ok=False).precision == "fp16"
    cpu_bf16 = plan(cfg, cuda=False, bf16_ok=False, cpu_bf16=True)  # the CPU's mixed precision, as on a GPU
    assert (cpu_bf16.precision, cpu_bf16.model_dtype, cpu_bf16.compute_dtype) == ("bf16", "bfloat16", "bfloat16")
    assert cpu_bf16.trainer_flags == {"use_cpu": True, "bf16": True, "fp16": False}
    pinned = build_config({"training": {"precision": "fp32"}})
    assert plan(pinned, cuda=False, bf16_ok=False, cpu_bf16=True).precision == "fp32"


def test_cpu_precision_takes_bf16_only_where_it_pays(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_bf16_flags(cpuinfo) == ["avx512_bf16"]
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert cpu_bf16_flags(cpuinfo) == []
    assert cpu_bf16_flags(tmp_path / "absent") == []
    wide, why = cpu_precision(576, ["avx512_bf16"])
    assert wide and "avx512_bf16" in why and "576" in why
    narrow, why = cpu_precision(64, ["amx_bf16"])
    assert not narrow and "measured slower" in why and "benchmarks/cpu_bf16.py" in why
    emulated, why = cpu_precision(4096, [])
    assert not emulated and "no native bf16" in why
