"""`lora-workbench evaluate RUN_DIR`: base vs adapter on held-out data, exact match of greedy answers and loss.

    lora-workbench evaluate runs/<run_id> --data data/sentiment_heldout.jsonl

Exact match compares the greedy answer to the row's last assistant message (whitespace-trimmed); loss is the
mean cross-entropy over the answer tokens, as in training. Results go to RUN_DIR/eval_results.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, RunConfig
from trainer.data_files import DataError
from trainer.data_formats import Example
from trainer.job_status import JobStatus
from trainer.tokenization import IGNORE_INDEX, tokenize_example

PHASES = 4


def load_for_inference(cfg: RunConfig, adapter_dir: Path):
    """Base as the run trained it (quantized or not) with the adapter on top, in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer import device
    from trainer.models import eval_as_trained, load_tokenizer, model_path, to_bnb_config

    cuda, _, bf16_ok = device.detect()
    plan = device.plan(cfg, cuda, bf16_ok)
    bnb = to_bnb_config(cfg.quantization, plan.compute_dtype)
    base = AutoModelForCausalLM.from_pretrained(
        model_path(cfg),
        revision=cfg.model.revision,
        dtype=getattr(torch, plan.model_dtype),
        quantization_config=bnb,
        device_map={"": 0 if cuda else "cpu"},
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=True,
    )
    return (
        eval_as_trained(PeftModel.from_pretrained(base, str(adapter_dir))),
        load_tokenizer(cfg, str(adapter_dir)),
    )


def split_prompt(example: Example) -> tuple[list[dict], str]:
    """The conversation before the last assistant turn, and that turn's text (the reference)."""
    msgs = example["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"].strip()


def greedy_answer(model: Any, tokenizer: Any, prompt: list[dict], max_new_tokens: int) -> str:
    import torch

    enc = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def answer_loss(model: Any, tokenizer: Any, example: Example) -> tuple[float, int]:
    """(summed loss, answer tokens) of one example."""
    import torch

    row = tokenize_example(tokenizer, example, tokenizer.chat_template)
    ids = torch.tensor([row.input_ids], device=model.device)
    labels = torch.tensor([row.labels], device=model.device)
    with torch.no_grad():  # loss computed here: AdaLoRA's forward adds its orthogonality penalty when given labels
        logits = model(input_ids=ids).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return float(loss), int((labels[:, 1:] != IGNORE_INDEX).sum())


def score(model: Any, tokenizer: Any, examples: list[Example], max_new_tokens: int) -> dict[str, float]:
    hits, loss_sum, tokens = 0, 0.0, 0
    for ex in examples:
        prompt, reference = split_prompt(ex)
        hits += greedy_answer(model, tokenizer, prompt, max_new_tokens) == reference
        total, n = answer_loss(model, tokenizer, ex)
        loss_sum, tokens = loss_sum + total, tokens + n
    loss = loss_sum / max(tokens, 1)
    return {
        "exact_match": round(hits / len(examples), 4),
        "loss": round(loss, 4),
        "perplexity": round(math.exp(min(loss, 50)), 3),
    }


def evaluate_run(
    run_dir: Path, data: str | None, max_new_tokens: int, limit: int | None, status: JobStatus | None = None
) -> dict[str, Any]:
    from trainer.data import load_examples
    from trainer.presets import load_config

    status = status or JobStatus("evaluate", PHASES)
    status.phase(1, "reading the run config and the held-out data")
    cfg = load_config(run_dir / "config.yaml")
    source = data or cfg.data.eval_source
    if source is None:
        raise ConfigError(["--data: this run has no data.eval_source; name a held-out file"])
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError([f"{adapter}: no saved adapter (has the run finished?)"])
    name, _, located = load_examples(source, cfg.data.model_copy(update={"max_samples": limit}))
    examples = [ex for _, ex in located if "messages" in ex]
    if not examples:
        raise DataError(name, ["no conversational rows to score (exact match needs an assistant answer)"])
    status.phase(2, f"loading the base and the adapter of {run_dir.name}")
    model, tokenizer = load_for_inference(cfg, adapter)
    status.phase(3, f"scoring the base on {len(examples)} rows")
    with model.disable_adapter():
        base = score(model, tokenizer, examples, max_new_tokens)
    status.phase(4, f"scoring the adapter on {len(examples)} rows")
    tuned = score(model, tokenizer, examples, max_new_tokens)
    result = {"run": run_dir.name, "data": name, "rows": len(examples), "base": base, "adapter": tuned}
    (run_dir / "eval_results.json").write_text(json.dumps(result, indent=1))
    return result


def evaluate_command(
    run_dir: str, data: str | None, max_new_tokens: int, limit: int | None, status_dir: str | None = None
) -> int:
    status = JobStatus("evaluate", PHASES, status_dir)
    status.start()
    try:
        r = evaluate_run(Path(run_dir), data, max_new_tokens, limit, status)
    except (ConfigError, DataError) as e:
        print(str(e), file=sys.stderr)
        status.fail(str(e))
        return 1
    except Exception as e:  # the job view shows the message; the traceback stays in the log
        import traceback

        traceback.print_exc()
        status.fail(f"{type(e).__name__}: {e}")
        return 1
    status.finish(r)
    print(f"{r['rows']} rows of {r['data']}")
    print(f"{'':10}{'exact match':>12}{'loss':>10}{'perplexity':>12}")
    for who in ("base", "adapter"):
        m = r[who]
        print(f"{who:10}{m['exact_match']:>12.1%}{m['loss']:>10.4f}{m['perplexity']:>12.3f}")
    return 0
