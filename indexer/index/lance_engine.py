"""LanceDB's own vector index (IVF_PQ or IVF_HNSW_SQ), with nprobes and refine_factor tuned to a
measured recall target, for users who keep everything in Lance.

Rows added after the build are searched by a flat scan until `optimize_indices` folds them in, so
results are never stale; deletions and updates are reflected by Lance itself.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np

from ..errors import IndexerError
from ..store import Collection
from ..store.collection import check_where, where_error
from ..store.manifest import now_iso
from .exact import exact_search
from .tuning import TUNING_MARGIN

META = "lance.json"
LANCE_KINDS = ("ivf-pq", "ivf-hnsw-sq")
NPROBES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
REFINE = (None, 2, 5, 10, 20, 50, 100)
RETRAIN_GROWTH = 4.0


def _sample_queries(coll: Collection, n_queries: int, seed: int) -> tuple[list[str], np.ndarray]:
    ds = coll.dataset()
    total = ds.count_rows()
    rng = np.random.default_rng(seed)
    offsets = np.sort(rng.choice(total, size=min(n_queries, total), replace=False))
    tbl = ds.take(offsets, columns=["id", "vector"])
    x = np.stack(tbl.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    return tbl.column("id").to_pylist(), x / np.linalg.norm(x, axis=1, keepdims=True)


def lance_search(coll: Collection, vector: np.ndarray, k: int, knobs: dict[str, Any], where: str | None = None,
                 columns: list[str] | None = None, exact: bool = False) -> list[dict[str, Any]]:
    """One query through Lance's index (or a flat scan with `exact`); `score` is cosine similarity."""
    q = coll.table.search(vector).distance_type("cosine").limit(k)
    if exact:
        q = q.bypass_vector_index()
    if knobs.get("nprobes"):
        q = q.nprobes(int(knobs["nprobes"]))
    if knobs.get("refine_factor"):
        q = q.refine_factor(int(knobs["refine_factor"]))
    if knobs.get("ef"):
        q = q.ef(int(knobs["ef"]))
    if columns is not None:
        q = q.select([*columns, "_distance"])
    check_where(where)
    try:
        if where:
            q = q.where(where, prefilter=True)
        rows = q.to_list()
    except (ValueError, RuntimeError) as exc:  # SQL and column errors; RuntimeError: see where_error
        if not where:
            raise
        raise where_error(where, exc) from exc
    for r in rows:
        r["score"] = 1.0 - float(r.pop("_distance"))
        r.pop("vector", None)
    return rows


def build_lance_index(coll: Collection, kind: str = "auto", target_recall: float = 0.95,
                      seed: int = 0) -> dict[str, Any]:
    """Create the Lance index, then sweep nprobes x refine_factor on held-in sample queries (each
    query's own row excluded from both sides) and keep the fastest setting that meets the target."""
    started = time.perf_counter()
    n, d = coll.count(), coll.spec.dim
    if n < 256:
        raise IndexerError(f"{coll.path} has {n} rows: too few for a Lance ANN index (exact search is instant)")
    kind = "ivf-pq" if kind == "auto" else kind
    if kind not in LANCE_KINDS:
        raise IndexerError(f"--kind {kind} with --engine lance: choose auto or one of {', '.join(LANCE_KINDS)}")
    partitions = max(1, min(4096, int(math.sqrt(n))))
    sub_vectors = next(m for m in (d // 8, d // 4, d // 2, d) if m and d % m == 0)
    index_type = {"ivf-pq": "IVF_PQ", "ivf-hnsw-sq": "IVF_HNSW_SQ"}[kind]
    params = {"num_partitions": partitions}
    if index_type == "IVF_PQ":
        params["num_sub_vectors"] = sub_vectors
    coll.table.create_index(metric="cosine", index_type=index_type, replace=True, **params)
    ids, queries = _sample_queries(coll, min(500, n // 10), seed)
    goal = min(1.0, target_recall + TUNING_MARGIN)
    # Ground truth by our blocked exact scan: one pass for all queries, not one Lance flat scan each.
    row_ids, _, version = exact_search(coll, queries, 11)
    id_of = coll.rows_by_row_id(sorted({r for rows in row_ids for r in rows}), ["id"], version)
    truth = [[id_of[r]["id"] for r in rows if id_of[r]["id"] != i][:10] for i, rows in zip(ids, row_ids)]
    sweep = []
    for nprobes in (p for p in NPROBES if p <= partitions):
        for refine in REFINE:
            knobs = {"nprobes": nprobes, "refine_factor": refine}
            start = time.perf_counter()
            found = [[h["id"] for h in lance_search(coll, q, 11, knobs, columns=["id"]) if h["id"] != i][:10]
                     for i, q in zip(ids, queries)]
            qps = len(queries) / (time.perf_counter() - start)
            rec = float(np.mean([len(set(f) & set(t)) / max(len(t), 1) for f, t in zip(found, truth)]))
            sweep.append({**knobs, "recall": rec, "qps": qps})
        if any(s["recall"] >= goal for s in sweep if s["nprobes"] == nprobes):
            break  # more probes only cost more
    meeting = [s for s in sweep if s["recall"] >= goal]
    best = max(meeting, key=lambda s: s["qps"]) if meeting else max(sweep, key=lambda s: s["recall"])
    meta = {
        "engine": "lance", "kind": kind, "index_type": index_type, "build_params": params,
        "params": {"nprobes": best["nprobes"], "refine_factor": best["refine_factor"]},
        "target_recall": target_recall, "recall_at_10": best["recall"], "recall_queries": len(ids),
        "qps_single": best["qps"], "sweep": sweep, "build_seconds": round(time.perf_counter() - started, 3),
        "trained_rows": n, "rows": n, "lance_version": coll.version(), "built": now_iso(),
    }
    coll.location.write_bytes(f"index/{META}", json.dumps(meta, indent=2).encode())
    return meta


def lance_meta(coll: Collection) -> dict[str, Any] | None:
    data = coll.location.read_bytes(f"index/{META}")
    return json.loads(data) if data is not None else None
