"""Loading the tokenizer and the (optionally quantized) base model, and wrapping it with the adapter."""

from __future__ import annotations

import logging
from typing import Any

from trainer.config.builtin_ids import TINY_MODEL_ID
from trainer.config.run_config import QuantizationSection, RunConfig
from trainer.model.builtin_models import BUILTIN_REAL, cache_root, ensure_builtin
from trainer.model.device import DevicePlan
from trainer.model.tiny_model import ensure_tiny_model

BNB_CPU_KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"


def quiet_unused_kernels(quantized: bool) -> None:
    """Importing peft imports bitsandbytes, which on a CPU with AVX512-BF16 warns that it could not fetch its 4-bit
    kernel ("Failed to load CPU gemm_4bit_forward from kernels-community"): the first line of every log. A run
    that is not quantized never calls that kernel, so its log leaves the warning out (a QLoRA run keeps it)."""
    if not quantized:
        logging.getLogger(BNB_CPU_KERNELS_LOGGER).setLevel(logging.ERROR)


def model_path(cfg: RunConfig) -> str:
    """The id or directory transformers loads; built-in models are built once under the cache (see cache_root)."""
    name = cfg.model.name_or_path
    if name == TINY_MODEL_ID:
        return str(ensure_tiny_model(cache_root(cfg.output.runs_dir)))
    if name in BUILTIN_REAL:
        return str(ensure_builtin(BUILTIN_REAL[name], cache_root(cfg.output.runs_dir)))
    return name


def to_bnb_config(q: QuantizationSection, compute_dtype: str):
    """bitsandbytes settings for 8-bit / 4-bit storage of the frozen base, or None."""
    import torch
    from transformers import BitsAndBytesConfig

    if q.mode == "none":
        return None
    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def load_tokenizer(cfg: RunConfig, path: str, local_only: bool = False):
    """The run's tokenizer; local_only reads only the local cache (the page's checks: no hub round trips)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code, local_files_only=local_only
    )
    if tok.pad_token is None:  # Llama-style tokenizers ship none; padding is masked out anyway
        tok.pad_token = tok.eos_token
    return tok


def local_gpu() -> int:
    """This rank's GPU: under several processes each quantized model must sit on its own device, not all on 0.

    Read from the launcher's LOCAL_RANK rather than PartialState, which would set up the process group before
    the Trainer does, with its own settings."""
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


def load_model(cfg: RunConfig, path: str, plan: DevicePlan, device_map: Any = None):
    """The base model, quantized per config and prepared for k-bit training when quantized."""
    import torch
    from transformers import AutoModelForCausalLM

    bnb = to_bnb_config(cfg.quantization, plan.compute_dtype)
    if bnb is not None and device_map is None:
        device_map = {"": local_gpu()} if plan.cuda else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=cfg.model.revision,
        dtype=getattr(torch, plan.model_dtype),
        attn_implementation=plan.attn,
        trust_remote_code=cfg.model.trust_remote_code,
        quantization_config=bnb,
        device_map=device_map,
        use_safetensors=True,
    )
    if bnb is not None:
        from peft import prepare_model_for_kbit_training

        checkpointing = cfg.training.gradient_checkpointing is True  # "auto" is decided in train.prepare
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.config.use_cache = False
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights are packed two per byte, so count their real elements."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n = n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def eval_as_trained(model: Any) -> Any:
    """model.eval(), except 4-bit layers, which keep computing as they did in training.

    bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks 4-bit weights for a bf16 kernel on the first eval-mode
    forward: the logits are then no longer training's, and dequantize() reads the repacked layout as garbage.
    In train mode these layers dequantize and matmul in the compute dtype, as in training; they hold no dropout.
    """
    model.eval()
    try:
        import bitsandbytes as bnb
    except ImportError:
        return model
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.train()
    return model
