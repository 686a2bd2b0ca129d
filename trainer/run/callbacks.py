"""Trainer callbacks: metrics and status writing, AdaLoRA budget allocation, the NaN guard, stop on signal,
and completion markers on checkpoints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from trainer.run.stopping import StopRequest
from trainer.run.system_stats import system_sample
from trainer.run_dir import RunDir

CHECKPOINT_MARKER = "CHECKPOINT_COMPLETE"


class TokenCounter:
    """Wraps the data collator to count real (unpadded) tokens on the CPU, so no GPU sync is added."""

    def __init__(self, collator: Any):
        self.collator = collator
        self.tokens = 0

    def __call__(self, examples: list[dict[str, Any]]):
        self.tokens += sum(len(ex["input_ids"]) for ex in examples)
        return self.collator(examples)


class MetricsCallback(TrainerCallback):
    """Writes train/eval/system lines to metrics.jsonl and keeps status.json's step current."""

    def __init__(self, run: RunDir, counter: TokenCounter, is_main: bool = True):
        self.run, self.counter, self.is_main = run, counter, is_main
        self._last_time = self._last_tokens = None
        self._snapshot = (time.perf_counter(), 0)
        self.last_train: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time, self._last_tokens = time.perf_counter(), self.counter.tokens
        if self.is_main:
            self.run.write_status(step=state.global_step, max_steps=state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self._snapshot = (time.perf_counter(), self.counter.tokens)
        if self.is_main:
            self.run.write_status(throttle_s=1.0, step=state.global_step, max_steps=state.max_steps)

    def on_evaluate(self, args, state, control, **kwargs):
        # Evaluation batches pass through the same collator: take their tokens and time out of throughput.
        then, tokens = self._snapshot
        self.counter.tokens = tokens
        self._last_time += time.perf_counter() - then

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.is_main or not logs:
            return
        step = state.global_step
        if "loss" in logs:
            now, tokens = time.perf_counter(), self.counter.tokens
            tps = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
            self._last_time, self._last_tokens = now, tokens
            self.last_train = {
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "epoch": logs.get("epoch", state.epoch),
                "tokens_per_second": round(tps, 2),
            }
            if "orth_reg_loss" in logs:  # AdaLoRA: loss is PEFT's, token NLL + its orthogonal regularisation
                self.last_train.update(
                    nll_loss=logs["loss"] - logs["orth_reg_loss"], orth_reg_loss=logs["orth_reg_loss"]
                )
            self.run.append_metric("train", step, **self.last_train)
            self.run.append_metric("system", step, **system_sample())
        if "eval_loss" in logs:
            self.last_eval = {k: v for k, v in logs.items() if k.startswith("eval_")}
            self.run.append_metric("eval", step, **self.last_eval)
        # Throttled like on_step_end: an fsync'ed rewrite per logged step cost 3-5% at logging_steps 1 (RESULTS.md);
        # the final status is written unthrottled when the run ends.
        self.run.write_status(throttle_s=1.0, step=step, max_steps=state.max_steps)


class NanGuard(TrainerCallback):
    """Stops the run when a logged loss or grad norm is NaN/inf (needs logging_nan_inf_filter=False)."""

    def __init__(self):
        self.error: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                self.error = (
                    f"{key} became {value} at step {state.global_step}: training diverged. Lower "
                    "training.learning_rate, keep max_grad_norm > 0, or use bf16/fp32 instead of fp16."
                )
                control.should_training_stop = True
                control.should_save = False
                return control


class StopSignal(TrainerCallback):
    """Ends training at the next step once a SIGTERM/SIGINT has been received (recorded in a
    trainer.run.stopping.StopRequest, whose handler is installed from the start of the run)."""

    def __init__(self, request: StopRequest):
        self.request = request
        # Several ranks: the largest signal number any rank has got (trainer/run/distributed.py), so that all stop
        # after the same step; a rank leaving the loop alone would leave the others waiting in a collective.
        self.agree: Callable[[int], int] | None = None

    @property
    def signum(self) -> int | None:
        return self.request.signum

    @signum.setter
    def signum(self, value: int | None) -> None:
        self.request.signum = value

    def on_step_end(self, args, state, control, **kwargs):
        if self.agree is not None:
            agreed = self.agree(self.signum or 0)
            if agreed:  # never cleared here: a signal may arrive while the ranks agree
                self.signum = agreed
        if self.signum is not None:
            self.request.say_unsaid()
            control.should_training_stop = True
            control.should_save = False
        return control


class AdaLoraAllocator(TrainerCallback):
    """Calls AdaLoRA's update_and_allocate after each optimizer step, before gradients are zeroed.

    TRL does not call it, so without this AdaLoRA never reallocates its rank budget.
    """

    def __init__(self, model: Any):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)


def adalora_ranks(model: Any) -> dict[str, int]:
    """Final rank per adapted module: the count of singular values left unmasked."""
    ranks = {}
    for name, module in model.named_modules():
        lora_e = getattr(module, "lora_E", None)
        if lora_e is not None and "default" in lora_e:
            ranks[name] = int((lora_e["default"].detach() != 0).sum().item())
    return ranks


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it; resume uses only marked ones."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / CHECKPOINT_MARKER).write_text(json.dumps({"step": state.global_step, "time": time.time()}))


def latest_complete_checkpoint(checkpoints: Path) -> Path | None:
    """Highest-step checkpoint that carries the completion marker (an interrupted save has none)."""
    found = []
    for p in checkpoints.glob("checkpoint-*"):
        if (p / CHECKPOINT_MARKER).is_file() and p.name.split("-")[-1].isdigit():
            found.append((int(p.name.split("-")[-1]), p))
    return max(found)[1] if found else None
