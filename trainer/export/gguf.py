"""`lora-workbench export --format gguf`: merge, convert with llama.cpp's own converter, and check the GGUF.

    lora-workbench export --adapter runs/<run_id>/adapter --out exports/my-model --format gguf --quant q8_0

Phases: 1 load base + adapter (reference logits from the unmerged model) -> 2 merge (fp32, saved into a temp dir)
-> 3 convert (llama.cpp's convert_hf_to_gguf.py, trainer/export/llama_cpp.py) -> [4 quantize: k-quants, llama-quantize]
-> check: load the GGUF back with transformers and require (a) its logits within the quant's tolerance of the
reference, (b) the tokenizer round-trip (same ids as the run's tokenizer, decoded back to the text), (c) the chat
template embedded, (d) a greedy reply to a templated prompt that ends with the model's EOS. The directory gets the
GGUF, an Ollama Modelfile (template + stop tokens), export_report.json and the export marker; a failed check
leaves --out as it was.
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainer.export.fidelity import compare, forward_logits, prompt_inputs
from trainer.export.gguf_types import CONVERTER_QUANTS, gguf_problems
from trainer.export.llama_cpp import convert, ensure_converter, quantize
from trainer.export.merge import (
    ExportError,
    load_tokenizer_for,
    load_unmerged,
    merge_adapter,
    move_into_place,
    validate_request,
)
from trainer.export.target import give_plain_modes, partial_dir, write_marker
from trainer.model.builtin_models import cache_root
from trainer.model.gguf_load import load_gguf, parsed_once
from trainer.run_dir import write_json_atomic

# Allowed max |logit diff| as a fraction of max |reference logit| (fp32 base + adapter, unmerged), per GGUF type.
# benchmarks/gguf_tolerance.py on builtin:smollm2-135m (CPU, 2 cores, 2026-12-02; llama-quantize from
# `lora-workbench build-llama-cpp`), rounding noise on two adapters (a 12-step LoRA; the default run's, 40 steps)
# -> chosen tolerance; a broken export (adapter x2 / dropped), lowest of the two:
#   f16 1.2e-3 -> 1e-2; bf16 1.3e-2 -> 5e-2; q8_0 4.6e-2 -> 1.2e-1; broken >= 2.7e-1 / 5.0e-1 for all three.
#   q6_k 7.5e-2 -> 1.5e-1 (x2 2.5e-1, dropped 5.1e-1); q5_k_m 2.6e-1 / 4.6e-1 -> 6e-1 (4.3e-1, 5.1e-1);
#   q4_k_m 1.8e-1 / 2.2e-1 -> 3e-1 (2.8e-1, 5.6e-1).
# At 4-6 bits the noise reaches a broken merge's distance, so a k-quant is checked twice: the f16 GGUF it is
# quantized from against base + adapter at f16's tolerance (check_source: the merge and conversion, exactly), and
# the k-quant itself at its own tolerance (the quantization). q5_k_m is noisier than q4_k_m on this model only:
# its weights are a Q4_1 file's, dequantized, and its 576-wide rows fall back from k-quants to Q5_1 (q5_k_m) or
# Q5_0 (q4_k_m), off that grid.
GGUF_TOLERANCE = {"f16": 1e-2, "bf16": 5e-2, "q8_0": 1.2e-1, "q6_k": 1.5e-1, "q5_k_m": 6e-1, "q4_k_m": 3e-1}
ROUND_TRIP = ["Hello, world!", "  two spaces,\ta tab and\nnew lines\n", "Ünïcödé — 東京 🚀 naïve café"]
EOS_PROMPT = "Name the capital of France."
MAX_REPLY = 96  # tokens: a one-sentence answer ends long before


def base_problems(source: Any) -> list[str]:
    """Bases llama.cpp's converter is known to refuse, named before minutes of loading and merging."""
    from trainer.config.builtin_ids import TINY_MODEL_ID

    tiny = source.cfg is not None and source.cfg.model.name_or_path == TINY_MODEL_ID
    if tiny or Path(source.base).resolve() == (gguf_cache(source) / "tiny-model").resolve():
        return [
            f"--format gguf: the adapter's base is {TINY_MODEL_ID}, whose test-only BPE tokenizer llama.cpp's "
            "converter does not know (no pre-tokenizer for it), so no GGUF can be made of it; --format "
            "safetensors works, or train on a model llama.cpp supports (builtin:smollm2-135m, Llama, Qwen, Mistral)"
        ]
    return []


def gguf_cache(source: Any) -> Path:
    """The model cache of the adapter's run: llama.cpp's converter and build live there."""
    return cache_root(source.cfg.output.runs_dir if source.cfg is not None else "runs")


def gguf_name(out: Path, quant: str) -> str:
    return f"{out.name}.{quant}.gguf"


def read_gguf_fields(path: Path) -> dict[str, Any]:
    """The metadata the check needs: the embedded chat template and the EOS id (None when absent)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    template, eos = fields.get("tokenizer.chat_template"), fields.get("tokenizer.ggml.eos_token_id")
    return {  # parts/data: ReaderField's layout in every gguf release (contents() came later)
        "chat_template": bytes(template.parts[template.data[0]]).decode("utf-8") if template is not None else None,
        "eos_token_id": int(eos.parts[eos.data[0]][0]) if eos is not None else None,
    }


def round_trip(tokenizer: Any, gguf_tokenizer: Any) -> dict[str, Any]:
    """The GGUF's tokenizer gives the run's token ids and decodes them back to the text."""
    texts = list(ROUND_TRIP)
    if tokenizer.chat_template:  # a chat as the model sees it: its special tokens too
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": EOS_PROMPT}], tokenize=False))
    bad = []
    for text in texts:
        ids = gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids != tokenizer(text, add_special_tokens=False)["input_ids"] or gguf_tokenizer.decode(ids) != text:
            bad.append(text)
    return {"texts": len(texts), "mismatched": bad, "passed": not bad}


def greedy_reply(model: Any, tokenizer: Any, eos_id: int) -> dict[str, Any]:
    """Greedy reply of the GGUF model to a templated prompt; passed when its last token is eos_id."""
    import torch

    messages = [{"role": "user", "content": EOS_PROMPT}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=MAX_REPLY, do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id
        )
    reply = out[0, ids["input_ids"].shape[1] :].tolist()
    text = tokenizer.decode(reply, skip_special_tokens=True)
    return {"prompt": EOS_PROMPT, "reply": text, "tokens": len(reply), "passed": bool(reply) and reply[-1] == eos_id}


def model_eos(merged: Any, tokenizer: Any) -> list[int]:
    """The EOS ids the merged model stops on: its generation config's, else the tokenizer's."""
    eos = merged.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return [eos] if isinstance(eos, int) else list(eos)


def check_gguf(path: Path, tokenizer: Any, reference: list[Any], quant: str, eos_ids: list[int]) -> dict[str, Any]:
    """Every check of a written GGUF against the model it came from; "failures" lists what did not hold."""
    with parsed_once(path):
        fields = read_gguf_fields(path)
        model, gguf_tokenizer = load_gguf(path)
    logits = compare(reference, forward_logits(model, prompt_inputs(tokenizer)), quant, GGUF_TOLERANCE)
    template = {"embedded": fields["chat_template"] is not None, "passed": False}
    template["passed"] = template["embedded"] and fields["chat_template"] == tokenizer.chat_template
    eos_id = fields["eos_token_id"]
    eos = {"gguf_eos_token_id": eos_id, "model_eos_token_ids": eos_ids, "passed": eos_id in eos_ids}
    if eos["passed"] and tokenizer.chat_template:  # without a template the template check has failed already
        eos |= greedy_reply(model, tokenizer, eos_id)
    checks = {"logits": logits, "tokenizer": round_trip(tokenizer, gguf_tokenizer), "chat_template": template}
    checks["eos"] = eos
    del model
    gc.collect()
    return checks | {"failures": failures(checks)}


def check_source(f16: Path, tokenizer: Any, reference: list[Any]) -> dict[str, Any]:
    """A k-quant's f16 source GGUF against base + adapter at f16's tolerance: at 4-6 bits the rounding noise of a
    small model can reach a mis-scaled adapter's distance, so the merge is checked where it is still exact."""
    with parsed_once(f16):
        model, _ = load_gguf(f16)
    logits = compare(reference, forward_logits(model, prompt_inputs(tokenizer)), "f16", GGUF_TOLERANCE)
    del model
    gc.collect()
    return logits


def failures(checks: dict[str, Any]) -> list[str]:
    """One line per failed check, saying what was found and what was expected."""
    out = []
    if not (f := checks["logits"])["passed"]:
        out.append(
            f"logits: the GGUF differs from base + adapter by up to {f['max_abs_logit_diff']:.4g} "
            f"(tolerance {f['tolerance']:.4g} = {f['tolerance_rule']}); greedy agreement {f['greedy_agreement']:.1%}"
        )
    if (src := checks.get("source_logits")) is not None and not src["passed"]:
        out.append(
            f"logits: the f16 GGUF the k-quant was quantized from differs from base + adapter by up to "
            f"{src['max_abs_logit_diff']:.4g} (tolerance {src['tolerance']:.4g} = {src['tolerance_rule']}): the merge "
            "or the conversion is wrong, not the quantization"
        )
    if not (t := checks["tokenizer"])["passed"]:
        out.append(f"tokenizer: the GGUF's tokenizer does not round-trip {len(t['mismatched'])} of {t['texts']} texts")
    if not checks["chat_template"]["passed"]:
        why = "is not the run's" if checks["chat_template"]["embedded"] else "is missing (tokenizer.chat_template)"
        out.append(f"chat template: the GGUF's {why}; llama.cpp and Ollama would format chats wrongly")
    e = checks["eos"]
    if e["gguf_eos_token_id"] not in e["model_eos_token_ids"]:
        out.append(f"eos: the GGUF's EOS id {e['gguf_eos_token_id']} is not the model's {e['model_eos_token_ids']}")
    elif not e["passed"] and "reply" in e:
        out.append(
            f"eos: a greedy reply to {e['prompt']!r} did not end with EOS in {MAX_REPLY} tokens: {e['reply']!r}"
        )
    return out


def modelfile(gguf: str, tokenizer: Any, eos_ids: list[int]) -> str:
    """An Ollama Modelfile: the GGUF, its chat template (ChatML in Ollama's Go template) and the stop tokens."""
    lines = [f"# ollama create NAME -f Modelfile && ollama run NAME\nFROM ./{gguf}"]
    template = tokenizer.chat_template or ""
    if "<|im_start|>" in template:  # ChatML; any other template Ollama reads from the GGUF's tokenizer.chat_template
        lines.append('TEMPLATE """' + CHATML + '"""')
        if system := default_system(tokenizer):
            lines.append(f'SYSTEM """{system}"""')
    for token in tokenizer.convert_ids_to_tokens(eos_ids):
        lines.append(f'PARAMETER stop "{token}"')
    return "\n".join(lines) + "\n"


CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}"
    "<|im_end|>\n"
)


def default_system(tokenizer: Any) -> str | None:
    """The system prompt the chat template adds when a chat has none (SmolLM2's does), for Ollama's SYSTEM."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    head = "<|im_start|>system\n"
    return text[len(head) : text.index("<|im_end|>")] if text.startswith(head) else None


def export_gguf(req: Any, progress: Any) -> dict[str, Any]:
    """The GGUF export's phases (see the module docstring); returns the report, raises ExportError on a failed check."""
    import torch

    source = validate_request(req)
    problems = gguf_problems(req.quant, None, gguf_cache(source)) + base_problems(source)  # the run's own cache
    if problems:  # before any load
        raise ExportError("cannot export:\n" + "\n".join(f"  - {p}" for p in problems))
    req = replace(req, dtype="fp32")  # merged and saved in fp32: the converter rounds once, to the quant
    out, cuda = req.out.expanduser().resolve(), torch.cuda.is_available()
    progress.phase("load", f"loading base {source.base} + {source.method} adapter ({'cuda' if cuda else 'cpu'})")
    tokenizer = load_tokenizer_for(source, req)
    model, _ = load_unmerged(source, req, cuda)
    progress.phase("merge", f"merging into the {req.merge_into} base (fp32)")
    reference = forward_logits(model, prompt_inputs(tokenizer))
    merged = merge_adapter(model, source, req, cuda)
    eos_ids = model_eos(merged, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(out)
    try:
        merged.save_pretrained(tmp / "merged")
        tokenizer.save_pretrained(tmp / "merged")
        del model, merged
        gc.collect()
        gguf, f16 = write_gguf(req, source, tmp, progress)
        progress.phase("check", f"checking {gguf.name}: logits, tokenizer, chat template, EOS")
        checks = check_gguf(gguf, tokenizer, reference, req.quant, eos_ids)
        if f16 is not None:  # a k-quant: its f16 source holds the merge exactly
            checks["source_logits"] = check_source(f16, tokenizer, reference)
            checks["failures"] = failures(checks)
            f16.unlink()
        progress.close()
        report = gguf_report(req, source, gguf, checks, progress.seconds)
        print_checks(checks)
        if checks["failures"]:
            lines = "\n".join(f"  - {x}" for x in checks["failures"])
            raise ExportError(f"GGUF check failed; nothing was written to {out}:\n{lines}", report)
        (tmp / "Modelfile").write_text(modelfile(gguf.name, tokenizer, eos_ids), encoding="utf-8")
        write_gguf_files(tmp, source, report)
        move_into_place(tmp, out, req.overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def write_gguf(req: Any, source: Any, tmp: Path, progress: Any) -> tuple[Path, Path | None]:
    """Convert tmp/merged (and quantize it for a k-quant); the merged checkpoint is deleted after. Returns the GGUF
    and, for a k-quant, the f16 GGUF it was quantized from (for check_source; the caller deletes it)."""
    out, cache = req.out.expanduser().resolve(), gguf_cache(source)
    gguf = tmp / gguf_name(out, req.quant)
    outtype = req.quant if req.quant in CONVERTER_QUANTS else "f16"
    progress.phase("convert", f"converting with llama.cpp's convert_hf_to_gguf.py (--outtype {outtype})")
    converted = gguf if outtype == req.quant else tmp / gguf_name(out, "f16")
    convert(ensure_converter(cache, log), tmp / "merged", converted, outtype, log)
    shutil.rmtree(tmp / "merged")
    if converted == gguf:
        return gguf, None
    progress.phase("quantize", f"quantizing to {req.quant} with llama-quantize")
    quantize(converted, gguf, req.quant, cache, log)
    return gguf, converted


def log(msg: str) -> None:
    print(f"[export] {msg}", flush=True)


def gguf_report(req: Any, source: Any, gguf: Path, checks: dict, seconds: dict) -> dict[str, Any]:
    return {
        "format": "gguf",
        "quant": req.quant,
        "base": source.base,
        "adapter": str(source.path),
        "method": source.method,
        "quantization": source.quantization,
        "merge_into": req.merge_into,
        "out": str(req.out.expanduser().resolve()),
        "gguf": gguf.name,
        "size_bytes": gguf.stat().st_size,
        "seconds": dict(seconds),
        "fidelity": checks["logits"],  # the page's and the report's usual name for the logit gate
        **checks,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_gguf_files(tmp: Path, source: Any, report: dict[str, Any]) -> None:

    write_json_atomic(tmp / "export_report.json", report)
    write_marker(tmp, source.path, source.base, report["created"])
    give_plain_modes(tmp)


def print_checks(checks: dict[str, Any]) -> None:
    f, e = checks["logits"], checks["eos"]
    verdict = "FAILED" if checks["failures"] else "passed"
    if (src := checks.get("source_logits")) is not None:
        print(
            f"[export] the f16 GGUF it was quantized from: max |logit diff| {src['max_abs_logit_diff']:.4g} "
            f"(tolerance {src['tolerance']:.4g})",
            flush=True,
        )
    print(
        f"[export] GGUF check {verdict}: max |logit diff| {f['max_abs_logit_diff']:.4g} (tolerance "
        f"{f['tolerance']:.4g}), greedy agreement {f['greedy_agreement']:.1%}; tokenizer round-trip "
        f"{'ok' if checks['tokenizer']['passed'] else 'FAILED'}; chat template "
        f"{'embedded' if checks['chat_template']['passed'] else 'MISSING/WRONG'}; reply {e.get('reply', '')!r}",
        flush=True,
    )
