"""Finding every pair of vectors with cosine >= a threshold, without ever forming an n x n matrix.

Exact copies are searched once: one representative per content hash takes part in the search and its
copies are linked to it afterwards (k copies: k - 1 links, not k(k-1)/2 pairs).
- `exact`: every query against every vector in blocked matrix products (exact, for small collections);
- `knn`: k-means lists of ~500 vectors (an IVF partition built for the job); each vector joins its
  `spread` nearest lists and each list is self-joined exactly with matrix products (BLAS speed, memory
  bounded by the block size). `spread` is tuned until the pair recall measured on sampled queries'
  exact neighbours reaches `target_recall`;
- `semdedup`: the same with one list per vector (SemDeDup's scheme): fastest, misses pairs split
  across lists;
- `auto`: exact up to EXACT_BELOW items, knn up to SEMDEDUP_ABOVE, semdedup past that. With `--against`,
  exact while queries x reference stays within the products of an exact search over EXACT_BELOW items.
Every method keeps the pairs with score >= threshold (the same comparison everywhere). A threshold so low
that more than MAX_PAIRS pairs would come back is refused with advice (estimated from the tuning sample,
or counted while searching) rather than filling the machine's memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import numpy as np

from ...errors import IndexerError
from ...index.exact import blocks
from .records import Pairs, Vectors

log = logging.getLogger(__name__)

Method = Literal["auto", "exact", "knn", "semdedup"]
METHODS = ("auto", "exact", "knn", "semdedup")

EXACT_BELOW = 50_000  # an exact search over this many vectors takes seconds
# --against, method auto: exact while queries x reference <= the vector products of an exact search over
# EXACT_BELOW items (one new item against millions stays exact; a big test set against a big train set
# goes through the lists join).
EXACT_PRODUCTS = EXACT_BELOW * EXACT_BELOW // 2
SEMDEDUP_ABOVE = 5_000_000  # past this, a spread of m costs ~m^2 the work of semdedup: hours on a few cores
TARGET_PAIR_RECALL = 0.995
MAX_SPREAD = 16  # lists a vector may join as a base (knn)
TUNING_QUERIES = 20_000
THIN_EVIDENCE = 200  # fewer sampled pairs than this: measure lower, keep a wider margin
JOIN_ROWS, JOIN_COLS = 2048, 16384  # block of one matrix product: 128 MB of float32 similarities
# More pairs than this (~21 bytes each as arrays, far more as output) means the threshold is too low for
# dedup: refused with advice instead of exhausting memory.
MAX_PAIRS = 50_000_000


def too_many_pairs(threshold: float, count: float) -> IndexerError:
    return IndexerError(
        f"cosine >= {threshold:.4g} pairs about {count:,.0f} items or more (the limit is {MAX_PAIRS:,}): "
        "this threshold is too low to mean 'duplicate'. Raise --threshold (an --out report.html of a "
        "higher threshold shows the nearest-neighbour similarities) or run --calibrate.")


def join_lists(xq: np.ndarray, q_members: Iterable[np.ndarray], xb: np.ndarray, b_members: Iterable[np.ndarray],
               threshold: float, same: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact pairs >= threshold inside each list, queries against bases: matrix products in blocks of
    JOIN_ROWS x JOIN_COLS (index/exact.blocks), so memory stays bounded whatever the list sizes, never
    n x n. With `same`, pairs come back once each as (smaller, larger) position. Lists are independent:
    `--engine ray` runs groups of them on a cluster with this same function (dedup/distributed.py).
    Past MAX_PAIRS found: IndexerError."""
    parts_i, parts_j, parts_s = [], [], []
    found = 0
    for qm, bm in zip(q_members, b_members):
        if len(qm) == 0 or len(bm) == 0:
            continue
        for rows, cols, sims in blocks(xq, xb, query_rows=qm, base_rows=bm, rows=JOIN_ROWS, cols=JOIN_COLS):
            qi, qj = np.nonzero(sims >= threshold)
            a, b, sc = rows[qi], cols[qj], sims[qi, qj]
            if same:
                a, b = np.minimum(a, b), np.maximum(a, b)
                keep = a != b
                a, b, sc = a[keep], b[keep], sc[keep]
            parts_i.append(a)
            parts_j.append(b)
            parts_s.append(sc)
            found += len(a)
            if found > (2 if same else 1) * MAX_PAIRS:  # `same` finds most pairs from both ends
                raise too_many_pairs(threshold, found // (2 if same else 1))
    return unique_pairs(parts_i, parts_j, parts_s)


def unique_pairs(parts_i: list[np.ndarray], parts_j: list[np.ndarray], parts_s: list[np.ndarray],
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not parts_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return _unique(np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s))


# How the list joins run: join_lists here, or spread over a Ray cluster (dedup/distributed.py).
Join = Callable[[np.ndarray, Iterable[np.ndarray], np.ndarray, Iterable[np.ndarray], float, bool],
                tuple[np.ndarray, np.ndarray, np.ndarray]]


def find_pairs(vecs: Vectors, threshold: float, method: Method = "auto", target_recall: float = TARGET_PAIR_RECALL,
               seed: int = 0, join: Join = join_lists) -> tuple[Pairs, str, dict[str, Any]]:
    """All pairs of one collection with cosine >= threshold, plus identical content. Returns the pairs,
    the method used and what it measured. One representative per content hash is searched; its copies
    are linked to it (the groups come out the same, the pairs stay linear in the copies)."""
    reps, ci, cj = _representatives(vecs.hashes)
    x = vecs.x if len(reps) == len(vecs.x) else vecs.x[reps]
    n = len(x)
    if method == "auto":
        method = "exact" if n <= EXACT_BELOW else "knn" if n <= SEMDEDUP_ABOVE else "semdedup"
    stats: dict[str, Any] = {"searched": n}
    t0 = time.perf_counter()
    if method == "exact" or n < 2:
        i, j, s = range_pairs_exact(x, threshold, join=join)
    else:  # knn: spread tuned to the recall target; semdedup: one list each
        i, j, s, tuned = range_pairs_partitioned(x, threshold, target_recall=target_recall, seed=seed,
                                                 spread=1 if method == "semdedup" else None, join=join)
        stats.update(tuned)
    stats["search_seconds"] = round(time.perf_counter() - t0, 3)
    if n < len(vecs.x):  # back to positions in the collection (reps ascend: i < j still holds)
        i, j = reps[i], reps[j]
    return _merge(vecs.x, vecs.x, (i, j, s), (ci, cj)), method, stats


def find_pairs_against(vecs: Vectors, ref: Vectors, threshold: float, method: Method = "auto",
                       target_recall: float = TARGET_PAIR_RECALL, seed: int = 0,
                       join: Join = join_lists) -> tuple[Pairs, str, dict[str, Any]]:
    """Pairs (i in vecs, j in ref) with cosine >= threshold or identical content."""
    if method == "semdedup":
        raise IndexerError("--against compares two collections; use --method exact or knn")
    if method == "auto":
        method = "exact" if len(vecs.x) * len(ref.x) <= EXACT_PRODUCTS else "knn"
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    if method == "exact":
        i, j, s = range_pairs_exact(ref.x, threshold, queries=vecs.x, join=join)
    else:
        i, j, s, stats = range_pairs_partitioned(ref.x, threshold, queries=vecs.x, target_recall=target_recall,
                                                 seed=seed, join=join)
    stats["search_seconds"] = round(time.perf_counter() - t0, 3)
    where: dict[str, list[int]] = {}
    for p, h in enumerate(ref.hashes):
        where.setdefault(h, []).append(p)
    hp = [(a, b) for a, h in enumerate(vecs.hashes) for b in where.get(h, ())]
    hi, hj = (np.array([p[0] for p in hp], dtype=np.int64), np.array([p[1] for p in hp], dtype=np.int64))
    return _merge(vecs.x, ref.x, (i, j, s), (hi, hj)), method, stats


def range_pairs_exact(base: np.ndarray, threshold: float, queries: np.ndarray | None = None,
                      join: Join = join_lists) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact: every query against every base vector, in blocked matrix products (the lists join with one
    list holding everything), so the base is never copied into an index and memory stays bounded. Within
    one collection each block of rows meets only the rows from its own start on: half the products."""
    if queries is not None:
        return join(queries, [np.arange(len(queries))], base, [np.arange(len(base))], threshold, False)
    n = len(base)
    starts = range(0, n, JOIN_ROWS)
    return join(base, (np.arange(s, min(s + JOIN_ROWS, n)) for s in starts), base, (np.arange(s, n) for s in starts),
                 threshold, True)


def _unique(i: np.ndarray, j: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(i) == 0:
        return i, j, s
    key = i * (int(j.max()) + 1) + j
    _, first = np.unique(key, return_index=True)
    return i[first], j[first], s[first]


def _nlist(n: int, per_list: int = 500) -> int:
    # Small lists and a wider spread find a given share of the pairs with less work than big lists and a
    # narrow spread (measured on clustered 384-d data: 500 x 6 beat 1000 x 5 and 2000 x 4).
    return int(max(1, min(16384, n // per_list)))


def _train_partitions(base: np.ndarray, nlist: int, seed: int):
    """Spherical k-means centroids (FAISS) in a flat inner-product index."""
    import faiss

    rng = np.random.default_rng(seed)
    sample = base[np.sort(rng.choice(len(base), min(len(base), 40 * nlist), replace=False))]
    km = faiss.Kmeans(base.shape[1], nlist, niter=10, spherical=True, seed=seed, verbose=False)
    km.train(sample)
    return km.index


def _assign(quantizer, x: np.ndarray, m: int) -> np.ndarray:
    """Each vector's m nearest lists, (n, m), in blocks."""
    out = np.empty((len(x), m), dtype=np.int64)
    for start in range(0, len(x), 65536):
        _, out[start : start + 65536] = quantizer.search(x[start : start + 65536], m)
    return out


def _members(assign: np.ndarray, nlist: int) -> list[np.ndarray]:
    flat = assign.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(nlist + 1))
    owners = order // assign.shape[1]
    return [owners[bounds[c] : bounds[c + 1]] for c in range(nlist)]


def range_pairs_partitioned(base: np.ndarray, threshold: float, queries: np.ndarray | None = None,
                            target_recall: float = TARGET_PAIR_RECALL, seed: int = 0, spread: int | None = None,
                            join: Join = join_lists) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """All pairs >= threshold through k-means lists (an IVF partition of ~500 vectors per list). Each
    vector is a query in its nearest list and a base in its `spread` nearest lists; each list joins its
    queries with its bases exactly, in one matrix product. A pair is found when either one's nearest list
    is among the other's `spread` nearest. `spread` (None: tuned) is the smallest whose pair recall,
    measured on sampled queries' exact neighbours, reaches target_recall; 1 is SemDeDup's scheme."""
    nlist = _nlist(len(base))
    t0 = time.perf_counter()
    quantizer = _train_partitions(base, nlist, seed)
    train_s = time.perf_counter() - t0
    same = queries is None
    qx = base if same else queries
    t0 = time.perf_counter()
    width = min(nlist, MAX_SPREAD) if spread is None else spread
    b_assign = _assign(quantizer, base, width)
    q_assign = b_assign if same else _assign(quantizer, qx, width)
    assign_s = time.perf_counter() - t0
    tuned: dict[str, Any] = {"spread": spread}
    if spread is None:
        tuned = _tune_spread(base, qx, q_assign, b_assign, threshold, target_recall, seed, same)
        if tuned["estimated_pairs"] is not None and tuned["estimated_pairs"] > MAX_PAIRS:
            raise too_many_pairs(threshold, tuned["estimated_pairs"])
    m = tuned["spread"]
    t0 = time.perf_counter()
    i, j, s = join(qx, _members(q_assign[:, :1], nlist), base, _members(b_assign[:, :m], nlist), threshold, same)
    if not same and m > 1:  # the other direction: a base's nearest list among a query's `spread` nearest
        j2, i2, s2 = join(base, _members(b_assign[:, :1], nlist), qx, _members(q_assign[:, :m], nlist), threshold,
                           False)
        i, j, s = _unique(np.concatenate([i, i2]), np.concatenate([j, j2]), np.concatenate([s, s2]))
    sizes = np.bincount(b_assign[:, :m].ravel(), minlength=nlist)
    return i, j, s, {"lists": nlist, **tuned, "largest_list": int(sizes.max()), "train_seconds": round(train_s, 3),
                     "assign_seconds": round(assign_s, 3), "join_seconds": round(time.perf_counter() - t0, 3)}


def _tune_spread(base: np.ndarray, queries: np.ndarray, q_assign: np.ndarray, b_assign: np.ndarray,
                 threshold: float, target: float, seed: int, same: bool) -> dict[str, Any]:
    """Up to TUNING_QUERIES sampled queries, each joined with the vectors whose nearest list is among its
    widest spread (the reference pairs: cheap, so the sample can be large enough to hold hundreds of pairs
    even when duplicates are rare). A reference pair is found at spread m when one vector's nearest list is
    among the other's m nearest. With fewer than THIN_EVIDENCE pairs at the threshold, measure a little
    lower (0.05: more pairs, a bit harder ones)."""
    nlist = int(max(b_assign.max(), q_assign.max())) + 1
    rng = np.random.default_rng(seed + 1)
    sample = np.sort(rng.choice(len(queries), min(len(queries), TUNING_QUERIES), replace=False))
    low = threshold - 0.05
    i, j, s = join_lists(np.ascontiguousarray(queries[sample]), _members(q_assign[sample], nlist), base,
                    _members(b_assign[:, :1], nlist), low, same=False)
    if same:
        keep = sample[i] != j
        i, j, s = i[keep], j[keep], s[keep]
    t = threshold if (s >= threshold).sum() >= THIN_EVIDENCE else low
    i, j = i[s >= t], j[s >= t]
    # Pairs in the whole search, from the sample's share (a pair within one collection has two ends).
    at_t = int((s >= threshold).sum())
    estimate = at_t * len(queries) / len(sample) / (2 if same else 1)
    result: dict[str, Any] = {"spread": b_assign.shape[1], "tuned_at": round(t, 4), "tuning_pairs": int(len(i)),
                              "estimated_recall": None, "estimated_pairs": int(estimate)}
    if not len(i):
        return result
    qa, ba = q_assign[sample[i]], b_assign[j]
    for m in range(1, b_assign.shape[1] + 1):
        hit = (qa[:, :1] == ba[:, :m]).any(axis=1) | (ba[:, :1] == qa[:, :m]).any(axis=1)
        result.update(spread=m, estimated_recall=round(float(hit.mean()), 4))
        if hit.mean() >= target:
            break
    # A margin for sampling error: one list more than measured (on 1M clustered vectors the measured
    # spread found 98.7% of the exact pairs against 99.8% estimated), two when the sample held few pairs.
    margin = 1 if len(i) >= THIN_EVIDENCE else 2
    result["spread"] = min(result["spread"] + margin, b_assign.shape[1])
    log.info("partitioned range search: each vector a base in %d of its %d nearest lists, pair recall %.3f "
             "(relative to all %d) on %d sampled pairs at %.3f", result["spread"], b_assign.shape[1],
             result["estimated_recall"], b_assign.shape[1], len(i), t)
    return result


def _representatives(hashes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first position of each content hash (ascending), and each later copy linked to it (first, copy)."""
    first: dict[str, int] = {}
    reps, ii, jj = [], [], []
    for p, h in enumerate(hashes):
        q = first.setdefault(h, p)
        if q == p:
            reps.append(p)
        else:
            ii.append(q)
            jj.append(p)
    return (np.array(reps, dtype=np.int64), np.array(ii, dtype=np.int64), np.array(jj, dtype=np.int64))


def _merge(xa: np.ndarray, xb: np.ndarray, near: tuple, same: tuple) -> Pairs:
    i, j, s = near
    hi, hj = same
    exact_flags = np.zeros(len(i), dtype=bool)
    if len(hi):
        hs = np.einsum("ij,ij->i", xa[hi], xb[hj])
        i, j, s = np.concatenate([hi, i]), np.concatenate([hj, j]), np.concatenate([hs, s])
        exact_flags = np.concatenate([np.ones(len(hi), dtype=bool), exact_flags])
        # _unique keeps the first occurrence: the content-hash flag wins over the same pair found by search
        key = i * (max(int(j.max()), len(xb)) + 1) + j
        _, first = np.unique(key, return_index=True)
        i, j, s, exact_flags = i[first], j[first], s[first], exact_flags[first]
    order = np.lexsort((j, i)) if len(i) else np.zeros(0, dtype=np.int64)
    return (i[order].astype(np.int64), j[order].astype(np.int64), np.asarray(s, dtype=np.float32)[order],
            exact_flags[order])
