"""Chat with a base model and the adapters trained on it: one base in memory, adapters switched on top of it.

One ChatEngine serves every page of the UI. The base is loaded once (as the first adapter's run trained it,
4-bit/8-bit/16-bit, or as the user overrides); more adapters join it with PEFT's `load_adapter` and are picked
per reply with `set_adapter`, or all disabled for the base's own answer, so switching never reloads the base.
Replies stream token by token from `model.generate` running in a worker thread (`TextIteratorStreamer`).
Only one generation runs at a time: the model is shared, and a second page waits for the lock.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from trainer.chat.adapter_source import AdapterError, AdapterSource, check_fits_base, read_adapter
from trainer.model.load import eval_as_trained

BASE = "base"  # the target name for "adapters disabled" in a comparison
QUANT_CHOICES = ("as trained", "none", "8bit", "4bit")


@dataclass(frozen=True)
class GenerationSettings:
    system_prompt: str = ""
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 128
    repetition_penalty: float = 1.1
    seed: int | None = 0  # sampling seed per reply, so base and adapter draw alike; None: random

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
        }


@dataclass
class ReplyStats:
    target: str
    first_token_s: float | None = None
    seconds: float = 0.0
    new_tokens: int = 0
    stopped: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class LoadedBase:
    path: str
    quantization: str  # none | 8bit | 4bit
    device: str
    seconds: float
    model: Any
    tokenizer: Any
    adapters: dict[str, AdapterSource] = field(default_factory=dict)
    peft_names: dict[str, str] = field(default_factory=dict)  # display name -> name inside the PeftModel
    attached: int = 0


class ChatEngine:
    """The shared chat model: load/unload the base, add/remove adapters, stream replies, stop them."""

    def __init__(self) -> None:
        # A plain Lock, not an RLock: compare() is a generator that holds it across yields, and Gradio runs each
        # next() on whichever worker thread is free, so the release can come from another thread than the
        # acquire (an RLock then raises "cannot release un-acquired lock" and stays held).
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.loaded: LoadedBase | None = None
        self.base_loads = 0  # how many times a base was loaded: switching adapters must not add to it
        self.last_stats: list[ReplyStats] = []

    # --- loading -------------------------------------------------------------------------------------------
    def load(self, adapter_dirs: dict[str, str], base: str | None = None, quantization: str = "as trained") -> str:
        """Load a base and the named adapters (name -> directory); replaces whatever was loaded."""
        sources = {name: read_adapter(d, base) for name, d in adapter_dirs.items()}
        _refuse_remote_code_runs(list(sources.values()))
        if not sources and not base:
            raise AdapterError("choose at least one adapter, or a base model to chat with alone")
        first = next(iter(sources.values()), None)
        base_path = base or first.base
        for source in sources.values():
            check_fits_base(_with_base(source, base_path))
        _check_same_kind(list(sources.values()))
        quant = (first.quantization if first else "none") if quantization == "as trained" else quantization
        with self._lock:
            self._unload()
            t0 = time.perf_counter()
            model, device = _load_base(base_path, quant, first)
            self.base_loads += 1
            tokenizer = _load_chat_tokenizer(base_path, first)
            self.loaded = LoadedBase(base_path, quant, device, 0.0, model, tokenizer)
            for name, source in sources.items():
                self._attach(name, _with_base(source, base_path))
            self.loaded.seconds = time.perf_counter() - t0
        return self.describe()

    def add_adapter(self, name: str, adapter_dir: str) -> float:
        """Put one more adapter on the loaded base; returns the seconds it took (the base stays as it is)."""
        with self._lock:
            if self.loaded is None:
                raise AdapterError("load a base model first")
            if name in self.loaded.adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded")
            source = read_adapter(adapter_dir, self.loaded.path)
            _refuse_remote_code_runs([source])
            check_fits_base(source)
            _check_same_kind([*self.loaded.adapters.values(), source])
            t0 = time.perf_counter()
            self._attach(name, source)
            return time.perf_counter() - t0

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            if self.loaded is None or name not in self.loaded.adapters:
                raise AdapterError(f"no adapter named {name!r} is loaded")
            if len(self.loaded.adapters) == 1:  # PEFT keeps at least one adapter: peel the wrapper off instead
                self.loaded.model = self.loaded.model.unload()
            else:
                self.loaded.model.delete_adapter(self.loaded.peft_names[name])
            del self.loaded.adapters[name], self.loaded.peft_names[name]

    def _attach(self, name: str, source: AdapterSource) -> None:
        from peft import PeftModel

        assert self.loaded is not None
        # PEFT's AdaLoRA loader tests `adapter_name in module_path` as a substring, so a name like "a" breaks it;
        # inside the model every adapter gets a name no module path contains.
        self.loaded.attached += 1
        peft_name = f"lwb{self.loaded.attached}"
        try:
            if self.loaded.adapters:
                self.loaded.model.load_adapter(str(source.path), adapter_name=peft_name)
            else:
                self.loaded.model = PeftModel.from_pretrained(
                    self.loaded.model, str(source.path), adapter_name=peft_name
                )
        except RuntimeError as e:  # the shape check passed, yet torch refused: still say which adapter
            raise AdapterError(f"adapter {source.path} could not be loaded on {self.loaded.path}: {e}") from e
        eval_as_trained(self.loaded.model)
        self.loaded.adapters[name] = source
        self.loaded.peft_names[name] = peft_name

    def unload(self) -> None:
        """Free the model (and the GPU memory it held)."""
        with self._lock:
            self._unload()

    def _unload(self) -> None:
        import torch

        self.loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- facts -----------------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.loaded.adapters) if self.loaded else []

    def memory_bytes(self) -> int:
        """Bytes of the loaded weights (base + adapters), as transformers counts them."""
        if self.loaded is None:
            return 0
        return int(self.loaded.model.get_memory_footprint())

    def describe(self) -> str:
        if self.loaded is None:
            return "Nothing loaded."
        b = self.loaded
        names = ", ".join(f"{n} ({s.method})" for n, s in b.adapters.items()) or "none"
        return (
            f"Base {b.path} ({b.quantization if b.quantization != 'none' else '16/32-bit'}) on {b.device}, "
            f"{self.memory_bytes() / 2**20:.1f} MiB, loaded in {b.seconds:.1f} s. Adapters: {names}."
        )

    # --- generating --------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the reply being generated (the next chunk ends it)."""
        self._stop.set()

    def prompt_ids(self, messages: list[dict[str, str]], settings: GenerationSettings) -> dict[str, Any]:
        assert self.loaded is not None
        if settings.system_prompt.strip():
            messages = [{"role": "system", "content": settings.system_prompt.strip()}, *messages]
        tok = self.loaded.tokenizer
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return {k: v.to(self.loaded.model.device) for k, v in enc.items()}

    def stream(
        self, messages: list[dict[str, str]], settings: GenerationSettings, target: str = BASE
    ) -> Iterator[str]:
        """The reply to messages by one target (an adapter name, or BASE), as a growing text."""
        for _, text in self.compare([(target, messages)], settings):
            yield text

    def compare(
        self, turns: list[tuple[str, list[dict[str, str]]]], settings: GenerationSettings
    ) -> Iterator[tuple[int, str]]:
        """Answer each (target, conversation) in turn; yields (turn index, reply so far) as tokens arrive.

        Each pane of the UI keeps its own conversation, so every target sees its own earlier replies.
        """
        with self._lock:
            if self.loaded is None:
                raise AdapterError("no model is loaded; press Load first")
            unknown = [t for t, _ in turns if t != BASE and t not in self.loaded.adapters]
            if unknown:
                loaded = ", ".join(self.adapter_names) or "none"
                raise AdapterError(f"not loaded: {', '.join(unknown)}; loaded adapters: {loaded}")
            self._stop.clear()
            self.last_stats = []
            for i, (target, messages) in enumerate(turns):
                stats = ReplyStats(target)
                self.last_stats.append(stats)
                for text in self._generate(self.prompt_ids(messages, settings), settings, target, stats):
                    yield i, text
                if self._stop.is_set():
                    break

    def _generate(self, enc: dict[str, Any], settings: GenerationSettings, target: str, stats: ReplyStats):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        assert self.loaded is not None
        model, tok = self.loaded.model, self.loaded.tokenizer
        peft_name = self.loaded.peft_names.get(target, BASE)
        stop = self._stop

        class StopFlag(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs) -> bool:
                return stop.is_set()

        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
        kwargs = {
            **enc,
            **settings.generate_kwargs(),
            "max_new_tokens": settings.max_new_tokens,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([StopFlag()]),
            "pad_token_id": tok.pad_token_id,
        }
        failure: list[BaseException] = []
        output: list[Any] = []

        def work() -> None:
            try:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                with torch.inference_mode(), _target_context(model, peft_name):
                    output.append(model.generate(**kwargs))
            except BaseException as e:  # re-raised in the caller's thread
                failure.append(e)
                streamer.end()

        t0 = time.perf_counter()
        worker = threading.Thread(target=work, name=f"generate-{target}", daemon=True)
        worker.start()
        text, drained = "", False
        try:
            for chunk in streamer:
                if chunk:
                    if stats.first_token_s is None:
                        stats.first_token_s = time.perf_counter() - t0
                    text += chunk
                    yield text
            drained = True
        finally:
            if not drained:
                stop.set()  # the consumer went away (page closed, new message): end the generation
            worker.join()
            stats.seconds = time.perf_counter() - t0
            stats.stopped = stop.is_set()
        if failure:
            raise failure[0]
        if output:
            stats.new_tokens = int(output[0].shape[1] - enc["input_ids"].shape[1])


def _target_context(model: Any, target: str):
    """Adapters off for the base's answer; the named adapter active otherwise."""
    from contextlib import nullcontext

    if not hasattr(model, "peft_config"):
        return nullcontext()
    if target == BASE:
        return model.disable_adapter()
    model.set_adapter(target)
    return nullcontext()


def _refuse_remote_code_runs(sources: list[AdapterSource]) -> None:
    """Chat loads models inside the UI server, where a model repo's own code must never run."""
    for source in sources:
        if source.cfg is not None and source.cfg.model.trust_remote_code:
            raise AdapterError(
                f"{source.path}: its run has model.trust_remote_code on, and chat loads models inside this server, "
                "where a model's own code never runs. Evaluate it from the Runs tab instead (a job, in its own "
                "process)."
            )


def _with_base(source: AdapterSource, base: str) -> AdapterSource:
    from dataclasses import replace

    return replace(source, base=base)


def _check_same_kind(sources: list[AdapterSource]) -> None:
    """PEFT keeps adapters of one tuner type on a model; AdaLoRA and LoRA cannot share a base."""
    kinds = {str(s.peft_config.get("peft_type", "LORA")) for s in sources}
    if len(kinds) > 1:
        raise AdapterError(
            f"adapters of different kinds ({', '.join(sorted(kinds))}) cannot be loaded on one base together; "
            "load them one kind at a time"
        )


def _load_base(path: str, quantization: str, source: AdapterSource | None) -> tuple[Any, str]:
    """The base model in eval mode, quantized as asked, on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.config.run_config import QuantizationSection, RunConfig
    from trainer.model import device
    from trainer.model.load import to_bnb_config

    cuda, _, bf16_ok = device.detect()
    cfg = source.cfg if source is not None and source.cfg is not None else RunConfig()
    plan = device.plan(cfg, cuda, bf16_ok)
    q = cfg.quantization if quantization == cfg.quantization.mode else QuantizationSection(mode=quantization)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=getattr(torch, plan.model_dtype),
            quantization_config=to_bnb_config(q, plan.compute_dtype),
            device_map={"": 0 if cuda else "cpu"},
            trust_remote_code=cfg.model.trust_remote_code,
            use_safetensors=True,
        )
    except torch.cuda.OutOfMemoryError as e:
        raise AdapterError(
            f"out of GPU memory loading {path}: unload the other model, stop a training job, or load in 4-bit"
        ) from e
    except OSError as e:
        raise AdapterError(f"base model {path}: {e}") from e
    eval_as_trained(model)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or model.config.eos_token_id
    return model, "cuda:0" if cuda else "cpu"


def _load_chat_tokenizer(base: str, source: AdapterSource | None) -> Any:
    """The tokenizer saved with the adapter (it carries the chat template it was trained with), else the base's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source.path) if source else base)
    if source is not None and source.cfg is not None and source.cfg.model.chat_template:
        tok.chat_template = source.cfg.model.chat_template
    if not tok.chat_template:
        raise AdapterError(f"{base}: its tokenizer has no chat template; set model.chat_template in the run config")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
