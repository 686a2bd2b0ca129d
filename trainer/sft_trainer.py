"""TRL's SFTTrainer with AdaLoRA's orthogonal regularisation put back into the training loss."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.adalora import AdaLoraModel
from trl import SFTTrainer


class WorkbenchSFTTrainer(SFTTrainer):
    """SFTTrainer whose training loss is what PEFT's model would report."""

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
