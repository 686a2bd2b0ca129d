"""`lora-workbench bench`: the workbench against a plain TRL script on the same data, model, adapter, steps and seed.

    lora-workbench bench                          # the matrix of this machine (gpu if CUDA, else cpu)
    lora-workbench bench --matrix cpu --repeat 3  # tiny + small model, LoRA + QLoRA, max_length 64 and 256
    lora-workbench bench --matrix gpu             # Qwen2.5 / Llama-3.1 shapes with random weights, 512 and 2048
    lora-workbench bench --only smollm2           # the real model: SmolLM2-135M, LoRA + QLoRA, 256 and 1024
    lora-workbench bench --only smollm2-lora-256 --steps 3 --variants ab --out -   # its quickest smoke run
    lora-workbench bench --only tiny-lora-64 --steps 3 --out -   # one case, table printed only
    lora-workbench bench --matrix cpu --threads 1 --repeat 3     # a CPU shared with other work (see RESULTS.md)

The GPU matrix (10 cases x 4 runs of 10 steps; 0.5B to 8B models written once into runs/.cache/bench-models,
~35 GB) is sized for ~20 minutes on one H100; it has not yet been run on one.

The real cases (smollm2-{lora,qlora}-{256,1024}, `matrix("real")`) train the built-in SmolLM2-135M-Instruct
(builtin:smollm2-135m, resolved to its converted checkpoint in $LORA_WORKBENCH_CACHE or --cache-dir; both (a)
and the workbench load that directory) on real English (text_data: the bundled data's sentences, cut so that
every row fits max_length with the model's chat template). They run 10 steps by default, are picked by name with
--only from either matrix, and are not in the cpu matrix: at 2 CPU threads one of their steps takes tens of
seconds (~15 real tokens/s), not the tiny cases' tens of milliseconds, so the four take hours there.

Every case runs one process per variant: (a) benchmarks/reference_trl.py, plain TRL; (b) `lora-workbench train`
on a config pinned to the reference's settings (precision, no packing, checkpointing, optimizer, schedule, and
plain TRL's behaviour for every workbench speed option this version has); (c) `lora-workbench train` with the
workbench's defaults (recipe + its packing etc.); (d) as (c) with packing on, while the defaults do not pack. All
share the batch, accumulation, steps and seed. The reference takes the recipe's optimizer and keeps TRL's default
gradient checkpointing (on), as a minimal script does; (c) decides it with the memory estimate ('auto').

Measured inside the training part only (imports, model load and data preparation excluded): from just before
trainer.train() to the last logged step (the workbench's `model_loaded` event to its last train line), with
one logged step per optimizer step. Step time and real tokens/s leave out the first WARMUP steps. The process's
CPU seconds in the same window are sampled from outside (CpuClock): on a shared CPU they move far less than wall
time. Peak memory: torch.cuda.max_memory_allocated on a GPU; on a CPU the largest RSS sampled at the logged
steps. MFU on a GPU:

    FLOPs per real token = 4·N + 6·N_lora + 12·L·d_attn·s_eff
    N       weights of every matmul of the frozen base (all nn.Linear, lm_head included; not the embedding lookup):
            forward 2N + gradients w.r.t. activations 2N; no weight gradients for frozen weights
    N_lora  adapter weights: forward, activation and weight gradients, 2 + 2 + 2 per weight
    12·L·d_attn·s_eff  attention scores and weighted sum (QK^T, PV): forward 4·L·d_attn·s, backward twice that;
            L layers, d_attn = heads · head_dim, counted over the full (non-causal) context as in PaLM's MFU;
            s_eff = Σℓ²/Σℓ over the data's rows ℓ (truncated to max_length): each row attends to itself only
    MFU = real tokens/s · FLOPs per token / the GPU's dense bf16 peak. Recomputation by gradient checkpointing
    and 4-bit dequantization are not counted (they are overhead, not model FLOPs).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from trainer.bench.report import (
    RESULTS_HEADER,
    VARIANTS,
    Measure,
    flops_per_token,
    machine,
    median_measure,
    peak_flops,
    report,
    summarize,
)
from trainer.config.paths import PROJECT_ROOT
from trainer.model.builtin_models import CACHE_ENV, SMOLLM2, BuiltinModel, ensure_builtin

REFERENCE = PROJECT_ROOT / "benchmarks" / "reference_trl.py"
BUNDLED_DATA = PROJECT_ROOT / "data" / "sentiment_train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
LEARNING_RATE, SEED, WARMUP = 2e-4, 42, 3
STEPS = {"cpu": 60, "gpu": 10, "real": 10}
ROLES = {"system", "user", "assistant", "human", "gpt"}
REAL_MODELS: dict[str, BuiltinModel] = {"smollm2": SMOLLM2}  # case.model -> built-in model; its preset's name
# The workbench's speed options at what plain TRL does by default; (b) pins those this version has.
PLAIN_TRL: dict[str, Any] = {
    "padding_free": False,
    "group_by_length": False,
    "dataloader_num_workers": 0,
    "torch_compile": False,
    "use_liger_kernel": False,
    "tf32": False,  # TrainingArguments(tf32=False) sets PyTorch's own default (no TF32 matmuls); TRL leaves it
}
KNOWN_TRAINING_FIELDS = {
    "num_epochs", "max_steps", "learning_rate", "lr_scheduler", "warmup_ratio", "per_device_batch_size",
    "gradient_accumulation_steps", "packing", "gradient_checkpointing", "optimizer", "weight_decay", "max_grad_norm",
    "precision", "seed", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "resume_from_checkpoint",
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    model: str  # tiny | small | a presets/configs name
    quant: bool  # 4-bit QLoRA
    max_length: int
    batch: int
    accum: int
    steps: int | None = None  # this case's default step count, else the matrix's

    @property
    def name(self) -> str:
        return f"{self.model}-{'qlora' if self.quant else 'lora'}-{self.max_length}"


def real_cases(cuda: bool) -> list[Case]:
    """The built-in SmolLM2-135M, LoRA and QLoRA at 256 and 1024 tokens. On a CPU 2 rows of 256 or 1 of 1024 (~380
    and ~760 real tokens a step: rows average 3/4 of max_length), already tens of seconds a step on 2 threads."""
    batch = {256: 8, 1024: 8} if cuda else {256: 2, 1024: 1}
    return [Case("smollm2", q, n, batch[n], 1, STEPS["real"]) for n in (256, 1024) for q in (False, True)]


def matrix(kind: str, cuda: bool = False) -> list[Case]:
    if kind == "real":
        return real_cases(cuda)
    if kind == "cpu":
        return [Case(m, q, n, 8, 2) for m in ("tiny", "small") for n in (64, 256) for q in (False, True)]
    big = [("qwen2.5-1.5b", False, 2048), ("qwen2.5-1.5b", True, 512), ("qwen2.5-7b", False, 512)]
    big += [("qwen2.5-7b", True, 2048), ("llama-3.1-8b", False, 2048), ("llama-3.1-8b", True, 512)]
    cases = [("qwen2.5-0.5b", q, n) for n in (512, 2048) for q in (False, True)] + big
    return [Case(m, q, n, 8 if n == 512 else 2, 1) for m, q, n in cases]


def select(cases: list[Case], only: str | None) -> list[Case]:
    """Cases named in a comma list, by full name or by a prefix ending at a '-' (tiny-lora: both lengths)."""
    if not only:
        return cases
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    return [c for c in cases if any(c.name == w or c.name.startswith(w + "-") for w in wanted)]


def resolve_cases(kind: str, only: str | None, cuda: bool) -> tuple[list[Case], list[Case]]:
    """(the cases to run, the ones --only can name): --only also reaches the real cases from the cpu/gpu matrix."""
    pool = matrix(kind, cuda)
    if only and kind != "real":
        pool += real_cases(cuda)
    return select(pool, only), pool


# ----------------------------------------------------------------------------------------------- models, data


def prepare_model(case: Case, cache: Path, env: dict[str, str]) -> Path | None:
    """The model directory of a case, built once into the cache; None when its config.json is not in presets/."""
    from trainer.model.tiny_model import ensure_tiny_model

    if case.model in REAL_MODELS:  # $LORA_WORKBENCH_CACHE as train reads it, else runs/.cache: train's default
        return ensure_builtin(REAL_MODELS[case.model], Path(os.environ.get(CACHE_ENV) or cache))
    tiny = ensure_tiny_model(cache)
    if case.model == "tiny":
        return tiny
    out = cache / "bench-models" / case.model
    if (out / "config.json").exists():
        return out
    if case.model == "small":
        return build_small_model(out, tiny)
    configs = PROJECT_ROOT / "presets" / "configs"
    config = next(
        (p for p in (configs / case.model / "config.json", configs / f"{case.model}.json") if p.is_file()), None
    )
    if config is None:
        return None
    print(f"bench: building {case.model} with random weights from {config} into {out}", flush=True)
    code = f"from trainer.bench.bench import build_preset_model as b; b({str(config)!r}, {str(out)!r}, {str(tiny)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, check=True)  # keeps CUDA out of here
    return out


def _save(model: Any, tokenizer: Any, out: Path) -> Path:
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def build_small_model(out: Path, tiny: Path) -> Path:
    """A ~3.5M-parameter Llama (hidden 256, 4 layers, MLP 768) with random weights and the tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.model.tiny_model import llama_config

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = llama_config(tokenizer, hidden=256, intermediate=768, layers=4)
    torch.manual_seed(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(AutoModelForCausalLM.from_config(config), tokenizer, out)


def build_preset_model(config_path: str, out: str, tiny: str) -> Path:
    """A real architecture from its config.json with random weights (made on the GPU when there is one) and the
    tiny model's tokenizer: its ids are valid in any vocabulary, and speed does not depend on the weights."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    fields = json.loads(Path(config_path).read_text())
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tokenizer.model_max_length = config.max_position_embeddings
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return _save(model, tokenizer, Path(out))


def synthetic_data(model_dir: Path, max_length: int, rows: int, out: Path) -> Path:
    """messages rows of max_length/2 .. max_length tokens (a quarter prompt, the rest answer) made of the bundled
    data's words: the bundled rows are ~25 tokens, too short for the GPU's 512 and 2048."""
    import json
    import random

    from transformers import AutoTokenizer

    from trainer.model.tiny_model import corpus_lines

    if out.exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = sorted({w for line in corpus_lines() for w in line.split()})
    rng = random.Random(SEED)
    lines = []
    for _ in range(rows):
        n = rng.randint(max_length // 2, max_length) - 16  # room for the chat template's tokens
        ids = tokenizer(" ".join(rng.choice(words) for _ in range(n)))["input_ids"][:n]
        prompt, answer = tokenizer.decode(ids[: n // 4]), tokenizer.decode(ids[n // 4 :])
        messages = [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": answer.strip()}]
        lines.append(json.dumps({"messages": messages}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def text_data(model_dir: Path, max_length: int, rows: int, out: Path) -> Path:
    """messages rows of real English for a real model: a run of the bundled data's lines from a random start (a
    quarter prompt, the rest answer), cut so that the row as the workbench tokenizes it (chat template and its
    default system prompt included) is max_length/2 .. max_length tokens. No row is truncated, so (a) and (b)
    train the same tokens; the padded batches are about max_length wide; the loss is a real model's on text."""
    import json
    import random

    from transformers import AutoTokenizer

    from trainer.data.tokenization import chat_template_of, tokenize_example
    from trainer.model.tiny_model import corpus_lines

    if out.exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = chat_template_of(tokenizer, None)
    text = " ".join(x for x in corpus_lines() if x not in ROLES)  # the rows' text, not their role fields
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream += stream[:max_length]  # a run may wrap around the end

    def row(prompt: list[int], answer: list[int]) -> tuple[dict, int]:
        texts = [tokenizer.decode(ids).strip() for ids in (prompt, answer)]
        messages = [{"role": r, "content": t} for r, t in zip(("user", "assistant"), texts, strict=True)]
        return {"messages": messages}, len(tokenize_example(tokenizer, {"messages": messages}, template).input_ids)

    rng = random.Random(SEED)
    lines = []
    for _ in range(rows):
        n = rng.randint(max_length // 2, max_length)
        start = rng.randrange(len(stream) - max_length)
        prompt, answer = stream[start : start + n // 4], stream[start + n // 4 : start + n]
        example, length = row(prompt, answer)
        while length > n:  # the template's tokens, and re-tokenizing at the cuts, take the excess
            answer = answer[: n - length]
            example, length = row(prompt, answer)
        lines.append(json.dumps(example))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def model_flops(model_dir: Path, cfg: Any) -> float:
    """FLOPs per real token of this model, adapter and data (formula in the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.data.cache import cache_dir
    from trainer.data.prepare import prepare_data
    from trainer.data.tokenization import chat_template_of
    from trainer.model.load import load_tokenizer

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    n_matmul = sum(m.weight.numel() for _, m in linears)
    n_lora = sum(ADAPTER["r"] * (m.in_features + m.out_features) for n, m in linears if n.split(".")[-1] in TARGETS)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tokenizer = load_tokenizer(cfg, str(model_dir))
    template = chat_template_of(tokenizer, None)
    data = prepare_data(tokenizer, cfg.data, template, cfg.training.seed, cache_dir(cfg.output.runs_dir))
    lengths = [len(r.input_ids) for r in data.train]
    s_eff = sum(n * n for n in lengths) / sum(lengths)
    return flops_per_token(n_matmul, n_lora, config.num_hidden_layers, config.num_attention_heads * head_dim, s_eff)


# ----------------------------------------------------------------------------------------------- configs


def workbench_config(case: Case, model_dir: Path, data: Path, steps: int, runs_dir: Path) -> dict[str, Any]:
    """(c): the recipe's and the workbench's defaults; only the run's identity and measurement are set."""
    preset = {"model_preset": case.model} if case.model in REAL_MODELS else {}  # as a user of the model picks it
    return {
        "recipe": "qlora" if case.quant else "lora",
        **preset,
        "model": {"name_or_path": str(model_dir)},
        "adapter": {**ADAPTER, "target_modules": TARGETS},
        "data": {"source": str(data), "max_length": case.max_length},
        "training": {
            "max_steps": steps,
            "per_device_batch_size": case.batch,
            "gradient_accumulation_steps": case.accum,
            "seed": SEED,
            "logging_steps": 1,  # one metrics line per step: the step times
            "save_steps": steps + 1,  # no checkpoint inside the measured part (the final one comes after it)
        },
        "output": {"runs_dir": str(runs_dir)},
    }


def plain_trl(defaults: dict[str, Any], cuda_bf16: bool) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(b)'s config, the reference's knobs, and the config fields this harness does not know (left at default)."""
    from trl import SFTConfig

    from trainer.config.presets import build_config, deep_merge

    resolved = build_config(defaults)
    knobs = {
        "optim": resolved.training.optimizer,  # what the recipe's users would pick with plain TRL too
        "gradient_checkpointing": SFTConfig.gradient_checkpointing,  # TRL's default, which a minimal script keeps
    }
    dtype = "bfloat16" if cuda_bf16 else "float32"
    pinned = {
        "model": {"dtype": dtype, "attn_implementation": "sdpa"},
        "training": {
            "packing": False,
            "gradient_checkpointing": knobs["gradient_checkpointing"],
            "optimizer": knobs["optim"],
            "precision": "bf16" if cuda_bf16 else "fp32",
            "learning_rate": LEARNING_RATE,
            "lr_scheduler": "linear",  # SFTConfig's defaults
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
        },
    }
    if resolved.quantization.mode == "4bit":
        pinned["quantization"] = {"quant_type": "nf4", "double_quant": True, "compute_dtype": dtype}
    fields = type(resolved.training).model_fields.keys()
    pinned["training"].update({name: value for name, value in PLAIN_TRL.items() if name in fields})
    return deep_merge(defaults, pinned), knobs, sorted(fields - KNOWN_TRAINING_FIELDS - PLAIN_TRL.keys())


def reference_argv(case: Case, model_dir: Path, data: Path, steps: int, knobs: dict, out: Path) -> list[str]:
    argv = [sys.executable, str(REFERENCE), "--model", str(model_dir), "--data", str(data)]
    argv += ["--r", str(ADAPTER["r"]), "--alpha", str(ADAPTER["lora_alpha"])]
    argv += ["--dropout", str(ADAPTER["lora_dropout"])]
    argv += ["--targets", ",".join(TARGETS), "--steps", str(steps), "--batch", str(case.batch)]
    argv += ["--accum", str(case.accum), "--max-length", str(case.max_length), "--seed", str(SEED)]
    argv += ["--lr", str(LEARNING_RATE), "--optim", knobs["optim"], "--logging-steps", "1", "--warmup", str(WARMUP)]
    argv += ["--gradient-checkpointing" if knobs["gradient_checkpointing"] else "--no-gradient-checkpointing"]
    argv += ["--4bit"] if case.quant else []
    return argv + ["--output-dir", str(out / "output"), "--json", str(out / "reference.json")]


# ----------------------------------------------------------------------------------------------- running


def child_env(threads: int) -> dict[str, str]:
    from trainer.run.log_tee import CAPTURED_ENV

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.pop(CAPTURED_ENV, None)  # train as `lora-workbench train` does from a shell: with its log tee
    return env


class CpuClock:
    """Samples a process's CPU time (user + system, all its threads) against the wall clock, so that the CPU
    seconds of a window known only later (the training part) can be read. Other work sharing the cores barely
    moves them, unlike wall time; OpenMP threads spin-waiting for a descheduled sibling do count, though."""

    def __init__(self, pid: int, interval_s: float = 0.02):
        import threading

        import psutil

        self.samples: list[tuple[float, float]] = []
        self._proc, self._interval = psutil.Process(pid), interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        try:
            while True:
                t = self._proc.cpu_times()
                self.samples.append((time.time(), t.user + t.system))
                time.sleep(self._interval)
        except psutil.Error:  # the process ended
            pass

    def stop(self) -> CpuClock:
        self._thread.join()
        return self

    def at(self, when: float) -> float | None:
        """CPU seconds used by `when` (unix time), interpolated between the samples around it."""
        for (t0, c0), (t1, c1) in zip(self.samples, self.samples[1:], strict=False):
            if t0 <= when <= t1:
                return c0 + (c1 - c0) * (when - t0) / max(t1 - t0, 1e-9)
        return None

    def between(self, start: float, end: float) -> float | None:
        a, b = self.at(start), self.at(end)
        return None if a is None or b is None else b - a


def run_process(argv: list[str], log: Path, env: dict[str, str], timeout_s: float) -> tuple[int, CpuClock]:
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, env=env)
        clock = CpuClock(proc.pid)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = 124
        return code, clock.stop()


def reference_measure(out: Path, code: int, log: Path, clock: CpuClock | None = None) -> Measure:
    import itertools
    import json

    if code != 0 or not (out / "reference.json").exists():
        return Measure(error=f"exit {code}, see {log}")
    r = json.loads((out / "reference.json").read_text())
    times = list(itertools.accumulate(r["step_times_s"]))
    tokens = list(itertools.accumulate(r["tokens_per_step"]))
    _, step_s, tps = summarize(0.0, times, tokens, r["warmup_steps"])
    cpu = clock.between(r["train_start_time"], r["train_end_time"]) if clock else None
    return Measure(r["train_wall_s"], cpu, step_s, tps, r["peak_mem_gb"], r["first_loss"])


def workbench_measure(runs_dir: Path, code: int, log: Path, warmup: int, clock: CpuClock | None = None) -> Measure:
    from trainer.metrics_summary import MetricsSummary
    from trainer.run_dir import read_metrics

    runs = [p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")] if runs_dir.exists() else []
    if code != 0 or len(runs) != 1:
        return Measure(error=f"exit {code}, see {log}")
    m = MetricsSummary.of(read_metrics(runs[0] / "metrics.jsonl"))
    t0 = m.events.get("model_loaded", m.events.get("start"))
    times = [p.time for p in m.train]
    wall, step_s, tps = summarize(t0, times, m.tokens_done(t0), warmup)
    # The estimate predicts GPU memory (torch allocated); a CPU's RSS (mostly the runtime) is no measure of it.
    predicted = m.predicted_peak_gb if m.memory_kind == "gpu" else None
    cpu = clock.between(t0, times[-1]) if clock else None
    return Measure(wall, cpu, step_s, tps, m.peak_gb, m.first_loss, predicted)


@dataclass
class Bench:
    work: Path
    cache: Path
    steps: int
    threads: int
    repeat: int = 1
    variants: str = "abcd"
    timeout_s: float = 600.0

    def case(self, case: Case) -> tuple[dict[str, Measure], float | None, list[str]] | None:
        """Each variant's (median) measures, FLOPs/token (on a GPU) and unpinned config fields; None: skipped."""
        import torch

        from trainer.config.presets import build_config
        from trainer.model import device

        env = child_env(self.threads)
        model_dir = prepare_model(case, self.cache, env)
        if model_dir is None:
            print(f"bench: {case.name}: skipped, no presets/configs/{case.model}/config.json", flush=True)
            return None
        data, rows = BUNDLED_DATA, max(64, 3 * self.steps * case.batch * case.accum)
        if case.model in REAL_MODELS:
            data = text_data(model_dir, case.max_length, rows, self.cache / "bench-data" / f"{case.name}-{rows}.jsonl")
        elif case.model not in ("tiny", "small"):
            data = synthetic_data(model_dir, case.max_length, rows, self.cache / "bench-data" / f"{case.name}.jsonl")
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        defaults = workbench_config(case, model_dir, data, self.steps, self.work)
        matched, _, unknown = plain_trl(defaults, bf16)
        resolved = build_config(defaults)
        cuda, _, bf16_ok = device.detect()
        packs = device.packing(resolved, device.plan(resolved, cuda, bf16_ok))[0]  # as the run will decide
        keys = [k for k in dict.fromkeys("a" + self.variants) if k in VARIANTS and not (k == "d" and packs)]
        runs: dict[str, list[Measure]] = {k: [] for k in keys}
        for i in range(self.repeat):
            for key in keys:
                runs[key].append(self.variant(case, key, model_dir, data, bf16, self.work / case.name / f"{key}{i}"))
                print(f"bench: {case.name} {VARIANTS[key]} run {i + 1}: {runs[key][-1]}", flush=True)
        flops = None
        if bf16 and peak_flops(torch.cuda.get_device_name()):
            flops = model_flops(model_dir, build_config(matched))
        return {k: median_measure(v) for k, v in runs.items()}, flops, unknown

    def variant(self, case: Case, key: str, model_dir: Path, data: Path, bf16: bool, out: Path) -> Measure:
        """One process: the reference (a) or `lora-workbench train` on the variant's config."""
        import yaml

        from trainer.config.presets import deep_merge

        out.mkdir(parents=True, exist_ok=True)
        log, env = out / "stdout.log", child_env(self.threads)
        defaults = workbench_config(case, model_dir, data, self.steps, out / "runs")
        matched, knobs, _ = plain_trl(defaults, bf16)
        if key == "a":
            argv = reference_argv(case, model_dir, data, self.steps, knobs, out)
            code, clock = run_process(argv, log, env, self.timeout_s)
            return reference_measure(out, code, log, clock)
        config = {"b": matched, "c": defaults, "d": deep_merge(defaults, {"training": {"packing": True}})}[key]
        (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [sys.executable, "-m", "trainer", "train", str(out / "config.yaml")]
        code, clock = run_process(argv, log, env, self.timeout_s)
        return workbench_measure(out / "runs", code, log, WARMUP, clock)


def steps_note(steps: dict[str, int]) -> str:
    """'60 steps, the first 3 left out ...', with the cases of each count when they differ."""
    counts = sorted(set(steps.values()))
    runs = (
        f"{counts[0]} steps"
        if len(counts) == 1
        else "; ".join(f"{n} steps: {', '.join(c for c, s in steps.items() if s == n)}" for n in counts)
    )
    return f"{runs}, the first {min(WARMUP, counts[0] - 1)} left out of step time and tokens/s"


def bench_command(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    kind = args.matrix or ("gpu" if cuda else "cpu")
    cases, pool = resolve_cases(kind, args.only, cuda)
    if not cases:
        print(f"bench: no case matches --only {args.only!r}; cases: {', '.join(c.name for c in pool)}")
        return 2
    steps = {c.name: args.steps or c.steps or STEPS[kind] for c in cases}
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    work = Path(args.work_dir or Path("runs/.bench") / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    env_lines = machine(args.threads)
    cache = Path(args.cache_dir).resolve()
    results, notes = [], [steps_note(steps) + f"; runs in {work}"]
    if args.repeat > 1:
        notes.append(f"median of {args.repeat} interleaved repeats (a, b, c, a, b, c, ...)")
    t_start = time.monotonic()
    for case in cases:
        got = Bench(work, cache, steps[case.name], args.threads, args.repeat, args.variants).case(case)
        if got is not None:
            runs, flops, unknown = got
            results.append((case.name, runs, flops))
            if unknown:
                notes.append(f"config fields this harness does not pin in (b), left at default: {', '.join(unknown)}")
    notes = list(dict.fromkeys(notes)) + [f"whole bench took {(time.monotonic() - t_start) / 60:.1f} min"]
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    command = (
        "lora-workbench bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "lora-workbench bench"
    )
    text = report(f"{stamp}: {kind} matrix (`{command.strip()}`)", env_lines, notes, results, peak)
    print("\n" + text)
    if args.out != "-":
        out = Path(args.out)
        if not out.exists():
            out.write_text(RESULTS_HEADER, encoding="utf-8")
        with open(out, "a", encoding="utf-8") as f:
            f.write("\n" + text)
        print(f"appended to {out}")
    return 0 if results and all(not m.error for _, r, _ in results for m in r.values()) else 1
