"""Derived indexes over a collection, rebuildable from the store: FAISS (faiss_engine) and Lance's own
(lance_engine) ANN indexes tuned to a recall target, the full-text BM25 index (fulltext), and the exact
top-k they are measured against (exact); kept in step with the store after every write."""

from __future__ import annotations

import logging
import os

from ..errors import IndexerError
from ..store import Collection
from .faiss_engine import FaissIndex
from .fulltext import fts_search, update_fts_index
from .lance_engine import RETRAIN_GROWTH, build_lance_index, lance_meta, lance_search
from .tuning import KINDS, parse_size

log = logging.getLogger(__name__)

__all__ = ["AUTO_INDEX_ROWS", "KINDS", "FaissIndex", "build_index", "current_index", "fts_search", "lance_meta",
           "lance_search", "parse_size", "update_after_ingest"]

# Past this many rows an exact scan costs tens of ms per query (384-d, a few cores): ingest builds an
# index automatically from here on. Below it, exact search is both exact and fast.
AUTO_INDEX_ROWS = 100_000


def build_index(collection: Collection | str | os.PathLike, *, kind: str = "auto", target_recall: float = 0.95,
                max_memory: str | int | None = None, engine: str = "faiss", address: str | None = None) -> dict:
    """Build (or rebuild) the collection's ANN index and return what index.json records.

    engine: `faiss` (this process), `lance` (LanceDB's own index) or `ray` (the FAISS index encoded in
    parallel shards on the Ray cluster at `address` and merged: index/sharded.py).

    >>> build_index("photos.idx", target_recall=0.95)["recall_at_10"]     # doctest: +SKIP
    0.962
    """
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    if engine not in ("faiss", "lance", "ray"):
        raise IndexerError(f"--engine {engine}: choose faiss, lance or ray")
    budget = parse_size(max_memory) if isinstance(max_memory, str) else max_memory
    with coll.write_lock("index"):
        if engine == "lance":
            return {k: v for k, v in build_lance_index(coll, kind=kind, target_recall=target_recall).items()
                    if k != "sweep"}
        if engine == "ray":
            from .sharded import build_on_ray

            index = build_on_ray(coll, kind=kind, target_recall=target_recall, max_memory=budget, address=address)
        else:
            index = FaissIndex.build(coll, kind=kind, target_recall=target_recall, max_memory=budget)
    return index.info()


def current_index(coll: Collection, locked: bool = False) -> FaissIndex | None:
    """The collection's index, brought up to date with the store first; None if there is none.

    Never silently stale: a store that moved on since the index was saved is caught up (rows added,
    replaced rows and deleted rows tombstoned) or, when that stops being sound, the index is rebuilt.
    """
    index = _open_cached(coll)
    if index is None or index.is_current(coll):
        return index
    if locked:
        return _catch_up(coll)
    # Not waiting: a search met during a write answers exactly rather than waiting for the writer.
    with coll.write_lock("index catch-up", wait=False):
        return _catch_up(coll)


_OPEN: dict[str, tuple[tuple, FaissIndex]] = {}


def _open_cached(coll: Collection) -> FaissIndex | None:
    """Opening reads (or maps) the index and its row map: keep the last one per collection in this
    process, keyed by index.json's identity, so repeated searches by path cost no reload."""
    if coll.location.remote:
        data = coll.location.read_bytes("index/index.json")  # one small GET: did a writer publish a new index?
        if data is None:
            return None
        key: tuple = (hash(data),)
    else:
        try:
            st = (coll.location.local_path / "index" / "index.json").stat()
        except FileNotFoundError:
            return None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
    hit = _OPEN.get(coll.location.identity())
    if hit is not None and hit[0] == key:
        return hit[1]
    index = FaissIndex.open(coll)
    if index is not None:
        _OPEN[coll.location.identity()] = (key, index)
    return index


def _catch_up(coll: Collection) -> FaissIndex:
    index = FaissIndex.open(coll, mmap=False)
    if index.is_current(coll):
        return index
    stats = index.catch_up(coll)
    log.info("index caught up with the collection: %d added, %d removed", stats["added"], stats["removed"])
    reason = index.needs_rebuild()
    if reason:
        log.warning("rebuilding the index: %s", reason)
        index = FaissIndex.build(coll, kind=index.meta.get("requested_kind", index.meta["kind"]),
                                 target_recall=index.meta["target_recall"])
    return index


def update_after_ingest(coll: Collection) -> None:
    """Called by ingest with the write lock held: keep an index current, or build one once the
    collection is past AUTO_INDEX_ROWS."""
    update_fts_index(coll)  # first: it makes a Lance version, and the FAISS index must reflect the last one
    lance = lance_meta(coll)
    if lance is not None:
        if coll.count() > RETRAIN_GROWTH * lance["trained_rows"]:
            log.warning("retraining the Lance index: the collection grew past %gx its trained size", RETRAIN_GROWTH)
            build_lance_index(coll, kind=lance["kind"], target_recall=lance["target_recall"])
        else:
            coll.dataset().optimize.optimize_indices()  # fold new rows into the index
    try:
        opened = FaissIndex.open(coll)
    except IndexerError as exc:
        # Each index file is replaced atomically, not the set: a writer killed between two of them leaves
        # files that no longer match index.json. The index is derived: rebuild it as index.json describes.
        meta = FaissIndex.recorded(coll)
        log.warning("rebuilding the index: %s", exc)
        FaissIndex.build(coll, kind=meta.get("requested_kind", meta["kind"]), target_recall=meta["target_recall"])
        return
    if opened is not None:
        current_index(coll, locked=True)
    elif lance is None and coll.count() >= AUTO_INDEX_ROWS:
        log.info("%d rows: building an ANN index (exact search stops being cheap past %d)",
                 coll.count(), AUTO_INDEX_ROWS)
        FaissIndex.build(coll)
