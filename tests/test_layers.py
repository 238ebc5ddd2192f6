"""Imports only downward: every import in src/ against the layer table of docs/architecture.md.

All imports count: module-level, function-level and typing-only (``if TYPE_CHECKING:``) ones.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
TABLE = ROOT / "docs" / "architecture.md"


def layer_table() -> list[tuple[int, list[str]]]:
    """(layer, module patterns) from the ```layers block of docs/architecture.md."""
    text = TABLE.read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, f"{TABLE} has no ```layers block"
    rows = []
    for line in block.group(1).splitlines():
        if line.strip():
            number, _title, *patterns = line.split()
            rows.append((int(number), patterns))
    return rows


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    base = SRC / Path(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports_of(path: Path) -> set[str]:
    """The infkit modules a file of src/ imports, anywhere in it."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    return imports_in(path.read_text(), own, package)


def imports_in(source: str, own: str, package: str) -> set[str]:
    """The infkit modules ``source`` (module ``own`` of ``package``) imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "infkit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "infkit":
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if is_module(candidate) else target)
    # importing infkit.a.b runs infkit/a/__init__.py first (the root package excepted)
    for name in list(found):
        parts = name.split(".")
        found.update(".".join(parts[:k]) for k in range(2, len(parts)))
    found.discard(own)
    found.discard(package)  # a package's own modules are imported by it, not the other way
    return found


MODULES = {module_name(p): p for p in sorted((SRC / "infkit").rglob("*.py"))}


def layer_of(name: str, table: list[tuple[int, list[str]]]) -> int | None:
    for number, patterns in table:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return number
    return None


def test_every_module_is_in_a_layer() -> None:
    table = layer_table()
    missing = [name for name in MODULES if layer_of(name, table) is None]
    assert not missing, f"modules in no layer of {TABLE.name}: {missing}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_or_sideways(name: str) -> None:
    table = layer_table()
    own = layer_of(name, table)
    assert own is not None
    upward = [
        f"{target} (layer {layer_of(target, table)})"
        for target in sorted(imports_of(MODULES[name]))
        if (layer_of(target, table) or 0) > own
    ]
    assert not upward, f"{name} (layer {own}) imports upward: {upward}"


def test_no_import_cycle() -> None:
    graph = {name: imports_of(path) & set(MODULES) for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_check_sees_typing_only_relative_and_function_level_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from infkit.influence import Influence\n"
        "def f():\n    import infkit.registry\n"
        "from . import exact\n"
        "from ..fitted import Fitted\n"
        "import torch\n"
    )
    found = imports_in(source, "infkit.methods.probe", "infkit.methods")
    assert found == {
        "infkit.influence",
        "infkit.registry",
        "infkit.methods.exact",
        "infkit.fitted",
    }
    table = layer_table()
    assert layer_of("infkit.methods.probe", table) == 6  # layer 6 may not import the facade
    assert layer_of("infkit.influence", table) == 9


def test_the_facade_never_asks_what_kind_of_method_it_holds() -> None:
    """influence.py names no concrete method class and probes no capability with getattr."""
    import infkit

    tree = ast.parse((SRC / "infkit" / "influence.py").read_text())
    classes = {cls.__name__ for cls in _registered().values()}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & classes, f"the facade names method classes {sorted(names & classes)}"
    calls = [
        n.func.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    ]
    assert "getattr" not in calls and "hasattr" not in calls
    imported = imports_of(SRC / "infkit" / "influence.py")
    concrete = [
        m for m in imported if m.startswith("infkit.methods.") and m != "infkit.methods.base"
    ]
    assert not concrete, f"the facade imports concrete methods: {concrete}"
    assert infkit.methods()  # the registry is populated


def _registered() -> dict:
    from infkit.methods import registered

    return registered()
