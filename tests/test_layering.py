"""
The layering of docs/dev/module_map.md, checked on the sources: imports point only down.

The layer list is read from the table between ``<!-- layers -->`` and ``<!-- /layers -->`` in
docs/dev/module_map.md (top layer first), so the document and this test cannot drift. The import
graph is built with ``ast`` from every module of the project's packages and every script,
module-level imports and imports inside functions alike (an import moved into a function still
counts: that is how cycles used to be hidden). It fails on

- a project module that no layer lists (a new module must be placed in the map);
- a cycle among the project's modules;
- an import of a module in a higher layer than the importer;
- importing another module's private (``_underscore``) name.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("guided_diffusion", "improved_diffusion", "evaluations", "experiments")
MODULE_MAP = REPO / "docs" / "dev" / "module_map.md"
SCRIPTS = "scripts"


def read_layers() -> List[Tuple[str, List[str]]]:
    """``[(layer name, [module or pattern, ...]), ...]``, top layer first, from module_map.md's table."""
    text = MODULE_MAP.read_text()
    m = re.search(r"<!-- layers -->(.*?)<!-- /layers -->", text, re.S)
    assert m, f"{MODULE_MAP}: no <!-- layers --> ... <!-- /layers --> table"
    layers = []
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0] or set(cells[0]) <= {"-", ":", " "} or cells[0] == "layer":
            continue
        names = re.findall(r"`([^`]+)`", cells[1])
        assert names, f"module_map.md layer {cells[0]!r} lists no `module`"
        layers.append((cells[0], names))
    assert layers, "module_map.md's layer table is empty"
    return layers


def project_modules() -> Dict[str, Path]:
    """Dotted name -> file, for every module of the packages, their subpackages (``experiments.study.x``)
    included, and every script (``scripts.x.y``)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if not all((REPO.joinpath(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
                continue  # a folder that is not a package
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((REPO / SCRIPTS).rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        out[".".join(rel.parts)] = path
    return out


def _resolve(module: Optional[str], level: int, importer: str, is_package: bool) -> str:
    if not level:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_edges(modules: Dict[str, Path]) -> List[Tuple[str, str, str, int]]:
    """``(importer, imported module, imported name or "", line)`` for every project import."""
    edges = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.stem == "__init__"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    while target and target not in modules:
                        target = target.rpartition(".")[0]
                    if target:
                        edges.append((name, target, "", node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module, node.level, name, is_package)
                if base.split(".")[0] not in PACKAGES:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:  # ``from pkg import module``
                        edges.append((name, sub, "", node.lineno))
                    elif base in modules:
                        edges.append((name, base, alias.name, node.lineno))
    return edges


def layer_of(modules: Dict[str, Path], layers: List[Tuple[str, List[str]]]) -> Dict[str, int]:
    """Module -> its layer's index (0 = top); a pattern ``pkg.*`` covers a package's other modules."""
    index: Dict[str, int] = {}
    patterns = []
    for k, (_, names) in enumerate(layers):
        for n in names:
            if n.endswith(".*"):
                patterns.append((n[:-2], k))
            else:
                assert n in modules, f"module_map.md lists {n!r}, which is not a module of the project"
                assert n not in index, f"module_map.md lists {n!r} in two layers"
                index[n] = k
    for name in modules:
        if name not in index:
            for prefix, k in patterns:
                if name == prefix or name.startswith(prefix + "."):
                    index[name] = k
                    break
    return index


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    layers = read_layers()
    return modules, layers, layer_of(modules, layers), import_edges(modules)


def test_every_module_has_a_layer(graph):
    modules, _, index, _ = graph
    missing = sorted(set(modules) - set(index))
    assert not missing, f"modules in no layer of docs/dev/module_map.md: {missing}"


def test_no_import_points_up(graph):
    _, layers, index, edges = graph
    up = [f"{a} ({layers[index[a]][0]}) imports {b} ({layers[index[b]][0]}) at line {line}"
          for a, b, _, line in edges if a in index and b in index and index[b] < index[a]]
    assert not up, "imports that point up the layers of docs/dev/module_map.md:\n" + "\n".join(sorted(set(up)))


def test_no_import_cycle(graph):
    _, _, _, edges = graph
    succ: Dict[str, Set[str]] = {}
    for a, b, _, _ in edges:
        if a != b and not a.startswith(b + "."):  # a package's own __init__ is not a cycle
            succ.setdefault(a, set()).add(b)
    color: Dict[str, int] = {}
    stack: List[str] = []
    cycles = []

    def visit(n: str) -> None:
        color[n] = 1
        stack.append(n)
        for m in sorted(succ.get(n, ())):
            if color.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif not color.get(m):
                visit(m)
        stack.pop()
        color[n] = 2

    for n in sorted(succ):
        if not color.get(n):
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_names_imported(graph):
    _, _, _, edges = graph
    private = [f"{a} imports {b}.{n} at line {line}" for a, b, n, line in edges
               if n.startswith("_") and not n.startswith("__") and a != b]
    assert not private, "imports of another module's private names:\n" + "\n".join(sorted(set(private)))


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path, monkeypatch):
    # the checker itself: a function-level import that closes a cycle and points up is found
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / SCRIPTS).mkdir()
    (tmp_path / "guided_diffusion" / "low.py").write_text("def f():\n    from .high import g\n    return g\n")
    (tmp_path / "guided_diffusion" / "high.py").write_text("from . import low\nfrom .low import _hidden\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    modules = project_modules()
    edges = {(a, b, n) for a, b, n, _ in import_edges(modules)}
    assert ("guided_diffusion.low", "guided_diffusion.high", "g") in edges
    assert ("guided_diffusion.high", "guided_diffusion.low", "") in edges
    assert ("guided_diffusion.high", "guided_diffusion.low", "_hidden") in edges
