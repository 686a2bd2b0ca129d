"""The built-in real model (SmolLM2-135M-Instruct) through every path: the label mask on its ChatML template,
chat base vs adapter, export with the fidelity check, evaluate; each method's training is in
tests/test_real_model_methods.py.

One converted copy is shared by the whole session (the `real_model` fixture); runs are a few short steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, only_run
from trainer.config.presets import build_config, deep_merge
from trainer.config.run_config import ConfigError
from trainer.model.builtin_models import SMOLLM2, cache_root, cached_dir

INSTRUCTIONS = str(ROOT / "data/instructions_messages.jsonl")

# A dataset the project does not ship (alpaca-shaped): every answer opens the same way, a style the base never has.
STYLE = "Ahoy, matey!"
UNSEEN = [
    ("Name a fruit that is yellow.", "A banana is yellow."),
    ("What do bees make?", "Bees make honey."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which planet do we live on?", "We live on Earth."),
    ("What colour is grass?", "Grass is green."),
    ("What do cows drink?", "Cows drink water."),
    ("Name a large ocean.", "The Pacific is a large ocean."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("How many days are in a week?", "A week has seven days."),
    ("What do you use to write on paper?", "You write on paper with a pen."),
    ("Which animal barks?", "A dog barks."),
    ("What falls from clouds when it rains?", "Rain falls from clouds."),
    ("What shines in the sky by day?", "The Sun shines by day."),
    ("What is two plus two?", "Two plus two is four."),
    ("Where do fish live?", "Fish live in water."),
]


def unseen_rows(tmp_path: Path) -> Path:
    path = tmp_path / "pirate_alpaca.json"
    rows = [{"instruction": q, "input": "", "output": f"{STYLE} {a}"} for q, a in UNSEEN]
    path.write_text(json.dumps(rows))
    return path


def real_config(tmp_path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A few-step run of the built-in model on the bundled instruction rows."""
    base = {
        "model_preset": "smollm2",
        "adapter": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {"source": INSTRUCTIONS, "max_length": 96, "max_samples": 12},
        "training": {
            "max_steps": 3,
            "learning_rate": 1e-3,
            "per_device_batch_size": 4,
            "logging_steps": 1,
            "save_steps": 1000,
        },
        "output": {"runs_dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(deep_merge(base, overrides or {})))
    return path


def train_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


def train_unseen_run(root: Path) -> Path:
    """One LoRA run of the real model on a dataset the project has never seen, under root: conftest's session
    fixture `real_run`, shared by the chat, export, evaluate and GGUF tests."""
    from trainer.run.train import run_training

    data = {"source": str(unseen_rows(root)), "format": "alpaca", "max_samples": None}
    # 12 steps of 4 rows (no accumulation): the style is learned as surely as from 16-row steps, at a quarter the cost
    cfg = real_config(root, {"data": data, "training": {"max_steps": 12, "gradient_accumulation_steps": 1}})
    assert run_training(str(cfg)) == 0
    return only_run(root / "runs")


def test_builtin_id_resolves_to_the_cached_checkpoint(real_model: Path, tmp_path: Path) -> None:
    from trainer.model.load import model_path

    cfg = build_config({"model_preset": "smollm2", "output": {"runs_dir": str(tmp_path)}})
    assert cfg.model.name_or_path == "builtin:smollm2-135m"
    assert Path(model_path(cfg)) == real_model == cached_dir(SMOLLM2, cache_root(tmp_path))
    config = json.loads((real_model / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True


def test_an_unknown_builtin_id_names_the_known_ones() -> None:
    with pytest.raises(ConfigError) as e:
        build_config({"model": {"name_or_path": "builtin:smollm3"}})
    assert "builtin:smollm2-135m" in str(e.value) and "builtin:tiny" in str(e.value)


def test_two_processes_building_it_at_once_share_one_conversion(real_model: Path, tmp_path: Path) -> None:
    """Two `prepare-model` processes on an empty cache: one converts, the other waits on the lock and reuses it."""
    import shutil

    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    wheel = cache_root("runs") / "downloads" / SMOLLM2.wheel_name  # the fixture's download: no network needed here
    shutil.copy(wheel, downloads / wheel.name)
    env = {**__import__("os").environ, "LORA_WORKBENCH_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "trainer", "prepare-model", SMOLLM2.model_id]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("converting" in o for o in outs) == 1 and sum("built by another process" in o for o in outs) == 1
    target = tmp_path / "cache" / SMOLLM2.dir_name
    assert (target / "model.safetensors").stat().st_size == (real_model / "model.safetensors").stat().st_size
    assert [p.name for p in (tmp_path / "cache").iterdir() if "partial" in p.name] == []


def test_the_preview_masks_the_chatml_prompt_and_trains_the_answer_and_its_end(
    real_model: Path, tmp_path: Path
) -> None:
    from trainer.plan.data_preview import CUT, PROMPT, TRAINED, preview_data

    cfg = build_config(yaml.safe_load(real_config(tmp_path).read_text()))
    row = preview_data(cfg, n_rows=1).rows[0]
    trained = "".join(t for t, kind in row.segments if kind == TRAINED)
    masked = "".join(t for t, kind in row.segments if kind == PROMPT)
    first = json.loads(Path(INSTRUCTIONS).read_text().splitlines()[0])
    answer = next(m["content"] for m in first["messages"] if m["role"] == "assistant")
    assert answer in trained and trained.rstrip().endswith("<|im_end|>")  # the model must learn to stop
    system = next(m["content"] for m in first["messages"] if m["role"] == "system")
    assert f"<|im_start|>system\n{system}<|im_end|>" in masked
    assert "<|im_start|>user" in masked and "<|im_start|>assistant" in masked
    assert not any(kind == CUT for _, kind in row.segments)


def test_chat_streams_base_and_adapter_side_by_side(real_run: Path) -> None:
    from trainer.chat.engine import BASE, ChatEngine, GenerationSettings

    engine = ChatEngine()
    engine.load({"lora": str(real_run / "adapter")})
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    chunks: dict[int, list[str]] = {0: [], 1: []}
    for i, text in engine.compare(
        [(BASE, prompt), ("lora", prompt)], GenerationSettings(temperature=0, max_new_tokens=16)
    ):
        chunks[i].append(text)
    assert len(chunks[0]) > 1 and len(chunks[1]) > 1  # both streamed
    assert "Paris" in chunks[0][-1]  # the real base answers correctly


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_merges_the_real_model_and_passes_its_fidelity_check(
    real_run: Path, tmp_path: Path, dtype: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.export.job import run_export
    from trainer.export.merge import ExportRequest

    out = tmp_path / "merged"
    report = run_export(ExportRequest(adapter=real_run / "adapter", out=out, dtype=dtype))
    fidelity = report["fidelity"]
    assert fidelity["passed"], fidelity
    if dtype == "fp32":
        assert fidelity["greedy_agreement"] == 1.0
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What colour is the sky?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    answer = tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :])
    assert answer.startswith(STYLE), answer  # the merged model answers an unseen question in the trained style


def test_evaluate_writes_base_and_adapter_scores(real_run: Path, tmp_path: Path) -> None:
    """Held-out questions of the unseen dataset: the adapter answers in its style, the base never does."""
    from trainer.cli import main

    heldout = tmp_path / "heldout.json"
    questions = ["What colour is the sky?", "What do birds do?", "Name a vegetable."]
    heldout.write_text(
        json.dumps([{"instruction": q, "input": "", "output": STYLE, "facts": [STYLE]} for q in questions])
    )
    assert main(["evaluate", str(real_run), "--data", str(heldout), "--max-new-tokens", "8"]) == 0
    result = json.loads((real_run / "eval_results.json").read_text())
    assert result["rows"] == 3 and result["base"]["loss"] > 0 and result["adapter"]["loss"] > 0
    assert (result["base"]["facts"], result["adapter"]["facts"]) == (0.0, 1.0), result["examples"]


def test_evaluate_scores_rows_of_different_lengths_together_as_it_would_one_by_one(real_model: Path) -> None:
    """answer_losses right-pads similar rows into one forward: the same summed loss as one row at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data.tokenization import IGNORE_INDEX, tokenize_example
    from trainer.export.evaluate import answer_losses

    model = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    pairs = [
        ("Hi?", "Hello."),
        ("What is the capital of France, and why?", "Paris, the seat of government."),
        ("2+2?", "4"),
    ]
    examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    total, tokens = 0.0, 0
    for ex in examples:  # one row at a time, no padding
        row = tokenize_example(tokenizer, ex, tokenizer.chat_template)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row.input_ids])).logits[0, :-1]
        targets = torch.tensor(row.labels[1:])
        total += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((targets != IGNORE_INDEX).sum())
    together, counted = answer_losses(model, tokenizer, examples)
    assert counted == tokens and together == pytest.approx(total, rel=1e-4)


def test_the_page_says_where_the_model_is_cached_or_what_first_use_will_do(real_model: Path, tmp_path: Path) -> None:
    from trainer.model.builtin_models import cache_note

    ready = cache_note(SMOLLM2, real_model.parent)
    assert str(real_model) in ready and "MB" in ready
    fresh = cache_note(SMOLLM2, tmp_path)
    assert "not built yet" in fresh and "93 MB" in fresh and "prepare-model builtin:smollm2-135m" in fresh


def test_a_corrupt_extracted_gguf_is_dropped_and_named(real_model: Path, tmp_path: Path) -> None:
    """A bad GGUF in downloads/ is not trusted forever: the error names it and the next try re-extracts it."""
    import shutil

    from trainer.model.builtin_models import BuiltinModelError, ensure_builtin

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    shutil.copy(cache_root("runs") / "downloads" / SMOLLM2.wheel_name, downloads / SMOLLM2.wheel_name)
    gguf = downloads / Path(SMOLLM2.gguf_member).name
    gguf.write_bytes(b"not a gguf file")
    stale = tmp_path / f".{SMOLLM2.dir_name}.partial-killed"
    stale.mkdir()
    with pytest.raises(BuiltinModelError) as e:
        ensure_builtin(SMOLLM2, tmp_path, log=lambda _: None)
    assert str(gguf) in str(e.value) and "extracted again" in str(e.value)
    assert not gguf.exists() and not stale.exists() and cached_dir(SMOLLM2, tmp_path) is None


def test_the_preview_never_builds_the_model_in_the_page(tmp_path: Path, monkeypatch) -> None:
    """Uncached: the preview says the model is being prepared in the background, then why the last try failed."""
    import time

    from trainer.model.builtin_models import preparing
    from trainer.plan.data_preview import preview_data

    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / SMOLLM2.wheel_name).write_bytes(b"truncated")  # fails its sha256 check at once
    monkeypatch.setenv("LORA_WORKBENCH_CACHE", str(cache))
    cfg = build_config(yaml.safe_load(real_config(tmp_path).read_text()))
    first = preview_data(cfg, n_rows=0).errors
    assert len(first) == 1 and "being fetched and converted in the background" in first[0], first
    deadline = time.time() + 120
    while time.time() < deadline and (
        preparing(SMOLLM2, cache) or "sha256" not in (cache / "smollm2-135m-instruct.prepare.log").read_text()
    ):
        time.sleep(0.5)
    again = preview_data(cfg, n_rows=0).errors
    assert "The last attempt ended with" in again[0] and "sha256" in again[0], again


def test_a_cut_or_unfinished_checkpoint_is_not_taken_as_cached(real_model: Path, tmp_path: Path) -> None:
    """The conversion records each file's size last; a copy cut short (a full disk, a killed copy) is rebuilt."""
    from trainer.model.builtin_models import MANIFEST, checkpoint_problem

    assert checkpoint_problem(real_model) is None  # the session's own conversion wrote its sizes
    target = tmp_path / SMOLLM2.dir_name
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"x" * 100)
    assert MANIFEST in checkpoint_problem(target)  # both files there, but no record that the conversion finished
    (target / MANIFEST).write_text(json.dumps({"config.json": 2, "model.safetensors": 1000}))
    assert "model.safetensors is 100 bytes, the conversion wrote 1000 bytes" in checkpoint_problem(target)
    assert cached_dir(SMOLLM2, tmp_path) is None
