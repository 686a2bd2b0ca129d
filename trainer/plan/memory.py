"""Peak GPU memory of a run, predicted from the model's config.json alone (no weights), and what makes it fit.

Parts, in bytes (the arithmetic of the QLoRA paper, PEFT and the Trainer as they run here):
- base weights: 16/32-bit; 8-bit (LLM.int8: 1 byte + an fp32 scale per output row); NF4/FP4 (half a byte, plus an
  absmax constant per 64-weight block: fp32, or with double quantization an 8-bit one plus an fp32 per 256 of those).
  bitsandbytes keeps embeddings, norms and lm_head unquantized, and PEFT's prepare_model_for_kbit_training casts them
  to fp32 for a k-bit run.
- adapter weights, their gradients (same dtype) and optimizer states (AdamW: 2 fp32 moments = 8 bytes/param;
  8-bit AdamW: 2 bytes; paged variants the same, but they can spill to CPU RAM instead of failing).
- activations saved for the backward pass, per token and decoder layer (SwiGLU decoder, SDPA attention): two RMSNorm
  inputs kept in fp32 plus their outputs, q/k/v after RoPE, attention output, and gate, up, act(gate), product of the
  MLP; PEFT's dropout makes a copy of every targeted layer's input when lora_dropout > 0. With gradient
  checkpointing only each layer's input is kept, plus one layer's activations while it is recomputed.
- logits: batch x length x vocab, in the compute dtype plus the fp32 log-softmax the loss keeps and its gradient.
- CUDA context and allocator slack: outside torch's counters; added when checking whether the run fits.

The prediction is torch.cuda.max_memory_allocated of the run (what the monitor plots as peak), for sequences of
max_length (the worst case; packing always fills it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from trainer.config.run_config import RunConfig

GB = 1024**3
CUDA_CONTEXT_BYTES = int(0.5 * GB)  # CUDA context + cuBLAS workspace on recent GPUs, outside torch's allocator
ALLOCATOR_SLACK = 0.10  # reserved-but-unallocated blocks of PyTorch's caching allocator at the peak
# 'auto' checkpointing stays off only below this share of the GPU: the estimate's error and other processes' memory
AUTO_CHECKPOINTING_SHARE = 0.85
BLOCK = 64  # bitsandbytes 4-bit block size
DQ_BLOCK = 256  # blocks per second-level constant with double quantization
OPTIMIZER_BYTES = {
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "paged_adamw_32bit": 8,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
    "adafactor": 4,  # factored second moment; the update buffer dominates: about one fp32 per parameter
    "sgd": 0,
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shapes:
    """What the arithmetic needs from the architecture, read from a meta-device model."""

    linear_params: int  # weights bitsandbytes would quantize (every decoder linear layer; lm_head is kept)
    linear_rows: int  # their output features, summed (8-bit keeps an fp32 scale per row)
    other_params: int  # embeddings, norms, biases, lm_head
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    dropout_copy_features: int = 0  # input features of the targeted layers of one decoder layer


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]
    gpu_total: int | None = None  # bytes of the GPU checked against, None when there is none
    gpu_name: str | None = None
    suggestions: list[str] = field(default_factory=list)
    checkpointing: bool = True  # gradient checkpointing as predicted ('auto' decided)
    checkpointing_note: str = ""  # what 'auto' chose and why ("off: ..."), when the config said 'auto'

    @property
    def peak_bytes(self) -> int:
        """Predicted torch.cuda.max_memory_allocated."""
        return sum(self.parts.values())

    @property
    def needed_bytes(self) -> int:
        """What the GPU must have free: the peak plus allocator slack and the CUDA context."""
        return needed_bytes(self.peak_bytes)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_total is None else self.needed_bytes <= self.gpu_total

    def summary(self, total_params: int) -> str:
        """One paragraph for the Train tab: the peak, its big parts, the fit, and the saving over full fine-tuning."""
        p = self.parts
        adapter = p["adapter weights"] + p["adapter gradients"] + p["optimizer states"]
        base = p["base weights"] + p.get("quant constants", 0)
        # full fine-tuning in mixed precision: 16-bit weights and grads, fp32 master copy and two Adam moments
        full = total_params * 16 + p["activations"] + p["logits + loss"]
        text = (
            f"Predicted peak GPU memory **{self.peak_bytes / GB:.2f} GB**: base {base / GB:.2f}, adapter + grads + "
            f"optimizer {adapter / GB:.3f}, activations {p['activations'] / GB:.2f}, logits {p['logits + loss'] / GB:.2f}"
            f" (full fine-tuning would need ~{full / GB:.1f} GB). Needs {self.needed_bytes / GB:.1f} GB free with "
            "the CUDA context"
        )
        if self.checkpointing_note:
            text += f" (gradient checkpointing auto -> {self.checkpointing_note})"
        if self.gpu_total is None:
            return text + "; no GPU on this machine."
        verdict = "fits" if self.fits else "**does not fit**"
        text += f": {verdict} on {self.gpu_name} ({self.gpu_total / GB:.0f} GB)."
        return text + "".join(f"  \nTo fit: {s}" for s in self.suggestions)

    def lines(self) -> list[str]:
        out = [f"predicted peak GPU memory: {self.peak_bytes / GB:.2f} GB (torch allocated)"]
        out += [f"  {name:<22}{size / GB:>8.3f} GB" for name, size in self.parts.items()]
        out.append(f"  + CUDA context and allocator slack -> needs {self.needed_bytes / GB:.2f} GB free")
        if self.checkpointing_note:
            out.append(f"gradient checkpointing auto -> {self.checkpointing_note}")
        if self.gpu_total is None:
            out.append("no GPU detected: pass --gpu-memory GB to check against a GPU")
        else:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"{verdict} on {self.gpu_name or 'the GPU'} ({self.gpu_total / GB:.1f} GB)")
        out += [f"  to fit: {s}" for s in self.suggestions]
        return out


def shapes_of(model: Any, model_config: Any, cfg: RunConfig) -> Shapes:
    """Parameter categories and dimensions of a (meta-device, not yet PEFT-wrapped) model."""
    import torch

    from trainer.config.run_config import resolved_target_modules

    head = model.get_output_embeddings()
    linear = rows = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linear += module.weight.numel()
            rows += module.out_features
            seen.add(id(module.weight))
    total = sum(p.numel() for p in model.parameters())
    hidden = model_config.hidden_size
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    kv_dim = (getattr(model_config, "num_key_value_heads", None) or heads) * head_dim
    return Shapes(
        linear_params=linear,
        linear_rows=rows,
        other_params=total - linear,
        layers=model_config.num_hidden_layers,
        hidden=hidden,
        intermediate=getattr(model_config, "intermediate_size", 4 * hidden),
        kv_dim=kv_dim,
        vocab=model_config.vocab_size,
        dropout_copy_features=_dropout_features(model, resolved_target_modules(cfg))
        if cfg.adapter.lora_dropout
        else 0,
    )


def _dropout_features(model: Any, targets: str | list[str]) -> int:
    """Input features of the targeted linear layers in the first decoder layer (each gets its own dropout copy)."""
    import torch

    head = model.get_output_embeddings()
    names = None if targets == "all-linear" else set(targets if isinstance(targets, list) else [targets])
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head or ".0." not in f".{name}.":
            continue
        if names is None or name.rsplit(".", 1)[-1] in names:
            total += module.in_features
    return total


def predict(cfg: RunConfig, shapes: Shapes, trainable: int, adapter_bytes: int) -> dict[str, int]:
    """The parts of the peak, in bytes, for a bf16-capable GPU (or the config's explicit precision)."""
    from trainer.model import device

    plan = device.plan(cfg, cuda=True, bf16_ok=True)
    act = DTYPE_BYTES.get(plan.model_dtype if plan.precision == "fp32" else "bfloat16", 2)
    base_w = DTYPE_BYTES.get(plan.model_dtype, 2)
    q = cfg.quantization
    parts: dict[str, int] = {}
    if q.mode == "none":
        parts["base weights"] = (shapes.linear_params + shapes.other_params) * base_w
    else:
        other = shapes.other_params * 4  # prepare_model_for_kbit_training upcasts every unquantized param to fp32
        if q.mode == "8bit":
            parts["base weights"] = shapes.linear_params + other
            parts["quant constants"] = shapes.linear_rows * 4
        else:
            parts["base weights"] = shapes.linear_params // 2 + other
            blocks = shapes.linear_params // BLOCK
            parts["quant constants"] = blocks + (blocks // DQ_BLOCK) * 4 if q.double_quant else blocks * 4
    parts["adapter weights"] = trainable * adapter_bytes
    parts["adapter gradients"] = trainable * adapter_bytes
    parts["optimizer states"] = trainable * OPTIMIZER_BYTES.get(cfg.training.optimizer, 8)
    tokens = cfg.training.per_device_batch_size * cfg.data.max_length
    checkpointing = cfg.training.gradient_checkpointing is not False  # an undecided 'auto' counts as on
    parts["activations"] = tokens * activation_bytes_per_token(shapes, act, checkpointing)
    parts["logits + loss"] = tokens * shapes.vocab * (act + 4 + 4)
    return parts


def layer_bytes_per_token(s: Shapes, act: int) -> int:
    """Activations one decoder layer keeps for its backward pass, per token."""
    norms = 2 * s.hidden * (4 + act)  # fp32 input + normalized output, twice
    attention = (2 * s.hidden + 2 * s.kv_dim) * act  # q, k, v after RoPE + attention output
    mlp = 4 * s.intermediate * act  # gate, up, act(gate), product
    dropout = s.dropout_copy_features * (act + 1)  # a dropped-out copy and its mask per targeted layer
    return norms + attention + mlp + dropout


def activation_bytes_per_token(s: Shapes, act: int, checkpointing: bool) -> int:
    per_layer = layer_bytes_per_token(s, act)
    if checkpointing:  # each layer's input, plus one layer recomputed during its backward
        return s.layers * s.hidden * act + per_layer
    return s.layers * per_layer + s.hidden * (4 + act)  # + the final norm


def variants(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """Changes that lower memory, from least to most intrusive to the run (each keeps the effective batch)."""
    t, q, d = cfg.training, cfg.quantization, cfg.data
    out: list[tuple[str, RunConfig]] = []

    def with_(section: str, **changes: Any) -> RunConfig:
        return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=changes)})

    if t.gradient_checkpointing is not True:  # off, or 'auto' that chose off and still ran out of memory
        out.append(
            ("training.gradient_checkpointing: true (~20-30% slower)", with_("training", gradient_checkpointing=True))
        )
    if t.per_device_batch_size > 1:
        b = t.per_device_batch_size
        for smaller in sorted({max(b // 2, 1), max(b // 4, 1), 1}, reverse=True):
            acc = t.gradient_accumulation_steps * b // smaller
            out.append(
                (
                    f"training.per_device_batch_size: {smaller}, gradient_accumulation_steps: {acc} (same effective batch)",
                    with_("training", per_device_batch_size=smaller, gradient_accumulation_steps=acc),
                )
            )
    if OPTIMIZER_BYTES.get(t.optimizer, 8) > 2:
        out.append(("training.optimizer: paged_adamw_8bit", with_("training", optimizer="paged_adamw_8bit")))
    if q.mode != "4bit":
        out.append(("quantization.mode: 4bit (QLoRA, NF4 + double quant)", with_("quantization", mode="4bit")))
    for shorter in (d.max_length // 2, d.max_length // 4):
        if shorter >= 256:
            out.append((f"data.max_length: {shorter} (longer rows are truncated)", with_("data", max_length=shorter)))
    return out


def suggest(cfg: RunConfig, shapes: Shapes, trainable: int, adapter_bytes: int, gpu_total: int) -> list[str]:
    """The least intrusive single change that fits; else changes applied in order until the run fits."""

    def needed(c: RunConfig) -> int:
        return needed_bytes(sum(predict(c, shapes, trainable, adapter_bytes).values()))

    for text, candidate in variants(cfg):
        if needed(candidate) <= gpu_total:
            return [f"{text} -> needs {needed(candidate) / GB:.1f} GB"]
    current, applied = cfg, {}
    while options := variants(current):
        text, current = options[0]
        applied[text.split(":")[0]] = text  # a field changed twice (batch halved again) keeps its last value
        if needed(current) <= gpu_total:
            return [*applied.values(), f"together -> needs {needed(current) / GB:.1f} GB"]
    return [
        f"even with {', '.join(applied)} changed it needs {needed(current) / GB:.1f} GB: use a smaller model or a "
        "GPU with more memory"
    ]


def detect_gpu() -> tuple[int | None, str | None]:
    import torch

    if not torch.cuda.is_available():
        return None, None
    props = torch.cuda.get_device_properties(0)
    return int(props.total_memory), props.name


def needed_bytes(peak: int) -> int:
    """What the GPU must have free for a predicted peak: allocator slack and the CUDA context on top."""
    return int(peak * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT_BYTES


def auto_checkpointing(
    cfg: RunConfig, shapes: Shapes, trainable: int, adapter_bytes: int, gpu_total: int | None
) -> tuple[bool, str]:
    """gradient_checkpointing 'auto': off (the faster choice) where the run fits without it, with room to spare."""
    if gpu_total is None:
        return False, "off: no GPU, recomputing activations would only slow the steps"
    t = cfg.training
    without = cfg.model_copy(update={"training": t.model_copy(update={"gradient_checkpointing": False})})
    need = needed_bytes(sum(predict(without, shapes, trainable, adapter_bytes).values()))
    if need <= AUTO_CHECKPOINTING_SHARE * gpu_total:
        return False, f"off: needs {need / GB:.1f} GB without it, within {AUTO_CHECKPOINTING_SHARE:.0%} of the GPU"
    return True, f"on: needs {need / GB:.1f} GB without it, over {AUTO_CHECKPOINTING_SHARE:.0%} of the GPU"


def resolve_checkpointing(cfg: RunConfig, choice: bool) -> RunConfig:
    """The config with gradient_checkpointing decided ('auto' replaced by the choice)."""
    if cfg.training.gradient_checkpointing != "auto":
        return cfg
    return cfg.model_copy(update={"training": cfg.training.model_copy(update={"gradient_checkpointing": choice})})


def memory_estimate(
    cfg: RunConfig, shapes: Shapes, trainable: int, adapter_bytes: int, gpu_total: int | None, gpu_name: str | None
) -> MemoryEstimate:
    note = ""
    if cfg.training.gradient_checkpointing == "auto":
        choice, why = auto_checkpointing(cfg, shapes, trainable, adapter_bytes, gpu_total)
        cfg, note = resolve_checkpointing(cfg, choice), why
    parts = predict(cfg, shapes, trainable, adapter_bytes)
    est = MemoryEstimate(parts, gpu_total, gpu_name, checkpointing=cfg.training.gradient_checkpointing is True)
    est = replace(est, checkpointing_note=note)
    if est.fits is False:
        est = replace(est, suggestions=suggest(cfg, shapes, trainable, adapter_bytes, gpu_total))
    return est
