"""The layout of the code: no import cycle among the project's modules (imports inside
functions included), the plan record below the driver layer, bench and the CLI on public or
staged API only, and no module over 500 lines or function over 80."""

from __future__ import annotations

import ast
import pathlib

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {
    "autopipe": "autopipe",
    "autopipe.passes": "passes",
    "autopipe.cost_models": "cost_models",
}
# Owned by the parameter-layout rewrite (issue 11) for now; listed so the exemption is visible.
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


MODULES = _modules()


def _imported(node: ast.AST) -> list[str]:
    """Project modules an import statement loads (``from pkg import submodule`` included)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        subs = [f"{node.module}.{a.name}" for a in node.names]
        return [s for s in subs if s in MODULES] or [node.module]
    return []


def import_graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for name, path in MODULES.items():
        graph.add_node(name)
        for node in ast.walk(ast.parse(path.read_text())):  # every import, at any depth
            for target in _imported(node):
                if target in MODULES and target != name:
                    graph.add_edge(name, target)
    return graph


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph.number_of_edges() > 50  # the graph really was built
    cycles = list(nx.simple_cycles(graph.subgraph(n for n in graph if n != "autopipe")))
    assert cycles == [], f"import cycles: {cycles[:5]}"
    # only entry points may import the package itself (it imports every public module)
    importers = sorted(graph.predecessors("autopipe"))
    assert set(importers) <= {"autopipe._cli", "autopipe.launch", "autopipe.demo"}, importers


def test_plan_record_imports_nothing_above_passes_and_cost_models():
    graph = import_graph()
    below = {n for n in graph.successors("autopipe._plan")}
    assert below, "the record imports the schedule and hardware records"
    assert all(n.startswith(("autopipe.passes.", "autopipe.cost_models.")) for n in below), below


def test_passes_and_cost_models_import_nothing_of_the_driver_layer():
    graph = import_graph()
    for name in graph:
        if name.startswith(("autopipe.passes", "autopipe.cost_models")):
            up = [
                t
                for t in graph.successors(name)
                if t.split(".")[1] not in ("passes", "cost_models")
            ]
            assert up in ([], ["autopipe._compat"]), (name, up)


def test_bench_and_cli_use_only_public_or_staged_api():
    files = [*sorted((ROOT / "bench").glob("*.py")), ROOT / "autopipe" / "_cli.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            for target in _imported(node):
                private = [p for p in target.split(".")[1:] if p.startswith("_")]
                assert not (target.startswith("autopipe") and private), (path.name, target)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "autopipe":
                    assert not node.attr.startswith("_"), (path.name, node.attr)


def _sizes():
    for path in sorted({*MODULES.values(), *(ROOT / "bench").glob("*.py")}):
        rel = path.relative_to(ROOT).as_posix()
        yield pytest.param(path, id=rel)


@pytest.mark.parametrize("path", list(_sizes()))
def test_module_and_function_sizes(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    long = [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []
