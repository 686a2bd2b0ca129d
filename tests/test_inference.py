"""The chat engine on the tiny model: streaming, compare mode, adapter switching, stop, readable errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.views.adapter_choices import adapter_choices, gpu_busy_warning, resolve_user_dir, run_adapter
from trainer.chat.adapter_source import AdapterError, read_adapter, shape_problems
from trainer.chat.engine import BASE, ChatEngine, GenerationSettings
from trainer.jobs.registry import Job
from trainer.run.callbacks import CHECKPOINT_MARKER

PROMPT = [{"role": "user", "content": "Review: I loved this film, great acting. Sentiment?"}]
GREEDY = GenerationSettings(temperature=0, max_new_tokens=24)


@pytest.fixture(scope="module")
def engine(trained_adapter) -> ChatEngine:
    e = ChatEngine()
    e.load({"lora": str(trained_adapter("lora") / "adapter")})
    return e


def other_base(root: Path, tiny_model: Path) -> Path:
    """A Llama like the tiny one but 96 wide: a base the tiny model's adapters do not fit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    config.hidden_size, config.intermediate_size = 96, 256
    out = root / "wider"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in tiny_model.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


def test_reply_streams_in_several_chunks(engine: ChatEngine):
    chunks = list(engine.stream(PROMPT, GREEDY, BASE))
    assert len(chunks) > 1
    assert all(b.startswith(a) for a, b in zip(chunks, chunks[1:], strict=False))  # a growing text
    stats = engine.last_stats[0]
    assert stats.target == BASE and stats.new_tokens > 1 and stats.first_token_s is not None


def test_compare_mode_answers_base_and_adapter_differently(engine: ChatEngine):
    final: dict[str, str] = {}
    for i, text in engine.compare([(BASE, PROMPT), ("lora", PROMPT)], GREEDY):
        final[[BASE, "lora"][i]] = text
    assert set(final) == {BASE, "lora"}
    assert final["lora"].strip() in ("positive", "negative")  # the trained task's answer
    assert final[BASE] != final["lora"]
    assert [s.target for s in engine.last_stats] == [BASE, "lora"]


def test_switching_adapters_keeps_the_one_base(engine: ChatEngine, trained_adapter):
    base_module = engine.loaded.model.base_model.model
    loads = engine.base_loads
    seconds = engine.add_adapter("dora", str(trained_adapter("dora") / "adapter"))
    assert seconds >= 0
    try:
        targets = ["lora", "dora", BASE, "lora"]
        answers = {targets[i]: x for i, x in engine.compare([(t, PROMPT) for t in targets], GREEDY)}
        assert engine.base_loads == loads
        assert engine.loaded.model.base_model.model is base_module
        assert set(answers) == {"lora", "dora", BASE}
        assert "dora (dora)" in engine.describe()
    finally:
        engine.remove_adapter("dora")
    assert engine.adapter_names == ["lora"]


def test_stop_ends_the_reply_early(engine: ChatEngine):
    long = GenerationSettings(temperature=1.0, max_new_tokens=400, repetition_penalty=1.0)
    texts = []
    for _, text in engine.compare([(BASE, PROMPT), ("lora", PROMPT)], long):
        texts.append(text)
        if len(texts) == 2:
            engine.stop()
    assert [s.target for s in engine.last_stats] == [BASE]  # the comparison ended with the base's reply
    assert engine.last_stats[0].stopped and engine.last_stats[0].new_tokens < 400


def test_an_abandoned_reply_releases_the_model(engine: ChatEngine):
    gen = engine.stream(PROMPT, GenerationSettings(max_new_tokens=300), BASE)
    next(gen)
    gen.close()  # the page went away mid-reply
    assert list(engine.stream(PROMPT, GREEDY, "lora"))  # the next reply is not blocked


def test_a_reply_stepped_from_several_threads_finishes_and_frees_the_model(engine: ChatEngine):
    """Gradio runs each next() of a streaming handler on whichever worker thread is free."""
    from concurrent.futures import ThreadPoolExecutor

    gen = engine.compare([(BASE, PROMPT), ("lora", PROMPT)], GREEDY)
    texts, done = [], object()
    for _ in range(1000):
        with ThreadPoolExecutor(1) as pool:  # a fresh thread for every step
            item = pool.submit(next, gen, done).result(timeout=60)
        if item is done:
            break
        texts.append(item)
    assert {i for i, _ in texts} == {0, 1}
    with ThreadPoolExecutor(1) as pool:  # the lock is free again, whichever thread asks
        pool.submit(lambda: list(engine.stream(PROMPT, GREEDY, "lora"))).result(timeout=60)


def test_adapter_for_another_base_is_refused_readably(trained_adapter, tiny_model, tmp_path):
    wider = other_base(tmp_path, tiny_model)
    engine = ChatEngine()
    with pytest.raises(AdapterError) as err:
        engine.load({"lora": str(trained_adapter("lora") / "adapter")}, base=str(wider))
    msg = str(err.value)
    assert "does not fit base" in msg and "in_features 64, base 96" in msg and "Choose the base" in msg
    assert engine.loaded is None and engine.base_loads == 0  # refused before any weights were loaded


def test_missing_files_are_named(tmp_path, trained_adapter):
    with pytest.raises(AdapterError, match="no such adapter directory"):
        read_adapter(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(trained_adapter("lora") / "adapter", broken)
    (broken / "adapter_model.safetensors").rename(broken / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: missing \(adapter_model.bin\); .*safetensors"):
        read_adapter(broken)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        read_adapter(broken)


def test_the_qlora_run_reloads_its_base_in_4bit(trained_adapter):
    engine = ChatEngine()
    engine.load({"q": str(trained_adapter("qlora") / "adapter")})
    assert engine.loaded.quantization == "4bit" and "4bit" in engine.describe()
    assert list(engine.stream(PROMPT, GREEDY, "q"))
    engine.load({"q": str(trained_adapter("qlora") / "adapter")}, quantization="none")
    assert engine.loaded.quantization == "none" and engine.base_loads == 2
    engine.unload()
    assert engine.loaded is None and engine.memory_bytes() == 0


def test_shape_problems_names_each_layer():
    shapes = {
        "base_model.model.layers.0.q.lora_A.weight": [8, 64],
        "base_model.model.layers.0.q.lora_B.weight": [64, 8],
        "base_model.model.layers.0.gone.lora_A": [8, 64],  # AdaLoRA's names have no ".weight"
    }
    problems = shape_problems(shapes, {"layers.0.q": (64, 32)})
    assert problems == [
        "layers.0.gone: the adapter has weights for it, the base has no such layer",
        "layers.0.q: adapter out_features 64, base 32",
    ]


def _job(seq: int, run_dir: Path, state: str, kind: str = "train") -> Job:
    return Job(seq, run_dir.name, None, kind, state, None, None, 0.0, None, None, "", str(run_dir), None, None, None)


def test_adapter_choices_list_adapters_and_running_checkpoints(tmp_path, trained_adapter):
    done = trained_adapter("lora")
    running = tmp_path / "running-run"
    ckpt = running / "checkpoints" / "checkpoint-3"
    shutil.copytree(done / "adapter", ckpt)
    (ckpt / CHECKPOINT_MARKER).write_text("")
    queued = tmp_path / "queued-run"
    queued.mkdir()
    jobs = [_job(1, done, "completed"), _job(2, running, "running"), _job(3, queued, "queued")]
    assert run_adapter(running) == ckpt
    choices = adapter_choices(jobs)
    assert [label.split(" ")[0] for label, _ in choices] == ["running-run", done.name]
    assert "@ checkpoint-3" in choices[0][0] and choices[1][1] == str(done / "adapter")


def test_typed_paths_must_stay_inside_the_allowed_roots(tmp_path):
    inside = tmp_path / "runs" / "x"
    inside.mkdir(parents=True)
    assert resolve_user_dir(str(inside), [tmp_path / "runs"]) == inside.resolve()
    with pytest.raises(AdapterError, match="outside the directories"):
        resolve_user_dir(str(tmp_path / "runs" / ".." / "elsewhere"), [tmp_path / "runs"])
    (tmp_path / "runs" / "link").symlink_to("/etc")
    with pytest.raises(AdapterError, match="outside the directories"):
        resolve_user_dir(str(tmp_path / "runs" / "link"), [tmp_path / "runs"])


def test_gpu_busy_warning_only_when_a_job_runs_on_a_gpu(tmp_path):
    jobs = [_job(1, tmp_path / "a", "running")]
    assert gpu_busy_warning(jobs, cuda=False) is None
    assert gpu_busy_warning([_job(1, tmp_path / "a", "completed")], cuda=True) is None
    assert "is using the GPU" in gpu_busy_warning(jobs, cuda=True)


def test_generation_settings_greedy_when_temperature_is_zero():
    assert GenerationSettings(temperature=0).generate_kwargs()["do_sample"] is False
    kw = GenerationSettings(temperature=0.5, top_k=7).generate_kwargs()
    assert kw["do_sample"] and kw["temperature"] == 0.5 and kw["top_k"] == 7
