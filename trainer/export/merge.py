"""`lora-workbench export`: merge a trained adapter into its base and write a plain transformers model.

    lora-workbench export --adapter runs/<run_id>/adapter --out exports/my-model
    lora-workbench export --adapter runs/<run_id>/adapter --out exports/my-model --merge-into dequantized --dtype fp16

Phases: 1 load base + adapter -> 2 merge (the reference logits are taken first, from the unmerged model) ->
3 save into a temp dir next to --out -> 4 fidelity (reload the saved model with plain transformers, compare its
logits with the reference; for a 4/8-bit run also with the quantized base + adapter it was trained with, reported
and never a gate: trainer/export/fidelity.py) -> rename into place -> 5 push (only with --push-to-hub).

Every problem with the request is reported before a model loads. A failed export leaves --out as it was: the temp
dir is deleted, also when the fidelity check fails (its numbers are printed, and kept in <status-dir>/
export_report.json). --overwrite replaces only an earlier export (trainer/export/target.py: its marker file), and
only once the new one has passed its check. --merge-into dequantized is refused for an adapter trained on an
unquantized base: there is nothing to dequantize, and silently doing a 16-bit merge instead would hide a wrong
expectation.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from trainer.chat.adapter_source import AdapterSource, check_fits_base, read_adapter
from trainer.export.fidelity import (  # PROMPTS, compare: benchmarks/export_fidelity.py imports them from here
    PROMPTS,  # noqa: F401
    TOLERANCE,
    against_trained,
    compare,
    forward_logits,
    print_fidelity,
    print_trained,
    prompt_inputs,
    saved_logits,
)
from trainer.export.gguf_types import gguf_problems
from trainer.export.target import (
    give_plain_modes,
    outside_root,
    partial_dir,
    replace_problem,
    unwritable,
    write_marker,
)
from trainer.job_status import JobStatus
from trainer.run_dir import write_json_atomic

SaveDtype = Literal["bf16", "fp16", "fp32"]
MergeInto = Literal["16bit", "dequantized"]
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SHORT = {v: k for k, v in TORCH_DTYPES.items()} | {"int8": "int8"}


class ExportError(ValueError):
    """An export that cannot be done or did not pass its check; the message says why and what to do."""

    failure_kind = "check"  # trainer/failure.py's kind

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ExportRequest:
    adapter: Path
    out: Path
    base: str | None = None  # overrides the base the adapter was trained on
    dtype: SaveDtype = "bf16"  # of the saved weights
    max_shard_size: str = "2GB"
    merge_into: MergeInto = "16bit"  # 16bit: unquantized base; dequantized: the 4/8-bit base as trained, dequantized
    overwrite: bool = False
    push_to_hub: str | None = None
    status_dir: Path | None = None
    out_root: Path | None = None  # the page's <runs_dir>/exports: out must lie inside it; None from the CLI
    format: Literal["safetensors", "gguf"] = "safetensors"  # gguf: trainer/export/gguf.py (dtype is then unused)
    quant: str = "q8_0"  # of a GGUF export


def parse_shard_size(text: str) -> int:
    """Bytes from "2GB", "500MB", "200KB", "1GiB" or a plain byte count (transformers' own parser)."""
    from transformers.utils.hub import convert_file_size_to_int

    size = int(text) if text.strip().isdigit() else convert_file_size_to_int(text.strip())
    if size <= 0:
        raise ValueError("must be positive")
    return size


def out_dir_problems(out: Path, source: AdapterSource, overwrite: bool, root: Path | None = None) -> list[str]:
    """--out must not hold or sit in the adapter or the base (or lie outside root), and an existing non-empty one
    must be an earlier export, replaced only with --overwrite."""
    if root is not None and (problem := outside_root(out, root)):
        return [problem]
    protected = {"adapter": source.path}
    if Path(source.base).expanduser().exists():
        protected["base model"] = Path(source.base).expanduser().resolve()
    for what, path in protected.items():
        if out == path or path in out.parents:
            return [f"--out {out}: is the {what} directory {path} or inside it; choose a directory outside it"]
        if out in path.parents:
            return [f"--out {out}: contains the {what} ({path}); choose a directory that does not"]
    if problem := replace_problem(out, page=root is not None) or unwritable(out):
        return [problem]
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        how = "tick Replace" if root is not None else "pass --overwrite"  # the page's checkbox, or the CLI's flag
        return [
            f"--out {out}: is an earlier export and not empty; nothing was changed. Choose another directory, "
            f"or {how} to replace it once the new export has passed its checks"
        ]
    return []


def push_problems(repo_id: str) -> list[str]:
    """Everything that would stop the upload, checked before the merge work: offline, no token, bad id or token."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return ["--push-to-hub: offline (HF_HUB_OFFLINE=1); unset it to push, or upload the export later"]
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return [f"--push-to-hub: {repo_id!r} is not a valid repo id ({e})"]
    token = get_token()  # HF_TOKEN, HUGGING_FACE_HUB_TOKEN or ~/.cache/huggingface/token; never printed
    if not token:
        return ["--push-to-hub: no hub token: set HF_TOKEN (a write token) or run `hf auth login`"]
    try:
        HfApi(token=token).whoami()
    except Exception as e:  # any failure here means the upload would fail too
        return [f"--push-to-hub: {hub_message(e, repo_id)}"]
    return []


def hub_message(e: Exception, repo_id: str) -> str:
    """A readable line for a hub failure (the token is never part of it)."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return "the hub rejected the token (401); check HF_TOKEN or run `hf auth login` again"
    if status == 403:
        return f"the token may not write to {repo_id} (403); use a write token with access to that namespace"
    if status is not None:
        return f"the hub answered {status} for {repo_id}: {str(e).splitlines()[0]}"
    return f"cannot reach the hub ({type(e).__name__}: {e})"


def validate_request(req: ExportRequest) -> AdapterSource:
    """Every check that needs no model weights; raises AdapterError or ExportError (all problems at once)."""
    source = read_adapter(req.adapter, req.base)
    problems = []
    if req.dtype not in TORCH_DTYPES:
        problems.append(f"--dtype: {req.dtype!r} is not one of bf16, fp16, fp32")
    if req.merge_into not in ("16bit", "dequantized"):
        problems.append(f"--merge-into: {req.merge_into!r} is not one of 16bit, dequantized")
    elif req.merge_into == "dequantized" and source.quantization == "none":
        problems.append(
            "--merge-into dequantized: the adapter was trained on an unquantized base, so there is nothing to "
            "dequantize; use --merge-into 16bit"
        )
    try:
        parse_shard_size(req.max_shard_size)
    except ValueError:
        problems.append(f"--max-shard-size: {req.max_shard_size!r} is not a size; use e.g. 2GB, 500MB or 1GiB")
    problems += out_dir_problems(req.out.expanduser().resolve(), source, req.overwrite, req.out_root)
    if req.format not in ("safetensors", "gguf"):
        problems.append(f"--format: {req.format!r} is not one of safetensors, gguf")
    elif req.format == "gguf":
        problems += gguf_problems(req.quant, req.push_to_hub)
    if req.push_to_hub and not problems:  # the hub round trip only for an otherwise valid request
        problems += push_problems(req.push_to_hub)
    if problems:
        raise ExportError("cannot export:\n" + "\n".join(f"  - {p}" for p in problems))
    check_fits_base(source)
    return source


class Progress:
    """JobStatus's `[export] k/N ...` lines and status.json, plus the seconds each phase took (for the report)."""

    def __init__(self, phases: list[str], status_dir: Path | None):
        if status_dir is not None:
            Path(status_dir).mkdir(parents=True, exist_ok=True)
        self.names, self.seconds = phases, {}
        self.status = JobStatus("export", len(phases), str(status_dir) if status_dir else None)
        self._open: tuple[str, float] | None = None

    def phase(self, name: str, text: str) -> None:
        self.close()
        self.status.phase(self.names.index(name) + 1, text)
        self._open = (name, time.perf_counter())

    def close(self) -> None:
        if self._open:
            name, t0 = self._open
            self.seconds[name] = round(time.perf_counter() - t0, 3)
            self._open = None

    def copy_report(self, report: dict[str, Any] | None) -> None:
        """export_report.json next to status.json: the UI finds the numbers of a failed check there too."""
        if report and self.status.dir is not None:
            write_json_atomic(self.status.dir.path / "export_report.json", report)


def load_tokenizer_for(source: AdapterSource, req: ExportRequest):
    """The adapter's tokenizer (it holds the chat template the run trained with), else the base's."""
    from transformers import AutoTokenizer

    trust = bool(source.cfg and source.cfg.model.trust_remote_code)
    if (source.path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(source.path), trust_remote_code=trust)
    return AutoTokenizer.from_pretrained(source.base, revision=base_revision(source, req), trust_remote_code=trust)


def base_revision(source: AdapterSource, req: ExportRequest) -> str | None:
    """The run's pinned revision applies to the run's own base, not to a --base override."""
    return source.cfg.model.revision if source.cfg is not None and req.base is None else None


def load_unmerged(
    source: AdapterSource, req: ExportRequest, cuda: bool, quantized: bool | None = None
) -> tuple[Any, str]:
    """Base + adapter, unmerged, and the dtype its logits are computed in (the fidelity reference).

    16bit: the unquantized base in fp32 on a CPU (merged there, then rounded once to --dtype), in --dtype on a GPU.
    dequantized (or quantized=True): the base quantized exactly as the run trained it.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "revision": base_revision(source, req),
        "trust_remote_code": bool(source.cfg and source.cfg.model.trust_remote_code),
    }
    if req.merge_into == "dequantized" if quantized is None else quantized:
        from trainer.model import device
        from trainer.model.load import to_bnb_config

        plan = device.plan(source.cfg, cuda, cuda and torch.cuda.is_bf16_supported())
        kwargs["dtype"] = getattr(torch, plan.model_dtype)
        kwargs["quantization_config"] = to_bnb_config(source.cfg.quantization, plan.compute_dtype)
        ref_dtype = "int8" if source.quantization == "8bit" else plan.compute_dtype  # LLM.int8 rounds activations
    else:
        ref_dtype = TORCH_DTYPES[req.dtype] if cuda else "float32"
        kwargs["dtype"] = getattr(torch, ref_dtype)
    base = AutoModelForCausalLM.from_pretrained(
        source.base, device_map={"": 0 if cuda else "cpu"}, use_safetensors=True, **kwargs
    )
    from trainer.model.load import eval_as_trained

    return eval_as_trained(PeftModel.from_pretrained(base, str(source.path))), ref_dtype


def merge_adapter(model: Any, source: AdapterSource, req: ExportRequest, cuda: bool) -> Any:
    """merge_and_unload into the --dtype model; for dequantized, dequantize the base first and re-apply the adapter."""
    import torch
    from peft import PeftModel

    target = getattr(torch, TORCH_DTYPES[req.dtype])
    if req.merge_into == "dequantized":
        base = model.unload()  # the quantized base without adapter layers
        base = base.dequantize(dtype=target if cuda else torch.float32)
        model = PeftModel.from_pretrained(base, str(source.path))
    return model.merge_and_unload().to(target)


def save_model(model: Any, tokenizer: Any, tmp: Path, max_shard_size: int) -> list[str]:
    """Safetensors shards (+ index when sharded), config, generation config and tokenizer; returns the shard names."""
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    return sorted(p.name for p in tmp.glob("*.safetensors"))


def move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the checked tmp to out; an earlier export is moved aside, and deleted once the new one is in place."""
    if problem := replace_problem(out):  # again: out may have been filled (or swapped) while the model was merged
        raise ExportError(f"{problem} (found when the new export was ready; it was not kept)")
    old = None
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:  # something appeared there while we worked: never replace it unasked
            raise ExportError(f"--out {out}: was filled by something else during the export; nothing was changed")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    elif out.is_dir():
        out.rmdir()
    try:
        tmp.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)  # the earlier export goes back where it was
        raise
    if old is not None:
        shutil.rmtree(old)


def push(out: Path, repo_id: str) -> str:
    """Create the repo if needed and upload the export directory; returns the repo URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HTTPError

    api = HfApi(token=get_token())
    try:
        url = api.create_repo(repo_id, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id, folder_path=str(out), commit_message="Upload merged model (lora-workbench export)"
        )
    except (HTTPError, OSError) as e:
        raise ExportError(f"push-to-hub: {hub_message(e, repo_id)}; the export itself is complete in {out}") from e
    return str(url)


def tolerance_key(req: ExportRequest, ref_dtype: str) -> str:
    """The coarsest precision in a comparison: the saved dtype, or the reference's compute dtype when coarser."""
    return max(req.dtype, SHORT[ref_dtype], key=TOLERANCE.__getitem__)


def trained_reference(source: AdapterSource, req: ExportRequest, cuda: bool, inputs: list[Any]) -> tuple | None:
    """(logits, tolerance key) of the quantized base + adapter the run trained, for a 16bit merge of a 4/8-bit run;
    None otherwise (a dequantized merge's fidelity reference is that model already). Freed before the next load."""
    if source.quantization == "none" or req.merge_into == "dequantized":
        return None
    model, dtype = load_unmerged(source, req, cuda, quantized=True)
    logits = forward_logits(model, inputs)
    del model
    gc.collect()
    return logits, tolerance_key(req, dtype)


def check_saved(tmp: Path, inputs: list[Any], refs: dict[str, tuple], quantization: str, cuda: bool) -> dict:
    """The gate ("fidelity") and, for a 4/8-bit run, "against_trained_model", from one reload of the saved model."""
    logits = saved_logits(tmp, inputs, cuda)
    reference, key = refs["fidelity"]
    checks: dict[str, Any] = {"fidelity": compare(reference, logits, key)}
    if quantization != "none":
        trained, key = refs.get("trained", refs["fidelity"])  # dequantized: the gate's reference is the trained model
        checks["against_trained_model"] = against_trained(trained, logits, key, quantization)
    return checks


def write_export_files(tmp: Path, source: AdapterSource, report: dict[str, Any]) -> None:
    """Card, report and the marker (after them: it lists every file), then one file mode for all."""
    from trainer.export.merged_card import merged_card

    (tmp / "README.md").write_text(merged_card(source, report), encoding="utf-8")
    write_json_atomic(tmp / "export_report.json", report)
    write_marker(tmp, source.path, source.base, report["created"])
    give_plain_modes(tmp)


def export_safetensors(req: ExportRequest, progress: Progress) -> dict[str, Any]:
    """Phases load, merge, save, fidelity (and push): the safetensors export; returns its report."""
    import torch

    source = validate_request(req)
    out, cuda = req.out.expanduser().resolve(), torch.cuda.is_available()
    progress.phase("load", f"loading base {source.base} + {source.method} adapter ({'cuda' if cuda else 'cpu'})")
    tokenizer = load_tokenizer_for(source, req)
    inputs = prompt_inputs(tokenizer)
    trained = trained_reference(source, req, cuda, inputs)  # first: one model in memory at a time
    model, ref_dtype = load_unmerged(source, req, cuda)
    progress.phase("merge", f"merging into the {req.merge_into} base, saved as {req.dtype}")
    refs = {"fidelity": (forward_logits(model, inputs), tolerance_key(req, ref_dtype))}
    if trained is not None:
        refs["trained"] = trained
    merged = merge_adapter(model, source, req, cuda)
    del model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(out)
    try:
        progress.phase("save", f"saving safetensors (shards up to {req.max_shard_size}) and tokenizer")
        shards = save_model(merged, tokenizer, tmp, parse_shard_size(req.max_shard_size))
        del merged
        gc.collect()
        progress.phase("fidelity", "fidelity check: reloading the saved model with plain transformers")
        checks = check_saved(tmp, inputs, refs, source.quantization, cuda)
        fidelity = checks["fidelity"]
        progress.close()
        print_fidelity(fidelity)
        report = {
            "base": source.base,
            "adapter": str(source.path),
            "method": source.method,
            "quantization": source.quantization,
            "merge_into": req.merge_into,
            "dtype": req.dtype,
            "out": str(out),
            "shards": shards,
            "size_bytes": sum((tmp / s).stat().st_size for s in shards),
            "max_shard_size": req.max_shard_size,
            "device": "cuda" if cuda else "cpu",
            "seconds": dict(progress.seconds),
            **checks,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        print_trained(report)
        if not fidelity["passed"]:
            raise ExportError(
                f"fidelity check failed: the merged model's logits differ from base + adapter by up to "
                f"{fidelity['max_abs_logit_diff']:.4g} (tolerance {fidelity['tolerance']:.4g}); nothing was written "
                f"to {out}",
                report,
            )
        write_export_files(tmp, source, report)
        move_into_place(tmp, out, req.overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    if req.push_to_hub:
        progress.phase("push", f"uploading {out} to the hub as {req.push_to_hub}")
        try:
            report["pushed_to"] = push(out, req.push_to_hub)
        except ExportError as e:
            e.report = report  # the export itself is complete and checked: the job view still shows its numbers
            raise
        progress.close()
        report["seconds"] = dict(progress.seconds)
    return report
