"""The package's shape: no import cycles between gpt2mm modules, and stages that do not reach into SFT.

The import graph is read from the source (ast), not by importing: an edge A -> B for each `gpt2mm.*`
import that runs when A is imported (module level, outside `if TYPE_CHECKING:`), to the deepest module
it names (`from gpt2mm.rl import core` -> gpt2mm.rl.core).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "gpt2mm"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(body: list[ast.stmt], module_level: bool):
    """Import statements in `body`; with `module_level`, only those that run at import time."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        elif module_level and isinstance(node, ast.If) and _is_type_checking(node):
            yield from _import_nodes(node.orelse, module_level)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _import_nodes(getattr(node, field, []) or [], module_level)


def imported_modules(name: str, module_level: bool = True) -> set[str]:
    """The gpt2mm modules that module `name` imports."""
    path = MODULES[name]
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text()).body, module_level):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the package that holds `name`
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in MODULES:  # a name defined in a module -> that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_module_level_imports_have_no_cycle():
    graph = {name: imported_modules(name) for name in MODULES}
    assert graph["gpt2mm.loading"] >= {"gpt2mm.modeling", "gpt2mm.processing"}  # the graph is really read
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


# the modules that run the SFT trainer: the `train` command and the demo (its stages 1 and 3)
RUNS_SFT = {"gpt2mm.commands.train", "gpt2mm.demo", "gpt2mm.few_labels"}  # the demos run stage 1


def test_sft_is_not_the_other_stages_utility_library():
    """What stages share lives in train/'s run layer: outside train/, only the commands that run SFT import
    train/sft.py."""
    importers = {
        name
        for name in MODULES
        if not name.startswith("gpt2mm.train.") and "gpt2mm.train.sft" in imported_modules(name, False)
    }
    assert importers <= RUNS_SFT, sorted(importers - RUNS_SFT)
    assert importers, "the graph is really read"
