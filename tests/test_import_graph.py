"""The package's rooms: no import circle between bsf modules, NVFlare only inside ``bsf/fl``.

Every ``import`` / ``from ... import`` of a ``bsf`` module counts, also those inside functions: a lazy import
hides a circle from Python but not from the next engineer reading the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bsf

PACKAGE_ROOT = Path(bsf.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(module: str, path: Path) -> list[str]:
    """Every dotted name ``module`` imports (relative imports resolved), in source order."""
    names: list[str] = []
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
    return names


def _import_graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """``module -> bsf modules it imports`` and ``module -> the nvflare names it imports``."""
    files = {_module_name(p): p for p in PACKAGE_ROOT.rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    nvflare: dict[str, list[str]] = {}
    for module, path in files.items():
        for name in _imported_names(module, path):
            if name.split(".")[0] == "nvflare":
                nvflare.setdefault(module, []).append(name)
            elif name.split(".")[0] == "bsf" and (target := owner(name)) not in (None, module):
                graph[module].add(target)
    return graph, nvflare


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_bsf_modules():
    graph, _ = _import_graph()
    assert len(graph) > 50, "the package was not found"
    assert _circles(graph) == []


def test_nvflare_is_imported_only_inside_bsf_fl():
    _, nvflare = _import_graph()
    assert nvflare, "no module imports nvflare: the check looks in the wrong place"
    outside = {m: names for m, names in nvflare.items() if m != "bsf.fl" and not m.startswith("bsf.fl.")}
    assert outside == {}


def test_bsf_io_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, bsf.io; assert 'torch' not in sys.modules, 'bsf.io imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
