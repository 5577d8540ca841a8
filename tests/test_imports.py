"""lcm_dist's modules import each other without cycles (imports inside functions included),
only down its layers, and each stays small enough to read (400 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lcm_dist"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (``from a import b``
    counts ``a.b`` when that is a module, else ``a``; relative imports are resolved). Imports
    under ``if TYPE_CHECKING:`` never run, so they do not count."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body
            for inner in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_lcm_dist_has_no_import_cycle():
    graph = import_graph(module_files())
    cycle = find_cycle(graph)
    assert cycle is None, "lcm_dist has an import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    graph = import_graph(module_files(pkg))
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_the_cycle_check_skips_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    graph = import_graph(module_files(pkg))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == set()
    assert find_cycle(graph) is None


LAYERS = [
    {"faults", "memory", "files", "config", "distributed"},
    {"lifecycle", "commits", "model"},
    {"latents"},
    {"data", "images"},
    {"planning", "export"},
    {"restore"},
    {"evaluate"},
    {"train"},
    {"benchmarks"},
]
"""lcm_dist's parts (top-level modules and subpackages), bottom layer first. A part imports
only parts of the layers below it (and itself): utilities, then the model, the latent store,
data and images, planning and the export, restoration, evaluation, training, benchmarks."""


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_part_imports_only_the_layers_below_it():
    layer = {part: i for i, parts in enumerate(LAYERS) for part in parts}
    graph = import_graph(module_files())
    parts = {_part(m) for m in graph} - {"lcm_dist"}
    assert parts == set(layer), f"parts without a layer: {sorted(parts - set(layer))}"
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if _part(module) in layer
        and _part(target) != _part(module)
        and layer[_part(target)] >= layer[_part(module)]
    )
    assert not upward, "imports that do not point down the layers:\n" + "\n".join(upward)


MAX_MODULE_LINES = 400


def test_every_module_is_at_most_400_lines():
    """A module past 400 lines holds more than one idea: split it along its seams."""
    long = sorted(
        f"{path.relative_to(PACKAGE.parent)}: {n} lines"
        for folder in (PACKAGE, PACKAGE.parent / "launch")
        for path in folder.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    )
    assert not long, "modules over 400 lines:\n" + "\n".join(long)
