"""Choosing a FAISS index: its structure for the data size and memory budget (`choose_plan`), then the
fastest search knobs that reach a recall target, measured against exact neighbours (`tune`)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from ..errors import IndexerError
from .exact import top_k

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivf-flat", "ivf-pq", "opq-ivf-pq")
RECALL_K = 10
EF_SWEEP = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
NPROBE_SWEEP = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
KFACTOR_SWEEP = (1, 2, 4, 8, 16, 32)
# What auto builds instead when a kind cannot reach the target recall on this data (ivf-flat reaches
# any recall as nprobe grows; flat is exact).
FALLBACK = {"hnsw": "ivf-flat", "ivf-flat": "flat"}
FLAT_BELOW = 20_000  # exact search over this many vectors takes well under a few ms
HNSW_BELOW = 300_000  # HNSW build time on a few cores stays in minutes up to here
# Tuning aims this far above the target: the sample's recall estimate has noise, fresh queries must
# still reach the target.
TUNING_MARGIN = 0.01


@dataclass(frozen=True)
class Plan:
    kind: str
    factory: str
    nlist: int | None = None


def choose_plan(n: int, d: int, kind: str = "auto", max_memory: int | None = None) -> Plan:
    """The index for n vectors of dim d within a memory budget (bytes)."""
    flat_bytes = n * d * 4
    budget = max_memory if max_memory else _default_budget()
    if kind == "auto":
        if n <= FLAT_BELOW and flat_bytes <= budget:
            kind = "flat"
        elif n <= HNSW_BELOW and flat_bytes * 1.3 <= budget:
            kind = "hnsw"
        elif flat_bytes * 1.1 <= budget:
            kind = "ivf-flat"
        else:
            kind = "ivf-pq"
    if kind not in KINDS:
        raise IndexerError(f"--kind {kind}: choose auto or one of {', '.join(KINDS)}")
    nlist = max(16, min(65536, 2 ** round(math.log2(max(2 * math.sqrt(max(n, 1)), 1)))))
    nlist = min(nlist, max(16, n // 39))  # k-means wants ~39+ points per list
    # PQ sub-quantizers of 8 bits each, ~4 dims apiece for small d and ~8 for large d.
    m = next(m for m in ((d // 4, d // 8) if d <= 256 else (d // 8, d // 4)) + (d // 2, d) if m and d % m == 0)
    refine = "RFlat" if flat_bytes + n * m <= budget else "Refine(SQ8)"
    if kind in ("flat", "hnsw", "ivf-flat") and flat_bytes * 1.1 > budget:
        raise IndexerError(f"--kind {kind} needs ~{_size(flat_bytes)}; over --max-memory {_size(budget)}: "
                           "use ivf-pq or raise the budget")
    factory = {"flat": "Flat", "hnsw": "HNSW32,Flat", "ivf-flat": f"IVF{nlist},Flat",
               "ivf-pq": f"IVF{nlist},PQ{m}x8,{refine}", "opq-ivf-pq": f"OPQ{m},IVF{nlist},PQ{m}x8,{refine}"}[kind]
    return Plan(kind, factory, nlist if "ivf" in kind else None)


def _default_budget() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.7)
    except ImportError:
        return 8 << 30


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def parse_size(text: str) -> int:
    """'8GB', '512M', '1.5 GiB', '1000000' -> bytes."""
    units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
             "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    try:
        return int(float(num) * units[s[len(num):]])
    except (ValueError, KeyError) as exc:
        raise IndexerError(f"--max-memory {text!r}: expected a size like 4GB or 512MB") from exc


# ---- search-time knobs and their tuning --------------------------------------------------------------------------------

def search_params(index, knobs: dict[str, int], selector=None):
    """faiss SearchParameters for this index's structure, with an optional IDSelector."""
    import faiss

    index = faiss.downcast_index(index)  # sub-indexes come back as plain faiss.Index proxies
    if isinstance(index, faiss.IndexRefine):
        base = search_params(index.base_index, knobs, selector)
        return faiss.IndexRefineSearchParameters(k_factor=float(knobs.get("k_factor", 1)), base_index_params=base)
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(index_params=search_params(index.index, knobs, selector))
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=int(knobs.get("ef", 64)), sel=selector)
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=int(knobs.get("nprobe", 1)), sel=selector)
    return faiss.SearchParameters(sel=selector)


def _knob_grid(index, kind: str) -> list[dict[str, int]]:
    import faiss

    if kind == "flat":
        return [{}]
    if kind == "hnsw":
        return [{"ef": ef} for ef in EF_SWEEP]
    nlist = faiss.extract_index_ivf(index).nlist
    nprobes = [p for p in NPROBE_SWEEP if p <= nlist]
    if kind == "ivf-flat":
        return [{"nprobe": p} for p in nprobes]
    return [{"nprobe": p, "k_factor": f} for p in nprobes for f in KFACTOR_SWEEP]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


def tune(index, kind: str, queries: np.ndarray, truth: np.ndarray, target: float) -> tuple[dict, float, list]:
    """Measure recall@10 and time of every knob setting; keep the fastest one that meets the target
    (or, if none does, the most accurate). Returns (knobs, recall, sweep)."""
    goal = min(1.0, target + TUNING_MARGIN)
    sweep = []
    for knobs in _knob_grid(index, kind):
        params = search_params(index, knobs)
        start = time.perf_counter()
        _, found = index.search(queries, RECALL_K, params=params)
        elapsed = time.perf_counter() - start
        rec = recall_at(found, truth)
        sweep.append({**knobs, "recall": rec, "qps": len(queries) / elapsed})
        # Larger knobs only cost more; once a 1-D sweep meets the target it is done.
        if rec >= goal and kind in ("hnsw", "ivf-flat"):
            break
    meeting = [s for s in sweep if s["recall"] >= goal]
    best = max(meeting, key=lambda s: s["qps"]) if meeting else max(sweep, key=lambda s: s["recall"])
    knobs = {k: v for k, v in best.items() if k not in ("recall", "qps")}
    return knobs, best["recall"], sweep


def ground_truth(x: np.ndarray, base: np.ndarray, held: np.ndarray) -> np.ndarray:
    """The held-out queries' exact neighbours among the base rows, as positions in the index being tuned
    (the base rows in order; `base` is sorted)."""
    _, rows = top_k(x[held], x, RECALL_K, base_rows=base)
    return np.searchsorted(base, rows)


def single_query_qps(index, queries: np.ndarray, knobs: dict) -> float:
    params = search_params(index, knobs)
    start = time.perf_counter()
    for q in queries:
        index.search(q[None, :], RECALL_K, params=params)
    return len(queries) / max(time.perf_counter() - start, 1e-9)


def batch_qps(index, queries: np.ndarray, knobs: dict) -> float:
    start = time.perf_counter()
    index.search(queries, RECALL_K, params=search_params(index, knobs))
    return len(queries) / max(time.perf_counter() - start, 1e-9)
