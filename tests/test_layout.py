"""trainer/'s layout follows the one flow: a package per stage, each importing only earlier stages and the run-dir
contract at the root, no import cycles (lazy imports inside functions included), and no Gradio.

Read from the source with ast (nothing is imported), so a new module or import that breaks the order fails here
with the line that does it.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import ROOT

TRAINER = ROOT / "trainer"
# The stages in the order of the flow: a module may import its own stage, earlier ones and the contract.
STAGES = ["config", "data", "model", "plan", "run", "chat", "export", "jobs", "bench"]
# What every stage reads and writes (the run dir, metrics lines, status and failure kinds): they import no stage.
CONTRACT = {"run_dir", "metrics_reader", "metrics_summary", "failure", "job_status"}
ENTRY = {"cli", "__main__", "__init__"}  # the command line: dispatches to every stage (and to app/ for `ui`)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks: annotations only, never imported at run time."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in the file, inside functions too; `from trainer.run import
    train` gives trainer.run.train."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = type_checking_lines(tree)
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if (ROOT / Path(*candidate.split("."))).with_suffix(".py").is_file():
                    yield node.lineno, candidate


@functools.cache
def graph() -> dict[str, list[tuple[int, str]]]:
    return {module_name(p): list(imports(p)) for p in sorted(TRAINER.rglob("*.py"))}


def stage_of(module: str) -> str:
    """trainer.run.train -> run; trainer.run_dir -> contract; trainer.cli -> entry; trainer.run (a package) -> run."""
    parts = module.split(".")
    if len(parts) > 2:
        return parts[1]
    name = parts[1] if len(parts) == 2 else "__init__"
    return "contract" if name in CONTRACT else "entry" if name in ENTRY else name


def test_every_module_sits_in_a_stage_package_or_is_the_contract() -> None:
    loose = [
        module_name(p)
        for p in TRAINER.glob("*.py")
        if p.stem not in CONTRACT | ENTRY  # a new module at the root must choose its stage
    ]
    assert loose == [], f"modules at trainer/'s root that belong in a stage package ({', '.join(STAGES)}): {loose}"
    packages = sorted(p.name for p in TRAINER.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(STAGES)


def test_a_stage_imports_only_earlier_stages_and_the_contract() -> None:
    wrong = []
    for module, found in graph().items():
        stage = stage_of(module)
        for line, target in found:
            other = stage_of(target) if target.startswith("trainer.") else None
            if stage == "entry" or other in (None, "contract", stage):
                continue
            if other == "entry":
                wrong.append(f"{module}:{line} imports the command line {target}")
            elif stage == "contract":
                wrong.append(f"{module}:{line} (the contract) imports the {other} stage: {target}")
            elif STAGES.index(other) > STAGES.index(stage):
                wrong.append(f"{module}:{line} ({stage}) imports a later stage: {target}")
    assert wrong == [], "\n".join(wrong)


def test_no_import_cycles_lazy_imports_included() -> None:
    edges = {m: {t for _, t in found if t.startswith("trainer.")} for m, found in graph().items()}
    cycles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(" -> ".join([*path[path.index(module) :], module]))
            return
        if module in done:
            return
        for target in sorted(edges.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])
    assert cycles == []


def test_trainer_never_imports_gradio_and_only_the_cli_reaches_the_ui() -> None:
    wrong = []
    for module, found in graph().items():
        for line, target in found:
            root = target.split(".")[0]
            if root == "gradio" or (root == "app" and module != "trainer.cli"):
                wrong.append(f"{module}:{line} imports {target}")
    assert wrong == [], "\n".join(wrong)


def test_the_page_view_models_are_pure_python() -> None:
    """app/views/ computes what the tabs show without Gradio, so it is tested without a browser or a Blocks."""
    wrong = [
        f"{module_name(path)}:{line} imports {target}"
        for path in sorted((ROOT / "app" / "views").rglob("*.py"))
        for line, target in imports(path)
        if target.split(".")[0] == "gradio"
    ]
    assert wrong == [], "\n".join(wrong)
