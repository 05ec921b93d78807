#!/usr/bin/env python3
"""Check sloserve's import layering: every `sloserve.*` import (top-level, inside functions
and under TYPE_CHECKING alike) must point to the same layer or one below, and the module
graph must have no circles. Prints each violation; exit status 1 if any.

    python scripts/check_layers.py [PACKAGE_DIR]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "sloserve"  # or the first argument

# Lowest first; a module may import its own layer and the ones above it in this list.
LAYERS = [
    ["sloserve.request", "sloserve.config", "sloserve.errors", "sloserve.interface"],
    ["sloserve.core"],  # scheduler, policies, KV blocks, latency model, router: no torch
    ["sloserve.workload", "sloserve.flags"],  # workloads and metrics; CLI flags from configs
    ["sloserve.model"],  # torch: decoder, families, attention backends, loader
    ["sloserve.worker", "sloserve.detokenizer", "sloserve.step_log"],  # one rank; engine aids
    ["sloserve.engine"],
    ["sloserve.llm", "sloserve.profiler", "sloserve.cluster"],
    ["sloserve.server", "sloserve.sim"],
    ["sloserve.bench"],  # above sim: the simulator never imports the load client
    ["sloserve.tune"],  # searches with the simulator, verifies with the load client
    ["sloserve.cli", "sloserve"],
]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise SystemExit(f"{module}: in no layer; add it to LAYERS")
    return rank


def imports(path: Path, modules: set[str]) -> set[str]:
    """The sloserve modules `path` imports (a name imported from a package counts as its
    submodule when one exists)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sloserve")}
        elif isinstance(node, ast.ImportFrom) and node.module \
                and node.module.startswith("sloserve") and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def main(root: Path = ROOT) -> int:
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {m: imports(p, set(paths)) - {m} for m, p in paths.items()}
    problems = []
    for m, targets in sorted(graph.items()):
        for t in sorted(targets):
            if layer_of(t) > layer_of(m):
                problems.append(f"upward: {m} (layer {layer_of(m)}) imports {t} "
                                f"(layer {layer_of(t)})")
    problems += [f"circle: {' -> '.join(c)}" for c in circles(graph)]
    print("\n".join(problems) or f"{len(graph)} modules, {len(LAYERS)} layers: no upward "
                                 "import, no circle")
    return 1 if problems else 0


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module."""
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
