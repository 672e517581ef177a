"""The records every part of dedup shares: a collection's vectors, pairs as arrays, and the report.

The bottom of the package: it imports nothing from the modules beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ...wording import counted


@dataclass
class Vectors:
    """A collection's rows in stored order: ids, content hashes and L2-normalised vectors."""

    ids: list[str]
    hashes: list[str]
    x: np.ndarray


# Pairs are arrays (i, j, score, exact) over positions; i < j within one collection.
Pairs = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def no_pairs() -> Pairs:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, bool)


@dataclass
class DedupReport:
    """`pairs` ({"a", "b", "score", "exact"}; a < b in stored order, a from this collection) are kept as
    arrays and turned into dicts only when asked for (`pairs`, `iter_pairs`, `to_dict`)."""

    collection: str
    method: str
    threshold: float
    threshold_source: str  # "given" or "default for <modality> embeddings"
    modality: str
    keep: str
    items: int
    groups: list[list[str]]  # the kept id first
    drop: list[str]
    dropped: list[dict[str, Any]]  # {"id", "kept", "score" (cosine to the kept item), "via", "via_score"}
    against: str | None = None
    applied: bool = False
    version_before: int | None = None
    version_after: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    pair_arrays: Pairs = field(default_factory=no_pairs, repr=False)
    pair_ids: tuple[list[str], list[str]] = field(default=([], []), repr=False)  # names of i and of j

    @property
    def pair_count(self) -> int:
        return len(self.pair_arrays[0])

    def iter_pairs(self) -> Iterator[dict[str, Any]]:
        ids_a, ids_b = self.pair_ids
        i, j, s, e = self.pair_arrays
        for a, b, sc, ex in zip(i.tolist(), j.tolist(), s.tolist(), e.tolist()):
            yield {"a": ids_a[a], "b": ids_b[b], "score": round(sc, 6), "exact": ex}

    @property
    def pairs(self) -> list[dict[str, Any]]:
        return list(self.iter_pairs())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("pair_arrays", "pair_ids"):
                continue
            if f.name == "groups":
                out["pairs"] = self.pairs
            out[f.name] = getattr(self, f.name)
        return out

    def line(self) -> str:
        what = f"against {self.against}" if self.against else f"{len(self.groups)} groups"
        done = (f"; deleted as Lance version {self.version_after} (undo with "
                f"`indexer dedup {self.collection} --restore {self.version_before}`)" if self.applied
                else "; nothing deleted (use --apply)")
        return (f"{counted(self.items, 'item')}, {counted(self.pair_count, 'pair')} >= {self.threshold:g} "
                f"({self.method}), {what}, {len(self.drop)} to drop (keep {self.keep}){done}")
