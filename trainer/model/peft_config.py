"""RunConfig.adapter -> a PEFT config: one small mapper per family of methods."""

from __future__ import annotations

from trainer.config.run_config import RunConfig, resolved_target_modules


def to_peft_config(cfg: RunConfig, total_steps: int):
    """The PEFT config of the run's adapter method. AdaLoRA needs the total step count for its schedule."""
    from peft import AdaLoraConfig, LoftQConfig, LoraConfig

    a = cfg.adapter
    common = dict(
        target_modules=resolved_target_modules(cfg),
        lora_alpha=a.lora_alpha,
        lora_dropout=a.lora_dropout,
        bias=a.bias,
        modules_to_save=a.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    if a.method == "adalora":
        return AdaLoraConfig(
            init_r=a.init_r,
            target_r=a.target_r,
            tinit=a.tinit,
            tfinal=a.tfinal,
            deltaT=a.delta_t,
            total_step=total_steps,
            **common,
        )
    init: bool | str = {"pissa": "pissa", "loftq": "loftq"}.get(a.method, True)
    return LoraConfig(
        r=a.r,
        use_dora=a.method == "dora",
        use_rslora=a.method == "rslora",
        init_lora_weights=init,
        loftq_config=LoftQConfig(loftq_bits=a.loftq_bits, loftq_iter=a.loftq_iter) if a.method == "loftq" else {},
        **common,
    )


def adalora_schedule_problem(cfg: RunConfig, total_steps: int) -> str | None:
    """AdaLoRA's tinit/tfinal must leave steps for the budget to move; known only once the data is counted."""
    a = cfg.adapter
    if a.method == "adalora" and a.tinit >= total_steps - a.tfinal:
        return (
            f"adapter.tinit ({a.tinit}) + adapter.tfinal ({a.tfinal}) must be below the run's {total_steps} "
            "optimizer steps; lower them or train longer"
        )
    return None
