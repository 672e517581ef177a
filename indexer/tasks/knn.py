"""k-nearest-neighbour classification on frozen features.

The default is the DINO evaluation protocol (Caron et al. 2021): L2-normalised features, cosine
similarity, the top k=20 neighbours, each neighbour voting for its class with weight exp(sim / T),
T=0.07; class probabilities are the normalised votes. `vote="majority"` gives every neighbour one vote.
Neighbours come from the collection's FAISS index when it has one (millions of reference rows), else
from an exact blocked matrix product.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import IndexerError
from ..store import Collection
from .features import (
    LabelledVectors,
    check_classes,
    embed_new_inputs,
    load_labelled,
    normalized,
    scores,
    stratified_folds,
)

log = logging.getLogger(__name__)

Vote = Literal["weighted", "majority"]
KnnEngine = Literal["auto", "exact", "faiss"]
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
DEFAULT_FOLDS = 5
_BLOCK_BYTES = 256 << 20  # similarity block held at once by the exact search


def vote_probabilities(sims: np.ndarray, neighbour_classes: np.ndarray, n_classes: int, temperature: float = DEFAULT_TEMPERATURE,
         how: Vote = "weighted") -> np.ndarray:
    """(m, k) similarities and class indices of the neighbours -> (m, n_classes) probabilities.
    Missing neighbours (class -1) carry no vote."""
    if how not in ("weighted", "majority"):
        raise IndexerError(f"--vote {how}: choose weighted or majority")
    if how == "weighted" and temperature <= 0:
        raise IndexerError("--temperature must be positive")
    valid = neighbour_classes >= 0
    weights = np.exp(sims.astype(np.float64) / temperature) if how == "weighted" else np.ones(sims.shape)
    weights = np.where(valid, weights, 0.0)
    votes = np.zeros((sims.shape[0], n_classes), dtype=np.float64)
    rows = np.repeat(np.arange(sims.shape[0]), sims.shape[1])
    np.add.at(votes, (rows, np.where(valid, neighbour_classes, 0).ravel()), weights.ravel())
    total = votes.sum(axis=1, keepdims=True)
    return votes / np.where(total > 0, total, 1.0)


def exact_topk(reference: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours by matrix product, in query blocks that bound memory: (sims, indices)."""
    import torch

    k = min(k, reference.shape[0])
    ref = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
    block = max(1, _BLOCK_BYTES // (4 * max(reference.shape[0], 1)))
    sims = np.empty((len(queries), k), dtype=np.float32)
    idx = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        q = torch.from_numpy(np.ascontiguousarray(queries[start : start + block], dtype=np.float32))
        s, i = torch.mm(q, ref.T).topk(k, dim=1, largest=True, sorted=True)
        sims[start : start + len(q)], idx[start : start + len(q)] = s.numpy(), i.numpy()
    return sims, idx


class Reference:
    """The labelled rows neighbours are drawn from, searched exactly or through a FAISS index."""

    def __init__(self, data: LabelledVectors, index=None):
        self.data = data
        self.index = index
        self.classes = check_classes(data.labels)
        self.class_of = {c: n for n, c in enumerate(self.classes)}
        self.y = np.array([self.class_of[c] for c in data.labels], dtype=np.int64)
        if index is not None:
            import pyarrow as pa
            import pyarrow.compute as pc

            # Index position -> row of `data` (-1 for rows without a label).
            row = pc.index_in(index.ids, value_set=pa.array(data.ids, pa.string()))
            self._row_at = row.to_numpy(zero_copy_only=False)
            self._row_at = np.where(np.isnan(self._row_at.astype(np.float64)), -1, self._row_at).astype(np.int64)

    @property
    def engine(self) -> str:
        return "exact" if self.index is None else f"faiss {self.index.meta.get('kind')}"

    def topk(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(sims, class indices) of the k nearest allowed rows; `exclude` masks rows of `data` out
        (the query's own fold). Class -1 marks a missing neighbour."""
        allowed = np.ones(len(self.data), bool) if exclude is None else ~exclude
        if self.index is None:
            rows = np.flatnonzero(allowed)
            sims, idx = exact_topk(self.data.vectors[rows], queries, k)
            return sims, self.y[rows[idx]]
        mask = np.isin(self._row_at, np.flatnonzero(allowed)) if exclude is not None else self._row_at >= 0
        positions, sims = self.index.search(queries, k, allowed=mask)
        rows = np.where(positions >= 0, self._row_at[np.maximum(positions, 0)], -1)
        classes = np.where(rows >= 0, self.y[np.maximum(rows, 0)], -1)
        return sims, classes

    def neighbours(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims, rows of `data`) for predictions that show which rows voted."""
        if self.index is None:
            return exact_topk(self.data.vectors, queries, k)
        positions, sims = self.index.search(queries, k, allowed=self._row_at >= 0)
        return sims, np.where(positions >= 0, self._row_at[np.maximum(positions, 0)], -1)


def _open_index(coll: Collection, engine: KnnEngine):
    if engine not in ("auto", "exact", "faiss"):
        raise IndexerError(f"--engine {engine}: choose auto, exact or faiss")
    if engine == "exact":
        return None
    from ..index import current_index

    index = current_index(coll)
    if index is None and engine == "faiss":
        raise IndexerError(f"{coll.path} has no index: build one with `indexer index {coll.path}`")
    return index


def _check_k(k: int, n: int) -> int:
    if k < 1:
        raise IndexerError("-k must be at least 1")
    if k > n:
        log.warning("-k %d is more than the %d reference rows: using %d", k, n, n)
    return min(k, n)


@dataclass(frozen=True)
class KnnSettings:
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    vote: Vote = "weighted"

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "temperature": self.temperature, "vote": self.vote}


def knn_eval(collection: Collection | str, label_field: str = "label", *, test: Collection | str | None = None,
             folds: int | None = None, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
             vote: Vote = "weighted", engine: KnnEngine = "auto", out: str | None = None) -> dict[str, Any]:
    """Accuracy of the k-NN classifier: on a labelled `test` collection, or by `folds`-fold
    cross-validation within the collection (default 5 folds). `out`: a folder for the JSON report
    and the confusion-matrix PNG.

    >>> knn_eval("photos.idx", "label", folds=5)["accuracy"]        # doctest: +SKIP
    0.93
    """
    start = time.perf_counter()
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    if test is not None and folds is not None:
        raise IndexerError("give --test or --folds, not both")
    ref = Reference(load_labelled(coll, label_field), _open_index(coll, engine))
    settings = KnnSettings(_check_k(k, len(ref.data)), temperature, vote)
    if test is not None:
        test_coll = test if isinstance(test, Collection) else Collection.open(test)
        coll.check_compatible(test_coll.spec)
        held = load_labelled(test_coll, label_field)
        probs = _classify(ref, held.vectors, settings)
        y_true, n_train, split = list(held.labels), len(ref.data), {"test": str(test_coll.path)}
    else:
        n_folds = folds or DEFAULT_FOLDS
        fold = stratified_folds(ref.data.labels, n_folds)
        probs = np.zeros((len(ref.data), len(ref.classes)))
        for f in range(n_folds):
            inside = fold == f
            probs[inside] = _classify(ref, ref.data.vectors[inside], settings, exclude=inside)
        y_true, n_train, split = list(ref.data.labels), int(len(ref.data) * (n_folds - 1) / n_folds), {"folds": n_folds}
    y_pred = [ref.classes[i] for i in probs.argmax(axis=1)]
    result = {**scores(y_true, y_pred, ref.classes), **settings.to_dict(), "n_train": n_train,
              "n_test": len(y_true), "unlabelled": ref.data.unlabelled, "engine": ref.engine,
              "label_field": label_field, **split, "seconds": round(time.perf_counter() - start, 3)}
    if out is not None:
        from .plots import write_eval_report

        result["files"] = write_eval_report(result, out, "knn", f"k-NN ({vote}, k={settings.k}) on {coll.path.name}")
    return result


def _classify(ref: Reference, queries: np.ndarray, s: KnnSettings, exclude: np.ndarray | None = None) -> np.ndarray:
    sims, classes = ref.topk(queries, s.k, exclude)
    return vote_probabilities(sims, classes, len(ref.classes), s.temperature, s.vote)


def knn_eval_arrays(train_x: np.ndarray, train_y: Sequence, test_x: np.ndarray, test_y: Sequence, *,
                    k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                    vote: Vote = "weighted") -> dict[str, Any]:
    """The same protocol on in-memory features (e.g. before/after fine-tuning): exact neighbours."""
    data = LabelledVectors([str(i) for i in range(len(train_x))], normalized(train_x),
                           np.array([str(y) for y in train_y], dtype=object), 0)
    ref = Reference(data)
    settings = KnnSettings(_check_k(k, len(data)), temperature, vote)
    probs = _classify(ref, normalized(test_x), settings)
    y_pred = [ref.classes[i] for i in probs.argmax(axis=1)]
    return {**scores([str(y) for y in test_y], y_pred, ref.classes), **settings.to_dict(),
            "n_train": len(train_x), "n_test": len(test_x)}


def knn_predict(collection: Collection | str, sources: Sequence[str] | None = None, *, items: Sequence | None = None,
                vectors: np.ndarray | None = None, label_field: str = "label", k: int = DEFAULT_K,
                temperature: float = DEFAULT_TEMPERATURE, vote: Vote = "weighted", engine: KnnEngine = "auto",
                device: str = "auto", text_field: str = "text", image_field: str = "image",
                id_field: str | None = None) -> list[dict[str, Any]]:
    """Classify new inputs by their neighbours in the collection: files/tables (`sources`), raw
    `items` (strings or PIL images), or `vectors`. Each prediction carries the label, the class
    probabilities and the neighbours that voted.

    >>> knn_predict("notes.idx", items=["the mitochondria makes ATP"])[0]["label"]   # doctest: +SKIP
    'biology'
    """
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    ref = Reference(load_labelled(coll, label_field), _open_index(coll, engine))
    settings = KnnSettings(_check_k(k, len(ref.data)), temperature, vote)
    ids, queries = embed_new_inputs(coll.spec.to_dict(), sources, items, vectors, device=device,
                                    text_field=text_field, image_field=image_field, id_field=id_field)
    if queries.shape[1] != coll.spec.dim:
        raise IndexerError(f"vectors have {queries.shape[1]} dimensions; {coll.path} has {coll.spec.dim}")
    queries = normalized(queries)
    sims, rows = ref.neighbours(queries, settings.k)
    classes = np.where(rows >= 0, ref.y[np.maximum(rows, 0)], -1)
    probs = vote_probabilities(sims, classes, len(ref.classes), settings.temperature, settings.vote)
    out = []
    for n, item_id in enumerate(ids):
        order = np.argsort(-probs[n], kind="stable")
        out.append({
            "id": item_id,
            "label": ref.classes[order[0]],
            "probabilities": {ref.classes[c]: round(float(probs[n, c]), 6) for c in order if probs[n, c] > 0},
            "neighbours": [{"id": ref.data.ids[r], "score": float(s), "label": ref.data.labels[r]}
                           for r, s in zip(rows[n], sims[n]) if r >= 0],
        })
    return out
