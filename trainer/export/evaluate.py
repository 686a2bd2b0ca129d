"""`lora-workbench evaluate RUN_DIR`: base vs adapter on held-out data, exact match of greedy answers and loss.

    lora-workbench evaluate runs/<run_id> --data data/sentiment_heldout.jsonl
    lora-workbench evaluate runs/<run_id> --data data/persona_heldout.jsonl --max-new-tokens 48

Exact match compares the greedy answer to the row's last assistant message (whitespace-trimmed); loss is the
mean cross-entropy over the answer tokens, as in training. When rows carry `facts` (what a correct free-text
answer must state), `facts` is the fraction of those rows whose greedy answer states every fact (any of its
alternatives, case-insensitive substring). Results go to RUN_DIR/eval_results.json, with every row's question,
reference, base and adapter answers under `examples`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from trainer.config.run_config import ConfigError, RunConfig
from trainer.data.files import DataError
from trainer.data.formats import Example
from trainer.data.tokenization import IGNORE_INDEX, tokenize_example
from trainer.job_status import JobStatus

PHASES = 4
# Rows answered per generate call: up to GENERATE_ROWS rows and GENERATE_TOKENS tokens in the cache (rows x (the
# longest prompt + max_new_tokens)), similar lengths together. A decoding step costs little more for 28 short rows
# than for 8.
GENERATE_ROWS = 32
GENERATE_TOKENS = 4096
LOSS_TOKENS = 1024  # padded tokens per scoring forward: its logits are LOSS_TOKENS x the vocabulary


def load_for_inference(cfg: RunConfig, adapter_dir: Path):
    """Base as the run trained it (quantized or not) with the adapter on top, in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.model import device
    from trainer.model.load import eval_as_trained, load_tokenizer, model_path, to_bnb_config

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


def generate_batches(lengths: list[int], rows: int = GENERATE_ROWS, tokens: int = GENERATE_TOKENS) -> list[list[int]]:
    """Indices of the rows handled together, shortest first: each batch at most `rows` rows and `tokens` padded
    tokens (rows x the longest; one row alone when it is longer)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        current = batches[-1] if batches else []
        # sorted: the row joining is the batch's longest
        if not current or len(current) == rows or (len(current) + 1) * lengths[i] > tokens:
            batches.append(current := [])
        current.append(i)
    return batches


def greedy_answers(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to a batch of rendered prompts, left-padded so every answer starts where its prompt ends."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new = out[:, enc["input_ids"].shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def answer_losses(model: Any, tokenizer: Any, examples: list[Example]) -> tuple[float, int]:
    """(summed loss, answer tokens) over the examples: similar lengths scored together, right-padded (a causal
    model's real positions never see the padding after them), LOSS_TOKENS tokens a forward."""
    import torch

    rows = [tokenize_example(tokenizer, ex, tokenizer.chat_template) for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, tokens = 0.0, 0
    for batch in generate_batches([len(r.input_ids) for r in rows], tokens=LOSS_TOKENS):
        width = max(len(rows[i].input_ids) for i in batch)
        fill = [width - len(rows[i].input_ids) for i in batch]
        ids = [rows[i].input_ids + [pad] * n for i, n in zip(batch, fill, strict=True)]
        labels = torch.tensor([rows[i].labels + [IGNORE_INDEX] * n for i, n in zip(batch, fill, strict=True)])
        mask = [[1] * (width - n) + [0] * n for n in fill]
        with torch.no_grad():  # loss computed here: AdaLoRA's forward adds its orthogonality penalty when given labels
            logits = model(
                input_ids=torch.tensor(ids, device=model.device),
                attention_mask=torch.tensor(mask, device=model.device),
            ).logits[:, :-1]
        targets = labels[:, 1:].to(logits.device)
        scored = targets != IGNORE_INDEX  # the answer positions only: the vocabulary-wide fp32 copy stays small
        loss = torch.nn.functional.cross_entropy(logits[scored].float(), targets[scored], reduction="sum")
        total, tokens = total + float(loss), tokens + int(scored.sum())
    return total, tokens


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())


def missing_facts(answer: str, facts: list[str | list[str]]) -> list[str]:
    """The facts (each named by its first alternative) that the answer does not state: a case-insensitive,
    whitespace-collapsed substring match of any alternative."""
    said = _normal(answer)
    missing = []
    for fact in facts:
        alternatives = [fact] if isinstance(fact, str) else fact
        if not any(_normal(a) in said for a in alternatives):
            missing.append(alternatives[0])
    return missing


def answer_all(model: Any, tokenizer: Any, examples: list[Example], max_new_tokens: int) -> tuple[list[str], float]:
    """Every example's greedy answer, and the mean answer-token loss over all of them."""
    texts = [
        tokenizer.apply_chat_template(split_prompt(ex)[0], add_generation_prompt=True, tokenize=False)
        for ex in examples
    ]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    answers = [""] * len(examples)
    for batch in generate_batches([n + max_new_tokens for n in lengths]):
        said = greedy_answers(model, tokenizer, [texts[i] for i in batch], max_new_tokens)
        for i, answer in zip(batch, said, strict=True):
            answers[i] = answer
    loss_sum, tokens = answer_losses(model, tokenizer, examples)
    return answers, loss_sum / max(tokens, 1)


def metrics(examples: list[Example], answers: list[str], loss: float) -> dict[str, float]:
    """exact_match, loss and perplexity; plus `facts` over the rows that carry facts, when any do."""
    hits = sum(a == split_prompt(ex)[1] for ex, a in zip(examples, answers, strict=True))
    out = {
        "exact_match": round(hits / len(examples), 4),
        "loss": round(loss, 4),
        "perplexity": round(math.exp(min(loss, 50)), 3),
    }
    checked = [not missing_facts(a, ex["facts"]) for ex, a in zip(examples, answers, strict=True) if ex.get("facts")]
    if checked:
        out["facts"] = round(sum(checked) / len(checked), 4)
    return out


def row_result(example: Example, base: str, adapter: str) -> dict[str, Any]:
    """One row for eval_results.json: its question and answers, and whether each answer hits (states every
    fact when the row has facts, else matches the reference exactly)."""
    prompt, reference = split_prompt(example)
    row: dict[str, Any] = {"question": prompt[-1]["content"] if prompt else "", "reference": reference}
    row |= {"base": base, "adapter": adapter}
    if facts := example.get("facts"):
        row["facts"] = facts
        for who, answer in (("base", base), ("adapter", adapter)):
            row[f"{who}_missing"] = missing_facts(answer, facts)
            row[f"{who}_hit"] = not row[f"{who}_missing"]
    else:
        row |= {"base_hit": base == reference, "adapter_hit": adapter == reference}
    return row


def evaluate_run(
    run_dir: Path, data: str | None, max_new_tokens: int, limit: int | None, status: JobStatus | None = None
) -> dict[str, Any]:
    from trainer.config.presets import load_config
    from trainer.data.prepare import load_examples

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
        base, base_loss = answer_all(model, tokenizer, examples, max_new_tokens)
    status.phase(4, f"scoring the adapter on {len(examples)} rows")
    tuned, tuned_loss = answer_all(model, tokenizer, examples, max_new_tokens)
    result = {"run": run_dir.name, "data": name, "rows": len(examples)}
    if n_facts := sum(1 for ex in examples if ex.get("facts")):
        result["facts_rows"] = n_facts
    result |= {"base": metrics(examples, base, base_loss), "adapter": metrics(examples, tuned, tuned_loss)}
    result["examples"] = [row_result(*row) for row in zip(examples, base, tuned, strict=True)]
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
        status.fail(str(e), exc=e)
        return 1
    except Exception as e:  # the job view shows the message; the traceback stays in the log
        import traceback

        traceback.print_exc()
        status.fail(f"{type(e).__name__}: {e}", exc=e)
        return 1
    status.finish(r)
    print_summary(r)
    return 0


def print_summary(result: dict[str, Any], shown: int = 3) -> None:
    """The scores as a table, then a few rows where the two answers differ."""
    facts = "facts" in result["base"]
    print(f"{result['rows']} rows of {result['data']}" + (f" ({result['facts_rows']} with facts)" if facts else ""))
    print(f"{'':10}{'exact match':>12}{'loss':>10}{'perplexity':>12}" + (f"{'facts':>10}" if facts else ""))
    for who in ("base", "adapter"):
        m = result[who]
        line = f"{who:10}{m['exact_match']:>12.1%}{m['loss']:>10.4f}{m['perplexity']:>12.3f}"
        print(line + (f"{m['facts']:>10.1%}" if facts else ""))
    differ = [row for row in result.get("examples", []) if row["base"] != row["adapter"]]
    differ.sort(key=lambda row: row["base_hit"] == row["adapter_hit"])  # rows whose verdict changed first
    for row in differ[:shown]:
        print(f"\nQ: {_clip(row['question'])}")
        for who in ("base", "adapter"):
            print(f"  {who:8}{'hit ' if row[who + '_hit'] else 'miss'} {_clip(row[who])}")


def _clip(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."
