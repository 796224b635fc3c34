"""The layout is the architecture: imports flow one way, and the command line loads without torch."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "preftune"
# Lowest first. A module may import its own package and any lower layer, never a package of its
# own layer or above: stages never import each other (docs/architecture.md).
LAYERS = [
    {"__init__", "errors"},
    {"config", "progress"},
    {"data"},
    {"models"},
    {"scoring", "training"},
    {"sft", "sampling", "annotators", "reward", "rl", "dpo", "evaluation", "feedback"},
    {"pipeline"},
    {"cli"},
    {"__main__"},
]
LAYER_OF = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every preftune module and the preftune modules it imports, at any depth of its code (an
    import inside a function is still a dependency)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("preftune"):
                # "from pkg import sub" depends on the submodule; "from mod import name" on the module
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("preftune")]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_imports_flow_from_stages_down_to_shared_layers():
    wrong = []
    for module, deps in import_graph().items():
        here = top(module)
        for dep in deps:
            there = top(dep)
            if here == there:
                continue
            if LAYER_OF[there] > LAYER_OF[here]:
                wrong.append(f"{module} imports {dep} (up: {here} -> {there})")
            elif LAYER_OF[there] == LAYER_OF[here]:
                wrong.append(f"{module} imports {dep} (sideways: {here} -> {there})")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_help_runs_without_importing_torch():
    code = """
import sys
import click
from preftune.cli import cli

def walk(command, path):
    yield path
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from walk(sub, path + [name])

seen = 0
for path in walk(cli, []):
    try:
        cli(path + ["--help"], prog_name="preftune", standalone_mode=False)
    except SystemExit:
        pass
    seen += 1
heavy = sorted(m for m in ("torch", "transformers", "numpy", "sqlalchemy", "fastapi") if m in sys.modules)
print(seen, heavy)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    count, heavy = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) >= 20  # every command and group, annotate's included
    assert heavy == "[]", f"--help imported {heavy}"
