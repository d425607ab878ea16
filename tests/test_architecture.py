"""The library stays small and layered: no function in pylon/ grows past LIMITS, and imports run
one way, from higher layers to lower ones (lazy imports inside functions count too). Read with
ast, so nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pylon"
MAX_LINES, MAX_PARAMS = 60, 8

# Lowest first. A module may import from its own layer or lower ones; a prefix covers a subpackage.
LAYERS = (
    # errors, numbers, files, devices, processes and figures
    ("pylon", "pylon.metrics", "pylon.tracking", "pylon.cli", "pylon.checkpoint", "pylon.device",
     "pylon.runs", "pylon.distributed", "pylon.plots", "pylon.tables", "pylon.configfile"),
    ("pylon.optim", "pylon.trainstate"),  # a training run's optimizer and bookkeeping, beneath the engine
    ("pylon.data", "pylon.models"),
    ("pylon.heatmaps", "pylon.config"),  # config checks eval.methods against the heatmap methods
    ("pylon.inference",),
    ("pylon.embeddings", "pylon.engine"),
    ("pylon.evaluation",),
)


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def functions() -> list[tuple[str, int, int]]:
    """``(where, lines, parameters)`` of every function and method; self and cls are not counted."""
    out = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if p is not None]
                n = len([p for p in params if p not in ("self", "cls")])
                out.append((f"{name}.{node.name} (line {node.lineno})", node.end_lineno - node.lineno + 1, n))
    return out


def imports() -> dict[str, set[str]]:
    """``{module: the pylon modules it imports}``, top-level and lazy alike."""
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: from .backbone import ...
                package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
                targets |= {f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pylon":
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                            for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == "pylon"}
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def layer(module: str) -> int:
    matches = [(len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
               if module == prefix or (prefix != "pylon" and module.startswith(prefix + "."))]
    assert matches, f"{module} is in no layer: place it in LAYERS"
    return max(matches)[1]  # the longest prefix decides


def test_no_function_is_too_long_or_takes_too_many_parameters():
    too_long = [(where, lines) for where, lines, _ in functions() if lines > MAX_LINES]
    too_many = [(where, n) for where, _, n in functions() if n > MAX_PARAMS]
    assert too_long == [], f"functions over {MAX_LINES} lines: split them"
    assert too_many == [], f"functions over {MAX_PARAMS} parameters: group what travels together"


def test_imports_run_from_higher_layers_to_lower_ones():
    upward = [f"{m} -> {t}" for m, targets in imports().items() for t in sorted(targets) if layer(t) > layer(m)]
    assert upward == []


def test_no_import_cycle():
    graph = imports()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + (module,))}"
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_the_walk_sees_the_package():
    """Guards the tests above against passing vacuously."""
    graph = imports()
    assert {"pylon.engine", "pylon.data.pipeline", "pylon.models.pylon"} <= set(graph)
    assert "pylon.models.backbone" in graph["pylon.models"]  # relative imports are followed
    assert "pylon.embeddings" in graph["pylon.evaluation"]  # and lazy ones
    assert len(functions()) > 200
