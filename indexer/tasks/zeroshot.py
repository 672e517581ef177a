"""Zero-shot classification with a joint text-image model: each class name, put into prompt templates
("a photo of a {}"), goes through the text tower; every stored item takes the class whose prompts are
nearest, with the model's own logit scale (softmax for CLIP, sigmoid with its bias for SigLIP). No
labelled row is needed; `zero_shot_eval` scores the labels against stored ones like the k-NN classifier.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexerError
from ..index.exact import normalized
from ..store import Collection
from .features import label_column, scores

DEFAULT_TEMPLATE = "a photo of a {}"
_BLOCK = 8192  # rows scored at once


def read_classes(classes: str | Sequence[str]) -> list[str]:
    """Class names: a list, a comma list ("cat,dog,car"), or a file with one name per line (# comments)."""
    if isinstance(classes, str):
        path = Path(classes)
        if path.is_file():
            names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            names = [n for n in names if n and not n.startswith("#")]
        else:
            names = [n.strip() for n in classes.split(",") if n.strip()]
    else:
        names = [str(n).strip() for n in classes]
    if len(names) < 2 or len(set(names)) != len(names):
        raise IndexerError(f"--zero-shot needs at least two distinct class names (got {names})")
    return names


class ZeroShot:
    """Class prompt vectors and the model's logit head, ready to score (n, d) item vectors."""

    def __init__(self, coll: Collection, classes: str | Sequence[str], templates: Sequence[str], device: str):
        from .search import query_embedder

        spec = coll.spec
        if not (spec.joint and spec.accepts("text")):
            raise IndexerError(f"zero-shot needs a joint text-image model (clip:, open_clip:); {coll.path} holds "
                               f"{spec.describe()}")
        self.classes = read_classes(classes)
        self.templates = list(templates) or [DEFAULT_TEMPLATE]
        bad = [t for t in self.templates if "{}" not in t]
        if bad:
            raise IndexerError(f"--template {bad[0]!r} has no {{}} where the class name goes")
        embedder = query_embedder(coll, device)
        prompts = [t.format(c) for c in self.classes for t in self.templates]
        # Several templates per class: the mean of their (normalised) vectors, as CLIP's prompt ensembles.
        vectors = embedder.embed(prompts).reshape(len(self.classes), len(self.templates), -1).mean(axis=1)
        self.text = normalized(vectors)
        self.scale, self.bias = embedder.logit_head()

    def logits(self, items: np.ndarray) -> np.ndarray:
        """(n, classes) logits of normalised item vectors, as the model computes them."""
        logits = self.scale * (normalized(items) @ self.text.T)
        return logits if self.bias is None else logits + self.bias

    def probabilities(self, items: np.ndarray) -> np.ndarray:
        logits = self.logits(items).astype(np.float64)
        if self.bias is not None:  # SigLIP: each class on its own
            return 1 / (1 + np.exp(-logits))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def _rows(coll: Collection, columns: list[str], where: str | None) -> Iterator[tuple[list[str], np.ndarray, list]]:
    if coll.count() == 0:
        raise coll.empty()
    for batch in coll.scan(["id", "vector", *columns], where, batch_size=_BLOCK):
        vectors = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)
        extra = batch.column(columns[0]).to_pylist() if columns else [None] * batch.num_rows
        yield batch.column("id").to_pylist(), vectors.astype(np.float32, copy=False), extra


def zero_shot_predict(collection: Collection | str, classes: str | Sequence[str], *,
                      templates: Sequence[str] = (DEFAULT_TEMPLATE,), where: str | None = None,
                      device: str = "auto") -> list[dict[str, Any]]:
    """A label and the class probabilities for every stored item (or those `where` selects).

    >>> zero_shot_predict("photos.idx", "cat,dog,car")[0]                 # doctest: +SKIP
    {'id': 'cat.jpg', 'label': 'cat', 'probabilities': {'cat': 0.93, 'dog': 0.05, 'car': 0.02}}
    """
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    zs = ZeroShot(coll, classes, templates, device)
    out = []
    for ids, vectors, _ in _rows(coll, [], where):
        for item_id, p in zip(ids, zs.probabilities(vectors)):
            order = np.argsort(-p, kind="stable")
            out.append({"id": item_id, "label": zs.classes[order[0]],
                        "probabilities": {zs.classes[c]: round(float(p[c]), 6) for c in order}})
    return out


def zero_shot_eval(collection: Collection | str, classes: str | Sequence[str], label_field: str = "label", *,
                   templates: Sequence[str] = (DEFAULT_TEMPLATE,), where: str | None = None,
                   device: str = "auto") -> dict[str, Any]:
    """Accuracy of the zero-shot labels against the stored ones, with the k-NN report's keys (k,
    temperature and vote are None: nothing votes; n_train is 0: nothing is learnt)."""
    start = time.perf_counter()
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    zs = ZeroShot(coll, classes, templates, device)
    column = label_column(coll, label_field)
    y_true: list[str] = []
    y_pred: list[str] = []
    unlabelled = 0
    for _, vectors, labels in _rows(coll, [column], where):
        keep = np.array([v is not None and str(v) != "" for v in labels], dtype=bool)
        unlabelled += int((~keep).sum())
        if keep.any():
            y_true += [str(v) for v, k in zip(labels, keep) if k]
            y_pred += [zs.classes[i] for i in zs.logits(vectors[keep]).argmax(axis=1)]
    if not y_true:
        raise IndexerError(f"no row of {coll.path} has a value in {label_field!r}")
    unknown = sorted(set(y_true) - set(zs.classes))
    if unknown:
        raise IndexerError(f"stored labels that are not zero-shot classes: {', '.join(unknown[:5])}; "
                           f"name every class (classes given: {', '.join(zs.classes)})")
    return {**scores(y_true, y_pred, zs.classes), "k": None, "temperature": None, "vote": None, "n_train": 0,
            "n_test": len(y_true), "unlabelled": unlabelled, "engine": "zero-shot", "label_field": label_field,
            "templates": zs.templates, "zero_shot": zs.classes, "seconds": round(time.perf_counter() - start, 3)}
