"""The export's checks: teacher-forced logits of the saved model against base + adapter (the pass/fail gate), and,
for an adapter trained on a 4/8-bit base, against the model it was trained with (reported, not a gate).

A 16bit merge of a QLoRA adapter passes its gate (it adds B·A·alpha/r to the 16-bit base exactly) and still drifts
from what was trained: the adapter learned against the quantized weights. The second comparison shows how far, and
the dequantized merge is the one that keeps the trained behaviour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Allowed max |logit diff| as a fraction of max |reference logit|, keyed by the coarsest precision in the comparison
# (the saved dtype, or the reference's compute dtype when that is coarser). benchmarks/export_fidelity.py on
# builtin:smollm2-135m (CPU; lora/dora/qlora, both merges): float noise fp32 <= 4.9e-6, fp16 <= 5.2e-3, bf16 <= 4.4e-2;
# a broken merge (adapter x2 or dropped) >= 1.7e-1; margins noise/broken: fp32 20x/1700x, fp16 6x/6x, bf16 2.3x/1.7x.
# int8 (8-bit run, dequantized merge; LLM.int8 also rounds activations): <= 1e-2 on the tiny model, not re-measured.
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2, "bf16": 1e-1, "int8": 1e-1}
# Teacher-forced prompts (user, assistant) for the fidelity check; the tiny model's BPE was trained on text like this.
PROMPTS = [
    ("Review: The camera was awful.\nSentiment:", " negative"),
    ("Review: Honestly, the phone was wonderful.\nSentiment:", " positive"),
    ("Name the capital of France.", "The capital of France is Paris."),
    ("Give the opposite of the word.\n\nhot", "cold"),
]


def prompt_inputs(tokenizer) -> list[Any]:
    """Token ids of the fidelity prompts, rendered with the chat template when there is one."""
    inputs = []
    for user, answer in PROMPTS:
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if tokenizer.chat_template:
            enc = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
        else:
            enc = tokenizer(f"{user}\n{answer}", return_tensors="pt")
        inputs.append(enc["input_ids"])
    return inputs


def forward_logits(model: Any, inputs: list[Any]) -> list[Any]:
    """Teacher-forced logits per prompt, as float32 on the CPU."""
    import torch

    with torch.no_grad():
        return [model(input_ids=ids.to(model.device)).logits[0].float().cpu() for ids in inputs]


def compare(
    reference: list[Any], logits: list[Any], tol_key: str, tolerances: dict[str, float] = TOLERANCE
) -> dict[str, Any]:
    """Logit differences, greedy agreement and the verdict; a NaN anywhere fails. tolerances: per key, e.g. the
    GGUF export's per quant type."""
    import torch

    diffs = [(r - g).abs() for r, g in zip(reference, logits, strict=True)]
    positions = sum(d.shape[0] for d in diffs)
    max_diff = float(torch.stack([d.max() for d in diffs]).max())
    mean_diff = float(sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs))
    agree = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(reference, logits, strict=True))
    scale = max(float(torch.stack([r.abs().max() for r in reference]).max()), 1.0)
    tolerance = tolerances[tol_key] * scale
    return {
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": mean_diff,
        "greedy_agreement": agree / positions,
        "tolerance": tolerance,
        "tolerance_rule": f"{tolerances[tol_key]:g} x max |reference logit| ({scale:.4g}), {tol_key}",
        "passed": bool(max_diff <= tolerance),
        "prompts": len(reference),
        "positions": positions,
    }


def saved_logits(model_dir: Path, inputs: list[Any], cuda: bool) -> list[Any]:
    """Load the saved model with plain transformers (no PEFT) and return its logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), device_map={"": 0} if cuda else None, use_safetensors=True
    )
    logits = forward_logits(model, inputs)
    del model
    return logits


def against_trained(trained: list[Any], logits: list[Any], tol_key: str, quantization: str) -> dict[str, Any]:
    """The saved model against the quantized base + adapter the run trained: reported, never a gate."""
    numbers = compare(trained, logits, tol_key)
    numbers["within_tolerance"] = numbers.pop("passed")
    return numbers | {"reference": f"the {quantization} base + adapter, loaded as training loaded it"}


def trained_line(report: dict[str, Any], merge_control: str) -> str | None:
    """One sentence on the trained-model comparison; merge_control names the merge setting (--merge-into or the
    page's "Merge into:"), so each surface names its own control."""
    t = report.get("against_trained_model")
    if not t:
        return None
    q = report["quantization"]
    numbers = (
        f"Against the model it was trained with (the {q} base + adapter): max |logit diff| "
        f"{t['max_abs_logit_diff']:.4g}, greedy agreement {t['greedy_agreement']:.1%} over {t['positions']} positions"
    )
    if report["merge_into"] == "dequantized":
        return f"{numbers}; this merge ({merge_control} dequantized) keeps the trained behaviour."
    return (
        f"{numbers}. {merge_control} dequantized keeps the trained behaviour: it merges into the dequantized {q} "
        "weights the adapter saw, where 16bit merges into a fresh 16-bit base."
    )


def print_fidelity(f: dict[str, Any]) -> None:
    verdict = "passed" if f["passed"] else "FAILED"
    print(
        f"[export] fidelity {verdict}: max |logit diff| {f['max_abs_logit_diff']:.4g} (tolerance {f['tolerance']:.4g}"
        f" = {f['tolerance_rule']}), mean {f['mean_abs_logit_diff']:.4g}, greedy agreement "
        f"{f['greedy_agreement']:.1%} over {f['positions']} positions",
        flush=True,
    )


def print_trained(report: dict[str, Any]) -> None:
    if line := trained_line(report, "--merge-into"):
        print(f"[export] {line[0].lower()}{line[1:]}", flush=True)
