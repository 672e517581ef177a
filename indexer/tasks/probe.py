"""Linear probe: a multinomial logistic-regression head on a frozen backbone's features.

Features are L2-normalised (as the collection stores them) and standardised; the inverse
regularisation strength C is chosen on a stratified validation split from a log grid, then the head is
refit on all training rows. A saved head carries the model spec, so it classifies raw text or images
end to end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexerError
from ..store import Collection
from .features import (
    check_classes,
    embed_new_inputs,
    load_eval_data,
    load_labelled,
    normalized,
    scores,
    stratified_folds,
    stratified_holdout,
)

log = logging.getLogger(__name__)

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
VAL_FRACTION = 0.2
HEAD_FORMAT = "indexer-probe-head/1"


@dataclass
class ProbeHead:
    """A trained classifier head: probabilities = softmax(standardise(normalise(x)) @ coef.T + intercept)."""

    classes: list[str]
    coef: np.ndarray  # (n_classes, d)
    intercept: np.ndarray  # (n_classes,)
    mean: np.ndarray  # (d,) standardisation fitted on the training features
    scale: np.ndarray  # (d,)
    C: float
    label_field: str = "label"
    spec: dict[str, Any] | None = None  # the model whose features the head reads
    info: dict[str, Any] = field(default_factory=dict)  # training set size, validation scores, time

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        if x.shape[1] != self.coef.shape[1]:
            raise IndexerError(f"the head reads {self.coef.shape[1]}-d features; got {x.shape[1]}-d")
        return ((normalized(x) - self.mean) / self.scale) @ self.coef.T + self.intercept

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = self.logits(x)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> list[str]:
        return [self.classes[i] for i in self.logits(x).argmax(axis=1)]

    def save(self, path: str | os.PathLike) -> Path:
        """One .npz file (no pickle): arrays plus a JSON header; written atomically."""
        path = Path(path)
        meta = {"format": HEAD_FORMAT, "classes": self.classes, "C": self.C, "label_field": self.label_field,
                "spec": self.spec, "info": self.info}
        from ..files import write_atomic

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a path
                np.savez(fh, coef=self.coef, intercept=self.intercept, mean=self.mean, scale=self.scale,
                         meta=np.array(json.dumps(meta)))

        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, write)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProbeHead:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in ("coef", "intercept", "mean", "scale")}
        except FileNotFoundError:
            raise IndexerError(f"probe head not found: {path}") from None
        except (OSError, ValueError, KeyError) as exc:
            raise IndexerError(f"{path} is not a probe head saved by `indexer probe --save` ({exc})") from None
        if meta.get("format") != HEAD_FORMAT:
            raise IndexerError(f"{path} is not a probe head saved by `indexer probe --save`")
        return cls(classes=meta["classes"], C=meta["C"], label_field=meta["label_field"], spec=meta["spec"],
                   info=meta.get("info", {}), **arrays)

    def classify(self, sources: Sequence[str] | None = None, *, items: Sequence | None = None,
                 vectors: np.ndarray | None = None, device: str = "auto", **fields) -> list[dict[str, Any]]:
        """End to end: raw inputs (files/tables, or strings / PIL images) in, label and
        probabilities out, embedded with the model the head was trained on.

        >>> ProbeHead.load("topic.npz").classify(items=["the cell divides"])[0]["label"]   # doctest: +SKIP
        'biology'
        """
        ids, x = embed_new_inputs(self.spec, sources, items, vectors, device=device, **fields)
        return predictions(ids, self.predict_proba(x), self.classes)


def predictions(ids: Sequence[str], probs: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for item_id, p in zip(ids, probs):
        order = np.argsort(-p, kind="stable")
        out.append({"id": item_id, "label": classes[order[0]],
                    "probabilities": {classes[c]: round(float(p[c]), 6) for c in order if p[c] >= 1e-6}})
    return out


def fit_probe(x: np.ndarray, y: Sequence, *, C: float | None = None, seed: int = 0) -> ProbeHead:
    """Fit the head on (n, d) features and labels; C from the validation grid unless given."""
    start = time.perf_counter()
    y = np.array([str(v) for v in y], dtype=object)
    classes = check_classes(y)
    x = normalized(x)
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), 1e-6)
    z = (x - mean) / scale
    val_acc: dict[str, float] = {}
    if C is None:
        C, val_acc = _choose_c(z, y, seed)
    model = _logistic(C).fit(z, y)
    coef, intercept = model.coef_.astype(np.float32), model.intercept_.astype(np.float32)
    if len(classes) == 2:  # sklearn keeps one row for two classes: logits [0, z] give the same softmax
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]], dtype=np.float32)
    info = {"n_train": len(y), "validation_accuracy_by_C": val_acc,
            "seconds": round(time.perf_counter() - start, 3)}
    return ProbeHead([str(c) for c in model.classes_], coef, intercept, mean.astype(np.float32),
                     scale.astype(np.float32), float(C), info=info)


def _logistic(C: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=2000, tol=1e-4)


def _choose_c(z: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, dict[str, float]]:
    """The C with the best validation accuracy (ties: the stronger regularisation)."""
    val = stratified_holdout(y, VAL_FRACTION, seed)
    if not val.any() or len(set(y[~val])) < 2:
        log.info("too few examples per class for a validation split: C=1")
        return 1.0, {}
    accuracy = {}
    for c in C_GRID:
        model = _logistic(c).fit(z[~val], y[~val])
        accuracy[c] = float(np.mean(model.predict(z[val]) == y[val]))
    best = max(C_GRID, key=lambda c: (accuracy[c], -c))
    return best, {str(c): round(a, 4) for c, a in accuracy.items()}


def probe_eval_arrays(train_x: np.ndarray, train_y: Sequence, test_x: np.ndarray, test_y: Sequence,
                      ) -> dict[str, Any]:
    """Fit on the training features, score on the test features: accuracy, macro-F1, per class, C."""
    head = fit_probe(train_x, train_y)
    y_true = [str(v) for v in test_y]
    return {**scores(y_true, head.predict(test_x), head.classes), "C": head.C, "n_train": len(train_x),
            "n_test": len(test_x)}


def probe_eval(collection: Collection | str, label_field: str = "label", *, test: Collection | str | None = None,
               folds: int | None = None, save: str | os.PathLike | None = None,
               out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Linear-probe accuracy on a labelled `test` collection or by cross-validation (default 5 folds);
    `save` also fits the head on every labelled row and writes it; `out`: a folder for the JSON report
    and the confusion-matrix PNG.

    >>> probe_eval("photos.idx", "label", save="label.probe.npz")["accuracy"]   # doctest: +SKIP
    0.95
    """
    start = time.perf_counter()
    data = load_eval_data(collection, label_field, test, folds)
    train, coll = data.train, data.coll
    classes = check_classes(train.labels)
    head = None
    if data.test is not None:
        head = fit_probe(train.vectors, train.labels)
        y_true, y_pred, chosen = data.test.labels, head.predict(data.test.vectors), [head.C]
        n_train = len(train)
    else:
        fold = stratified_folds(train.labels, data.folds)
        y_pred = np.empty(len(train), dtype=object)
        chosen = []
        for f in range(data.folds):
            inside = fold == f
            fold_head = fit_probe(train.vectors[~inside], train.labels[~inside])
            y_pred[inside] = fold_head.predict(train.vectors[inside])
            chosen.append(fold_head.C)
        y_true, n_train = train.labels, int(len(train) * (data.folds - 1) / data.folds)
    result = {**scores(y_true, y_pred, classes), "C": chosen, "n_train": n_train, "n_test": len(y_true),
              "unlabelled": train.unlabelled, "label_field": label_field, **data.split()}
    if save is not None:
        head = head or fit_probe(train.vectors, train.labels)
        head.label_field, head.spec = label_field, coll.spec.to_dict()
        head.info.update({"collection": str(coll.path), "eval": {k: result[k] for k in ("accuracy", "macro_f1")},
                          **data.split()})
        result["saved"] = str(head.save(save))
    result["seconds"] = round(time.perf_counter() - start, 3)
    if out is not None:
        from .plots import write_eval_report

        result["files"] = write_eval_report(result, out, "probe", f"linear probe on {coll.path.name}")
    return result


def probe_predict(head_or_collection: str | os.PathLike | Collection | ProbeHead,
                  sources: Sequence[str] | None = None, *, items: Sequence | None = None,
                  vectors: np.ndarray | None = None, label_field: str = "label", device: str = "auto",
                  **fields) -> list[dict[str, Any]]:
    """Classify new inputs with a saved head (a .npz path or a ProbeHead), or with a head fitted on
    the spot on every labelled row of a collection."""
    head = head_or_collection
    if not isinstance(head, ProbeHead):
        if isinstance(head, Collection) or Path(head).is_dir():
            coll = head if isinstance(head, Collection) else Collection.open(head)
            data = load_labelled(coll, label_field)
            head = fit_probe(data.vectors, data.labels)
            head.label_field, head.spec = label_field, coll.spec.to_dict()
        else:
            head = ProbeHead.load(head)
    return head.classify(sources, items=items, vectors=vectors, device=device, **fields)
