"""A FAISS index over a collection's vectors, tuned to a measured recall target.

Vectors are added in order, so a vector's FAISS id is its position; `rows.parquet` maps positions to
collection ids, record hashes and Lance row addresses (`row_id`, as of the Lance version the index
reflects: every catch-up refreshes them, since compaction and updates move rows), so a hit's fields are
one direct read by address. Updated and deleted rows become tombstones (a `live` flag) that
search skips through an IDSelector; the index is compacted by a rebuild once tombstones pile up.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import IndexerError
from ..files import verify, write_atomic, write_json_atomic
from ..store import Collection
from ..store.location import Location
from ..store.manifest import now_iso
from ..threads import few_threads
from .addresses import AddressMap
from .exact import normalized
from .resident import ResidentFields
from .tuning import (
    FALLBACK,
    RECALL_K,
    Plan,
    batch_qps,
    choose_plan,
    ground_truth,
    search_params,
    single_query_qps,
    tune,
)

log = logging.getLogger(__name__)

INDEX_DIR, META, INDEX_FILE, ROWS_FILE = "index", "index.json", "faiss.index", "rows.parquet"
ROW_ID = "row_id"
RETRAIN_GROWTH = 4.0  # retrain IVF/PQ once the collection is this many times the trained size
MAX_TOMBSTONES = 0.2
KEPT_MASKS = 8  # filters whose matching positions are kept (1 MB each per million rows)




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
        # None for an index saved before addresses were kept: hits are then looked up by id until a catch-up.
        self.row_ids = (np.array(rows.column(ROW_ID).to_numpy(), dtype=np.uint64)  # a copy: catch-up writes it
                        if ROW_ID in rows.column_names else None)
        self._addresses: tuple[np.ndarray, AddressMap] | None = None  # live positions, their addresses' map
        self._resident: ResidentFields | None = None
        self._masks: dict[tuple[str, int], np.ndarray] = {}  # mask_for's: (where, version) -> mask, oldest first

    # -- building ---------------------------------------------------------------------------------------

    @classmethod
    def build(cls, coll: Collection, kind: str = "auto", target_recall: float = 0.95,
              max_memory: int | None = None, seed: int = 0) -> FaissIndex:

        if not 0 < target_recall <= 1:
            raise IndexerError("--target-recall must be in (0, 1]")
        started = time.perf_counter()
        ensure_id_index(coll)  # first: it makes a Lance version, and the index must reflect the last one
        keys, x = _load_vectors(coll)
        n, d = x.shape
        if n == 0:
            raise coll.empty()
        plan = choose_plan(n, d, kind, max_memory)
        rng = np.random.default_rng(seed)
        held, base = split_held_out(n, rng)
        truth = ground_truth(x, base, held) if len(held) and plan.kind != "flat" else None
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
        sample = x[held] if len(held) else x[:1000]
        return cls.finish(coll, index, plan, keys, base, held, sample,
                          {"requested_kind": kind, "params": knobs, "target_recall": target_recall,
                           "recall_at_10": recall, "sweep": sweep}, started)

    @classmethod
    def finish(cls, coll: Collection, index, plan: Plan, keys: pa.Table, base: np.ndarray, held: np.ndarray,
               sample: np.ndarray, tuned: dict[str, Any], started: float) -> FaissIndex:
        """A built and tuned index: the held-out queries (`sample` when there are any) added last, positions
        mapped to rows (`keys`: id, record_hash, row_id in scan order), query speed measured, index.json
        recorded, files saved. Local and Ray builds end here."""
        if tuned["recall_at_10"] < tuned["target_recall"]:
            log.warning("no setting reached recall %.2f; using the most accurate (%.3f)", tuned["target_recall"],
                        tuned["recall_at_10"])
        n = len(base) + len(held)
        if len(held):
            index.add(sample)
        position_order = pa.array(np.concatenate([base, held]))
        rows = keys.select(["id", "record_hash", ROW_ID]).take(position_order).append_column(
            "live", pa.array(np.ones(n, dtype=bool)))
        knobs = tuned["params"]
        meta = {
            "engine": "faiss", "kind": plan.kind, "factory": plan.factory, "metric": "cosine", **tuned,
            "recall_queries": len(held), "qps_single": single_query_qps(index, sample[:200], knobs),
            "qps_batch": batch_qps(index, sample, knobs), "build_seconds": round(time.perf_counter() - started, 3),
            "trained_rows": n, "rows": n, "dim": index.d, "lance_version": coll.version(), "built": now_iso(),
        }
        built = cls(coll.location, index, rows, meta)
        built.save()
        return built

    # -- files ------------------------------------------------------------------------------------------

    def save(self) -> None:
        import faiss

        self.directory.mkdir(parents=True, exist_ok=True)
        rows = pa.table({"id": self.ids, "record_hash": self.hashes, "live": pa.array(self.live),
                         **({ROW_ID: pa.array(self.row_ids)} if self.row_ids is not None else {})})
        self.meta["files"] = {
            INDEX_FILE: write_atomic(self.directory / INDEX_FILE, lambda p: faiss.write_index(self.index, p)),
            ROWS_FILE: write_atomic(self.directory / ROWS_FILE, lambda p: pq.write_table(rows, p)),
        }
        self.meta["memory_bytes"] = self.meta["files"][INDEX_FILE]["size"]
        self.meta["rows"] = int(self.live.sum())
        write_json_atomic(self.directory / META, self.meta)
        self.location.push(INDEX_DIR, [INDEX_FILE, ROWS_FILE, META])

    @staticmethod
    def recorded(coll: Collection) -> dict[str, Any] | None:
        """What index.json records (kind, parameters, file fingerprints), without opening the files;
        None when there is no index."""
        data = coll.location.read_bytes(f"{INDEX_DIR}/{META}")
        if data is None:
            return None
        try:
            meta = json.loads(data)
            meta["files"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise IndexerError(f"{coll.path}/{INDEX_DIR}/{META} is damaged; rebuild with "
                               f"`indexer index {coll.path}`") from exc
        return meta

    @classmethod
    def open(cls, coll: Collection, mmap: bool = True) -> FaissIndex | None:
        import faiss

        meta = cls.recorded(coll)
        if meta is None:
            return None
        files = meta["files"]
        directory = coll.location.local_dir(INDEX_DIR)
        hint = f"indexer index {coll.path}"
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
        """Add new rows, tombstone updated and deleted ones, refresh every live row's address; rebuild when
        that is no longer sound."""
        keys, version = coll.keys()
        position = {i: p for p, (i, alive) in enumerate(zip(self.ids.to_pylist(), self.live)) if alive}
        hashes = self.hashes.to_pylist()
        row_ids = self.row_ids if self.row_ids is not None else np.zeros(len(self.live), dtype=np.uint64)
        new = []  # positions in `keys` of rows to add
        for k, (rid, h, address) in enumerate(zip(keys.column("id").to_pylist(), keys.column("record_hash").to_pylist(),
                                                  keys.column(ROW_ID).to_numpy())):
            p = position.pop(rid, None)
            if p is not None and hashes[p] == h:
                row_ids[p] = address
                continue
            if p is not None:
                self.live[p] = False
            new.append(k)
        for p in position.values():
            self.live[p] = False
        stats = {"added": len(new), "removed": len(position), "version": version}
        if new:
            added = keys.take(pa.array(new, pa.int64()))
            stored = coll.take_rows(added.column(ROW_ID).to_numpy(), ["vector"], version)
            x = normalized(stored.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                           .reshape(len(new), -1))
            self.index.add(x)
            self.ids = pa.concat_arrays([_chunk(self.ids), _chunk(added.column("id"))])
            self.hashes = pa.concat_arrays([_chunk(self.hashes), _chunk(added.column("record_hash"))])
            self.live = np.concatenate([self.live, np.ones(len(new), dtype=bool)])
            row_ids = np.concatenate([row_ids, added.column(ROW_ID).to_numpy()])
        self.row_ids = row_ids
        self._addresses = self._resident = None  # both describe the version before
        self._masks = {}
        self.meta["lance_version"] = version
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
        with few_threads(len(queries)):
            scores, positions = self.index.search(queries, k, params=params)
        return positions, scores

    def ids_at(self, positions: np.ndarray) -> list[str]:
        return self.ids.take(pa.array(positions.ravel())).to_pylist()

    def rows_at(self, coll: Collection, positions: np.ndarray, columns: list[str]) -> dict[str, dict[str, Any]]:
        """id -> the stored `columns` of the rows at these positions: one read by row address, at the Lance
        version the index reflects. A row read back under another id than the index's (an address gone
        stale) is never returned as that id: it is looked up by id instead, as is every row of an index
        saved before addresses were kept."""
        positions = np.unique(positions)
        ids = self.ids_at(positions)
        if self.row_ids is None:
            return coll.rows_by_id(ids, columns)
        columns = ["id", *(c for c in columns if c != "id")]
        if self._resident is None:
            self._resident = ResidentFields(self.meta["lance_version"], self.row_ids, self.live)
        table = self._resident.take(coll, positions, columns)
        if table is None:
            table = coll.take_rows(self.row_ids[positions], columns, self.meta["lance_version"])
        rows = table.to_pylist()
        found = {r["id"]: r for r, expected in zip(rows, ids) if r["id"] == expected}
        stale = [i for i in ids if i not in found]
        if stale:
            log.warning("%d index entries point at moved rows: reading them by id", len(stale))
            found.update(coll.rows_by_id(stale, columns))
        return found

    def wait_for_resident_fields(self) -> None:
        """Until hit fields being read into memory are there (benchmarks and tests: searches never wait)."""
        if self._resident is not None:
            self._resident.wait()

    def mask_for(self, coll: Collection, where: str) -> np.ndarray:
        """Which positions hold rows matching `where` (the filter evaluated at the version the index
        reflects). The last few filters' masks are kept: applications repeat theirs (a tenant, a type)."""
        key = (where, self.meta["lance_version"])
        mask = self._masks.pop(key, None)
        if mask is None:
            mask = self._match(coll, where)
        self._masks[key] = mask  # newest last
        while len(self._masks) > KEPT_MASKS:
            self._masks.pop(next(iter(self._masks)))
        return mask

    def _match(self, coll: Collection, where: str) -> np.ndarray:
        if self.row_ids is None:  # an index saved before addresses were kept: match ids
            import pyarrow.compute as pc

            ids = [b.column("id") for b in coll.scan(["id"], where, version=self.meta["lance_version"])]
            ids = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
            return np.asarray(pc.is_in(self.ids, value_set=ids).to_numpy(zero_copy_only=False), dtype=bool)
        if self._addresses is None:
            live = np.flatnonzero(self.live)
            self._addresses = (live, AddressMap(self.row_ids[live]))
        live, addresses = self._addresses
        found = addresses.positions(coll.matching_row_ids(where, self.meta["lance_version"]))
        mask = np.zeros(len(self.live), dtype=bool)
        mask[live[found[found >= 0]]] = True
        return mask

    def info(self) -> dict[str, Any]:
        return {k: v for k, v in self.meta.items() if k not in ("sweep", "files")}


def split_held_out(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, base) positions: queries taken from the collection, left out of the index while tuning
    and added after (none below 200 rows)."""
    n_queries = min(1000, n // 10) if n >= 200 else 0
    order = rng.permutation(n)
    return np.sort(order[:n_queries]), np.sort(order[n_queries:])


def training_positions(base: np.ndarray, plan: Plan, rng: np.random.Generator) -> np.ndarray:
    """The base rows the quantizer (and PQ codebooks) train on: ~64 per list, at least 50,000."""
    return base[rng.permutation(len(base))[: max(64 * (plan.nlist or 1), 50_000)]]


def _build_tuned(plan: Plan, x: np.ndarray, base: np.ndarray, held: np.ndarray, truth: np.ndarray | None,
                 target_recall: float, rng) -> tuple[Any, dict, float, list]:
    """Train and fill one index with the base rows and tune its knobs on the held-out queries."""
    import faiss

    log.info("building %s index (%s) over %d vectors of dim %d", plan.kind, plan.factory, len(x), x.shape[1])
    index = faiss.index_factory(x.shape[1], plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = 80
    if not index.is_trained:
        train = x[training_positions(base, plan, rng)]
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


def _load_vectors(coll: Collection) -> tuple[pa.Table, np.ndarray]:
    """(keys: id, record_hash, row_id in scan order; their unit vectors)."""
    keys, blocks = [], []
    for batch in coll.scan(["id", "record_hash", "vector"], batch_size=65536, with_row_id=True):
        keys.append(pa.table({"id": batch.column("id"), "record_hash": batch.column("record_hash"),
                              ROW_ID: batch.column("_rowid")}))
        blocks.append(batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1))
    if not blocks:
        return coll.keys()[0], np.zeros((0, coll.spec.dim), np.float32)
    x = np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # in place: x can be GBs
    return pa.concat_tables(keys), x


def ensure_id_index(coll: Collection) -> None:
    """A BTREE on `id` turns the per-result row lookups into index probes instead of scans."""
    try:
        coll.table.create_scalar_index("id", replace=True)
    except Exception as exc:  # noqa: BLE001 - an optimisation only
        log.debug("no scalar index on id: %s", exc)
