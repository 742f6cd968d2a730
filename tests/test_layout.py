"""The layout is the data flow: each package imports only the ones below it, nothing imports in a
circle, and the CLI only parses, calls the library and prints.

Imports are read from the source (every `import`, including those inside functions), so a lazy
import cannot hide a cycle or a dependency that points upwards.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import curator

REPOSITORY = Path(curator.__file__).resolve().parent.parent
# Top-level folders of the repository and the package each is installed as (pyproject.toml).
FOLDERS = {"curator": "curator", "connectors": "curator.connectors", "indexes": "curator.indexes",
           "cli": "curator.cli"}
# Lowest first. A module may import its own package and any package of a lower layer.
LAYERS = [
    ("curator.errors", "curator.constants", "curator.artifacts", "curator.arrays", "curator.plots", "curator.threads",
     "curator.indexes"),
    ("curator.connectors",),
    ("curator.catalog",),       # workspace, DuckDB catalog, ingest, documents, queries, records
    ("curator.model",),         # loading, tokens, losses and layer hooks, the one document pass
    ("curator.influence",),     # EK-FAC math, factors, fit, preconditioned queries, exact scores
    ("curator.sketch",),        # bases, store, build, index, sketch scores, search, fidelity
    ("curator.curate",),        # rank, mix, export
    ("curator.audit",),         # analyses, report
    ("curator.evaluate",),      # train arms at equal tokens on mixtures and baselines, measure, report
    ("curator.demo",),
    ("curator.service", "curator.client"),  # `curator serve` (HTTP over the library) and its client
    ("curator.cli",),
    ("curator.__main__",),      # `python -m curator` and torchrun: joins the job, then runs the CLI
]


# The catalog's SQL is written in capitals; help texts say "select" in lower case.
SQL = re.compile(r"\bSELECT\b|\bINSERT (OR REPLACE )?INTO\b|\bDELETE FROM\b|\bUPDATE \w+ SET\b|\bCREATE TABLE\b")


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPOSITORY / folder).rglob("*.py")):
            parts = list(path.relative_to(REPOSITORY / folder).with_suffix("").parts)
            if folder == "curator" and parts[0] in ("connectors", "indexes", "cli"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The curator modules a file imports (resolved to the longest known module name)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer_of(module: str) -> int:
    for number, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return number
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, name, set(found)) for name, path in found.items()}


def test_every_module_has_a_layer_and_imports_only_its_own_package_or_lower_ones():
    wrong = []
    for module, targets in graph().items():
        if module == "curator":
            continue
        for target in targets:
            if target != "curator" and layer_of(target) > layer_of(module):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports that point up the data flow:\n  " + "\n  ".join(sorted(wrong))


def find_cycles(edges: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" → ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_checks_can_fail(tmp_path):
    """The walker sees lazy imports, the layer rule catches an upward one, and the cycle search finds
    a cycle through a lazy import."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from curator.sketch.store import SketchStore\n")
    found = imports_of(probe, "curator.catalog.probe", set(modules()))
    assert found == {"curator.sketch.store"}
    assert layer_of("curator.sketch.store") > layer_of("curator.catalog.probe")
    edges = {**graph(), "curator.catalog.database": graph()["curator.catalog.database"] | {"curator.sketch.store"}}
    assert any("curator.sketch.store" in cycle and "curator.catalog.database" in cycle
               for cycle in find_cycles(edges))


def test_the_cli_holds_no_sql_no_torch_and_no_catalog_connection():
    problems = []
    for module, path in modules().items():
        if not module.startswith("curator.cli"):
            continue
        text = path.read_text()
        tree = ast.parse(text)
        raw = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
               for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
        if raw & {"torch", "duckdb"}:
            problems.append(f"{module} imports {sorted(raw & {'torch', 'duckdb'})}")
        names = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for alias in node.names}
        if "Catalog" in names:
            problems.append(f"{module} opens the catalog itself")
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
                problems.append(f"{module}:{node.lineno} holds SQL")
    assert not problems, "\n".join(problems)
