"""One place that decides the device, the precisions and what this machine cannot do."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from trainer.config import RunConfig

# attn_implementation -> (module transformers imports, how to install it)
FLASH_PACKAGES = {
    "flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "flash_attention_3": ("flash_attn_interface", "FlashAttention-3 built from flash-attention's hopper/ folder"),
}


@dataclass(frozen=True)
class DevicePlan:
    cuda: bool
    precision: str  # bf16 | fp16 | fp32 (mixed precision of the Trainer)
    model_dtype: str  # torch dtype name of the base weights
    compute_dtype: str  # 4-bit matmul dtype
    tf32: bool | None = None  # None: leave PyTorch's setting alone (TrainingArguments raises on tf32=True off Ampere)
    attn: str = "sdpa"  # attn_implementation with 'auto' decided

    @property
    def trainer_flags(self) -> dict[str, bool]:
        """TrainingArguments flags. TRL defaults bf16=True, which raises on a CPU-only machine."""
        flags = {"use_cpu": not self.cuda, "bf16": self.precision == "bf16", "fp16": self.precision == "fp16"}
        return flags if self.tf32 is None else {**flags, "tf32": self.tf32}


def detect() -> tuple[bool, int, bool]:
    """(cuda available, gpu count, bf16 supported)."""
    import torch

    cuda = torch.cuda.is_available()
    return cuda, torch.cuda.device_count() if cuda else 0, cuda and torch.cuda.is_bf16_supported()


def tf32_supported() -> bool:
    """An Ampere or newer NVIDIA GPU (the check TrainingArguments applies to tf32=True)."""
    from transformers.utils import is_torch_tf32_available

    return is_torch_tf32_available()


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def hardware_problems(cfg: RunConfig, cuda: bool, gpu_count: int, bf16_ok: bool, tf32_ok: bool = False) -> list[str]:
    """What this machine cannot run of the config; each line names the field and the fix."""
    problems = []
    if cfg.adapter.method == "loftq" and not cuda:
        problems.append("adapter.method: loftq needs a CUDA GPU (PEFT's LoftQ init runs there); use lora or qlora")
    if not cuda and cfg.training.precision in ("bf16", "fp16"):
        problems.append(f"training.precision: {cfg.training.precision} needs a GPU; use auto or fp32 on a CPU")
    if cuda and cfg.training.precision == "bf16" and not bf16_ok:
        problems.append("training.precision: this GPU has no bf16 support; use fp16 or auto")
    return problems + process_problems(cfg, cuda, gpu_count) + speed_problems(cfg, cuda, tf32_ok)


def process_problems(cfg: RunConfig, cuda: bool, gpu_count: int) -> list[str]:
    """GPUs and processes the config asks for that this machine cannot give (checked before any launch)."""
    from trainer.launch import strategy_problems

    n, problems = cfg.hardware.num_gpus, []
    if n > 1 and not cuda:
        problems.append(
            f"hardware.num_gpus: {n} asked, this machine has no CUDA GPU; set num_gpus: 1 "
            "(to try the multi-process path on a CPU, set hardware.cpu_processes: 2 instead)"
        )
    elif n > max(gpu_count, 1):
        problems.append(
            f"hardware.num_gpus: {n} asked, this machine has {gpu_count} CUDA GPU(s) visible; set num_gpus to at "
            f"most {gpu_count} (or check CUDA_VISIBLE_DEVICES)"
        )
    return problems + strategy_problems(cfg, cuda)


def speed_problems(cfg: RunConfig, cuda: bool, tf32_ok: bool) -> list[str]:
    """Speed options this machine cannot run: GPU-only kernels and their optional packages."""
    t, attn = cfg.training, cfg.model.attn_implementation
    problems = []
    if attn in FLASH_PACKAGES and not cuda:
        problems.append(f"model.attn_implementation: {attn} needs a CUDA GPU; use sdpa on a CPU")
    elif attn in FLASH_PACKAGES and not installed(FLASH_PACKAGES[attn][0]):
        module, how = FLASH_PACKAGES[attn]
        problems.append(f"model.attn_implementation: {attn} needs the {module} package ({how}); or use sdpa")
    if t.use_liger_kernel and not cuda:
        problems.append(
            "training.use_liger_kernel: Liger's kernels are Triton GPU kernels and need a CUDA GPU; "
            "set use_liger_kernel: false on a CPU"
        )
    elif t.use_liger_kernel and not installed("liger_kernel"):
        problems.append(
            "training.use_liger_kernel: the liger-kernel package is not installed; run `pip install liger-kernel` "
            "or set use_liger_kernel: false"
        )
    if t.tf32 is True and not tf32_ok:
        where = "this GPU is older than Ampere" if cuda else "a CPU has no TF32"
        problems.append(f"training.tf32: true needs an Ampere or newer NVIDIA GPU ({where}); use auto or false")
    return problems


def plan(cfg: RunConfig, cuda: bool, bf16_ok: bool, tf32_ok: bool = False) -> DevicePlan:
    precision = cfg.training.precision
    if precision == "auto":
        precision = ("bf16" if bf16_ok else "fp16") if cuda else "fp32"
    half = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    model_dtype = cfg.model.dtype if cfg.model.dtype != "auto" else half
    compute = cfg.quantization.compute_dtype if cfg.quantization.compute_dtype != "auto" else half
    tf32 = (True if tf32_ok else None) if cfg.training.tf32 == "auto" else cfg.training.tf32
    return DevicePlan(cuda, precision, model_dtype, compute, tf32, attention(cfg, cuda, model_dtype))


def attention(cfg: RunConfig, cuda: bool, model_dtype: str) -> str:
    """attn_implementation 'auto': FlashAttention-2 where it runs (CUDA, the package, a 16-bit model), else sdpa."""
    attn = cfg.model.attn_implementation
    if attn != "auto":
        return attn
    if cuda and model_dtype in ("bfloat16", "float16") and installed(FLASH_PACKAGES["flash_attention_2"][0]):
        return "flash_attention_2"
    return "sdpa"


def packing(cfg: RunConfig, plan: DevicePlan) -> tuple[bool, str]:
    """training.packing, with 'auto' decided for this machine, and why."""
    if cfg.training.packing != "auto":
        return cfg.training.packing, "set in the config"
    if cfg.adapter.method == "adalora":
        return False, "off: AdaLoRA needs its step count before training, which packing changes"
    if plan.attn.startswith("flash_attention"):
        return True, f"on: {plan.attn}'s variable-length kernels keep packed rows apart at no extra cost"
    return False, f"off: under {plan.attn} a packed batch is one long row with a block mask, measured slower"
