"""The package's layers only point down and no two modules import each other (docs/architecture.md).

Every ``import`` / ``from ... import`` of every module under ``vlmtrain/`` is read with ``ast``
(function-local imports included: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlmtrain"
# Lower rank = lower layer. A module may import its own folder or a folder of lower rank.
RANK = {
    "config": 0,
    "presets": 1, "models": 1,
    "features": 2, "envs": 2,
    "data": 3,
    "metrics": 4, "parallel": 4,
    "train": 5,
    "tools": 6,
    "cli": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The vlmtrain modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + [node.module])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in modules and m != name and m != "vlmtrain"}


# The bottom layer is a few root modules that may import each other.
CONFIG_LAYER = {"config", "config_parallel", "config_sources", "durable", "errors"}


def _folder(module: str) -> str:
    """The layer of a module: its top-level folder (or root module) under vlmtrain/."""
    top = module.split(".")[1]
    return "config" if top in CONFIG_LAYER else top


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_folder_has_a_layer():
    folders = {_folder(m) for m in _modules() if m != "vlmtrain"}
    assert folders == set(RANK), f"give these a layer in RANK: {sorted(folders ^ set(RANK))}"


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() if m != "vlmtrain" for t in targets
                  if _folder(t) != _folder(m) and RANK[_folder(t)] >= RANK[_folder(m)])


def test_no_folder_imports_a_folder_above_it():
    upward = _upward(_graph())
    assert not upward, "imports that point up (or sideways between layers):\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The walk finds a lazy import that points up (so an empty result above means something)."""
    fake = tmp_path / "vlmtrain"
    (fake / "models").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "models" / "m.py").write_text("def f():\n    from vlmtrain.train import t\n")
    (fake / "train" / "t.py").write_text("from ..models import m\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = _graph()
    assert graph["vlmtrain.models.m"] == {"vlmtrain.train.t"} and graph["vlmtrain.train.t"] == {"vlmtrain.models.m"}
    assert _upward(graph) == ["vlmtrain.models.m -> vlmtrain.train.t"]
