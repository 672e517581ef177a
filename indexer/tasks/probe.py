"""Linear probe: a multinomial logistic-regression head on a frozen backbone's features.

Features are L2-normalised (as the collection stores them) and standardised; the inverse
regularisation strength C is chosen on a stratified validation split by walking a warm-started
regularisation path (extended past its ends while the best C sits there), then the head is refit on all
training rows. The solver is our own L-BFGS on scikit-learn's objective, on one BLAS thread for small
problems: 6,000 x 384 rows, 12 classes, path included, fit in less time than one scikit-learn
`LogisticRegression().fit` with its default threads (scripts/bench_probe.py). A saved head carries the model spec, so it
classifies raw text or images end to end.
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
from ..index.exact import normalized
from ..store import Collection
from .features import (
    check_classes,
    embed_new_inputs,
    load_eval_data,
    load_labelled,
    scores,
    stratified_folds,
    stratified_holdout,
)

log = logging.getLogger(__name__)

# log10 of C: the path starts at C_GRID[0] and walks up in C_STEP steps to C_GRID[1] at least, and past
# either end (within C_EXTREMES) while the best C sits at that end.
C_GRID = (-3.0, 2.0)
C_STEP = 0.5
C_EXTREMES = (-6.0, 6.0)
MAX_ITER = 1000
GRAD_TOL = 1e-4  # scikit-learn's tol: on the per-row loss's gradient, as there
PATH_GRAD_TOL = 1e-3  # the validation path only ranks the Cs; the refit on every row converges to GRAD_TOL
SINGLE_THREAD_SIZE = 1 << 24  # feature matrix entries below which BLAS runs on one thread
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
    """Fit the head on (n, d) features and labels; C from the validation path unless given."""
    start = time.perf_counter()
    y = np.array([str(v) for v in y], dtype=object)
    classes = check_classes(y)
    target = np.searchsorted(classes, y)
    with _blas_threads(np.size(x)):
        x = normalized(x)
        mean = x.mean(axis=0)
        scale = np.maximum(x.std(axis=0), 1e-6)
        z = np.ascontiguousarray((x - mean) / scale, dtype=np.float32)
        val_acc: dict[str, float] = {}
        params = None
        if C is None:
            C, params, val_acc = _choose_c(z, target, len(classes), seed)
        params, iterations = _fit_softmax(z, target, len(classes), C, params)
    coef, intercept = _unpack(params, len(classes), z.shape[1])
    info = {"n_train": len(y), "validation_accuracy_by_C": val_acc, "iterations": iterations,
            "seconds": round(time.perf_counter() - start, 3)}
    return ProbeHead(classes, coef, intercept, mean.astype(np.float32), scale.astype(np.float32), float(C),
                     info=info)


def _unpack(params: np.ndarray, n_classes: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    weights = params[: n_classes * d].reshape(n_classes, d).astype(np.float32)
    return weights, params[n_classes * d :].astype(np.float32)


def _fit_softmax(z: np.ndarray, target: np.ndarray, n_classes: int, C: float, init: np.ndarray | None = None,
                 tol: float = GRAD_TOL) -> tuple[np.ndarray, int]:
    """Multinomial logistic regression by L-BFGS: minimises C * sum(cross-entropy) + |W|^2 / 2 (the
    intercept unpenalised), scikit-learn's objective, so C means what it means there. The loss is
    taken per row (divided by n) so the gradient tolerance does not depend on n. `init` warm-starts
    from a neighbouring C's solution: along a regularisation path each fit then takes a few steps.
    `tol`: the largest gradient entry at which L-BFGS stops. Returns the flat parameters (W row-major,
    then the intercepts) and the iterations run."""
    from scipy.optimize import minimize

    n, d = z.shape
    penalty = 1.0 / (C * n)
    rows = np.arange(n)

    def loss_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = _unpack(params, n_classes, d)
        logits = z @ weights.T
        logits += bias
        logits -= logits.max(axis=1, keepdims=True)
        right = logits[rows, target]
        np.exp(logits, out=logits)
        total = logits.sum(axis=1)
        nll = float(np.log(total).mean() - right.mean())
        residual = logits  # softmax - onehot, per row: the gradient of the mean loss wrt the logits
        residual *= (1.0 / (n * total))[:, None]
        residual[rows, target] -= 1.0 / n
        grad_w = residual.T @ z + penalty * weights
        loss = nll + 0.5 * penalty * float(np.dot(params[: n_classes * d], params[: n_classes * d]))
        return loss, np.concatenate([grad_w.ravel(), residual.sum(axis=0)]).astype(np.float64)

    start = np.zeros(n_classes * (d + 1)) if init is None else init
    res = minimize(loss_and_grad, start, jac=True, method="L-BFGS-B",
                   options={"maxiter": MAX_ITER, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    return res.x, int(res.nit)


def _blas_threads(size: int):
    """One BLAS thread for products too small to share: on a busy machine a parallel region stalls
    whenever one of its threads is descheduled (6,000 x 384 rows: 0.7 s on one thread, 9-17 s on two
    cores shared with other work)."""
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas") if size < SINGLE_THREAD_SIZE else nullcontext()


def _choose_c(z: np.ndarray, target: np.ndarray, n_classes: int, seed: int,
              ) -> tuple[float, np.ndarray | None, dict[str, float]]:
    """Walk the regularisation path from strong to weak on a stratified validation split, each fit
    warm-started from the last, and take the C with the best validation accuracy (ties: the lower
    validation log-loss, i.e. the better calibrated probabilities). The walk stops two steps past the
    best C (weak regularisation is where L-BFGS needs the most steps), goes past either end of C_GRID
    while the best C sits at that end, and finally tries half a step either side of the best. Returns
    C, the validation split's solution at C (a warm start for the refit on every row) and the
    validation accuracy per C tried."""
    val = stratified_holdout(target, VAL_FRACTION, seed)
    if not val.any() or len(set(target[~val])) < 2:
        log.info("too few examples per class for a validation split: C=1")
        return 1.0, None, {}
    tried: dict[float, tuple[float, float, np.ndarray]] = {}  # log10 C -> (accuracy, log-loss, solution)
    z_fit, y_fit, z_val, y_val = z[~val], target[~val], z[val], target[val]

    def fit(exponent: float, init: np.ndarray | None) -> np.ndarray:
        params, _ = _fit_softmax(z_fit, y_fit, n_classes, 10.0**exponent, init, PATH_GRAD_TOL)
        weights, bias = _unpack(params, n_classes, z.shape[1])
        logits = z_val @ weights.T + bias
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        tried[exponent] = (float(np.mean(logits.argmax(axis=1) == y_val)),
                           float(-log_p[np.arange(len(log_p)), y_val].mean()), params)
        return params

    def best() -> float:
        return max(tried, key=lambda e: (tried[e][0], -tried[e][1]))

    low, high = C_GRID
    exponent, params = low, None
    while exponent <= C_EXTREMES[1] and (exponent <= high or best() == max(tried)):
        params = fit(exponent, params)
        if best() <= exponent - 2 * C_STEP:
            break  # two steps past the optimum: weaker regularisation only overfits more
        exponent += C_STEP
    exponent, params = low - C_STEP, tried[low][2]
    while best() == min(tried) and exponent >= C_EXTREMES[0]:
        params = fit(exponent, params)
        exponent -= C_STEP
    centre = best()
    for exponent in (centre - C_STEP / 2, centre + C_STEP / 2):
        fit(exponent, tried[centre][2])
    c = best()
    return 10.0**c, tried[c][2], {f"{10.0**e:.3g}": round(tried[e][0], 4) for e in sorted(tried)}


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

        result["files"] = write_eval_report(result, out, "probe", f"linear probe on {coll.name}")
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
