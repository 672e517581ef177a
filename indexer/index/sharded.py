"""`indexer index --engine ray`: the FAISS index of a large collection, built in parallel on a Ray cluster.

The driver trains the coarse quantizer (and PQ codebooks) on a sample. Ray tasks each take a contiguous
shard of the collection's rows, read those vectors from Lance themselves (the driver never loads the
whole collection), add them to a copy of the trained index, and compute the exact top-10 of the held-out
queries within the shard. The driver merges the shards in order (FAISS merge_from), so positions are
those of a local build, merges the shard top-10s into the ground truth, and tunes nprobe / k_factor to
the target recall exactly as a local build does. The merged index lives in the driver's memory, which
`--max-memory` bounds through the same plan as a local build (ivf-pq when ivf-flat would not fit).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import IndexerError
from ..store import Collection
from .exact import TopK
from .faiss_engine import FaissIndex, ensure_id_index, split_held_out, training_positions
from .tuning import RECALL_K, choose_plan, tune

log = logging.getLogger(__name__)

SHARD_ROWS = 250_000  # rows one task encodes: small enough to retry cheaply, big enough to amortise start-up
READ_ROWS = 32_768  # rows a task reads from Lance at a time


def build_on_ray(coll: Collection, kind: str = "auto", target_recall: float = 0.95, max_memory: int | None = None,
                 seed: int = 0, address: str | None = None, shard_rows: int = SHARD_ROWS) -> FaissIndex:
    import faiss

    from ..cluster import connect

    if not 0 < target_recall <= 1:
        raise IndexerError("--target-recall must be in (0, 1]")
    if kind == "hnsw":
        raise IndexerError("--engine ray builds flat and IVF indexes (HNSW graphs cannot be merged from shards): "
                           "use --kind auto, ivf-flat, ivf-pq or opq-ivf-pq")
    started = time.perf_counter()
    ensure_id_index(coll)  # first: it makes a Lance version, and the index must reflect the last one
    ds = coll.dataset()
    if ds is None or ds.count_rows() == 0:
        raise coll.empty()
    keys = ds.to_table(columns=["id", "record_hash"], with_row_id=True).rename_columns(["id", "record_hash", "row_id"])
    n, d = keys.num_rows, coll.spec.dim
    plan = choose_plan(n, d, kind, max_memory)
    if plan.kind == "hnsw":  # auto's choice for mid-size collections: the shardable equivalent
        plan = choose_plan(n, d, "ivf-flat", max_memory)
    ray = connect(address)

    rng = np.random.default_rng(seed)
    held, base = split_held_out(n, rng)
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = np.sort(training_positions(base, plan, rng))
        log.info("training %s on %d sampled vectors", plan.factory, len(sample))
        index.train(_read_vectors(ds, sample))
    queries = _read_vectors(ds, held) if len(held) else np.zeros((0, d), np.float32)

    shards = [base[i : i + shard_rows] for i in range(0, len(base), shard_rows)]
    log.info("encoding %d vectors in %d shards on Ray", len(base), len(shards))
    trained, qref = ray.put(faiss.serialize_index(index)), ray.put(queries)
    encode = ray.remote(max_retries=3)(_encode_shard)
    refs = [encode.remote(ds.uri, ds.version, coll.location.storage_options, shard, trained, qref)
            for shard in shards]
    truth = TopK(len(held), RECALL_K)  # the held-out queries' exact neighbours, as index positions
    added = 0
    for ref, shard in zip(refs, shards):  # in order: shard j's positions follow shard j-1's
        blob, scores, positions = ray.get(ref)
        _merge_into(index, faiss.deserialize_index(blob), added)
        truth.push(scores, positions + added)
        added += len(shard)

    knobs, recall, sweep = {}, 1.0, []
    if len(held) and plan.kind != "flat":
        knobs, recall, sweep = tune(index, plan.kind, queries, truth.result()[1], target_recall)
        log.info("tuned %s: recall@%d %.3f (target %.2f)", knobs, RECALL_K, recall, target_recall)
    sample = queries if len(held) else _read_vectors(ds, np.arange(min(n, 1000)))
    return FaissIndex.finish(coll, index, plan, keys, base, held, sample,
                             {"requested_kind": kind, "built_on": "ray", "shards": len(shards), "params": knobs,
                              "target_recall": target_recall, "recall_at_10": recall, "sweep": sweep}, started)


def _read_vectors(ds, positions: np.ndarray) -> np.ndarray:
    """L2-normalised float32 vectors of the rows at these positions (scan order), read in blocks."""
    blocks = []
    for start in range(0, len(positions), READ_ROWS):
        tbl = ds.take(positions[start : start + READ_ROWS].tolist(), columns=["vector"])
        col = tbl.column("vector").combine_chunks()
        blocks.append(col.flatten().to_numpy(zero_copy_only=False).reshape(tbl.num_rows, -1))
    x = np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32) if blocks else np.zeros((0, 0), np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _encode_shard(uri: str, version: int, storage_options: dict, positions: np.ndarray, trained: bytes,
                  queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Ray task: this shard's vectors added to the trained index (serialized back), and the exact
    top-k of the held-out queries among them (scores, shard-local positions)."""
    import faiss
    import lance

    ds = lance.dataset(uri, version=version, storage_options=storage_options or None)
    index = faiss.deserialize_index(trained)
    best = TopK(len(queries), RECALL_K)
    for start in range(0, len(positions), READ_ROWS):
        x = _read_vectors(ds, positions[start : start + READ_ROWS])
        index.add(x)
        if len(queries):
            best.push(queries @ x.T, np.arange(start, start + len(x)))
    scores, found = best.result()
    return faiss.serialize_index(index), scores, found


def _merge_into(dst, src, add_id: int) -> None:
    """dst += src with src's ids shifted by add_id. FAISS merges IVF and flat codes but not their
    wrappers (a refine stage, an OPQ rotation): those are unwrapped and merged part by part."""
    import faiss

    # Downcasts are views: `dst` and `src` (which own the memory) must stay referenced while they are used.
    to, frm = faiss.downcast_index(dst), faiss.downcast_index(src)
    if isinstance(to, faiss.IndexRefine):
        _merge_into(to.base_index, frm.base_index, add_id)
        _merge_into(to.refine_index, frm.refine_index, 0)
    elif isinstance(to, faiss.IndexPreTransform):
        _merge_into(to.index, frm.index, add_id)
    elif isinstance(to, faiss.IndexFlat):
        # Ids are positions, appended in order. (merge_from refuses IndexFlat + IndexFlatIP, which is what
        # a factory-made and a deserialized flat index are.)
        to.add(frm.reconstruct_n(0, frm.ntotal))
        return
    else:
        to.merge_from(frm, add_id)
        return
    to.ntotal += frm.ntotal
