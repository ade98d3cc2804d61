"""The package's layers: minigpt's modules, those of its subpackages too, import each other without a circle.

Every import counts, also one inside a function (it runs when the function does); only imports
under ``if TYPE_CHECKING:`` are left out, since they never run.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minigpt"


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def module_names() -> dict[str, Path]:
    """Every module of minigpt by its dotted name under the package: 'taps', 'harvest' (its __init__), 'harvest.runner'."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and parts != ["__main__"]:
            found[".".join(parts)] = path
    return found


def imports_at_run_time(name: str, path: Path, modules: set[str]) -> set[str]:
    """The minigpt modules (dotted names, e.g. 'taps', 'harvest.runner') that module ``name`` imports when it runs.

    A package imported on the way to one of its modules counts (its __init__ runs), except the
    module's own packages, which are already being imported when it runs.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def add(target: list[str], names: list[str] = ()) -> None:
        for i in range(1, len(target) + 1):
            found.add(".".join(target[:i]))
        for alias in names:  # from X import Y: Y may be a module of X
            found.add(".".join([*target, alias]))

    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".") if node.module else []
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                add(base + module, [a.name for a in node.names])
            elif module[:1] == ["minigpt"]:
                add(module[1:], [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("minigpt."):
                    add(a.name.split(".")[1:])
    own = {".".join(package[:i]) for i in range(1, len(package) + 1)}
    return (found & modules) - own - {name}


def graph() -> dict[str, set[str]]:
    paths = module_names()
    return {m: imports_at_run_time(m, path, set(paths)) for m, path in paths.items()}


def test_the_graph_is_read() -> None:
    edges = graph()
    assert "taps" in edges["model"] and "errors" in edges["taps"]  # the parser sees plain imports
    assert "generate" in edges["model"]  # ... and imports inside functions
    assert {"distributed", "corpus", "config"} <= edges["training.data"] | edges["training.loop"]
    assert "harvest.storage" in edges["harvest.runner"]  # ... and the modules of subpackages


def test_training_and_harvest_share_the_corpus_reader_not_each_other() -> None:
    edges = graph()
    training = {m for m in edges if m == "training" or m.startswith("training.")}
    harvest = {m for m in edges if m == "harvest" or m.startswith("harvest.")}
    assert training and harvest
    for module in training:
        assert not edges[module] & harvest, f"{module} imports {sorted(edges[module] & harvest)}"
    for module in harvest:
        assert not edges[module] & training, f"{module} imports {sorted(edges[module] & training)}"
    assert "corpus" in edges["training.data"] and "corpus" in edges["harvest.runner"]


def test_no_circle_among_minigpt_modules() -> None:
    edges = graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                pytest.fail("import circle: " + " -> ".join(path[path.index(target):] + [module, target]))
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_minigpt_never_imports_the_packages_above_it() -> None:
    """Not even lazily: the probes' commands reach the CLI through an entry point instead."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(n == "probes" or n.startswith("probes.") for n in names), f"{path} imports probes"
