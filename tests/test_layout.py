"""The size and shape the project set itself, checked on the code as it stands: no module over
400 lines, no function over 60 lines except declarative tables, and no import circles between
modules (function-level imports count). What a reader meets stays small enough to hold."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("proxy", "pdsim")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# declarative tables: argument parsers and metric definitions read top to bottom
TABLES = {
    "pdsim/cli.py:add_arguments",
    "pdsim/lmcache/cli.py:add_arguments",
    "pdsim/metrics.py:render",
    "proxy/cli/main.py:_serve_args",
    "proxy/observe/metrics.py:__init__",
}


def modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


def test_no_module_is_over_the_limit() -> None:
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for _, p in modules()}
    over = {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES}
    assert over == {}, f"modules over {MAX_MODULE_LINES} lines: split them by concern"


def test_no_function_is_over_the_limit_but_the_declarative_tables() -> None:
    over = {}
    for _, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                key = f"{path.relative_to(REPO)}:{node.name}"
                if lines > MAX_FUNCTION_LINES and key not in TABLES:
                    over[key] = lines
    assert over == {}, f"functions over {MAX_FUNCTION_LINES} lines"


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that `name` imports, anywhere in it (functions included)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
    return {m for m in found if m in known and m != name}


def test_no_import_circles() -> None:
    paths = dict(modules())
    known = set(paths)
    graph = {name: imports(name, path, known) for name, path in paths.items()}
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []
