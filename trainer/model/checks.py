"""Checks of the base model a config names, before any weights load, for the page (estimate, data preview,
Start) and for `lora-workbench train` alike.

- model_source_problem: the model can be read here at all: a local directory with config.json, a built-in
  model, a hub id already in the local cache, or one the hub confirms in a single request (no retries), so an
  offline machine answers at once instead of after transformers' ~25 s of download retries.
- layer_problems / length_problem: the adapter's target modules are layers of this model (PEFT's own matching,
  on the model built from config.json on the meta device), and data.max_length fits the model's context.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any

import yaml

from trainer.config.builtin_ids import TINY_MODEL_ID
from trainer.config.run_config import ConfigError, RunConfig, resolved_target_modules
from trainer.model.model_configs import kept_config_dir

HUB_TIMEOUT_S = 5  # one request to the hub; its download path retries 5 times with backoff instead


def is_hub_cached(repo_id: str, revision: str | None) -> bool:
    """Whether config.json of repo_id (at revision) is in the local hub cache; no network."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def model_source_problem(cfg: RunConfig) -> str | None:
    """Why the model named by model.name_or_path cannot be read on this machine, or None (it can)."""
    from trainer.model.builtin_models import BUILTIN_REAL

    name, revision = cfg.model.name_or_path, cfg.model.revision
    if name == TINY_MODEL_ID or name in BUILTIN_REAL:
        return None  # built here (the page says how, for a built-in real model not converted yet)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        return f"model.name_or_path: the directory {name} holds no config.json; type the model's own directory"
    if _looks_like_path(name):
        return f"model.name_or_path: no directory {name}; type the path of a model directory or a hub id"
    return hub_model_problem(name, revision)


def hub_model_problem(name: str, revision: str | None = None) -> str | None:
    """Why the hub id `name` cannot be loaded here (not cached, and the hub is off, unreachable or lacks it)."""
    from huggingface_hub import constants, is_offline_mode
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return f"model.name_or_path: {name!r} is neither a directory nor a hub id (such as Qwen/Qwen2.5-0.5B)"
    if is_hub_cached(name, revision):
        return None
    fixes = (
        f"download it where the hub is reachable (`hf download {name}`) into {constants.HF_HUB_CACHE}, or mount "
        "a copy of the model and type its directory here"
    )
    if is_offline_mode():
        return f"model.name_or_path: {name!r} is not in the local model cache and the hub is off (HF_HUB_OFFLINE=1); {fixes}"
    if (name, revision) in _HUB_CONFIRMED:  # the estimate asks on every edit
        return None
    problem = _hub_problem(name, revision, fixes)
    if problem is None:
        _HUB_CONFIRMED.add((name, revision))  # a refusal is asked again: the user may log in or connect
    return problem


_HUB_CONFIRMED: set[tuple[str, str | None]] = set()


def _hub_problem(name: str, revision: str | None, fixes: str) -> str | None:
    """Ask the hub once whether the model exists (and is visible with the token, if any)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(name, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return None  # exists; the download says whether this token was granted access
    except RepositoryNotFoundError:
        return (
            f"model.name_or_path: the hub has no model {name!r} visible here; check the id, or, for a private "
            "model, set the hub token (`hf auth login` or HF_TOKEN)"
        )
    except RevisionNotFoundError:
        return f"model.revision: the hub model {name!r} has no revision {revision!r}"
    except HfHubHTTPError as e:
        return f"model.name_or_path: the hub answered {e.response.status_code} for {name!r}; {fixes}"
    except Exception as e:  # DNS, refused, timeout, proxy: all mean "no hub from here"
        return (
            f"model.name_or_path: {name!r} is not in the local model cache and the hub ({constants.ENDPOINT}) "
            f"cannot be reached ({type(e).__name__}: {e}); {fixes}; or set HF_HUB_OFFLINE=1 to stop trying the hub"
        )
    return None


def length_problem(cfg: RunConfig, model_config: Any) -> str | None:
    """data.max_length against the model's context (max_position_embeddings; no check where config.json has none)."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    context = getattr(text_config, "max_position_embeddings", None)
    if isinstance(context, int) and cfg.data.max_length > context:
        return (
            f"data.max_length: {cfg.data.max_length:,} is longer than the model's context "
            f"(max_position_embeddings {context:,} in its config.json); set it to {context:,} or less"
        )
    return None


def adapter_layer_names(model: Any) -> list[str]:
    """Full names of the modules a LoRA adapter can wrap (what PEFT accepts as a target)."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def _matches(target: str | list[str], names: list[str]) -> bool:
    """PEFT's own rule (suffix after a dot for a list entry, full match for a regex)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_config = LoraConfig(target_modules=target)
    return any(check_target_module_exists(peft_config, name) for name in names)


def layer_problems(cfg: RunConfig, names: list[str]) -> list[str]:
    """Each explicit target module (a list entry, a group's member, or a regex) must match a layer in names."""
    tm, target = cfg.adapter.target_modules, resolved_target_modules(cfg)
    if target == "all-linear":
        return []
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if isinstance(target, str):  # a regex over full module names
        if _matches(target, names):
            return []
        example = next((n for n in names if n.count(".") > 1), names[0] if names else "")
        listed = [t.strip() for t in target.split(",")]
        hint = f"; for a list write [{', '.join(listed)}]" if "," in target and all(listed) else ""
        return [
            f"adapter.target_modules: the regex {target!r} matches no layer of this model (it must match a whole "
            f"name such as {example!r}){hint}; layer names: {', '.join(leaves)}"
        ]
    where = f" (in the model preset's group {tm!r})" if isinstance(tm, str) else ""
    problems = []
    for entry in target:
        if not _matches([entry], names):
            near = difflib.get_close_matches(entry, leaves, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            problems.append(
                f"adapter.target_modules: {entry!r}{where} is no layer of this model; {hint}"
                f"its layers: {', '.join(leaves)}"
            )
    return problems


def model_problems(cfg: RunConfig, run_model_code: bool) -> list[str]:
    """Every problem of the config with its model, from config.json alone. run_model_code: whether a model that
    needs its own code may be built here (a job: yes; the UI server: no, so only its source is checked)."""
    problem = model_source_problem(cfg)
    if problem is not None:
        return [problem]
    if cfg.model.trust_remote_code and not run_model_code:
        return []
    problems = [p for p in [length_problem(cfg, read_model_config(cfg))] if p]
    return problems + layer_problems(cfg, _layer_names(_model_key(cfg)))


def load_model_config(cfg: RunConfig) -> Any:
    """The model's config, or for a hub id not readable here the shapes kept in presets/configs (an estimate
    needs only shapes); ConfigError naming the model and the fix when there are neither."""
    from transformers import AutoConfig

    problem = model_source_problem(cfg)
    if problem is None:
        return read_model_config(cfg)
    kept = kept_config_dir(cfg.model.name_or_path)
    if kept is None:
        raise ConfigError([problem])
    return AutoConfig.from_pretrained(kept)


def read_model_config(cfg: RunConfig) -> Any:
    """The config.json of a model model_source_problem passed: from the cache alone when it is there (no hub
    round trip, so no retries on a machine without network)."""
    from transformers import AutoConfig

    from trainer.model.builtin_models import BUILTIN_REAL, cache_root, cached_dir
    from trainer.model.load import model_path

    spec = BUILTIN_REAL.get(cfg.model.name_or_path)
    if spec is not None and cached_dir(spec, cache_root(cfg.output.runs_dir)) is None:
        return AutoConfig.from_pretrained(kept_config_dir(spec.hub_id))  # shapes now; no conversion for a check
    path = model_path(cfg)
    local_only = not Path(path).is_dir() and is_hub_cached(path, cfg.model.revision)
    try:
        return AutoConfig.from_pretrained(
            path,
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            local_files_only=local_only,
        )
    except ValueError as e:
        if "custom code" in str(e):  # transformers refuses an auto_map model without trust_remote_code
            raise ConfigError([custom_code_problem(path)]) from None
        kept = kept_config_dir(path)
        if kept is not None:
            return AutoConfig.from_pretrained(kept)
        raise ConfigError([f"model.name_or_path: cannot read the config.json of {path!r} ({e})"]) from None
    except OSError as e:
        kept = kept_config_dir(path)
        if kept is not None:
            return AutoConfig.from_pretrained(kept)
        raise ConfigError([f"model.name_or_path: cannot read the config.json of {path!r} ({e})"]) from None


def custom_code_problem(name: str) -> str:
    return (
        f"model.name_or_path: {name} ships its own Python code (auto_map in its config.json); tick "
        "model.trust_remote_code to run it, in the training job only (never in this server), or pick a model "
        "transformers knows"
    )


def check_model(cfg: RunConfig, run_model_code: bool = False) -> None:
    """Raise one ConfigError with every problem model_problems finds."""
    problems = model_problems(cfg, run_model_code)
    if problems:
        raise ConfigError(problems)


def _model_key(cfg: RunConfig) -> str:
    """The config fields that decide the model's layers (the runs dir locates built-in models)."""
    return RunConfig(model=cfg.model, output=cfg.output).to_yaml()


@functools.lru_cache(maxsize=16)
def _layer_names(key: str) -> list[str]:
    """adapter_layer_names of the model built on the meta device: no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.config.run_config import validate_config

    cfg = validate_config(yaml.safe_load(key))
    model_config = read_model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=cfg.model.trust_remote_code)
    return adapter_layer_names(model)
