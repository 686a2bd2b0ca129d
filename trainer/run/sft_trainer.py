"""TRL's SFTTrainer with two mends for what it leaves out: AdaLoRA's orthogonal regularisation in the training
loss, and the adapter dtype TRL chose for a quantized base kept through a resume."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.adalora import AdaLoraModel
from trl import SFTTrainer


class WorkbenchSFTTrainer(SFTTrainer):
    """SFTTrainer whose training loss is what PEFT's model would report, and whose resume is faithful."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        peft_model = getattr(self.model, "base_model", None)
        # Training only: eval_loss stays the token NLL, comparable with other methods' and runs' eval_loss.
        if not (self.model.training and isinstance(peft_model, AdaLoraModel)):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with forward_outputs(peft_model) as seen:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        term = orth_reg_term(seen[0])
        self._metrics["train"]["orth_reg_loss"].append(term.item())
        # Like TRL's MoE aux loss: with num_items_in_batch the Trainer leaves gradient accumulation to the loss.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        if return_outputs:
            return result[0] + term / steps, result[1]
        return result + term / steps

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        # PEFT's load_adapter upcasts the adapter to fp32 (autocast_adapter_dtype), undoing TRL's bf16 cast for a
        # quantized base: the resumed run would train and save another dtype than the uninterrupted one.
        dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, param in self.model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])


@contextmanager
def forward_outputs(module: torch.nn.Module) -> Iterator[list[Any]]:
    """The outputs of each forward of module while inside the block."""
    seen: list[Any] = []
    handle = module.register_forward_hook(lambda _m, _args, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


def orth_reg_term(outputs: Any) -> torch.Tensor:
    """orth_reg_weight * reg, as PEFT's AdaLoraModel.forward added it to outputs.loss.

    PEFT computes the term only inside forward, onto the loss the model returned; TRL's fused LM head returned
    the token NLL there (FusedCausalLMOutput.loss), so the term is that loss less the same NLL."""
    nll = -outputs.log_probs.sum() / outputs.label_mask.sum().clamp(min=1)
    return outputs.loss - nll
