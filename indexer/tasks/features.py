"""Labelled features for the learning tasks (k-NN, linear probe, layer sweep): read them from a
collection or embed them from sources, split them into folds, and score predictions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexerError
from ..index.exact import normalized
from ..sources import Record, SkippedInput, SourceOptions, check_sources, guess_modality, iter_records
from ..store import Collection

log = logging.getLogger(__name__)

DEFAULT_FOLDS = 5
FOLDER_LABEL = "folder"  # --label-field folder: an image's parent folder names its class (ImageFolder layout)


@dataclass
class LabelledVectors:
    """Rows of a collection that carry a label: ids, L2-normalised vectors (n, d), labels (str)."""

    ids: list[str]
    vectors: np.ndarray
    labels: np.ndarray
    unlabelled: int  # rows without a label: not used, only reported

    def __len__(self) -> int:
        return len(self.ids)


def load_labelled(coll: Collection, label_field: str = "label", vectors: bool = True) -> LabelledVectors:
    """Every labelled row of a collection, vectors normalised for cosine similarity (an empty (n, 0)
    array with `vectors=False`: the index answers, only ids and labels are needed)."""
    table = coll.table
    if table is None or coll.count() == 0:
        raise coll.empty()
    column = label_column(coll, label_field)
    ids: list[str] = []
    labels: list[str] = []
    blocks: list[np.ndarray] = []
    unlabelled = 0
    columns = ["id", column] + (["vector"] if vectors else [])
    for batch in coll.scan(columns, batch_size=65536):
        raw = batch.column(column).to_pylist()
        keep = np.array([v is not None and str(v) != "" for v in raw], dtype=bool)
        unlabelled += int((~keep).sum())
        if not keep.any():
            continue
        if vectors:
            vec = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)
            blocks.append(vec[keep].astype(np.float32, copy=False))
        ids.extend(i for i, k in zip(batch.column("id").to_pylist(), keep) if k)
        labels.extend(str(v) for v, k in zip(raw, keep) if k)
    if not ids:
        raise IndexerError(f"no row of {coll.path} has a value in {label_field!r}")
    matrix = normalized(np.concatenate(blocks)) if vectors else np.zeros((len(ids), 0), dtype=np.float32)
    if unlabelled:
        log.info("%d rows of %s have no %s: left out", unlabelled, coll.path, label_field)
    return LabelledVectors(ids, matrix, np.array(labels, dtype=object), unlabelled)


def label_column(coll: Collection, name: str) -> str:
    """The stored column holding the labels called `name`: a column of that name, or `label` when
    `name` is what the sources called it at ingest (`--label-field topic` stores `label`, recorded in
    the manifest). An unknown name is an error listing the names that work."""
    columns = coll.table.schema.names
    if name in columns:
        return name
    alias = coll.manifest.label_field
    if name == alias and "label" in columns:
        return "label"
    fields = [n for n in coll.result_columns() if n not in ("id", "vector", "label")]
    labels = f"{alias!r} (stored as 'label')" if alias else "'label'" if "label" in columns else "none"
    raise IndexerError(f"{coll.path} has no label field {name!r}: its labels are {labels}; other fields: "
                       f"{', '.join(fields) or 'none'} (ingest with --label-field to store labels)")


@dataclass
class EvalData:
    """What an evaluation reads: the collection's labelled rows, and a labelled test collection's rows
    or the number of cross-validation folds."""

    coll: Collection
    train: LabelledVectors
    test: LabelledVectors | None
    test_path: str | None
    folds: int | None

    def split(self) -> dict[str, Any]:
        return {"test": self.test_path} if self.test is not None else {"folds": self.folds}


def load_eval_data(collection: Collection | str, label_field: str, test: Collection | str | None,
                   folds: int | None, train_vectors: bool = True) -> EvalData:
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    if test is not None and folds is not None:
        raise IndexerError("give --test or --folds, not both")
    train = load_labelled(coll, label_field, vectors=train_vectors or test is None)
    check_classes(train.labels)
    if test is None:
        return EvalData(coll, train, None, None, folds or DEFAULT_FOLDS)
    test_coll = test if isinstance(test, Collection) else Collection.open(test)
    coll.check_compatible(test_coll.spec)
    return EvalData(coll, train, load_labelled(test_coll, label_field), str(test_coll.path), None)


@dataclass
class Inputs:
    """Raw items read from sources, ready for an embedder: text strings or decoded RGB images."""

    ids: list[str]
    items: list[Any]
    labels: list[str | None]
    skipped: list[SkippedInput]


def read_inputs(sources: Sequence[str], modality: str, *, label_field: str | None = None, text_field: str = "text",
                image_field: str = "image", id_field: str | None = None, limit: int | None = None,
                min_size: int | None = None, records: bool = False) -> Inputs:
    """Read (and for images decode) every input of the sources in memory: for predictions and layer
    sweeps over labelled sets, not for collections of millions (ingest streams those). `min_size`:
    JPEG draft decoding as ingest does it (the model's resize), so features match the stored ones.
    `records=True`: the items are the Records themselves, undecoded (fine-tuning decodes batch by batch)."""
    from ..sources.images import ImageDecodeError, decode_image

    sources = list(sources)
    if not sources:
        raise IndexerError("no sources given")
    check_sources(sources, modality)
    folder_labels = label_field == FOLDER_LABEL
    opts = SourceOptions(modality=modality, text_field=text_field, image_field=image_field, id_field=id_field,
                         label_field=None if folder_labels else label_field)
    out = Inputs([], [], [], [])
    for rec in iter_records(sources, opts):
        if isinstance(rec, SkippedInput):
            out.skipped.append(rec)
            continue
        item: Any = rec if records else rec.text
        if modality == "image" and not records:
            try:
                item = decode_image(rec.payload_bytes(), min_size)
            except (ImageDecodeError, OSError) as exc:
                out.skipped.append(SkippedInput(rec.source, f"cannot decode image: {exc}", rec.id))
                continue
        out.ids.append(rec.id)
        out.items.append(item)
        out.labels.append(_folder_label(rec) if folder_labels else rec.label)
        if limit is not None and len(out.ids) >= limit:
            break
    for s in out.skipped:
        log.warning("skipped %s: %s", s.id or s.source, s.reason)
    if not out.ids:
        raise IndexerError(f"no usable {modality} input in {', '.join(sources)}")
    return out


def embed_new_inputs(spec: dict[str, Any] | None, sources: Sequence[str] | None, items: Sequence[Any] | None,
                     vectors: np.ndarray | None, *, device: str = "auto", **fields: Any) -> tuple[list[str], np.ndarray]:
    """(ids, features) of new inputs, with the model a head or collection was built with."""
    from ..models import load_embedder, query_runtime, respec
    from ..spec import ModelSpec

    if sum(x is not None for x in (sources, items, vectors)) != 1:
        raise IndexerError("give exactly one of sources, items or vectors to classify")
    if vectors is not None:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        return [str(i) for i in range(len(vectors))], vectors
    if spec is None or spec.get("name") == "none":
        raise IndexerError("these features came from no known model (precomputed vectors): classify vectors")
    model_spec = ModelSpec.from_dict(spec)
    embedder = load_embedder(respec(model_spec), query_runtime(model_spec.backend, model_spec.precision, device))
    if embedder.spec.identity() != model_spec.identity():
        raise IndexerError(f"{model_spec.name} on this machine is not the model the head was trained on "
                           "(different weights, layer or pooling)")
    if sources is not None:
        # A joint text-image model classifies either kind: words against pictures, pictures against words.
        modality = guess_modality(sources, fields.get("text_field", "text"), fields.get("image_field", "image")) \
            if model_spec.joint else model_spec.modality
        inputs = read_inputs(sources, modality, min_size=model_spec.preprocessing.get("resize"), **fields)
        ids, raw = inputs.ids, inputs.items
    else:
        raw = list(items)
        ids = [str(i) for i in range(len(raw))]
    return ids, embedder.embed(raw)


def _folder_label(rec: Record) -> str | None:
    parent = Path(rec.id).parent.name
    return parent or None


def check_classes(labels: Sequence[str], what: str = "training set") -> list[str]:
    """The sorted class names; at least two classes are needed to learn anything."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise IndexerError(f"the {what} has {len(classes)} class{'es' if len(classes) != 1 else ''} "
                           f"({', '.join(classes) or 'none'}): a classifier needs at least two")
    return classes


def stratified_folds(labels: np.ndarray, n_folds: int = DEFAULT_FOLDS, seed: int = 0) -> np.ndarray:
    """Fold number per row, each class spread evenly over the folds (the same folds for every
    method and layer, so their scores compare)."""
    if n_folds < 2:
        raise IndexerError("--folds must be at least 2")
    if n_folds > len(labels):
        raise IndexerError(f"--folds {n_folds} is more than the {len(labels)} labelled rows")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for members in _class_members(labels):
        rng.shuffle(members)
        # Continue the round-robin where the previous class stopped so fold sizes stay balanced.
        fold[members] = (np.arange(len(members)) + offset) % n_folds
        offset += len(members)
    smallest = min(len(m) for m in _class_members(labels))
    if smallest < n_folds:
        log.warning("the smallest class has %d rows, fewer than %d folds: some folds never see it",
                    smallest, n_folds)
    return fold


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A boolean mask holding out `fraction` of each class (at least one row, never all of a class)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for members in _class_members(labels):
        rng.shuffle(members)
        held[members[: min(len(members) - 1, max(1, round(len(members) * fraction)))]] = True
    return held


def _class_members(labels: np.ndarray) -> list[np.ndarray]:
    """Row indices of each class, classes in sorted order (one pass: millions of rows, thousands of classes)."""
    _, inverse = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)


def scores(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    (rows: true class, columns: predicted class, in `classes` order)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    seen = set(y_true) | set(y_pred)
    present = [c for c in classes if c in seen]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(np.mean(f)) if len(f) else 0.0,
        "per_class": {c: {"precision": float(pi), "recall": float(ri), "f1": float(fi), "support": int(si)}
                      for c, pi, ri, fi, si in zip(present, p, r, f, s)},
        "classes": list(present),
        "confusion": confusion_matrix(y_true, y_pred, labels=present).tolist(),
    }
