"""`indexer dedup --engine ray`: the list joins (the bulk of the work) spread over a Ray cluster.

Lists (k-means partitions, or the row blocks of an exact search) are independent: each is joined with
its bases by the same `join_lists` as a local run, in Ray tasks that each take a group of lists with
about the same number of vector products. The vectors go to the cluster's object store once; the pairs
come back as arrays. The partition, its spread tuning and the groups stay on the driver, so the pairs,
and the groups, are those of the local run on the same data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from .pairs import MAX_PAIRS, Join, join_lists, too_many_pairs, unique_pairs

log = logging.getLogger(__name__)

TASKS_PER_CPU = 4  # several groups per core: a slow or retried task does not hold up the others


def ray_join(address: str | None = None) -> Join:
    """A `Join` that runs on the Ray cluster at `address` (default: RAY_ADDRESS, else a local one)."""
    from ...cluster import connect

    ray = connect(address)
    task = ray.remote(max_retries=3)(join_lists)
    groups_wanted = max(1, int(ray.cluster_resources().get("CPU", 1)) * TASKS_PER_CPU)

    def join(xq: np.ndarray, q_members: Iterable[np.ndarray], xb: np.ndarray, b_members: Iterable[np.ndarray],
             threshold: float, same: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qm, bm = list(q_members), list(b_members)
        xq_ref = ray.put(xq)
        xb_ref = xq_ref if xb is xq else ray.put(xb)
        refs = [task.remote(xq_ref, qm[a:b], xb_ref, bm[a:b], threshold, same)
                for a, b in _balanced(qm, bm, groups_wanted)]
        log.info("joining %d lists in %d Ray tasks", len(qm), len(refs))
        parts = ray.get(refs)
        found = sum(len(p[0]) for p in parts)
        if found > MAX_PAIRS:
            raise too_many_pairs(threshold, found)
        return unique_pairs([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])

    return join


def _balanced(q_members: list[np.ndarray], b_members: list[np.ndarray], groups: int) -> list[tuple[int, int]]:
    """Consecutive ranges of lists with about equal work (queries x bases) each."""
    work = np.cumsum([len(q) * len(b) for q, b in zip(q_members, b_members)], dtype=np.float64)
    if not len(work) or work[-1] == 0:
        return [(0, len(q_members))] if q_members else []
    cuts = np.searchsorted(work, work[-1] * np.arange(1, groups) / groups, side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [len(work)]]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
