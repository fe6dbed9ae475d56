"""Imports go down the layers, never up, and never in a circle.

Layers of `medanomaly` (docs/ARCHITECTURE.md), from the top:
  apps      the command line, its console helpers, benchmark, demo, report: imported by nothing below
  launch    torch-free: find, describe and start bundles (the CLI and Slicer use it at start-up)
  runtime   inside a bundle process: method base, inferer, predictions, writers, handlers, weights, inputs,
            precision
  library   io, data, anomalies, scoring, masking, latent, metrics, perceptual, visualize
A module may import its own layer and those below it. Every import in a file counts, also those
inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "core" / "medanomaly"
APPS = {"medanomaly.cli", "medanomaly.console", "medanomaly.benchmark", "medanomaly.demo", "medanomaly.report"}
LAUNCH = {f"medanomaly.bundles{name}" for name in
          ("", ".registry", ".runner", ".progress", ".outputs", ".model_info", ".input_files", ".warm")}
RUNTIME = {f"medanomaly.bundles.{name}" for name in
           ("method", "predictions", "writing", "handlers", "weights", "inputs", "contrast", "distributed",
            "precision")}
HEAVY = {"torch", "monai", "ignite", "numpy", "SimpleITK"}
LEVEL = {"apps": 3, "launch": 2, "runtime": 2, "library": 1}
# launch and runtime share a level: runtime modules use the launch helpers (registry, outputs), but the
# launch layer must stay torch-free, so it may not import the runtime (checked separately)


def layer(module: str) -> str:
    if module in APPS:
        return "apps"
    if module in LAUNCH:
        return "launch"
    if module in RUNTIME:
        return "runtime"
    return "library"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The medanomaly modules a file imports (`from medanomaly.x import y` counts as x, or x.y if
    that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("medanomaly")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medanomaly"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def test_every_bundles_module_is_in_the_launch_or_the_runtime_layer():
    bundles = {name for name in MODULES if name.startswith("medanomaly.bundles")}
    assert bundles == LAUNCH | RUNTIME, f"unlisted: {bundles - LAUNCH - RUNTIME}, gone: {LAUNCH | RUNTIME - bundles}"


def test_no_module_imports_a_higher_layer():
    upward = [f"{name} ({layer(name)}) imports {target} ({layer(target)})"
              for name, targets in GRAPH.items() for target in targets
              if target in MODULES and LEVEL[layer(target)] > LEVEL[layer(name)]]
    assert not upward, "\n".join(upward)


def test_the_launch_layer_imports_no_torch_and_no_runtime_module():
    for name in sorted(LAUNCH):
        tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
        nodes = list(ast.walk(tree))
        names = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
        heavy = {"torch", "monai", "ignite", "numpy"}
        assert not names & heavy, f"{name} imports {names & heavy}"
        assert not GRAPH[name] & RUNTIME, f"{name} imports the runtime layer"


def test_importing_the_launch_layer_loads_no_torch():
    """A lazy import inside a function (e.g. `model_info.update_model_info` loading `medanomaly.io`)
    is allowed; loading torch when the CLI or Slicer merely imports the launch layer is not."""
    script = (f"import importlib, sys; [importlib.import_module(m) for m in {sorted(LAUNCH)!r}]; "
              "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent).stdout.split()
    assert not set(loaded) & HEAVY, f"importing the launch layer loaded {set(loaded) & HEAVY}"


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(GRAPH.get(node, ())):
            if target not in MODULES or target == node or _is_parent_package(target, node):
                continue
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def _is_parent_package(package: str, module: str) -> bool:
    """`medanomaly.data` importing `medanomaly.data.synth` (a package re-exporting its modules) is
    no cycle with `medanomaly.data.synth` importing `medanomaly.data.transforms` through the package."""
    return module.startswith(package + ".")
