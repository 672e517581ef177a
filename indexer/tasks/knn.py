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
from ..index.exact import normalized, top_k
from ..store import Collection
from .features import (
    LabelledVectors,
    check_classes,
    embed_new_inputs,
    load_eval_data,
    load_labelled,
    scores,
    stratified_folds,
)

log = logging.getLogger(__name__)

Vote = Literal["weighted", "majority"]
KnnEngine = Literal["auto", "exact", "faiss"]
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
_PREDICT_BLOCK = 8192  # queries voted at once


def vote_probabilities(sims: np.ndarray, neighbour_classes: np.ndarray, n_classes: int,
                       temperature: float = DEFAULT_TEMPERATURE, how: Vote = "weighted") -> np.ndarray:
    """(m, k) similarities and class indices of the neighbours -> (m, n_classes) probabilities.
    Missing neighbours (class -1) carry no vote."""
    if how not in ("weighted", "majority"):
        raise IndexerError(f"--vote {how}: choose weighted or majority")
    if how == "weighted" and temperature <= 0:
        raise IndexerError("--temperature must be positive")
    m, k = sims.shape
    valid = neighbour_classes >= 0
    if how == "weighted":
        s = np.where(valid, sims.astype(np.float64), -np.inf)
        # Shifting by each row's best similarity leaves the normalised votes unchanged and keeps
        # exp(sim / T) finite for any temperature.
        top = np.max(s, axis=1, keepdims=True) if k else np.zeros((m, 1))
        weights = np.exp((s - np.where(np.isfinite(top), top, 0.0)) / temperature)
    else:
        weights = np.ones((m, k))
    weights = np.where(valid, weights, 0.0)
    cells = (np.arange(m)[:, None] * n_classes + np.where(valid, neighbour_classes, 0)).ravel()
    votes = np.bincount(cells, weights=weights.ravel(), minlength=m * n_classes).reshape(m, n_classes)
    total = votes.sum(axis=1, keepdims=True)
    return votes / np.where(total > 0, total, 1.0)


@dataclass(frozen=True)
class KnnSettings:
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    vote: Vote = "weighted"

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "temperature": self.temperature, "vote": self.vote}


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
            self._row_at = pc.fill_null(row, -1).to_numpy(zero_copy_only=False).astype(np.int64)

    @property
    def engine(self) -> str:
        return "exact" if self.index is None else f"faiss {self.index.meta.get('kind')}"

    def neighbours(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(sims, rows of `data`) of the k nearest rows, best first; `exclude` masks rows of `data` out
        (the query's own fold). Row -1 marks a missing neighbour."""
        if self.index is None:
            return top_k(queries, self.data.vectors, k, base_rows=None if exclude is None else np.flatnonzero(~exclude))
        allowed = self._row_at >= 0
        if exclude is not None:
            allowed &= ~exclude[np.maximum(self._row_at, 0)]
        positions, sims = self.index.search(queries, k, allowed=allowed)
        return sims, np.where(positions >= 0, self._row_at[np.maximum(positions, 0)], -1)

    def classes_of(self, rows: np.ndarray) -> np.ndarray:
        return np.where(rows >= 0, self.y[np.maximum(rows, 0)], -1)

    def probabilities(self, queries: np.ndarray, s: KnnSettings, exclude: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probabilities, sims, rows) for a block of queries."""
        sims, rows = self.neighbours(queries, s.k, exclude)
        return vote_probabilities(sims, self.classes_of(rows), len(self.classes), s.temperature, s.vote), sims, rows

    def predict(self, queries: np.ndarray, s: KnnSettings, exclude: np.ndarray | None = None) -> np.ndarray:
        """Predicted class index per query, in blocks: (queries x classes) votes never exist at once."""
        out = np.empty(len(queries), dtype=np.int64)
        for start in range(0, len(queries), _PREDICT_BLOCK):
            probs, _, _ = self.probabilities(queries[start : start + _PREDICT_BLOCK], s, exclude)
            out[start : start + len(probs)] = probs.argmax(axis=1)
        return out


def _open_index(coll: Collection, engine: KnnEngine):
    if engine not in ("auto", "exact", "faiss"):
        raise IndexerError(f"--engine {engine}: choose auto, exact or faiss")
    from .search import index_for

    return index_for(coll, engine)


def _check_k(k: int, n: int) -> int:
    if k < 1:
        raise IndexerError("-k must be at least 1")
    if k > n:
        log.warning("-k %d is more than the %d reference rows: using %d", k, n, n)
    return min(k, n)


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
    index = _open_index(coll, engine)
    data = load_eval_data(coll, label_field, test, folds, train_vectors=index is None)
    ref = Reference(data.train, index)
    settings = KnnSettings(_check_k(k, len(ref.data)), temperature, vote)
    if data.test is not None:
        predicted = ref.predict(data.test.vectors, settings)
        y_true, n_train = data.test.labels, len(ref.data)
    else:
        fold = stratified_folds(ref.data.labels, data.folds)
        predicted = np.empty(len(ref.data), dtype=np.int64)
        for f in range(data.folds):
            inside = fold == f
            predicted[inside] = ref.predict(ref.data.vectors[inside], settings, exclude=inside)
        y_true, n_train = ref.data.labels, int(len(ref.data) * (data.folds - 1) / data.folds)
    y_pred = np.asarray(ref.classes, dtype=object)[predicted]
    result = {**scores(y_true, y_pred, ref.classes), **settings.to_dict(), "n_train": n_train,
              "n_test": len(y_true), "unlabelled": ref.data.unlabelled, "engine": ref.engine,
              "label_field": label_field, **data.split(), "seconds": round(time.perf_counter() - start, 3)}
    if out is not None:
        from .plots import write_eval_report

        result["files"] = write_eval_report(result, out, "knn", f"k-NN ({vote}, k={settings.k}) on {coll.name}")
    return result


def knn_eval_arrays(train_x: np.ndarray, train_y: Sequence, test_x: np.ndarray, test_y: Sequence, *,
                    k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                    vote: Vote = "weighted") -> dict[str, Any]:
    """The same protocol on in-memory features (e.g. before/after fine-tuning): exact neighbours."""
    data = LabelledVectors([str(i) for i in range(len(train_x))], normalized(train_x),
                           np.array([str(y) for y in train_y], dtype=object), 0)
    ref = Reference(data)
    settings = KnnSettings(_check_k(k, len(data)), temperature, vote)
    y_pred = np.asarray(ref.classes, dtype=object)[ref.predict(normalized(test_x), settings)]
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
    index = _open_index(coll, engine)
    ref = Reference(load_labelled(coll, label_field, vectors=index is None), index)
    check_classes(ref.data.labels)
    settings = KnnSettings(_check_k(k, len(ref.data)), temperature, vote)
    ids, queries = embed_new_inputs(coll.spec.to_dict(), sources, items, vectors, device=device,
                                    text_field=text_field, image_field=image_field, id_field=id_field)
    if queries.shape[1] != coll.spec.dim:
        raise IndexerError(f"vectors have {queries.shape[1]} dimensions; {coll.path} has {coll.spec.dim}")
    out = []
    for start in range(0, len(ids), _PREDICT_BLOCK):
        probs, sims, rows = ref.probabilities(normalized(queries[start : start + _PREDICT_BLOCK]), settings)
        for item_id, p, s, r in zip(ids[start : start + _PREDICT_BLOCK], probs, sims, rows):
            order = np.argsort(-p, kind="stable")
            out.append({
                "id": item_id,
                "label": ref.classes[order[0]],
                "probabilities": {ref.classes[c]: round(float(p[c]), 6) for c in order if p[c] > 0},
                "neighbours": [{"id": ref.data.ids[j], "score": float(v), "label": ref.data.labels[j]}
                               for j, v in zip(r, s) if j >= 0],
            })
    return out
