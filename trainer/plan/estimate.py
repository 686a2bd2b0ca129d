"""`lora-workbench estimate CONFIG.yaml`: exact trainable parameters and adapter size, without loading weights.

The model is built from its config.json on PyTorch's meta device (no memory, no weights) and wrapped with
the run's real PEFT config, so the count is PEFT's own. Peak-memory prediction will extend this module.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import yaml

from trainer.config.run_config import ConfigError, RunConfig
from trainer.model.checks import adapter_layer_names, layer_problems, length_problem, load_model_config
from trainer.model.model_configs import refuse_remote_code
from trainer.plan.memory import MemoryEstimate, detect_gpu, memory_estimate, shapes_of


@dataclass(frozen=True)
class Estimate:
    trainable_params: int
    total_params: int
    trainable_percent: float
    adapter_mb: float
    adapter_dtype: str
    memory: MemoryEstimate | None = None

    def lines(self) -> list[str]:
        out = [
            f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} "
            f"({self.trainable_percent:.4f}%)",
            f"adapter size: {self.adapter_mb:.2f} MB ({self.adapter_dtype})",
        ]
        return out + (self.memory.lines() if self.memory else [])


def counting_config(cfg: RunConfig) -> RunConfig:
    """Same shapes, but an init that works on the meta device (PiSSA's SVD and LoftQ need real weights)."""
    if cfg.adapter.method in ("pissa", "loftq"):
        return cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"method": "lora"})})
    return cfg


def estimate(cfg: RunConfig, gpu: tuple[int | None, str | None] | None = None) -> Estimate:
    """Parameter counts (PEFT's own, on the meta device) and the predicted peak memory, checked against gpu
    ((total bytes, name); default: the GPU of this machine, if any)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.model.load import count_parameters
    from trainer.model.peft_config import to_peft_config

    model_config = load_model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=cfg.model.trust_remote_code)
        problems = [p for p in [length_problem(cfg, model_config)] if p]
        problems += layer_problems(cfg, adapter_layer_names(model))  # PEFT would raise or silently skip them
        if problems:
            raise ConfigError(problems)
        shapes = shapes_of(model, model_config, cfg)
        steps = max(cfg.adapter.tinit + cfg.adapter.tfinal + 1, 1000)  # AdaLoRA's schedule does not change shapes
        peft_model = get_peft_model(model, to_peft_config(counting_config(cfg), steps))
    trainable, total = count_parameters(peft_model)
    # TRL stores QLoRA adapters in bf16 (the paper's recipe); otherwise PEFT keeps them in fp32.
    dtype, nbytes = ("bfloat16", 2) if cfg.quantization.mode != "none" else ("float32", 4)
    gpu_total, gpu_name = gpu if gpu is not None else detect_gpu()
    memory = memory_estimate(cfg, shapes, trainable, nbytes, gpu_total, gpu_name)
    return Estimate(
        trainable, total, round(100 * trainable / total, 4), round(trainable * nbytes / 2**20, 3), dtype, memory
    )


def estimate_command(config_path: str, gpu_memory_gb: float | None = None) -> int:
    from trainer.config.presets import load_config
    from trainer.model.load import quiet_unused_kernels

    gpu = (int(gpu_memory_gb * 2**30), f"a {gpu_memory_gb:g} GB GPU") if gpu_memory_gb else None
    try:
        cfg = load_config(config_path)
        quiet_unused_kernels(cfg.quantization.mode != "none")  # before the estimate imports peft
        result = estimate(cfg, gpu)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 1
    print("\n".join(result.lines()))
    return 0


@functools.lru_cache(maxsize=64)
def _estimate_of_yaml(config_yaml: str) -> Estimate:
    from trainer.config.run_config import validate_config

    return estimate(validate_config(yaml.safe_load(config_yaml)))


def estimate_cached(cfg: RunConfig) -> Estimate:
    """estimate(), remembered per distinct config: the Train tab asks again on every edit. It runs in the UI
    server, so a model that needs its own code is refused (RemoteCodeRefused) rather than built here."""
    refuse_remote_code(cfg.model.trust_remote_code, "the live estimate")
    return _estimate_of_yaml(cfg.to_yaml())
