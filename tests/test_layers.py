"""The package's imports flow one way: parsed with `ast` (nothing is imported), every import between
modules (at the top or inside functions) must point to a lower layer or stay inside one module group,
and no modules import each other in a circle. Failures name the files and lines."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "indexer"

# Low to high. A group is a top-level module or subpackage of indexer/ ("__init__" is the package's own
# API facade: the CLI calls it). Groups of one layer may not import each other.
LAYERS: list[set[str]] = [
    {"version", "wording", "timing", "threads"},
    {"errors"},
    {"files", "spec", "sample", "cluster"},
    {"models", "sources"},
    {"store"},
    {"index"},
    {"ingest", "tasks"},
    {"serve"},
    {"__init__"},
    {"cli"},
]
RANK = {group: rank for rank, groups in enumerate(LAYERS) for group in groups}

# Circles tolerated for now (none). An entry that no longer occurs fails the test: the list only shrinks.
KNOWN_CIRCLES: list[set[str]] = []


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def group(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module of the package, line) for every import statement in the file, at any depth."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` imports the submodule; `from pkg import name` the package itself
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import indexer.x.y` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno))
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def rel(name: str) -> str:
    return str(modules()[name].relative_to(PACKAGE.parent))


def upward_imports(edges: dict[str, list[tuple[str, int]]]) -> list[str]:
    bad = []
    for name, targets in edges.items():
        for target, line in targets:
            low, high = group(target), group(name)
            if low == high:
                continue
            if low not in RANK or high not in RANK:
                bad.append(f"{rel(name)}:{line} imports {target}: give {low if low not in RANK else high} a layer")
            elif RANK[low] >= RANK[high]:
                how = "a higher layer" if RANK[low] > RANK[high] else "a peer of its layer"
                bad.append(f"{rel(name)}:{line} imports {target} ({how}: {low} is not below {high})")
    return bad


def circles(edges: dict[str, list[tuple[str, int]]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w, _ in edges.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in edges:
        if v not in index:
            visit(v)
    return out


def describe(component: set[str], edges: dict[str, list[tuple[str, int]]]) -> str:
    links = sorted({f"{rel(a)}:{line} -> {rel(b)}" for a in component for b, line in edges[a] if b in component})
    return "circle: " + "; ".join(links)


def test_every_group_has_a_layer():
    assert not {group(n) for n in modules()} - RANK.keys()


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = upward_imports(graph())
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    edges = graph()
    found = [{rel(m) for m in c} for c in circles(edges)]
    unknown = [describe({m for m in modules() if rel(m) in c}, edges) for c in found if c not in KNOWN_CIRCLES]
    stale = [c for c in KNOWN_CIRCLES if c not in found]
    assert not unknown, "\n".join(unknown)
    assert not stale, f"no longer a circle, delete it from KNOWN_CIRCLES: {stale}"


# ---- the store and `indexer info` stand alone: no torch ---------------------------------------------------

@pytest.fixture(scope="module")
def ingested(tmp_path_factory, sample_corpus) -> Path:
    from indexer import ingest
    from indexer.index import build_index

    path = tmp_path_factory.mktemp("alone") / "texts.idx"
    ingest(path, [str(sample_corpus["texts"])], model="minilm", progress=False)
    build_index(path)
    return path


_INFO_WITHOUT_TORCH = """
import json, sys
import indexer, indexer.store
from click.testing import CliRunner
from indexer.cli import cli

result = CliRunner().invoke(cli, ["info", sys.argv[1], "--json"])
assert result.exit_code == 0, result.output
report = {"rows": json.loads(result.output)["rows"], "api_rows": indexer.info(sys.argv[1])["rows"],
          "spec": indexer.ModelSpec.__module__, "torch_after_info": "torch" in sys.modules}
import indexer.ingest  # the subpackage: `indexer.ingest` stays the API function
report["ingest"] = type(indexer.ingest).__name__
report["search"] = indexer.search.__module__
report["torch_after_search"] = "torch" in sys.modules
print(json.dumps(report))
"""


def test_info_and_the_store_load_no_torch(ingested):
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", _INFO_WITHOUT_TORCH, str(ingested)], capture_output=True, text=True,
                         env=env, cwd=PACKAGE.parent, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"rows": 48, "api_rows": 48, "spec": "indexer.spec", "torch_after_info": False,
                      "ingest": "function", "search": "indexer.tasks.search", "torch_after_search": True}


def test_unknown_api_names_raise_attribute_error():
    import indexer

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        indexer.nope  # noqa: B018
    assert {"ingest", "search", "ModelSpec", "__version__"} <= set(dir(indexer))


# ---- the checker itself catches what it should -------------------------------------------------------------

def _fake(tmp_path: Path, files: dict[str, str]) -> None:
    for rel_path, text in files.items():
        path = tmp_path / "indexer" / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_upward_imports_inside_functions_and_circles(tmp_path, monkeypatch):
    _fake(tmp_path, {
        "__init__.py": "", "errors.py": "",
        "store/__init__.py": "from .collection import Collection\n",
        "store/collection.py": "def f():\n    from ..tasks.search import x\n",
        "tasks/__init__.py": "",
        "tasks/search.py": "from ..store import Collection\nfrom . import knn\n",
        "tasks/knn.py": "import indexer.tasks.search\n",
        "ingest/__init__.py": "from indexer.tasks import search\n",
    })
    monkeypatch.setattr(__import__(__name__, fromlist=["_"]), "PACKAGE", tmp_path / "indexer")
    edges = graph()
    bad = upward_imports(edges)
    assert any(b.startswith("indexer/store/collection.py:2 imports indexer.tasks.search (a higher layer") for b in bad)
    assert any(b.startswith("indexer/ingest/__init__.py:1 imports indexer.tasks.search (a peer") for b in bad)
    assert len(bad) == 2
    (found,) = circles(edges)  # search <-> knn, and store -> collection -> search -> store: one knot
    assert found == {"indexer.tasks.search", "indexer.tasks.knn", "indexer.store", "indexer.store.collection"}
    assert "indexer/tasks/knn.py:1 -> indexer/tasks/search.py" in describe(found, edges)


@pytest.mark.parametrize("source, expected", [
    ("from ..models import load_embedder\n", "indexer.models"),
    ("from ..models.text import TextEmbedder\n", "indexer.models.text"),
    ("from .. import info\n", "indexer"),
    ("from . import exact\n", "indexer.index.exact"),
    ("import indexer.store.collection as c\n", "indexer.store.collection"),
])
def test_relative_and_absolute_imports_resolve(tmp_path, monkeypatch, source, expected):
    _fake(tmp_path, {"__init__.py": "", "models/__init__.py": "", "models/text.py": "", "store/__init__.py": "",
                     "store/collection.py": "", "index/__init__.py": "", "index/exact.py": "",
                     "index/probe.py": source})
    monkeypatch.setattr(__import__(__name__, fromlist=["_"]), "PACKAGE", tmp_path / "indexer")
    assert [t for t, _ in graph()["indexer.index.probe"]] == [expected]
