"""One place that decides the device, the precisions and what this machine cannot do."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from trainer.config.run_config import RunConfig

# attn_implementation -> (module transformers imports, how to install it)
FLASH_PACKAGES = {
    "flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "flash_attention_3": ("flash_attn_interface", "FlashAttention-3 built from flash-attention's hopper/ folder"),
}


SHARDED = ("fsdp", "deepspeed_zero3")  # strategies that split the weights: the adapter is gathered on save
# The CPU instruction sets that run bf16 matmuls natively (oneDNN uses them under torch.autocast).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# benchmarks/cpu_bf16.py (2-core AMD EPYC with avx512_bf16, torch 2.13.0): a LoRA step under bf16 autocast ran
# about 3x faster than fp32 on SmolLM2-135M (hidden 576) and about 3x slower on the tiny test model (hidden 64):
# the bf16 kernels pay only on wide layers, so 'auto' takes bf16 from this width on.
CPU_BF16_MIN_HIDDEN = 512


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


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The native-bf16 instruction sets this CPU reports (Linux); none where /proc/cpuinfo is not there."""
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split()
    except OSError:
        return []
    return [f for f in CPU_BF16_FLAGS if f in flags]


def cpu_precision(hidden_size: int | None, flags: list[str]) -> tuple[bool, str]:
    """precision 'auto' on a CPU: (bf16 mixed precision?, why). bf16 where it measures faster, fp32 elsewhere."""
    if not flags:
        return False, "fp32: this CPU has no native bf16 (amx_bf16 or avx512_bf16), where bf16 would be emulated"
    if hidden_size is None or hidden_size < CPU_BF16_MIN_HIDDEN:
        return False, (
            f"fp32: the CPU has {flags[0]}, but at hidden size {hidden_size} (< {CPU_BF16_MIN_HIDDEN}) bf16 "
            "measured slower (benchmarks/cpu_bf16.py)"
        )
    return True, (
        f"bf16 mixed precision: the CPU has {flags[0]} and the model's hidden size is {hidden_size}; base weights "
        "in bf16, LoRA weights and optimizer in fp32 (about 3x faster than fp32 by benchmarks/cpu_bf16.py)"
    )


def tf32_supported() -> bool:
    """An Ampere or newer NVIDIA GPU (the check TrainingArguments applies to tf32=True)."""
    from transformers.utils import is_torch_tf32_available

    return is_torch_tf32_available()


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def hardware_problems(
    cfg: RunConfig,
    cuda: bool,
    gpu_count: int,
    bf16_ok: bool,
    tf32_ok: bool = False,
    cpu_flags: list[str] | None = None,
) -> list[str]:
    """What this machine cannot run of the config; each line names the field and the fix. cpu_flags: the CPU's
    native-bf16 instruction sets (read from this machine when None)."""
    problems = []
    if cfg.adapter.method == "loftq" and not cuda:
        problems.append("adapter.method: loftq needs a CUDA GPU (PEFT's LoftQ init runs there); use lora or qlora")
    if not cuda and cfg.training.precision == "fp16":
        problems.append("training.precision: fp16 needs a GPU; use auto, bf16 or fp32 on a CPU")
    if not cuda and cfg.training.precision == "bf16" and not (cpu_bf16_flags() if cpu_flags is None else cpu_flags):
        problems.append(
            "training.precision: bf16 on this CPU would be emulated (it has no amx_bf16 or avx512_bf16), slower "
            "than fp32; use auto or fp32"
        )
    if cuda and cfg.training.precision == "bf16" and not bf16_ok:
        problems.append("training.precision: this GPU has no bf16 support; use fp16 or auto")
    return problems + process_problems(cfg, cuda, gpu_count) + speed_problems(cfg, cuda, tf32_ok)


def process_problems(cfg: RunConfig, cuda: bool, gpu_count: int) -> list[str]:
    """GPUs and processes the config asks for that this machine cannot give (checked before any launch)."""
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


def strategy_problems(cfg: RunConfig, cuda: bool) -> list[str]:
    """What the chosen strategy needs that is missing; each line names the field and the fix."""
    h, problems = cfg.hardware, []
    if h.strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        problems.append(
            f"hardware.strategy: {h.strategy} needs DeepSpeed, which is not installed; run "
            "`pip install 'lora-workbench[deepspeed]'` or use strategy ddp or fsdp"
        )
    if h.strategy != "ddp" and not cuda:
        problems.append(f"hardware.strategy: {h.strategy} needs CUDA GPUs; use ddp on a CPU")
    if h.strategy in SHARDED and cfg.quantization.mode != "none":
        problems.append(
            f"hardware.strategy: {h.strategy} shards the weights, which the workbench does not do for a "
            f"{cfg.quantization.mode} quantized base; use ddp or deepspeed_zero2, or quantization.mode none"
        )
    if h.cpu_processes > 1 and cuda:
        problems.append(
            "hardware.cpu_processes: only for a machine without a GPU (testing the multi-process path); "
            "set hardware.num_gpus here instead"
        )
    return problems


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


def plan(cfg: RunConfig, cuda: bool, bf16_ok: bool, tf32_ok: bool = False, cpu_bf16: bool = False) -> DevicePlan:
    """What the config becomes on this machine; cpu_bf16: 'auto' precision takes bf16 on this CPU (training only:
    chat, evaluate and export stay fp32 on a CPU)."""
    precision = cfg.training.precision
    if precision == "auto":
        precision = ("bf16" if bf16_ok else "fp16") if cuda else ("bf16" if cpu_bf16 else "fp32")
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
