"""`lora-workbench estimate CONFIG.yaml`: exact trainable parameters and adapter size, without loading weights.

The model is built from its config.json on PyTorch's meta device (no memory, no weights) and wrapped with
the run's real PEFT config, so the count is PEFT's own. Peak-memory prediction will extend this module.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import asdict, dataclass

import yaml

from trainer.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Estimate:
    trainable_params: int
    total_params: int
    trainable_percent: float
    adapter_mb: float
    adapter_dtype: str

    def lines(self) -> list[str]:
        return [
            f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} "
            f"({self.trainable_percent:.4f}%)",
            f"adapter size: {self.adapter_mb:.2f} MB ({self.adapter_dtype})",
        ]


def load_model_config(cfg: RunConfig):
    from transformers import AutoConfig

    from trainer.models import model_path

    path = model_path(cfg)
    try:
        return AutoConfig.from_pretrained(
            path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ConfigError([f"model.name_or_path: cannot read the config.json of {path!r} ({e})"]) from None


def counting_config(cfg: RunConfig) -> RunConfig:
    """Same shapes, but an init that works on the meta device (PiSSA's SVD and LoftQ need real weights)."""
    if cfg.adapter.method in ("pissa", "loftq"):
        return cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"method": "lora"})})
    return cfg


def estimate(cfg: RunConfig) -> Estimate:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.adapters import to_peft_config
    from trainer.models import count_parameters

    model_config = load_model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=cfg.model.trust_remote_code)
        steps = max(cfg.adapter.tinit + cfg.adapter.tfinal + 1, 1000)  # AdaLoRA's schedule does not change shapes
        peft_model = get_peft_model(model, to_peft_config(counting_config(cfg), steps))
    trainable, total = count_parameters(peft_model)
    # TRL stores QLoRA adapters in bf16 (the paper's recipe); otherwise PEFT keeps them in fp32.
    dtype, nbytes = ("bfloat16", 2) if cfg.quantization.mode != "none" else ("float32", 4)
    return Estimate(trainable, total, round(100 * trainable / total, 4), round(trainable * nbytes / 2**20, 3), dtype)


def estimate_command(config_path: str) -> int:
    from trainer.presets import load_config

    try:
        result = estimate(load_config(config_path))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 1
    print("\n".join(result.lines()))
    print(asdict(result))
    return 0


@functools.lru_cache(maxsize=64)
def _estimate_of_yaml(config_yaml: str) -> Estimate:
    from trainer.config import validate_config

    return estimate(validate_config(yaml.safe_load(config_yaml)))


def estimate_cached(cfg: RunConfig) -> Estimate:
    """estimate(), remembered per distinct config: the Train tab asks again on every edit."""
    return _estimate_of_yaml(cfg.to_yaml())
