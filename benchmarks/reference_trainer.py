"""Plain transformers Trainer LoRA fine-tuning: a second independent reference, built the way peers built on the
Trainer (not on TRL's SFTTrainer) do it, to set the workbench's memory and speed against.

    python benchmarks/reference_trainer.py --model builtin:smollm2-135m --data rows.jsonl --r 8 --alpha 16 \
        --dropout 0 --steps 16 --batch 4 --max-length 256 --seed 0 --lr 1e-4 --lr-scheduler cosine \
        --no-gradient-checkpointing --json /tmp/trainer.json
    python benchmarks/reference_trainer.py --model tiny --steps 3 ...      # the offline tiny model

What such a script does: load the model (fp32 on a CPU, bf16 on a GPU that has it), wrap it with PEFT's
get_peft_model and a LoraConfig, tokenize each row itself with the chat template (the prompt's tokens labelled
-100, the last assistant turn trained, cut to --max-length), pad batches with DataCollatorForSeq2Seq, and call
transformers.Trainer.train(): the model's own forward computes the loss from the full (batch, seq, vocab)
logits. Rows are read as benchmarks/reference_trl.py reads them (any bundled format); the measurements are the
same as there (its RealTokens and Meter: real tokens/s after --warmup steps, peak memory at the logged steps, the
process's ru_maxrss), so the two references compare line for line. It imports nothing from trainer/ except
what finds the built-in models.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_trl  # noqa: E402
from reference_trl import GB, RealTokens, load_data, load_model, make_meter, resolve_model, summarize  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tokenize(tokenizer, max_length: int):
    """Row -> input_ids, attention_mask, labels: the rendered conversation, trained on its last turn only."""

    def one(row: dict) -> dict:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return one


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args.model = resolve_model(args.model)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = load_data(args.data)
    train = rows.map(tokenize(tokenizer, args.max_length), remove_columns=rows.column_names)
    model = load_model(args, dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets, task_type="CAUSAL_LM"
        ),
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        optim=args.optim,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        bf16=dtype == torch.bfloat16,
        use_cpu=not cuda,
    )
    counter = RealTokens(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=counter)
    meter = make_meter(counter)
    trainer.add_callback(meter)
    t0 = time.time()
    trainer.train()
    result = {
        "tool": "reference_trainer",
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": len(meter.steps),
        "warmup_steps": args.warmup,
        "train_wall_s": meter.last_log - t0,
        "tokens": counter.tokens,
        **summarize(t0, meter.steps, args.warmup),
        "peak_mem_gb": round(meter.peak_gb, 4),
        "peak_mem_kind": "cuda_max_allocated" if cuda else "cpu_rss_at_logs",
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 4),
        "first_loss": meter.losses[0] if meter.losses else None,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    print(
        f"reference_trainer: {result['steps']} steps in {result['train_wall_s']:.2f} s, "
        f"{result['tokens_per_second']:.0f} real tokens/s, peak {result['peak_mem_gb']:.3f} GB "
        f"({result['peak_mem_kind']}), ru_maxrss {result['peak_rss_gb']:.3f} GB"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """reference_trl.py's flags (the same run, read the same way), and the Trainer's scheduler."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--lr-scheduler", default="linear", help="the Trainer's lr_scheduler_type")
    own.add_argument("--output-dir", default="runs/.bench/reference_trainer")
    mine, rest = own.parse_known_args(argv)
    args = reference_trl.parse_args([*rest, "--output-dir", mine.output_dir])
    if args.four_bit or args.packing:
        sys.exit("reference_trainer: --4bit and --packing are reference_trl.py's only")
    args.lr_scheduler = mine.lr_scheduler
    return args


if __name__ == "__main__":
    main()
