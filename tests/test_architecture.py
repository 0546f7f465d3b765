"""The package's layers, read from the imports themselves (ast, not text matching).

core (pure) < contract, broker < device < web < cli. A module may import its own layer and the
layers below it, never one above, and no two modules may import each other, directly or round a
circle, even through imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgecam"

# Rank of each layer; the package root (only __version__) is importable by all, __main__ by none.
RANKS = {"core": 0, "contract": 1, "broker": 1, "device": 2, "web": 3, "cli": 4, "__main__": 5}


def module_name(path: Path) -> str:
    parts = ["edgecam", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str], name: str | None = None) -> set[str]:
    """Every edgecam module this file imports, wherever the import statement stands."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "edgecam"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "edgecam":
                continue
            # `from edgecam.core import cam` imports the module edgecam.core.cam.
            subs = {f"{target}.{a.name}" for a in node.names} & modules
            found |= subs or {target}
    return found - {name}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(files)) for name, path in files.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        own = layer(mod)
        for dep in deps:
            theirs = layer(dep)
            if own is None:
                bad.append(f"{mod} (the package root) imports {dep}")
            elif theirs is not None and RANKS[theirs] > RANKS[own]:
                bad.append(f"{mod} ({own}) imports {dep} ({theirs}), a layer above")
    return sorted(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_belongs_to_a_known_layer() -> None:
    unknown = [m for m in graph() if layer(m) is not None and layer(m) not in RANKS]
    assert unknown == [], f"modules outside the layers {sorted(RANKS)}: {unknown}"


def test_no_module_imports_a_layer_above_its_own() -> None:
    assert upward(graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_core_has_no_network_threads_or_processes() -> None:
    # The manifest's download is the one network use allowed in core: models are fetched by URL.
    banned = {"paho", "threading", "socket", "subprocess", "sqlite3", "signal"}
    bad = []
    for path in (PACKAGE / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in banned]
    assert bad == []


# The checks themselves must be able to fail: a synthetic graph with each kind of fault.
@pytest.mark.parametrize(
    ("g", "up", "cyc"),
    [
        ({"edgecam.core.a": {"edgecam.device.b"}, "edgecam.device.b": set()}, 1, 0),
        ({"edgecam.cli.a": {"edgecam.core.b"}, "edgecam.core.b": set()}, 0, 0),
        ({"edgecam.core.a": {"edgecam.core.b"}, "edgecam.core.b": {"edgecam.core.a"}}, 0, 1),
        ({"edgecam.web.a": {"edgecam.cli.b"}, "edgecam.cli.b": {"edgecam.web.a"}}, 1, 1),
        ({"edgecam": {"edgecam.core.a"}, "edgecam.core.a": set()}, 1, 0),
    ],
)
def test_the_checks_catch_what_they_are_for(g: dict[str, set[str]], up: int, cyc: int) -> None:
    assert (len(upward(g)), len(cycles(g))) == (up, cyc)


def test_function_local_and_relative_imports_count(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from edgecam.cli import main\n    from ..web import fleet\n")
    found = imports(src, {"edgecam.web.fleet"}, name="edgecam.core.m")
    assert found == {"edgecam.cli", "edgecam.web.fleet"}
