"""The package reads as the data flow: stage folders in layers, no import circles, no module importing a stage above
its own (even lazily inside a function), and modules short enough to read."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raylm"
# Lowest first. The foundation is what every stage may use; the entry points at the top use every stage.
LAYERS = [
    {"raylm.errors", "raylm.console", "raylm.config"},
    {"raylm.data"},
    {"raylm.models"},
    {"raylm.training"},
    {"raylm.cluster"},
    {"raylm", "raylm.api", "raylm.train", "raylm.tune", "raylm.sweep", "raylm.plot"},
]
MAX_MODULE_LINES = 500
# The worker loop reads top to bottom; what it wraps the model in, compiles and optimizes with lives beside it.
WORKER_LOOP = "raylm.training.worker"
MAX_WORKER_LOOP_LINES = 300


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        for level, members in enumerate(LAYERS):
            if prefix in members:
                return level
    raise AssertionError(f"{module} belongs to no layer of tests/test_imports.py: add it to LAYERS")


def _imports(module: str) -> set[str]:
    """The raylm modules a module imports anywhere in it (function-level imports count: they close circles too)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "raylm":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "raylm")
    return found - {module}


GRAPH = {module: _imports(module) for module in MODULES}


def test_the_import_graph_was_read():
    assert len(MODULES) > 30 and sum(map(len, GRAPH.values())) > 60
    assert {"raylm.data.storage", "raylm.training.worker", "raylm.cluster.launcher"} <= set(MODULES)


def test_no_import_circles():
    circles = []
    for start in sorted(GRAPH):
        stack = [(start, [start])]
        while stack:
            module, path = stack.pop()
            for target in GRAPH[module] - {"raylm"}:
                if target == start:
                    circles.append(" -> ".join(path + [start]))
                elif target not in path and target > start:  # each circle once, from its smallest module
                    stack.append((target, path + [target]))
    assert not circles, circles


def test_no_module_imports_a_stage_above_its_own():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in GRAPH.items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, upward


def test_modules_stay_short_enough_to_read():
    lengths = {module: len(path.read_text().splitlines()) for module, path in MODULES.items()}
    assert lengths[WORKER_LOOP] < MAX_WORKER_LOOP_LINES, lengths[WORKER_LOOP]
    assert not {m: n for m, n in lengths.items() if n > MAX_MODULE_LINES}
