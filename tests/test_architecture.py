"""The rooms' arrows (docs/ARCHITECTURE.md): every import statement of the project, module- or
function-level, read with `ast`; no cycles between modules and no arrow pointing up a room."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

ROOMS = ("kernels", "model", "pretrain", "launch", "bench")
# What each room may import from ours (besides itself).
ALLOWED = {
    "kernels": set(),
    "model": {"kernels"},
    "pretrain": {"kernels", "model"},
    "launch": {"kernels", "model", "pretrain"},
    "bench": {"kernels", "model", "pretrain", "launch"},
}


def project_modules() -> dict[str, Path]:
    mods = {}
    for room in ROOMS:
        for path in (ROOT / room).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()

    def owner(name: str) -> str | None:  # the project module a dotted name lives in
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                # `from pkg import submodule` depends on the submodule, `from mod import name` on mod
                targets |= {s for s in subs if s in mods} or {base}
        graph[name] = {t for t in map(owner, targets) if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycles():
    assert cycles(import_graph()) == []


def test_cycle_detection_is_not_vacuous():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_arrows_point_down_the_rooms():
    wrong = sorted(
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        for t in targets
        if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in ALLOWED[m.split(".")[0]]
    )
    assert wrong == []


def test_every_user_facing_error_is_a_pretrain_error():
    """One error family: every exception class the project defines derives from PretrainError."""
    import importlib

    from kernels.errors import PretrainError

    strays = []
    for name, path in project_modules().items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(
                getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception"))
                or getattr(b, "id", "") == "Exception"
                for b in node.bases
            ):
                if name.startswith("bench") or "hf_custom" in name:
                    continue  # benchmarks; the exported remote code must not import the project
                cls = getattr(importlib.import_module(name), node.name)
                if not issubclass(cls, PretrainError):
                    strays.append(f"{name}.{node.name}")
    assert strays == []
