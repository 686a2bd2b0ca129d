"""Safe defaults that hold for every line of the code, checked on its syntax tree: no shell, nothing unpickled,
weights only from safetensors, remote code only when the config asks for it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

SOURCES = sorted(p for d in ("trainer", "app", "benchmarks") for p in (ROOT / d).rglob("*.py"))
UNPICKLERS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("joblib", "load"), ("dill", "load")}


def calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Call)]


def dotted(node: ast.AST) -> tuple[str, ...]:
    """('AutoModelForCausalLM', 'from_pretrained') for AutoModelForCausalLM.from_pretrained."""
    if isinstance(node, ast.Attribute):
        return (*dotted(node.value), node.attr)
    return (node.id,) if isinstance(node, ast.Name) else ()


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def where(path: Path, call: ast.Call) -> str:
    return f"{path.relative_to(ROOT)}:{call.lineno}"


def test_the_scan_sees_the_code() -> None:
    assert len(SOURCES) > 40 and any(p.name == "train.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_shell_no_unpickling_safetensors_only(path: Path) -> None:
    for call in calls(path):
        name = dotted(call.func)
        shell = keyword(call, "shell")
        assert not (isinstance(shell, ast.Constant) and shell.value), f"{where(path, call)}: shell=True"
        assert name[-2:] not in UNPICKLERS, f"{where(path, call)}: {'.'.join(name)} can run code from a file"
        remote = keyword(call, "trust_remote_code")
        assert not (isinstance(remote, ast.Constant) and remote.value), f"{where(path, call)}: trust_remote_code=True"
        if name[-2:] == ("AutoModelForCausalLM", "from_pretrained"):
            safe = keyword(call, "use_safetensors")
            assert isinstance(safe, ast.Constant) and safe.value is True, f"{where(path, call)}: use_safetensors=True"


def test_trusting_remote_code_is_warned_about_in_the_log_and_the_metrics(make_config, tmp_path: Path) -> None:
    from tests.conftest import only_run
    from trainer.run.train import run_training
    from trainer.run_dir import read_metrics

    assert run_training(str(make_config({"model": {"trust_remote_code": True}, "training": {"max_steps": 1}}))) == 0
    run = only_run(tmp_path / "runs")
    (event,) = [m for m in read_metrics(run / "metrics.jsonl") if m.get("event") == "warning"]
    assert "trust_remote_code is true" in event["message"]
    assert "WARNING: model.trust_remote_code is true" in (run / "train.log").read_text()
