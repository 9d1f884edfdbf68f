"""The modules form layers: no raylm module imports, even lazily inside a function, one that imports it back."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raylm"
MODULES = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}


def _imports(path: Path) -> set[str]:
    """The raylm modules a file imports anywhere in it (function-level imports count: they close circles too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raylm"):
            names = [node.module.split(".")[1]] if "." in node.module else [alias.name for alias in node.names]
            found.update(name for name in names if name in MODULES)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("raylm.") and alias.name.split(".")[1] in MODULES)
    return found - {path.stem}


def test_no_import_circles():
    graph = {name: _imports(PACKAGE / f"{name}.py") for name in MODULES}
    assert sum(map(len, graph.values())) > 40, "the import graph was not read"
    circles = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            module, path = stack.pop()
            for target in graph[module]:
                if target == start:
                    circles.append(" -> ".join(path + [start]))
                elif target not in path and target > start:  # each circle once, from its smallest module
                    stack.append((target, path + [target]))
    assert not circles, circles
