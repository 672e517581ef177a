"""The one exact cosine search: blocked matrix products, so memory stays bounded whatever the sizes.

`blocks` yields the products block by block (dedup thresholds them into pairs); `TopK` keeps the best k
per query across blocks of candidates; `top_k` ranks an in-memory base (k-NN, FAISS tuning's ground
truth) and `exact_search` streams a collection's vectors from Lance (search, Lance tuning's ground truth).

>>> sims, idx = top_k(queries, base, k=10)     # (m, 10) each, best first       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..store import Collection
from ..threads import few_threads

BLOCK_ROWS, BLOCK_COLS = 2048, 16384  # one block of a product: 128 MB of float32 similarities
SCAN_ROWS = 65536  # vectors read from Lance at once
# A collection with at most this many bytes of vectors keeps them in memory between unfiltered searches:
# reading 20k x 384 from Lance costs ~30 ms a query, the product itself ~1 ms.
RESIDENT_BYTES = 256 << 20

_RESIDENT: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}  # collection -> (version, row ids, unit vectors)


def normalized(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), as contiguous float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _spans(n: int, rows: np.ndarray | None, size: int) -> Iterator[slice | np.ndarray]:
    """Consecutive pieces of range(n) (slices: views, no copy) or of `rows` (positions)."""
    if rows is None:
        return (slice(s, min(s + size, n)) for s in range(0, n, size))
    return (rows[s : s + size] for s in range(0, len(rows), size))


def _positions(part: slice | np.ndarray) -> np.ndarray:
    return np.arange(part.start, part.stop) if isinstance(part, slice) else part


def blocks(queries: np.ndarray, base: np.ndarray, *, query_rows: np.ndarray | None = None,
           base_rows: np.ndarray | None = None, rows: int = BLOCK_ROWS, cols: int = BLOCK_COLS,
           ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every block of the product queries[query_rows] @ base[base_rows].T, as (query positions, base
    positions, similarities (len(q), len(b))). Base blocks are the outer loop: each is gathered once
    and met by every query block. Rows are expected unit length (the product is then the cosine)."""
    for b in _spans(len(base), base_rows, cols):
        xb, b_pos = base[b], _positions(b)
        for q in _spans(len(queries), query_rows, rows):
            yield _positions(q), b_pos, queries[q] @ xb.T


class TopK:
    """The best k candidates per query, kept while blocks of candidates stream past."""

    def __init__(self, n_queries: int, k: int, id_dtype=np.int64):
        self.k = k
        self.scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        self.ids = np.zeros((n_queries, k), dtype=id_dtype)
        self.seen = np.zeros(n_queries, dtype=np.int64)  # candidates offered per query

    def push(self, sims: np.ndarray, ids: np.ndarray, rows: np.ndarray | None = None) -> None:
        """`sims` (len(rows), b) of the candidates `ids` (b,) for the queries at `rows` (default: all)."""
        rows = slice(None) if rows is None else rows
        self.seen[rows] += sims.shape[1]
        if self.k == 0:
            return
        ids = np.broadcast_to(ids.astype(self.ids.dtype, copy=False), sims.shape)
        if sims.shape[1] > self.k:  # cut the block to its own best k first: the merge stays small
            top = np.argpartition(-sims, self.k - 1, axis=1)[:, : self.k]
            sims, ids = np.take_along_axis(sims, top, 1), np.take_along_axis(ids, top, 1)
        merged_s = np.concatenate([self.scores[rows], sims], axis=1)
        merged_i = np.concatenate([self.ids[rows], ids], axis=1)
        top = np.argpartition(-merged_s, self.k - 1, axis=1)[:, : self.k]
        self.scores[rows], self.ids[rows] = np.take_along_axis(merged_s, top, 1), np.take_along_axis(merged_i, top, 1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, min(k, candidates)), best first; equal scores in id order."""
        width = min(self.k, int(self.seen.min())) if len(self.seen) else 0
        order = np.lexsort((self.ids, -self.scores), axis=1)[:, :width]
        return np.take_along_axis(self.scores, order, 1), np.take_along_axis(self.ids, order, 1)


def _push_block(best: TopK, queries: np.ndarray, block: np.ndarray, ids: np.ndarray) -> None:
    """Offer one block of base rows (`ids` name them) to every query. FAISS's knn does the product and
    keeps each query's best k in a heap, multi-threaded: selecting from a numpy product costs 10x more."""
    import faiss

    if len(block) == 0:
        return
    sims, pos = faiss.knn(queries, np.ascontiguousarray(block, dtype=np.float32), min(best.k, len(block)),
                          metric=faiss.METRIC_INNER_PRODUCT)
    best.seen += len(block) - sims.shape[1]  # push counts the k offered; the rest of the block was seen too
    best.push(sims, ids[pos])


def top_k(queries: np.ndarray, base: np.ndarray, k: int, *, base_rows: np.ndarray | None = None,
          ) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of `base` (only `base_rows` when given) to each query by inner product
    (cosine for unit rows): (sims, positions in base), each (m, min(k, candidates)), best first."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best = TopK(len(queries), k)
    for b in _spans(len(base), base_rows, SCAN_ROWS):
        _push_block(best, queries, base[b], _positions(b))
    return best.result()


def exact_search(coll: Collection, queries: np.ndarray, k: int, where: str | None = None,
                 ) -> tuple[list[list[int]], list[list[float]], int]:
    """Cosine top-k over a collection's vectors (those matching `where`), streamed from Lance in blocks,
    or from memory for a small collection searched without a filter. `queries` are unit rows. Returns
    Lance row ids and scores per query, best first, and the version read: addresses belong to it (a
    writer's commit, a compaction above all, moves rows), so their fields are read at it too."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best = TopK(len(queries), k, np.uint64)
    version = coll.version()
    resident = None if where else _resident_vectors(coll, version)
    with few_threads(len(queries)):
        if resident is not None:
            row_ids, x = resident
            _push_block(best, queries, x, row_ids)
        else:
            for row_ids, block in _vector_blocks(coll, where, version):
                _push_block(best, queries, block, row_ids)
    scores, row_ids = best.result()
    return [list(map(int, r)) for r in row_ids], [list(s) for s in scores], version


def _vector_blocks(coll: Collection, where: str | None, version: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(Lance row ids, unit vectors) of the rows matching `where` at `version`, block by block."""
    for batch in coll.scan(["vector"], where=where, with_row_id=True, batch_size=SCAN_ROWS, version=version):
        block = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)
        yield batch.column("_rowid").to_numpy(), block if coll.spec.normalize else normalized(block)


def _resident_vectors(coll: Collection, version: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A small collection's row ids and unit vectors at `version`, read once per version; None past
    RESIDENT_BYTES."""
    key = coll.location.identity()
    hit = _RESIDENT.get(key)
    if hit is not None and hit[0] == version:
        return hit[1], hit[2]
    if coll.at_version(version).count_rows() * coll.spec.dim * 4 > RESIDENT_BYTES:
        return None
    blocks = list(_vector_blocks(coll, None, version))
    if not blocks:
        return None
    row_ids = np.concatenate([r for r, _ in blocks])
    x = np.ascontiguousarray(np.concatenate([b for _, b in blocks]), dtype=np.float32)
    _RESIDENT[key] = (version, row_ids, x)
    return row_ids, x
