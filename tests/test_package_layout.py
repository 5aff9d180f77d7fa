"""The package's shape: no import cycle and no upward import among metamm's modules (imports
inside functions included: a lazy import is still a dependency), read from the source with
``ast``; every module is in a layer, so a new one must say where it belongs."""
from __future__ import annotations

import ast
from pathlib import Path

import metamm_cli

ROOT = Path(metamm_cli.__file__).parent

# Lower layers never import higher ones; modules of one layer may import each other (no cycle).
LAYERS = [
    ["errors"],
    ["__init__"],
    ["runs.layout", "config", "device"],
    ["data.*"],
    ["models.*"],
    ["crossmodal"],
    ["algorithms.*"],
    ["runs.*"],
    ["scale", "scale.distributed", "scale.search", "scale.launch"],
    ["evaluate", "retrieval", "fixed_episodes", "optim"],
    ["train"],
    ["compare.*"],
    ["scale.callbacks"],
    ["app", "api"],
    ["scale.population"],
    ["cli", "__main__", "hydra_plugin.*"],
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py") if "configs" not in p.parts}


def imports_of(path: Path) -> set:
    """metamm modules imported anywhere in ``path`` (``from metamm_cli.x import y``: ``x.y`` when
    that is a module, else ``x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "metamm_cli" or node.module.startswith("metamm_cli."):
                base = node.module[len("metamm_cli."):] if node.module != "metamm_cli" else "__init__"
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base != "__init__" else alias.name
                    found.add(sub if sub in MODULES else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("metamm_cli."):
                    found.add(alias.name[len("metamm_cli."):])
    return {m for m in found if m in MODULES}


GRAPH = {m: imports_of(p) - {m} for m, p in MODULES.items()}


def layer_of(module: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for pattern in layer:
            exact = pattern == module
            prefix = pattern.endswith(".*") and (module == pattern[:-2] or module.startswith(pattern[:-1]))
            if exact:
                return i
            if prefix and best is None:
                best = i
    assert best is not None, f"metamm_cli.{module} is in no layer of tests/test_package_layout.py: add it"
    return best


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_no_upward_import():
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m, deps in GRAPH.items() for d in deps if layer_of(d) > layer_of(m)]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle():
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
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
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
