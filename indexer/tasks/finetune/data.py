"""Labelled inputs for fine-tuning: reading them, checking the classes, splitting the rows."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ...errors import IndexerError
from ...sources import SkippedInput
from ...wording import counted
from ..features import check_classes, read_inputs, stratified_holdout

log = logging.getLogger(__name__)


@dataclass
class LabelledSet:
    """Inputs with labels: text strings, or image Records decoded batch by batch."""

    ids: list[str]
    items: list[Any]
    labels: list[str]
    skipped: list[SkippedInput]


def read_labelled(sources: Sequence[str], modality: str, label_field: str, *, text_field: str = "text",
                  image_field: str = "image", id_field: str | None = None) -> LabelledSet:
    """Every labelled input of the sources. Rows without a label are skipped and reported (a model
    cannot learn from them, and one bad row should not cost a run), as are unreadable inputs."""
    inputs = read_inputs(sources, modality, label_field=label_field, text_field=text_field, image_field=image_field,
                         id_field=id_field, records=True)  # images stay undecoded until their batch
    out = LabelledSet([], [], [], inputs.skipped)
    for rec, label in zip(inputs.items, inputs.labels):
        if not label:
            out.skipped.append(SkippedInput(rec.source, f"no label in field {label_field!r}", rec.id))
            continue
        out.ids.append(rec.id)
        out.items.append(rec.text if modality == "text" else rec)
        out.labels.append(label)
    if not out.ids:
        raise IndexerError(f"no labelled {modality} input in {', '.join(sources)} (label field {label_field!r}; "
                           f"{counted(len(out.skipped), 'input')} skipped)")
    return out


def check_labels(labels: Sequence[str]) -> list[str]:
    """The sorted classes; fine-tuning needs two classes and two examples of each (one to train on,
    one to validate on)."""
    classes = check_classes(labels, "labelled data")
    counts = Counter(labels)
    single = [c for c in classes if counts[c] < 2]
    if single:
        shown = ", ".join(repr(c) for c in single[:10]) + (" ..." if len(single) > 10 else "")
        raise IndexerError(f"{len(single)} class(es) have a single example ({shown}): each class needs at least "
                           "two, one to train on and one to validate on; add examples or drop those rows")
    return classes


@dataclass(frozen=True)
class Splits:
    """Row indices: `train` fits the head and blocks, `val` drives early stopping, `test` (empty when
    a class has too few examples) is held out of both and scores the before/after comparison."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def evaluated_on(self) -> Literal["test", "validation"]:
        return "test" if len(self.test) else "validation"

    @property
    def evaluation(self) -> np.ndarray:
        return self.test if len(self.test) else self.val


def split_rows(labels: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """A stratified test split (when every class keeps two rows besides it), then a stratified
    validation split of the rest; every class has at least one training and one validation row."""
    y = np.asarray(labels, dtype=object)
    test = stratified_holdout(y, test_fraction, seed) if test_fraction > 0 else np.zeros(len(y), dtype=bool)
    if test.any() and min(Counter(y[~test]).values()) < 2:
        log.warning("a class has too few examples for a separate test split (it needs 3+): the before/after "
                    "comparison uses the validation split, which also chose the best epoch (optimistic)")
        test[:] = False
    rest = np.flatnonzero(~test)
    val = np.zeros(len(y), dtype=bool)
    val[rest[stratified_holdout(y[rest], val_fraction, seed + 1)]] = True
    return Splits(np.flatnonzero(~(test | val)), np.flatnonzero(val), np.flatnonzero(test))
