"""Pairs into groups, and the item each group keeps (the keep policy).

Groups are the connected components of the pair graph (transitive: a~b and b~c put a, b, c together).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from ...errors import IndexerError
from ...store import Collection
from .records import Pairs, Vectors

Keep = Literal["first", "oldest", "longest", "largest", "central"]
KEEPS = ("first", "oldest", "longest", "largest", "central")


def components(n: int, i: np.ndarray, j: np.ndarray) -> list[np.ndarray]:
    """Connected components with more than one member, as sorted positions, ordered by their first member."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(i):
        return []
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    members = np.flatnonzero(np.bincount(labels)[labels] > 1)  # ascending positions
    order = np.argsort(labels[members], kind="stable")
    members, labs = members[order], labels[members][order]
    groups = np.split(members, np.flatnonzero(np.diff(labs)) + 1)
    return sorted(groups, key=lambda g: int(g[0]))


def groups_within(coll: Collection, vecs: Vectors, pairs: Pairs, keep: str):
    i, j, s, _ = pairs
    groups = components(len(vecs.ids), i, j)
    kept = _choose(coll, vecs, groups, keep)
    # The strongest edge that ties each dropped item into its group ("via"): per item, its best-scored pair.
    u, v, sc = np.concatenate([i, j]), np.concatenate([j, i]), np.concatenate([s, s])
    order = np.lexsort((-sc, u))
    u, v, sc = u[order], v[order], sc[order]
    top = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
    best = dict(zip(u[top].tolist(), zip(sc[top].tolist(), v[top].tolist())))
    out_groups, drop, dropped = [], [], []
    for g, k in zip(groups, kept):
        rest = [int(m) for m in g if m != k]
        out_groups.append([vecs.ids[k]] + [vecs.ids[m] for m in rest])
        cos = vecs.x[rest] @ vecs.x[k]
        for m, c in zip(rest, cos.tolist()):
            score, via = best[m]
            drop.append(vecs.ids[m])
            dropped.append({"id": vecs.ids[m], "kept": vecs.ids[k], "score": round(c, 6),
                            "via": vecs.ids[via], "via_score": round(score, 6)})
    return out_groups, drop, dropped


def _choose(coll: Collection, vecs: Vectors, groups: list[np.ndarray], keep: str) -> list[int]:
    """The position kept in each group. Ties go to the smallest id."""
    if not groups:
        return []
    first = lambda g, score=None: min(g.tolist(), key=lambda m: (  # noqa: E731
        -score[m] if score is not None else 0, vecs.ids[m]))
    if keep == "first":
        return [first(g) for g in groups]
    if keep == "oldest":  # positions are in stored order
        return [int(g.min()) for g in groups]
    if keep == "central":
        out = []
        for g in groups:
            xg = vecs.x[g]
            summed = xg @ xg.sum(axis=0)  # sum of cosines to every member (itself included, a constant)
            out.append(first(g, dict(zip(g.tolist(), summed.tolist()))))
        return out
    sizes = _sizes(coll, [vecs.ids[m] for g in groups for m in g], keep)
    return [first(g, {m: sizes[vecs.ids[m]] for m in g.tolist()}) for g in groups]


def check_keep(coll: Collection, keep: str) -> None:
    """Refuse a keep policy the collection cannot answer, before anything is searched or deleted."""
    names = coll.result_columns()
    if keep == "longest" and "text" not in names:
        raise IndexerError(f"--keep longest compares texts; {coll.path} has none (use largest for images)")
    if keep == "largest" and "text" not in names and "path" not in names:
        raise IndexerError(f"--keep largest needs texts or image files; {coll.path} has neither "
                           "(use first, oldest or central)")


def _sizes(coll: Collection, ids: list[str], keep: str) -> dict[str, float]:
    if "text" in coll.result_columns():
        rows = coll.rows_by_id(ids, columns=["id", "text"])
        if keep == "longest":
            return {i: len(r["text"] or "") for i, r in rows.items()}
        return {i: len((r["text"] or "").encode()) for i, r in rows.items()}
    from ...sources.images import ImageDecodeError, decode_image

    out: dict[str, float] = {}
    for i, r in coll.rows_by_id(ids, columns=["id", "path"]).items():
        try:
            data = Path(r["path"]).read_bytes()
            img = decode_image(data)  # oriented, bomb-guarded: the size a viewer shows
            out[i] = img.size[0] * img.size[1] + len(data) / 1e12  # bytes break ties among equal sizes
        except (ImageDecodeError, OSError, TypeError):
            out[i] = -1.0  # gone or unreadable: never the one kept
    return out


def groups_against(vecs: Vectors, ref: Vectors, pairs: Pairs):
    """Each item of this collection with its matches in the other; all such items are dropped."""
    i, j, s, _ = pairs
    matches: dict[int, list[tuple[float, int]]] = {}
    for a, b, sc in zip(i.tolist(), j.tolist(), s.tolist()):
        matches.setdefault(a, []).append((sc, b))
    groups, drop, dropped = [], [], []
    for a in sorted(matches):
        ms = sorted(matches[a], key=lambda t: -t[0])
        groups.append([vecs.ids[a]] + [ref.ids[b] for _, b in ms])
        drop.append(vecs.ids[a])
        dropped.append({"id": vecs.ids[a], "kept": ref.ids[ms[0][1]], "score": round(ms[0][0], 6),
                        "via": ref.ids[ms[0][1]], "via_score": round(ms[0][0], 6)})
    return groups, drop, dropped
