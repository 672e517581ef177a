"""What every benchmark in scripts/ shares: timing, latency percentiles, synthetic corpora, the JSON report.

Imported by the scripts run as `python scripts/bench_x.py` (their folder is first on sys.path); importing
it also puts the repository root on sys.path, so the checkout's `indexer` is the one benchmarked.

>>> _, seconds = timed(sum, range(10))
>>> latency_ms([0.001, 0.002, 0.003])["p50_ms"]
2.0
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ---- timing ---------------------------------------------------------------------------------------------

def timed(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    """fn's result and its wall seconds."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def measured(fn: Callable, *args, **kwargs) -> tuple[Any, float, float | None]:
    """fn's result, wall seconds and peak RSS growth over the RSS before it (MiB; None if unmeasurable)."""
    can_reset = _reset_peak_rss()
    before = _status_kib("VmRSS:")
    result, seconds = timed(fn, *args, **kwargs)
    return result, seconds, (_status_kib("VmHWM:") - before) / 1024 if can_reset else None


def latency_ms(seconds: Sequence[float], percentiles: Sequence[int] = (50, 99)) -> dict[str, float]:
    """Per-call latencies (seconds) as milliseconds: the given percentiles, mean and max (NaN when empty)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    if not len(ms):
        ms = np.array([np.nan])
    out = {f"p{p}_ms": float(np.percentile(ms, p)) for p in percentiles}
    return {**out, "mean_ms": float(ms.mean()), "max_ms": float(ms.max())}


# ---- synthetic corpora ------------------------------------------------------------------------------------

def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float32)."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32, copy=False)


def clustered(n: int, centers: np.ndarray, noise: float, rng: np.random.Generator,
              chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors clustered like real embeddings: a random centre each plus `noise` * gaussian,
    normalised (built in chunks). Returns (vectors (n, d) float32, the centre of each (n,))."""
    x = np.empty((n, centers.shape[1]), dtype=np.float32)
    topic = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        topic[start : start + m] = rng.integers(0, len(centers), m)
        block = centers[topic[start : start + m]] + noise * rng.standard_normal((m, centers.shape[1]), dtype=np.float32)
        x[start : start + m] = unit_rows(block)
    return x, topic


def vectors_table(ids: Sequence[str], x: np.ndarray, vector_column: str = "vector", **columns):
    """A pyarrow table of precomputed embeddings (ingest with `--vector-field vector_column`)."""
    import pyarrow as pa

    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x, dtype=np.float32).ravel()),
                                                x.shape[1])
    return pa.table({"id": list(ids), **columns, vector_column: vectors})


def write_parquet(path: Path, ids: Sequence[str], x: np.ndarray, vector_column: str = "vector", **columns) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(vectors_table(ids, x, vector_column, **columns), path)
    return path


def sample_sentences() -> dict[str, list[str]]:
    """The bundled sample corpus (indexer/data/sample_texts.jsonl): label -> its sentences."""
    with resources.as_file(resources.files("indexer") / "data" / "sample_texts.jsonl") as src:
        rows = [json.loads(line) for line in Path(src).read_text(encoding="utf-8").splitlines() if line.strip()]
    by_label: dict[str, list[str]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row["text"])
    return by_label


DOCSTRING_SOURCES = ("numpy", "transformers", "torch")  # after the standard library, until enough are found


def docstring_passages(n: int, seed: int, cache: Path) -> list[str]:
    """`n` real English passages, identical on any machine with the same Python and packages: the
    distinct docstrings (whitespace folded, at least 8 words) of the standard library, then of
    DOCSTRING_SOURCES, shuffled by `seed`. Technical prose of every length, from one line to pages
    (the model truncates at its limit), unlike generated passages, whose near-copies make
    neighbour lists depend on differences smaller than any quantisation's noise. Cached in `cache`."""
    import ast
    import hashlib
    import importlib.util
    import random
    import sysconfig

    roots = [Path(sysconfig.get_paths()["stdlib"])]
    for name in DOCSTRING_SOURCES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots.append(Path(next(iter(spec.submodule_search_locations))))
    key = hashlib.sha256(json.dumps([platform.python_version(), *map(str, roots), n, seed]).encode()).hexdigest()[:12]
    cached = cache / f"docstrings-{key}.json"
    if cached.exists():
        return json.loads(cached.read_text(encoding="utf-8"))
    found: dict[str, None] = {}  # ordered set
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if {"test", "tests", "site-packages", "idlelib"} & set(path.relative_to(root).parts):
                continue
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = " ".join((ast.get_docstring(node) or "").split())
                    if len(doc.split()) >= 8:
                        found[doc] = None
        if len(found) >= n * 1.5:  # a margin, so the draw is not simply the first packages' docstrings
            break
    if len(found) < n:
        raise SystemExit(f"only {len(found)} docstrings found in {', '.join(map(str, roots))}; {n} asked for")
    passages = list(found)
    random.Random(seed).shuffle(passages)
    cache.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(passages[:n]), encoding="utf-8")
    return passages[:n]


def write_jsonl(rows: Sequence[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def no_auto_index() -> None:
    """Ingest builds no ANN index by itself for the rest of the run: every build is timed on its own."""
    import indexer.index

    indexer.index.AUTO_INDEX_ROWS = 1 << 62


# ---- the report -----------------------------------------------------------------------------------------

def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def machine() -> dict[str, Any]:
    """Where the figures come from: CPUs, Python, platform and the load average now."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_avg": load_average()}


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """The whole report as JSON at `path` (its folder made); values JSON cannot hold are written as text."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return out
