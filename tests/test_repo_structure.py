"""The shape of the library itself, kept by tests: short functions, short modules, one copy of each piece of
code, and floors that only import downwards (no import cycle)."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spp_peft"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def test_no_function_over_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_no_module_over_400_lines():
    long = [f"{name}: {n}" for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, long


def _top_level_imports(name: str, path: Path) -> set[str]:
    """spp_peft modules imported when ``name`` is imported (module level, not inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycle():
    graph = {name: _top_level_imports(name, path) for name, path in MODULES.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


@pytest.mark.parametrize("light", ["spp_peft.sparsity", "spp_peft.pruning", "spp_peft._utils"])
def test_light_modules_do_not_import_the_tuner(light):
    import sys

    code = f"import sys, {light}; print(sorted(m for m in ('peft', 'spp_peft.tuner') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(shutil.which("duplicates") is None, reason="the `duplicates` tool is not installed here")
def test_duplicates_finds_no_repeated_code_in_the_library():
    out = subprocess.run(["duplicates", "--repo", str(PACKAGE)], capture_output=True, text=True).stdout
    rows = [line for line in out.splitlines() if line[:1] == "D" and "boilerplate" not in line]
    assert not rows, out
