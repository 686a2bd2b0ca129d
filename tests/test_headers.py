"""Every preset and example opens with commands that work: the files they name exist, the real CLI parser
accepts them, and an example named as a preset's "e.g." really uses that preset."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from trainer.cli import build_parser

HEADED = sorted(
    [*ROOT.glob("presets/models/*.yaml"), *ROOT.glob("presets/recipes/*.yaml"), *ROOT.glob("examples/*.yaml")]
)
PRESETS = [p for p in HEADED if p.parent.parent.name == "presets"]
PLACEHOLDERS = {"CONFIG.yaml"}  # "your config": a file the reader brings, named as such


def header(path: Path) -> list[str]:
    """The comment block a file opens with, without the leading '#'."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#"))
    return lines


def commands(lines: list[str]) -> list[list[str]]:
    """argv of each command line (`#   lora-workbench ...`), cut at a trailing comment or a two-space gap."""
    found = []
    for line in lines:
        if line.startswith("   lora-workbench "):
            text = re.split(r"\s{2,}|\s#", line.strip())[0]
            found.append(shlex.split(text)[1:])
    return found


def is_placeholder(token: str) -> bool:
    return token in PLACEHOLDERS or "<" in token


def named_paths(lines: list[str], argv: list[list[str]]) -> set[str]:
    """Every file a header names: path-like command arguments and the repo paths (with a '/') in its prose."""
    paths = {t for args in argv for t in args if not t.startswith("-") and ("/" in t or t.endswith(".yaml"))}
    paths |= set(re.findall(r"\b(?:examples|presets|data|benchmarks)/[\w./-]*\w", " ".join(lines)))
    return {p for p in paths if not is_placeholder(p)}


@pytest.mark.parametrize("path", HEADED, ids=lambda p: str(p.relative_to(ROOT)))
def test_header_commands_name_files_that_exist_and_parse(path: Path) -> None:
    lines = header(path)
    argv = commands(lines)
    assert argv, f"{path.relative_to(ROOT)}: its header names no `lora-workbench` command"
    parser = build_parser()
    for args in argv:
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{path.relative_to(ROOT)}: `lora-workbench {shlex.join(args)}` does not parse")
    missing = [p for p in named_paths(lines, argv) if not (ROOT / p).exists()]
    assert not missing, f"{path.relative_to(ROOT)}: its header names files that do not exist: {missing}"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_the_example_a_preset_names_uses_that_preset(path: Path) -> None:
    key = "recipe" if path.parent.name == "recipes" else "model_preset"
    for args in commands(header(path)):
        for config in (t for t in args if t.startswith("examples/") and (ROOT / t).is_file()):
            used = yaml.safe_load((ROOT / config).read_text()).get(key)
            assert used == path.stem, f"{path.relative_to(ROOT)} names {config}, whose {key} is {used!r}"


def told_to_copy(path: Path) -> re.Match | None:
    """A header's "copy examples/X.yaml" (a preset no shipped example uses says which one to start from)."""
    return re.search(r"\bcopy(?: of)? (examples/[\w.-]+\.yaml)", " ".join(header(path)))


@pytest.mark.parametrize("path", [p for p in PRESETS if told_to_copy(p)], ids=lambda p: p.name)
def test_the_copy_a_preset_tells_you_to_make_builds_a_config_with_that_preset(path: Path) -> None:
    """Doing what the header says ("copy examples/X.yaml, set ...") gives a valid config that uses the preset."""
    from trainer.config.presets import build_config, read_yaml

    text, found = " ".join(header(path)), told_to_copy(path)

    user = yaml.safe_load((ROOT / found[1]).read_text())
    if path.parent.name == "recipes":
        user["recipe"] = path.stem
        assert build_config(user).adapter.method == read_yaml(path)["adapter"]["method"]
        return
    user["model_preset"] = path.stem
    if "delete its model.name_or_path" in text:
        del user["model"]["name_or_path"]
    assert build_config(user).model.name_or_path == read_yaml(path)["model"]["name_or_path"]
