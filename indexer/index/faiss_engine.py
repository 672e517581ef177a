"""A FAISS index over a collection's vectors, tuned to a measured recall target.

Vectors are added in order, so a vector's FAISS id is its position; `rows.parquet` maps positions to
collection ids and record hashes. Updated and deleted rows become tombstones (a `live` flag) that
search skips through an IDSelector; the index is compacted by a rebuild once tombstones pile up.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import IndexerError
from ..store import Collection
from ..store.location import Location
from ..store.manifest import now_iso, write_json_atomic
from .files import verify, write_atomic

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivf-flat", "ivf-pq", "opq-ivf-pq")
INDEX_DIR, META, INDEX_FILE, ROWS_FILE = "index", "index.json", "faiss.index", "rows.parquet"
RECALL_K = 10
EF_SWEEP = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
NPROBE_SWEEP = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
KFACTOR_SWEEP = (1, 2, 4, 8, 16, 32)
# What auto builds instead when a kind cannot reach the target recall on this data (ivf-flat reaches
# any recall as nprobe grows; flat is exact).
FALLBACK = {"hnsw": "ivf-flat", "ivf-flat": "flat"}
FLAT_BELOW = 20_000  # exact search over this many vectors takes well under a few ms
HNSW_BELOW = 300_000  # HNSW build time on a few cores stays in minutes up to here
RETRAIN_GROWTH = 4.0  # retrain IVF/PQ once the collection is this many times the trained size
MAX_TOMBSTONES = 0.2
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


# ---- search-time knobs --------------------------------------------------------------------------------

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


# ---- the index ------------------------------------------------------------------------------------------

class FaissIndex:
    def __init__(self, location: Location, index, rows: pa.Table, meta: dict[str, Any]):
        # Files are read and written in `directory`: the collection's index/ or, on object storage, a
        # local copy that `save` publishes.
        self.location, self.index, self.meta = location, index, meta
        self.directory = location.local_dir(INDEX_DIR)
        # One contiguous array each: take() on parquet's chunked columns costs ms per query.
        self.ids = _chunk(rows.column("id"))
        self.hashes = _chunk(rows.column("record_hash"))
        self.live = np.asarray(rows.column("live").to_numpy(zero_copy_only=False), dtype=bool)

    # -- building ---------------------------------------------------------------------------------------

    @classmethod
    def build(cls, coll: Collection, kind: str = "auto", target_recall: float = 0.95,
              max_memory: int | None = None, seed: int = 0) -> FaissIndex:

        if not 0 < target_recall <= 1:
            raise IndexerError("--target-recall must be in (0, 1]")
        started = time.perf_counter()
        _ensure_id_index(coll)  # first: it makes a Lance version, and the index must reflect the last one
        ids, hashes, x = _load_vectors(coll)
        n, d = x.shape
        if n == 0:
            raise IndexerError(f"{coll.path} is empty: ingest something first")
        plan = choose_plan(n, d, kind, max_memory)
        rng = np.random.default_rng(seed)
        # Held-out queries: taken from the collection, left out of the index while tuning, added after.
        n_queries = min(1000, n // 10) if n >= 200 else 0
        order = rng.permutation(n)
        held, base = np.sort(order[:n_queries]), np.sort(order[n_queries:])
        truth = _exact_topk(x[base], x[held], RECALL_K) if n_queries and plan.kind != "flat" else None
        while True:
            index, knobs, recall, sweep = _build_tuned(plan, x, base, held, truth, target_recall, rng)
            # auto never settles below the target while a kind that reaches it fits in memory.
            fallback = FALLBACK.get(plan.kind) if kind == "auto" and recall < target_recall else None
            if fallback is None:
                break
            try:
                plan = choose_plan(n, d, fallback, max_memory)
            except IndexerError:
                break
            log.info("recall %.3f is below %.2f: trying %s", recall, target_recall, plan.kind)
            truth = truth if plan.kind != "flat" else None
        if recall < target_recall:
            log.warning("no setting reached recall %.2f; using the most accurate (%.3f)", target_recall, recall)
        if n_queries:
            index.add(x[held])
        position_order = np.concatenate([base, held])
        rows = pa.table({"id": ids.take(pa.array(position_order)), "record_hash": hashes.take(pa.array(position_order)),
                         "live": pa.array(np.ones(n, dtype=bool))})
        sample = x[held] if n_queries else x[:1000]
        single_qps, batch_qps = _single_query_qps(index, sample[:200], knobs), _batch_qps(index, sample, knobs)
        meta = {
            "engine": "faiss", "requested_kind": kind, "kind": plan.kind, "factory": plan.factory, "metric": "cosine",
            "params": knobs, "target_recall": target_recall, "recall_at_10": recall, "recall_queries": n_queries,
            "qps_single": single_qps, "qps_batch": batch_qps,
            "sweep": sweep, "build_seconds": round(time.perf_counter() - started, 3),
            "trained_rows": n, "rows": n, "dim": d, "lance_version": coll.version(), "built": now_iso(),
        }
        built = cls(coll.location, index, rows, meta)
        built.save()
        return built

    # -- files ------------------------------------------------------------------------------------------

    def save(self) -> None:
        import faiss

        self.directory.mkdir(parents=True, exist_ok=True)
        rows = pa.table({"id": self.ids, "record_hash": self.hashes, "live": pa.array(self.live)})
        self.meta["files"] = {
            INDEX_FILE: write_atomic(self.directory / INDEX_FILE, lambda p: faiss.write_index(self.index, p)),
            ROWS_FILE: write_atomic(self.directory / ROWS_FILE, lambda p: pq.write_table(rows, p)),
        }
        self.meta["memory_bytes"] = self.meta["files"][INDEX_FILE]["size"]
        self.meta["rows"] = int(self.live.sum())
        write_json_atomic(self.directory / META, self.meta)
        self.location.push(INDEX_DIR, [INDEX_FILE, ROWS_FILE, META])

    @classmethod
    def open(cls, coll: Collection, mmap: bool = True) -> FaissIndex | None:
        import faiss

        data = coll.location.read_bytes(f"{INDEX_DIR}/{META}")
        if data is None:
            return None
        directory = coll.location.local_dir(INDEX_DIR)
        hint = f"indexer index {coll.path}"
        try:
            meta = json.loads(data)
            files = meta["files"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as exc:
            raise IndexerError(f"{coll.path}/{INDEX_DIR}/{META} is damaged; rebuild with `{hint}`") from exc
        coll.location.pull(INDEX_DIR, {name: files[name] for name in (INDEX_FILE, ROWS_FILE)})
        for name in (INDEX_FILE, ROWS_FILE):
            verify(directory / name, files[name], hint)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(directory / INDEX_FILE), flags)
            rows = pq.read_table(directory / ROWS_FILE)
        except Exception as exc:  # noqa: BLE001 - any parse failure means the same: rebuild
            raise IndexerError(f"cannot read the index in {directory} ({exc}); rebuild with `{hint}`") from exc
        if index.ntotal != rows.num_rows:
            raise IndexerError(f"the index in {directory} does not match its row map; rebuild with `{hint}`")
        return cls(coll.location, index, rows, meta)

    # -- keeping up with the collection ----------------------------------------------------------------

    def is_current(self, coll: Collection) -> bool:
        return self.meta.get("lance_version") == coll.version()

    def catch_up(self, coll: Collection) -> dict[str, int]:
        """Add new rows, tombstone updated and deleted ones; rebuild when that is no longer sound."""
        current = coll.record_hashes()
        position = {i: p for p, (i, alive) in enumerate(zip(self.ids.to_pylist(), self.live)) if alive}
        hashes = self.hashes.to_pylist()
        new_ids = []
        for rid, h in current.items():
            p = position.pop(rid, None)
            if p is not None and hashes[p] == h:
                continue
            if p is not None:
                self.live[p] = False
            new_ids.append(rid)
        for p in position.values():
            self.live[p] = False
        stats = {"added": len(new_ids), "removed": len(position), "version": coll.version()}
        if new_ids:
            vecs = coll.rows_by_id(new_ids, columns=["id", "record_hash", "vector"])
            x = _normalized(np.stack([np.asarray(vecs[i]["vector"], dtype=np.float32) for i in new_ids]))
            self.index.add(x)
            self.ids = pa.concat_arrays([_chunk(self.ids), pa.array(new_ids, type=pa.string())])
            self.hashes = pa.concat_arrays([_chunk(self.hashes), pa.array([vecs[i]["record_hash"] for i in new_ids])])
            self.live = np.concatenate([self.live, np.ones(len(new_ids), dtype=bool)])
        self.meta["lance_version"] = coll.version()
        self.meta["updated"] = now_iso()
        self.save()
        return stats

    def needs_rebuild(self) -> str | None:
        live = int(self.live.sum())
        if self.meta["kind"] != "flat" and live > RETRAIN_GROWTH * self.meta["trained_rows"]:
            return f"the collection grew to {live} rows, {RETRAIN_GROWTH:g}x the {self.meta['trained_rows']} it was trained on"
        dead = 1 - live / max(len(self.live), 1)
        if dead > MAX_TOMBSTONES:
            return f"{dead:.0%} of its entries are deleted or replaced rows"
        return None

    # -- searching ----------------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               knobs: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Positions and scores of the k best live (and allowed) entries per query; -1 where none."""
        import faiss

        mask = self.live if allowed is None else self.live & allowed
        knobs = {**self.meta.get("params", {}), **(knobs or {})}
        selector = None
        if not mask.all():
            bitmap = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
            # A filter leaves fewer candidates per probe/hop: widen the search by the inverse selectivity.
            widen = min(8.0, len(mask) / max(int(mask.sum()), 1))
            knobs = {key: int(math.ceil(v * widen)) if key in ("nprobe", "ef") else v for key, v in knobs.items()}
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = search_params(self.index, knobs, selector)
        if len(queries) > 4:
            scores, positions = self.index.search(queries, k, params=params)
            return positions, scores
        # OpenMP threads only add synchronisation to a query or two (and stall on a busy machine).
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            scores, positions = self.index.search(queries, k, params=params)
        finally:
            faiss.omp_set_num_threads(threads)
        return positions, scores

    def ids_at(self, positions: np.ndarray) -> list[str]:
        return self.ids.take(pa.array(positions.ravel())).to_pylist()

    def mask_for_ids(self, ids: pa.Array) -> np.ndarray:
        import pyarrow.compute as pc

        return np.asarray(pc.is_in(self.ids, value_set=ids).to_numpy(zero_copy_only=False), dtype=bool)

    def info(self) -> dict[str, Any]:
        return {k: v for k, v in self.meta.items() if k not in ("sweep", "files")}


def _build_tuned(plan: Plan, x: np.ndarray, base: np.ndarray, held: np.ndarray, truth: np.ndarray | None,
                 target_recall: float, rng) -> tuple[Any, dict, float, list]:
    """Train and fill one index with the base rows and tune its knobs on the held-out queries."""
    import faiss

    log.info("building %s index (%s) over %d vectors of dim %d", plan.kind, plan.factory, len(x), x.shape[1])
    index = faiss.index_factory(x.shape[1], plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = 80
    if not index.is_trained:
        train = x[base[rng.permutation(len(base))[: max(64 * (plan.nlist or 1), 50_000)]]]
        log.info("training on %d vectors", len(train))
        index.train(train)
    for start in range(0, len(base), 65536):  # chunks: x[base] at once would copy every vector
        index.add(x[base[start : start + 65536]])
    if truth is None:
        return index, {}, 1.0, []
    knobs, recall, sweep = tune(index, plan.kind, x[held], truth, target_recall)
    log.info("tuned %s: recall@%d %.3f (target %.2f)", knobs, RECALL_K, recall, target_recall)
    return index, knobs, recall, sweep


def _chunk(arr) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _load_vectors(coll: Collection) -> tuple[pa.Array, pa.Array, np.ndarray]:
    ids, hashes, blocks = [], [], []
    for batch in coll.scan(["id", "record_hash", "vector"], batch_size=65536):
        ids.append(batch.column("id"))
        hashes.append(batch.column("record_hash"))
        blocks.append(batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1))
    if not blocks:
        return pa.array([], pa.string()), pa.array([], pa.string()), np.zeros((0, coll.spec.dim), np.float32)
    x = np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # in place: x can be GBs
    return pa.concat_arrays(ids), pa.concat_arrays(hashes), x


def _exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    import faiss

    _, idx = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    return idx


def _single_query_qps(index, queries: np.ndarray, knobs: dict) -> float:
    params = search_params(index, knobs)
    start = time.perf_counter()
    for q in queries:
        index.search(q[None, :], RECALL_K, params=params)
    return len(queries) / max(time.perf_counter() - start, 1e-9)


def _batch_qps(index, queries: np.ndarray, knobs: dict) -> float:
    start = time.perf_counter()
    index.search(queries, RECALL_K, params=search_params(index, knobs))
    return len(queries) / max(time.perf_counter() - start, 1e-9)


def _ensure_id_index(coll: Collection) -> None:
    """A BTREE on `id` turns the per-result row lookups into index probes instead of scans."""
    try:
        coll.table.create_scalar_index("id", replace=True)
    except Exception as exc:  # noqa: BLE001 - an optimisation only
        log.debug("no scalar index on id: %s", exc)
