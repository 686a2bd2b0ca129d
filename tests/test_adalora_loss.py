"""AdaLoRA trains on PEFT's own loss: token NLL plus its orthogonal regularisation (TRL's loss drops the term)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.run.train import run_training
from trainer.run_dir import read_metrics

ADALORA = {"recipe": "adalora", "adapter": {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 1, "delta_t": 1}}


def workbench_trainer(cfg_path: Path):
    """The trainer fit() builds, for this config, on the CPU (no training)."""
    from trainer.config.presets import load_config
    from trainer.data.prepare import prepare_data, to_dataset
    from trainer.data.tokenization import chat_template_of
    from trainer.model import device
    from trainer.model.load import load_model, load_tokenizer, model_path
    from trainer.model.peft_config import to_peft_config
    from trainer.run.sft_trainer import WorkbenchSFTTrainer
    from trainer.run.train import to_sft_config
    from trainer.run_dir import RunDir

    cfg = load_config(cfg_path)
    plan = device.plan(cfg, cuda=False, bf16_ok=False)
    path = model_path(cfg)
    tokenizer = load_tokenizer(cfg, path)
    tokenizer.chat_template = chat_template_of(tokenizer, cfg.model.chat_template)
    data = prepare_data(tokenizer, cfg.data, tokenizer.chat_template, cfg.training.seed)
    return WorkbenchSFTTrainer(
        model=load_model(cfg, path, plan),
        args=to_sft_config(cfg, RunDir(cfg_path.parent / "run"), plan.trainer_flags, False),
        train_dataset=to_dataset(data.train),
        processing_class=tokenizer,
        peft_config=to_peft_config(cfg, cfg.training.max_steps),
    )


def test_adalora_train_loss_is_peft_own_loss_on_a_fixed_batch(make_config) -> None:
    """PEFT's AdaLoraModel.forward with labels returns NLL + orth_reg_weight * reg; the trainer must train on that."""
    import torch

    trainer = workbench_trainer(make_config(ADALORA))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.train()
    with torch.no_grad():
        peft_loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        plain_nll = model.get_base_model()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss  # the base model's own loss: NLL only, before PEFT adds its term
        ours = trainer.compute_loss(model, dict(batch))
    assert peft_loss.loss.item() - plain_nll.item() > 0.1  # the term is there to be lost
    assert ours.item() == pytest.approx(peft_loss.loss.item(), rel=1e-5, abs=1e-5)


def first_train_line(make_config, name: str, batch: int, accumulation: int) -> dict:
    cfg_path = make_config(
        {
            **ADALORA,
            "adapter": {**ADALORA["adapter"], "tinit": 0, "tfinal": 0},
            "training": {
                "max_steps": 2,
                "save_steps": 100,
                "per_device_batch_size": batch,
                "gradient_accumulation_steps": accumulation,
            },
            "output": {"run_name": name},
        },
        name=f"{name}.yaml",
    )
    assert run_training(str(cfg_path)) == 0
    runs = cfg_path.parent / "runs"
    (run,) = runs.glob(f"*-{name}")
    return next(x for x in read_metrics(run / "metrics.jsonl") if x["kind"] == "train")


def test_adalora_run_logs_the_orth_reg_term_once_per_step_under_accumulation(make_config) -> None:
    """metrics.jsonl: AdaLoRA's train lines carry orth_reg_loss and nll_loss; the step's loss counts the term
    once whether its 4 rows come as one batch of 4 or as 2 accumulated batches of 2."""
    one = first_train_line(make_config, "one", 4, 1)
    two = first_train_line(make_config, "two", 2, 2)
    assert one["orth_reg_loss"] > 0.1
    assert one["loss"] == pytest.approx(one["nll_loss"] + one["orth_reg_loss"], abs=1e-6)
    for key in ("loss", "nll_loss", "orth_reg_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
