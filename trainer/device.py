"""One place that decides the device, the precisions and what this machine cannot do."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import RunConfig


@dataclass(frozen=True)
class DevicePlan:
    cuda: bool
    precision: str  # bf16 | fp16 | fp32 (mixed precision of the Trainer)
    model_dtype: str  # torch dtype name of the base weights
    compute_dtype: str  # 4-bit matmul dtype

    @property
    def trainer_flags(self) -> dict[str, bool]:
        """TrainingArguments flags. TRL defaults bf16=True, which raises on a CPU-only machine."""
        return {"use_cpu": not self.cuda, "bf16": self.precision == "bf16", "fp16": self.precision == "fp16"}


def detect() -> tuple[bool, int, bool]:
    """(cuda available, gpu count, bf16 supported)."""
    import torch

    cuda = torch.cuda.is_available()
    return cuda, torch.cuda.device_count() if cuda else 0, cuda and torch.cuda.is_bf16_supported()


def hardware_problems(cfg: RunConfig, cuda: bool, gpu_count: int, bf16_ok: bool) -> list[str]:
    """What this machine cannot run of the config; each line names the field and the fix."""
    problems = []
    if cfg.adapter.method == "loftq" and not cuda:
        problems.append("adapter.method: loftq needs a CUDA GPU (PEFT's LoftQ init runs there); use lora or qlora")
    if not cuda and cfg.training.precision in ("bf16", "fp16"):
        problems.append(f"training.precision: {cfg.training.precision} needs a GPU; use auto or fp32 on a CPU")
    if cuda and cfg.training.precision == "bf16" and not bf16_ok:
        problems.append("training.precision: this GPU has no bf16 support; use fp16 or auto")
    if not cuda and cfg.model.attn_implementation.startswith("flash_attention"):
        problems.append("model.attn_implementation: flash attention needs a GPU; use sdpa")
    if cfg.hardware.num_gpus > max(gpu_count, 1):
        problems.append(f"hardware.num_gpus: {cfg.hardware.num_gpus} asked, {gpu_count} present")
    return problems


def plan(cfg: RunConfig, cuda: bool, bf16_ok: bool) -> DevicePlan:
    precision = cfg.training.precision
    if precision == "auto":
        precision = ("bf16" if bf16_ok else "fp16") if cuda else "fp32"
    half = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    model_dtype = cfg.model.dtype if cfg.model.dtype != "auto" else half
    compute = cfg.quantization.compute_dtype if cfg.quantization.compute_dtype != "auto" else half
    return DevicePlan(cuda, precision, model_dtype, compute)
