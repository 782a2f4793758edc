"""The import graph of baton/ and services/, read from the source: no cycle, the layers in order, and every module
that says it is free of transports imports none (gRPC), directly or through others. And every file opens with
what it is for.

The layers, bottom up: baton.errors and baton.flags; the engine (baton.engine); what the services share
(baton.rpc, baton.metrics, ...); the services (services.*); the command layer at the top (baton.cli, baton.bench,
which drive the services). Only the command layer may import a service.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND_LAYER = ("baton.cli", "baton.bench")
FREE_OF_TRANSPORT = ("transport-free", "free of any transport")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    files = [*ROOT.glob("baton/**/*.py"), *ROOT.glob("services/**/*.py")]
    return {module_name(f): f for f in files if "baton/v1" not in f.as_posix()}


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (functions included), and every external top package."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                out.add(name)
            elif name.split(".")[0] not in ("baton", "services"):
                out.add(name.split(".")[0])
    return out


def graph() -> dict[str, set[str]]:
    src = sources()
    known = set(src)
    return {m: imports(p, known) for m, p in src.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in g[v]:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def in_layer(module: str, layer: tuple[str, ...]) -> bool:
    return any(module == top or module.startswith(top + ".") for top in layer)


def reachable(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in g.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_command_layer_imports_a_service() -> None:
    g = graph()
    offenders = {m: sorted(w for w in ws if in_layer(w, ("services",)))
                 for m, ws in g.items() if in_layer(m, ("baton",)) and not in_layer(m, COMMAND_LAYER)}
    assert {m: ws for m, ws in offenders.items() if ws} == {}
    above = {(m, w) for m, ws in g.items() for w in ws if in_layer(w, COMMAND_LAYER) and not in_layer(m, COMMAND_LAYER)}
    assert above == set()


def test_modules_free_of_transports_import_none() -> None:
    g = graph()
    src = sources()
    free = [m for m, p in src.items() if any(s in (ast.get_docstring(ast.parse(p.read_text())) or "")
                                             for s in FREE_OF_TRANSPORT)]
    assert "services.decode.worker" in free and "baton.errors" in free
    assert {m: "grpc" for m in free if "grpc" in reachable(g, m)} == {}


def test_every_file_opens_with_what_it_is_for() -> None:
    files = [*sources().values(), *ROOT.glob("tests/**/*.py")]
    bare = [str(p.relative_to(ROOT)) for p in files
            if p.read_text().strip() and ast.get_docstring(ast.parse(p.read_text())) is None]
    assert bare == []
