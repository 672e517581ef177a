"""Fusing rankings and grouping passages: the pure parts of text and hybrid retrieval.

Reciprocal rank fusion (Cormack et al., 2009) needs no score calibration: BM25 scores are unbounded
and cosine similarities are not, so ranks are what the two rankings share.
"""

from __future__ import annotations

from typing import Any

RRF_K = 60  # the constant from the paper: damps the weight of the very first ranks
WEIGHTS = {"vector": 1.0, "text": 1.0}  # equal say for meaning and exact terms
HYBRID_DEPTH = 50  # candidates each ranking contributes before fusion
GROUP_CHUNKS = 3  # passages kept per document with group_by_doc: the best, plus up to two more

Hit = dict[str, Any]


def reciprocal_rank_fusion(vector_hits: list[Hit], text_hits: list[Hit], rrf_k: int = RRF_K,
                           weights: dict[str, float] = WEIGHTS) -> list[Hit]:
    """One ranking from two: score = sum over rankings of weight / (rrf_k + rank), ranks from 1.

    Each fused hit keeps its stored fields plus `vector_score` (cosine) and `text_score` (BM25),
    None where that ranking did not return it.

    >>> v = [{"id": "a", "score": 0.9}, {"id": "b", "score": 0.8}]
    >>> t = [{"id": "b", "score": 7.1}]
    >>> [(h["id"], round(h["score"], 4)) for h in reciprocal_rank_fusion(v, t)]
    [('b', 0.0325), ('a', 0.0164)]
    """
    fused: dict[str, Hit] = {}
    for name, hits in (("vector", vector_hits), ("text", text_hits)):
        for rank, hit in enumerate(hits, start=1):
            entry = fused.get(hit["id"])
            if entry is None:
                entry = fused[hit["id"]] = {**hit, "score": 0.0, "vector_score": None, "text_score": None}
            entry["score"] += weights[name] / (rrf_k + rank)
            entry[f"{name}_score"] = hit["score"]
    return sorted(fused.values(), key=lambda h: -h["score"])


def document_of(hit: Hit) -> str:
    """A chunk's document id; an unchunked item is its own document."""
    return hit.get("doc_id") or hit["id"]


def group_by_document(hits: list[Hit], k: int, per_doc: int = GROUP_CHUNKS) -> list[Hit]:
    """The k best documents, each as its best passage plus `other_chunks` (its next best, up to
    per_doc - 1), in the order of their best passage."""
    groups: dict[str, Hit] = {}
    for hit in hits:
        doc = document_of(hit)
        best = groups.get(doc)
        if best is None:
            if len(groups) < k:
                groups[doc] = {**hit, "other_chunks": []}
        elif len(best["other_chunks"]) < per_doc - 1:
            best["other_chunks"].append(hit)
    return list(groups.values())
