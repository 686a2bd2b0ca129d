"""`lora-workbench train CONFIG.yaml`: one fine-tuning run, top to bottom.

    lora-workbench train examples/tiny-qlora.yaml          # new run under runs/<run_id>/
    lora-workbench train runs/<run_id>/config.yaml --resume  # continue from its newest complete checkpoint
    lora-workbench train --job-dir runs/<run_id>             # a run the UI queued (config.yaml + job.json)

setup (config, run dir, signals) -> prepare (hardware check, tokenizer, data: all before the model) ->
fit (model, adapter, SFTTrainer) -> finish (adapter + model card, status). Exit codes: 0 completed,
1 failed, 130 stopped by SIGINT, 143 stopped by SIGTERM.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from trainer.config.presets import load_config
from trainer.config.run_config import ConfigError, RunConfig
from trainer.data.files import DataError
from trainer.failure import Failure, classify, failure
from trainer.model.device import SHARDED
from trainer.model.load import quiet_unused_kernels
from trainer.plan.schedule import total_optimizer_steps
from trainer.run.launch import ONE_MACHINE, Machines, inside_launch, is_main_process, wants_launcher
from trainer.run.log_tee import tee_to
from trainer.run.stopping import RunStopped, StopRequest
from trainer.run_dir import RunDir, job_held, new_run_id, read_status

if TYPE_CHECKING:
    from trainer.data.prepare import Prepared
    from trainer.model.device import DevicePlan
    from trainer.plan.memory import MemoryEstimate
    from trainer.run.callbacks import NanGuard
    from trainer.run.distributed import RankMetrics
    from trainer.run.sft_trainer import WorkbenchSFTTrainer

EXIT_OK, EXIT_FAILED = 0, 1


def open_run_dir(cfg: RunConfig, config_path: Path, resuming: bool) -> RunDir:
    """The plain form's run directory: the config's own if it lies in <runs_dir>/<id>/config.yaml beside a
    status.json (a run resumed, or a queued one trained by hand), else a new one. The queue names its dir instead
    (--job-dir)."""
    runs = Path(cfg.output.runs_dir).resolve()
    status = read_status(config_path.resolve().parent) if config_path.name == "config.yaml" else None
    if status is not None:  # the config of an existing run
        path = config_path.resolve().parent
        check_existing_run(path, status.get("state"), resuming, cfg.adapter.method == "adalora", str(config_path))
        return RunDir(path)
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / new_run_id(cfg.output.run_name, runs)
    path.mkdir()
    run = RunDir(path)
    run.config.write_text(cfg.to_yaml(), encoding="utf-8")
    return run


def check_existing_run(path: Path, state: str | None, resuming: bool, adalora: bool, source: str) -> None:
    """An existing run trains only when it is queued (its first start) or resumed after it stopped or failed."""
    if resuming and state == "completed":
        raise ConfigError([f"run {path.name} already completed; nothing to resume"], source)
    if not resuming and state != "queued":
        raise ConfigError(
            [
                f"run {path.name} is already {state}; pass --resume to continue it from its newest complete "
                "checkpoint, or train a copy of its config to start a new run"
            ],
            source,
        )
    if resuming and adalora:
        raise ConfigError(
            [
                "adapter.method: AdaLoRA checkpoints hold pruned ranks that cannot be reloaded for training; "
                "resume is not supported for AdaLoRA, start a new run"
            ],
            source,
        )


def load_run_config(path: Path, overrides: list[str], resume: bool) -> RunConfig:
    cfg = load_config(path, overrides)
    if resume and cfg.training.resume_from_checkpoint is None:
        cfg.training.resume_from_checkpoint = "latest"
    return cfg


def note_overrides(config: Path, cfg: RunConfig, overrides: list[str]) -> None:
    """Rewrite a run's config.yaml with the overrides applied (what the run will train), keeping the old one."""
    before = config.with_name("config.before-overrides.yaml")
    if not before.exists():
        before.write_bytes(config.read_bytes())
    config.write_text(cfg.to_yaml(), encoding="utf-8")
    print(f"{config}: {' '.join(overrides)} applied (the earlier file is kept as {before.name})")


def to_sft_config(cfg: RunConfig, run: RunDir, flags: dict[str, bool], has_eval: bool):
    from trl import SFTConfig

    t = cfg.training
    return SFTConfig(
        output_dir=str(run.checkpoints),
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        activation_checkpointing=t.gradient_checkpointing is True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # HF's filter hides non-finite losses from the curve; the NaN guard needs them
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        # Rows arrive already cut to max_length (data.overlength). TRL refuses padding_free without packing while
        # max_length is set, as it would not cut them itself.
        max_length=None if t.padding_free and t.packing is not True else cfg.data.max_length,
        packing=t.packing is True,  # 'auto' is decided in decide_memory_options()
        packing_strategy="bfd",  # rows kept whole and apart; "wrapped" cuts rows and lets them attend to each other
        padding_free=t.padding_free,
        loss_type="nll",  # plain token NLL; TRL 1.16's "chunked_nll" is only a deprecated alias of it
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        dataloader_num_workers=t.dataloader_num_workers,
        torch_compile=t.torch_compile,
        use_liger_kernel=t.use_liger_kernel,
        report_to=[],
        disable_tqdm=True,
        **flags,
    )


def resume_checkpoint(cfg: RunConfig, run: RunDir) -> str | None:
    from trainer.run.callbacks import latest_complete_checkpoint

    want = cfg.training.resume_from_checkpoint
    if want is None:
        return None
    if want == "latest":
        found = latest_complete_checkpoint(run.checkpoints)
        if found is None:
            raise ConfigError([f"training.resume_from_checkpoint: no complete checkpoint in {run.checkpoints}"])
        return str(found)
    if not Path(want, "CHECKPOINT_COMPLETE").is_file():
        raise ConfigError([f"training.resume_from_checkpoint: {want} is not a complete checkpoint directory"])
    return want


class Session:
    """State shared by the stages of one run: setup -> load_data -> build_trainer -> fit -> save_adapter -> finish."""

    def __init__(self, cfg: RunConfig, run: RunDir, request: StopRequest | None = None):
        from trainer.run.callbacks import StopSignal

        self.cfg, self.run, self.request = cfg, run, request or StopRequest()
        self.stop = StopSignal(self.request)  # the Trainer's view of the same request, checked after every step
        self.facts: dict[str, Any] = {}  # what the model card and the final event report
        self.nan_guard: NanGuard | None = None  # set by fit
        self.metrics: RankMetrics | None = None  # set by fit: the metrics.jsonl writer
        self.pissa_init: Path | None = None  # PiSSA's initial adapter, for the conversion at save

    def check_stop(self) -> None:
        self.request.check()


class Setup(NamedTuple):
    """What setup_run checked and chose: the machine's plan, the model path, the tokenizer, the checkpoint to resume."""

    plan: DevicePlan
    path: str
    tokenizer: Any
    resume: str | None


def setup_run(s: Session) -> Setup:
    """Hardware, model and resume checks and the tokenizer: what can fail on bad input, before any data or model."""
    from trainer.data.tokenization import chat_template_of
    from trainer.model import device
    from trainer.model.checks import check_model
    from trainer.model.load import load_tokenizer, model_path

    cuda, gpus, bf16_ok = device.detect()
    tf32_ok = cuda and device.tf32_supported()
    problems = device.hardware_problems(s.cfg, cuda, gpus, bf16_ok, tf32_ok)
    if problems:
        raise ConfigError(problems)
    if s.cfg.model.trust_remote_code:
        warning = (
            f"model.trust_remote_code is true: Python files shipped with {s.cfg.model.name_or_path} will run in "
            "this process with your permissions. Keep it only for repos you trust."
        )
        print(f"WARNING: {warning}")
        s.run.event(0, "warning", message=warning)
    check_model(s.cfg, run_model_code=True)  # from config.json: target layers, max_length, the model is here
    plan = device.plan(s.cfg, cuda, bf16_ok, tf32_ok, decide_precision(s, cuda, bf16_ok))
    path = model_path(s.cfg)
    tokenizer = load_tokenizer(s.cfg, path)
    tokenizer.chat_template = chat_template_of(tokenizer, s.cfg.model.chat_template)
    if plan.attn != s.cfg.model.attn_implementation:
        print(f"model.attn_implementation {s.cfg.model.attn_implementation} -> {plan.attn}")
    s.facts.update(base_model=s.cfg.model.name_or_path, precision=plan.precision)
    return Setup(plan, path, tokenizer, resume_checkpoint(s.cfg, s.run))


def load_data(s: Session, setup: Setup) -> Prepared:
    """Read, convert and tokenize the data (from the cache when the Start check or an earlier run did it)."""
    from trainer.data.cache import cache_dir
    from trainer.data.prepare import prepare_data

    tokenizer = setup.tokenizer
    cache = cache_dir(s.cfg.output.runs_dir)
    data = prepare_data(tokenizer, s.cfg.data, tokenizer.chat_template, s.cfg.training.seed, cache)
    s.check_stop()
    r, e = data.report, data.eval_report
    print(f"data: {data.source} ({data.format}): {r.summary()}; {len(data.train)} train / {len(data.eval)} eval")
    print(f"data: tokens from the cache in {cache}" if data.cached else f"data: tokenized, kept in {cache}")
    if e is not None:
        print(f"eval data: {e.summary()}")
    s.run.event(
        0,
        "data",
        source=data.source,
        format=data.format,
        rows=r.rows,
        truncated=r.truncated,
        dropped_overlength=r.dropped_overlength,
        dropped_no_trainable=r.dropped_no_trainable,
        train_rows=len(data.train),
        eval_rows=len(data.eval),
        trainable_tokens=r.trainable_tokens,
        tokens_cached=data.cached,
        eval_truncated=e.truncated if e else 0,
        eval_dropped=(e.dropped_overlength + e.dropped_no_trainable) if e else 0,
    )
    s.facts.update(train_rows=len(data.train), data_format=data.format)
    return data


def decide_memory_options(s: Session, plan: DevicePlan) -> None:
    """The memory estimate, and what `auto` gradient checkpointing and packing become for this run."""
    decide_checkpointing(s, plan.cuda, record_memory_estimate(s))
    decide_packing(s, plan)


def decide_precision(s: Session, cuda: bool, bf16_ok: bool) -> bool:
    """precision 'auto': what it becomes here, in the log and as an event; True when a CPU run takes bf16."""
    from trainer.model import device
    from trainer.model.checks import read_model_config

    if s.cfg.training.precision != "auto":
        return False
    if cuda:
        cpu_bf16, choice = False, "bf16" if bf16_ok else "fp16"
        why = f"{choice}: {'this GPU supports bf16' if bf16_ok else 'this GPU has no bf16'}"
    else:
        hidden = getattr(read_model_config(s.cfg).get_text_config(), "hidden_size", None)
        cpu_bf16, why = device.cpu_precision(hidden, device.cpu_bf16_flags())
        choice = "bf16" if cpu_bf16 else "fp32"
    print(f"training.precision auto -> {why}")
    s.run.event(0, "precision", precision=choice, reason=why)
    return cpu_bf16


def record_memory_estimate(s: Session) -> MemoryEstimate | None:
    """The predicted GPU peak, in metrics.jsonl (event memory_estimate), to set against the measured one."""
    from trainer.plan.estimate import estimate

    try:
        memory = estimate(s.cfg).memory
    except Exception as e:  # the prediction is advice; a model it cannot build must not stop the run
        print(f"memory estimate unavailable: {e}")
        return None
    if memory is not None:
        print("\n".join(memory.lines()))
        s.run.event(0, "memory_estimate", predicted_peak_gb=round(memory.peak_bytes / 2**30, 4), parts=memory.parts)
    return memory


def decide_checkpointing(s: Session, cuda: bool, memory: MemoryEstimate | None) -> None:
    """Replace gradient_checkpointing 'auto' by what the estimate chose (on when there is none on a GPU)."""
    from trainer.plan.memory import resolve_checkpointing

    if s.cfg.training.gradient_checkpointing != "auto":
        return
    if not cuda:
        choice, why = False, "off: training on the CPU, recomputing activations would only slow the steps"
    elif memory is not None:
        choice, why = memory.checkpointing, memory.checkpointing_note
    else:
        choice, why = True, "on: no memory estimate to show the run fits without it"
    s.cfg = resolve_checkpointing(s.cfg, choice)
    announce_auto(s, "gradient_checkpointing", choice, why)


def decide_packing(s: Session, plan: DevicePlan) -> None:
    """Replace packing 'auto' by what suits this machine's attention kernel."""
    from trainer.model import device

    if s.cfg.training.packing != "auto":
        return
    choice, why = device.packing(s.cfg, plan)
    s.cfg = s.cfg.model_copy(update={"training": s.cfg.training.model_copy(update={"packing": choice})})
    announce_auto(s, "packing", choice, why)


def announce_auto(s: Session, field: str, choice: bool, why: str) -> None:
    """An 'auto' setting decided: in the log and as an event (config.yaml keeps 'auto')."""
    print(f"training.{field} auto -> {why}")
    s.run.event(0, field, enabled=choice, reason=why)


def build_trainer(s: Session, setup: Setup, data: Prepared) -> WorkbenchSFTTrainer:
    """Load the model and build TRL's trainer around it with the adapter, the data and the callbacks."""
    from trainer.data.prepare import to_dataset
    from trainer.model.load import count_parameters, load_model
    from trainer.model.peft_config import adalora_schedule_problem, to_peft_config
    from trainer.run.callbacks import AdaLoraAllocator, CheckpointMarker, NanGuard, TokenCounter
    from trainer.run.distributed import RankMetrics, signal_agreement
    from trainer.run.lean_memory import lean_training
    from trainer.run.sft_trainer import WorkbenchSFTTrainer

    plan, path, tokenizer, _ = setup
    world = int(os.environ.get("WORLD_SIZE", "1"))
    total = total_optimizer_steps(s.cfg, len(data.train), world)
    if problem := adalora_schedule_problem(s.cfg, total):
        raise ConfigError([problem])
    s.check_stop()
    print(f"loading the model: {path}", flush=True)
    model = load_model(s.cfg, path, plan)
    s.check_stop()
    args = to_sft_config(s.cfg, s.run, plan.trainer_flags, bool(data.eval))
    lean = lean_training(plan.cuda, s.cfg.training.torch_compile)
    tiles = lean["fused_head_tile_tokens"]
    print(
        f"memory: allocator {lean['allocator']}"
        + (f", TRL's fused LM head in tiles of {tiles} tokens" if tiles else "")
        + (" over the trained tokens only" if lean["fused_head_labelled_only"] else "")
    )
    s.run.event(0, "lean_memory", **lean)
    s.nan_guard = NanGuard()
    trainer = WorkbenchSFTTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(data.train),
        eval_dataset=to_dataset(data.eval) if data.eval else None,
        processing_class=tokenizer,
        peft_config=to_peft_config(s.cfg, total),
        callbacks=[s.nan_guard, s.stop, CheckpointMarker()],
    )
    counter = (SharedTokenCounter if s.cfg.training.dataloader_num_workers else TokenCounter)(trainer.data_collator)
    trainer.data_collator = counter
    s.metrics = RankMetrics(s.run, counter, trainer.is_world_process_zero(), trainer.args.world_size)
    if trainer.args.world_size > 1:
        s.stop.agree = signal_agreement()
    trainer.add_callback(s.metrics)
    if s.cfg.adapter.method == "adalora":
        trainer.add_callback(AdaLoraAllocator(trainer.model))
    if s.cfg.adapter.method == "pissa":
        s.pissa_init = save_pissa_init(trainer.model, s.run)
    if s.cfg.training.packing is True:  # packed blocks, not rows, make the batches
        total = total_optimizer_steps(s.cfg, len(trainer.train_dataset), world)
    trainable, total_params = count_parameters(trainer.model)
    s.facts.update(
        trainable_params=trainable,
        total_params=total_params,
        trainable_percent=round(100 * trainable / max(total_params, 1), 4),
    )
    print(
        f"model: {path}: {trainable:,} trainable of {total_params:,} parameters "
        f"({s.facts['trainable_percent']}%), {total} optimizer steps"
    )
    s.run.event(
        0,
        "model_loaded",
        trainable_params=trainable,
        total_params=total_params,
        adapter_mb=round(trainable * 4 / 2**20, 3),
        max_steps=total,
    )
    return trainer


def fit(s: Session, trainer: WorkbenchSFTTrainer, resume: str | None) -> None:
    """Train, from the checkpoint to resume if any."""
    s.check_stop()
    s.request.training = True  # from here a stop ends the run after the current step, saving the adapter
    trainer.train(resume_from_checkpoint=resume)


class SharedTokenCounter:
    """TokenCounter for DataLoader workers: they collate in other processes, so the count lives in shared memory."""

    def __init__(self, collator: Any):
        import multiprocessing

        self.collator = collator
        self._count = multiprocessing.Value("q", 0)

    @property
    def tokens(self) -> int:
        return self._count.value

    @tokens.setter
    def tokens(self, value: int) -> None:
        self._count.value = value

    def __call__(self, examples: list[dict[str, Any]]):
        with self._count.get_lock():
            self._count.value += sum(len(ex["input_ids"]) for ex in examples)
        return self.collator(examples)


def save_pissa_init(model: Any, run: RunDir) -> Path:
    """Save PiSSA's initial adapter so the final one can be converted to plain LoRA on the untouched base."""
    init_dir = run.path / "pissa_init"
    if not init_dir.exists() and run.writer:
        cfg = model.peft_config["default"]
        original, cfg.init_lora_weights = cfg.init_lora_weights, True
        model.save_pretrained(init_dir)
        cfg.init_lora_weights = original
    return init_dir


def save_adapter(s: Session, trainer: Any) -> None:
    """adapter/: PEFT weights (safetensors), tokenizer, the run config and a model card; swapped in atomically."""
    import shutil

    from trainer.run.callbacks import adalora_ranks
    from trainer.run.model_card import model_card

    kwargs = {}
    if s.cfg.hardware.strategy in SHARDED:  # every rank holds a shard: gather the full weights, all ranks together
        kwargs["state_dict"] = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not s.run.writer:
        return
    tmp = s.run.path / "adapter.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if s.pissa_init is not None:
        kwargs["path_initial_model_for_weight_conversion"] = str(s.pissa_init)
    trainer.model.save_pretrained(tmp, safe_serialization=True, **kwargs)
    trainer.processing_class.save_pretrained(tmp)
    (tmp / "workbench_config.yaml").write_text(s.cfg.to_yaml(), encoding="utf-8")
    s.facts.update(
        steps=trainer.state.global_step,
        epoch=trainer.state.epoch,
        final_train_loss=s.metrics.last_train.get("loss") if s.metrics else None,
        final_eval_loss=s.metrics.last_eval.get("eval_loss") if s.metrics else None,
    )
    (tmp / "README.md").write_text(model_card(s.cfg, s.facts["base_model"], s.facts), encoding="utf-8")
    if s.cfg.adapter.method == "adalora":
        import json

        ranks = adalora_ranks(trainer.model)
        (s.run.path / "adalora_ranks.json").write_text(json.dumps(ranks, indent=1))
        s.run.event(trainer.state.global_step, "adalora_ranks", ranks=ranks)
    old = s.run.path / "adapter.old"
    shutil.rmtree(old, ignore_errors=True)  # left over by a run killed mid-swap
    if s.run.adapter.exists():
        s.run.adapter.rename(old)
    tmp.rename(s.run.adapter)
    shutil.rmtree(old, ignore_errors=True)


def finish(s: Session, state: str, code: int, error: str | None = None, why: Failure | None = None) -> int:
    structured = why.to_status() if why is not None else None
    s.run.write_status(state=state, exit_code=code, error=error, failure=structured, ended_at=time.time())
    s.run.event(s.run.status.get("step") or 0, "end", state=state, error=error)
    s.run.close()
    print(f"run {s.run.run_id}: {state}" + (f": {error}" if error else "") + f" ({s.run.path})")
    if why is not None:
        print(f"hint: {why.hint}")
    return code


def oom_message(err: BaseException) -> str:
    return f"out of memory: {str(err).splitlines()[0]}"  # the failure's hint says how to fit the run


def execute(s: Session) -> int:
    """Run the stages, mapping each way a run ends to its state and exit code."""
    import torch

    s.run.write_status(
        state="running",
        pid=os.getpid(),
        started_at=time.time(),
        ended_at=None,
        exit_code=None,
        error=None,
        failure=None,
    )
    s.run.event(0, "start", run_id=s.run.run_id, pid=os.getpid(), world_size=int(os.environ.get("WORLD_SIZE", "1")))
    try:
        s.check_stop()  # a stop that came while the config was read
        setup = setup_run(s)
        data = load_data(s, setup)
        decide_memory_options(s, setup.plan)
        trainer = build_trainer(s, setup, data)
        fit(s, trainer, setup.resume)
        if s.nan_guard is not None and s.nan_guard.error:
            return finish(s, "failed", EXIT_FAILED, s.nan_guard.error, failure("nan", s.nan_guard.error))
        save_adapter(s, trainer)
        if s.stop.signum is not None:
            return finish(s, "stopped", 128 + s.stop.signum)
        return finish(s, "completed", EXIT_OK)
    except (ConfigError, DataError) as e:
        print(str(e), file=sys.stderr)
        return finish(s, "failed", EXIT_FAILED, str(e), classify(e, str(e)))
    except (RunStopped, KeyboardInterrupt):
        s.request.say_unsaid()
        return finish(s, "stopped", s.request.exit_code(), s.request.error())
    except torch.OutOfMemoryError as e:
        return finish(s, "failed", EXIT_FAILED, oom_message(e), failure("oom", oom_message(e)))
    except Exception as e:
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
        return finish(s, "failed", EXIT_FAILED, error, classify(e, error))


def run_training(
    config_path: str,
    resume: bool = False,
    run_dir: str | None = None,
    machines: Machines = ONE_MACHINE,
    overrides: list[str] | None = None,
) -> int:
    """`lora-workbench train CONFIG.yaml`: one run in a new run dir (or the config's own, resumed). run_dir: the
    directory every rank of a multi-process run shares (the launching parent chose it)."""
    return stoppable(lambda stop: train_run(stop, Path(config_path), resume, run_dir, machines, overrides or []))


def run_job_dir(job_dir: Path, resume: bool, overrides: list[str], machines: Machines | None = None) -> int:
    """`lora-workbench train --job-dir RUN`: the run dir is named, not found; its request is config.yaml plus
    job.json's flags (trainer/jobs/requests.py)."""
    return stoppable(lambda stop: train_job(stop, RunDir(job_dir), resume, machines or ONE_MACHINE, overrides))


def stoppable(body: Callable[[StopRequest], int]) -> int:
    """Stop signals are handled from the first line (trainer/run/stopping.py): a Stop while the config, the data or
    the model loads ends the run `stopped`, as one during training does."""
    stop = StopRequest()
    try:
        with stop.installed():
            return body(stop)
    except KeyboardInterrupt:  # stopped twice before the run had a directory to record it in
        return stop.exit_code()
    finally:
        if inside_launch():
            leave_process_group()


def train_run(
    stop: StopRequest, path: Path, resume: bool, run_dir: str | None, machines: Machines, overrides: list[str]
) -> int:
    try:
        cfg = load_run_config(path, overrides, resume)
        if run_dir and not Path(run_dir, "config.yaml").is_file():
            raise ConfigError([f"--run-dir {run_dir}: not a run directory (it holds no config.yaml)"])
        run = RunDir(Path(run_dir), writer=is_main_process()) if run_dir else open_run_dir(cfg, path, resume)
    except ConfigError as e:
        return refused(path, e)
    with nullcontext() if inside_launch() else job_held(run.path) as holder:  # the launcher holds it for its ranks
        if holder is not None:  # e.g. a queued run trained by hand while its job runs
            print(f"run {run.path.name} is already being trained by pid {holder}; this one leaves it", file=sys.stderr)
            return EXIT_FAILED
        if overrides and run.config.resolve() == path.resolve():  # an existing run's own config: record the change
            note_overrides(run.config, cfg, overrides)
        return train_in(stop, cfg, run, resume, machines)


def train_job(stop: StopRequest, run: RunDir, resume: bool, machines: Machines, overrides: list[str]) -> int:
    try:
        if not run.config.is_file():
            raise ConfigError([f"--job-dir {run.path}: not a run directory (it holds no config.yaml)"])
        cfg = load_run_config(run.config, overrides, resume)
        check_existing_run(run.path, run.status.get("state"), resume, cfg.adapter.method == "adalora", str(run.config))
        if overrides:
            note_overrides(run.config, cfg, overrides)
    except ConfigError as e:
        return refused(run.config, e)
    return train_in(stop, cfg, run, resume, machines)


def refused(config_path: Path, e: ConfigError) -> int:
    print(str(e), file=sys.stderr)
    mark_failed_if_run_dir(config_path, str(e))
    return EXIT_FAILED


def train_in(stop: StopRequest, cfg: RunConfig, run: RunDir, resume: bool, machines: Machines) -> int:
    """Both forms meet here: the run's processes (several through accelerate, decided here), then the stages."""
    if wants_launcher(cfg, machines) and not inside_launch():
        from trainer.run.launch import start_ranks

        code = start_ranks(cfg, run, resume, machines, stop)
        if code is not None:
            return code  # else the run fails (or stops) below: this machine cannot launch it, or a stop came
    quiet_unused_kernels(cfg.quantization.mode != "none")  # before Session imports peft (and bitsandbytes)
    s = Session(cfg, run, stop)
    with tee_to(run.log_file):
        print(f"run {run.run_id} in {run.path} (pid {os.getpid()})")
        return execute(s)


def leave_process_group() -> None:
    """Wait for every rank, then close the process group. Rank 0 may still be saving the adapter, and a rank
    that exits first (with a stop's 143) makes the launcher SIGTERM the others; a rank that exits with gloo's
    threads still running can abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # a rank is already gone (it failed): nothing left to wait for
            pass
        dist.destroy_process_group()


def mark_failed_if_run_dir(config_path: Path, error: str) -> None:
    """A queued run whose config no longer validates is marked failed, so its watcher sees why."""
    if config_path.name == "config.yaml":
        fail_queued(config_path.parent, error)


def fail_queued(job_dir: Path, error: str) -> None:
    """A queued job whose request cannot be run: its own process writes the failed state (kind `config`), but only
    over a queued status: a finished run, a running one or a dir that is no job keeps its own."""
    if (read_status(job_dir) or {}).get("state") == "queued" and is_main_process():
        RunDir(job_dir).write_status(
            state="failed",
            exit_code=EXIT_FAILED,
            error=error,
            failure=failure("config", error).to_status(),
            ended_at=time.time(),
        )
