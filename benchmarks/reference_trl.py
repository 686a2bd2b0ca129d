"""Plain TRL LoRA / QLoRA fine-tuning: the reference that `lora-workbench bench` measures the workbench against.

    python benchmarks/reference_trl.py --model runs/.cache/tiny-model --data data/sentiment_train.jsonl \
        --max-length 64 --steps 30 --batch 8 --accum 2 --json /tmp/ref.json
    python benchmarks/reference_trl.py --model tiny ...            # builds the offline tiny model first
    python benchmarks/reference_trl.py --model builtin:smollm2-135m ...   # the workbench's converted checkpoint
    python benchmarks/reference_trl.py --model DIR --4bit --optim paged_adamw_8bit --max-length 2048 ...

What a competent user writes with TRL 1.16 + PEFT + bitsandbytes: load the model (BitsAndBytesConfig NF4 for
QLoRA, prepared with PEFT's prepare_model_for_kbit_training), a LoraConfig, an SFTConfig, the dataset from the
same JSON/JSONL file, trainer.train(). It imports nothing from trainer/ except what finds or builds the built-in
models (--model tiny, --model builtin:...: the directory the workbench trains too), so it stays an independent
reference.

Loss masking: the workbench renders every row with the chat template and trains the assistant answer only
(end-of-turn token included). Here every row becomes a conversational prompt/completion pair (completion = the
last assistant turn), and TRL's completion_only_loss (its default for prompt/completion data) trains exactly
those tokens. TRL's assistant_only_loss would need {% generation %} markers, which the tiny model's and most
real chat templates lack. For single-turn rows (all bundled data) both train the same tokens.

Measured (printed and written to --json): training wall time from just before trainer.train() to the last
logged step; per-step times and real tokens (attention-mask sums of the collated batches, counted on the CPU,
or all tokens of a padding-free packed batch); steady tokens/s and mean step time excluding the first
--warmup steps; peak memory: torch.cuda.max_memory_allocated on a GPU, else the largest RSS sampled at each
logged step (and the process's ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
GB = 1024**3


def to_prompt_completion(row: dict) -> dict:
    """A row of any bundled format as a conversational prompt/completion pair (completion: the last turn)."""
    if row.get("messages"):
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    elif row.get("conversations"):
        messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
    elif row.get("instruction"):
        user = f"{row['instruction']}\n\n{row['input']}" if (row.get("input") or "").strip() else row["instruction"]
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        messages = system + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    else:  # plain prompt/completion text, rendered with the chat template like the workbench does
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    messages[-1]["content"] = messages[-1]["content"].strip()
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def load_data(path: str):
    from datasets import load_dataset

    data = load_dataset("json", data_files=path, split="train")
    return data.map(to_prompt_completion, remove_columns=data.column_names)


def load_model(args: argparse.Namespace, dtype):
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if args.four_bit:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"} if quant else None
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        dtype=dtype,
        quantization_config=quant,
        device_map=device_map,
        attn_implementation="sdpa",
        use_safetensors=True,
    )
    if quant:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.config.use_cache = False
    return model


class RealTokens:
    """Wraps the collator: adds up each batch's real tokens on the CPU (no GPU sync)."""

    def __init__(self, collator):
        self.collator, self.tokens = collator, 0

    def __call__(self, examples):
        batch = self.collator(examples)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()  # padding-free: no pads
        return batch


def make_meter(counter: RealTokens):
    import psutil
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        """Time and cumulative real tokens at each step end; loss and memory at each logged step."""

        def __init__(self):
            self.steps: list[tuple[float, int]] = []
            self.losses: list[float] = []
            self.last_log = 0.0
            self.peak_gb = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append((time.time(), counter.tokens))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.last_log = time.time()
                self.losses.append(logs["loss"])
                now = (
                    torch.cuda.max_memory_allocated()
                    if torch.cuda.is_available()
                    else psutil.Process().memory_info().rss
                )
                self.peak_gb = max(self.peak_gb, now / GB)

    return Meter()


def summarize(t0: float, steps: list[tuple[float, int]], warmup: int) -> dict:
    """Mean step time and tokens/s over the steps after the first `warmup` ones."""
    times = [t0] + [t for t, _ in steps]
    tokens = [0] + [n for _, n in steps]
    w = min(warmup, len(steps) - 1)
    span = times[-1] - times[w]
    return {
        "mean_step_s": span / (len(steps) - w),
        "tokens_per_second": (tokens[-1] - tokens[w]) / span,
        "step_times_s": [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)],
        "tokens_per_step": [b - a for a, b in zip(tokens, tokens[1:], strict=False)],
    }


def resolve_model(name: str) -> str:
    """A model directory for 'tiny' and the built-in ids, found (or built once) where the workbench keeps them:
    $LORA_WORKBENCH_CACHE, else runs/.cache. Any other name is loaded as given."""
    if name != "tiny" and not name.startswith("builtin:"):
        return name
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from trainer.model.builtin_models import BUILTIN_REAL, cache_root, ensure_builtin  # only to find the checkpoint
    from trainer.model.tiny_model import ensure_tiny_model

    if name == "tiny":
        return str(ensure_tiny_model(Path("runs/.cache")))
    if name not in BUILTIN_REAL:
        sys.exit(f"reference_trl: unknown built-in model {name!r} (built in: tiny, {', '.join(BUILTIN_REAL)})")
    return str(ensure_builtin(BUILTIN_REAL[name], cache_root("runs")))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args.model = resolve_model(args.model)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    sft_config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        learning_rate=args.lr,
        optim=args.optim,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        max_length=args.max_length,
        packing=args.packing,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,  # the workbench disables it too; logs are printed instead
        bf16=dtype == torch.bfloat16,
        use_cpu=not cuda,
    )
    trainer = SFTTrainer(
        model=load_model(args, dtype),
        args=sft_config,
        train_dataset=load_data(args.data),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets, task_type="CAUSAL_LM"
        ),
    )
    counter = RealTokens(trainer.data_collator)
    trainer.data_collator = counter
    meter = make_meter(counter)
    trainer.add_callback(meter)
    t0 = time.time()
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {
        "tool": "reference_trl",
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": len(meter.steps),
        "warmup_steps": args.warmup,
        "train_start_time": t0,
        "train_end_time": meter.last_log,
        "train_wall_s": meter.last_log - t0,
        "tokens": counter.tokens,
        **summarize(t0, meter.steps, args.warmup),
        "peak_mem_gb": round(meter.peak_gb, 4),
        "peak_mem_kind": "cuda_max_allocated" if cuda else "cpu_rss_at_logs",
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 4),
        "first_loss": meter.losses[0] if meter.losses else None,
        "trainable_params": trainable,
    }
    print(
        f"reference: {result['steps']} steps in {result['train_wall_s']:.2f} s, "
        f"{result['tokens_per_second']:.0f} real tokens/s, {result['mean_step_s'] * 1000:.1f} ms/step "
        f"(after {args.warmup} warm-up steps), peak {result['peak_mem_gb']:.3f} GB ({result['peak_mem_kind']})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Plain TRL SFTTrainer LoRA/QLoRA run with speed measurements.")
    ap.add_argument("--model", required=True, help="model dir or hub id; tiny, builtin:...: the workbench's")
    ap.add_argument("--data", default="data/sentiment_train.jsonl", help="JSON/JSONL file (messages/alpaca/...)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--targets", default="all-linear", help="comma-separated module names, or all-linear")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--optim", default="adamw_torch")
    ap.add_argument("--4bit", dest="four_bit", action="store_true", help="QLoRA: NF4 base with double quantization")
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--logging-steps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the step time and tokens/s")
    ap.add_argument("--output-dir", default="runs/.bench/reference")
    ap.add_argument("--json", help="write the measurements here")
    return ap.parse_args(argv)


if __name__ == "__main__":
    main()
