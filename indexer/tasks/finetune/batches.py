"""Feeding the model: batches of inputs (texts, or images decoded as ingest does), and the forward size
that fits in memory."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ...errors import IndexerError
from ...models import Embedder
from ...sources import Record
from ...sources.images import ImageDecodeError, decode_image
from .data import LabelledSet

log = logging.getLogger(__name__)

SMALL_IMAGE_SET = 200  # below this, images are decoded in the main process (worker start-up costs more)


class _Images(torch.utils.data.Dataset):
    """Image records decoded and transformed exactly as ingest does; failures come back as messages."""

    def __init__(self, records: list[Record], transform: Callable[[Any], torch.Tensor], min_size: int | None):
        self.records, self.transform, self.min_size = records, transform, min_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        try:
            return i, self.transform(decode_image(self.records[i].payload_bytes(), self.min_size))
        except (ImageDecodeError, OSError) as exc:
            return i, str(exc)


def _collate(items: list[tuple[int, torch.Tensor | str]]) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    good = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
    failed = {i: x for i, x in items if isinstance(x, str)}
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, failed


# Row lists in, (rows, model inputs) out: the Batches themselves, or (head only) cached features.
BatchSource = Callable[[list[list[int]]], Iterator[tuple[list[int], Any]]]


class Batches:
    """Batches of model inputs (text strings or image tensors) over chosen rows of a labelled set."""

    def __init__(self, data: LabelledSet, embedder: Embedder, workers: int | None = None):
        self.data, self.embedder = data, embedder
        self.text = embedder.modality == "text"
        self.failed: dict[int, str] = {}
        if not self.text:
            resize = embedder.spec.preprocessing.get("resize")  # JPEG draft decoding down to it, as ingest does
            self.images = _Images(data.items, embedder.preprocess_fn(), resize)
            small = len(data.items) < SMALL_IMAGE_SET
            self.workers = workers if workers is not None else 0 if small else min(4, os.cpu_count() or 1)

    def __call__(self, batches: list[list[int]]) -> Iterator[tuple[list[int], Any]]:
        if self.text:
            for idx in batches:
                yield idx, [self.data.items[i] for i in idx]
            return
        loader = torch.utils.data.DataLoader(self.images, batch_sampler=batches, num_workers=self.workers,
                                             collate_fn=_collate, pin_memory=self.embedder.runtime.is_cuda)
        for idx, pixels, failed in loader:
            self.failed.update(failed)
            if idx:
                yield idx, pixels

    def in_order(self, rows: np.ndarray, batch_size: int) -> list[list[int]]:
        """Rows in batches for evaluation; texts sorted by length so padding stays small."""
        rows = [int(i) for i in rows]
        if self.text:
            rows.sort(key=lambda i: len(self.data.items[i]))
        return [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]


class ForwardSize:
    """The most items one forward pass takes. On CUDA out-of-memory it halves (and says so); the
    optimiser batch stays the same through gradient accumulation, so training is unchanged."""

    def __init__(self, size: int):
        self.size = size

    def run(self, n: int, fn: Callable[[slice], Any], reset: Callable[[], None] | None = None) -> list[Any]:
        while True:
            try:
                return [fn(slice(s, s + self.size)) for s in range(0, n, self.size)]
            except torch.cuda.OutOfMemoryError:
                if self.size == 1:
                    raise IndexerError("out of GPU memory with one item per forward pass: use a smaller "
                                       "model, fewer unfrozen blocks, or --device cpu") from None
                self.size = max(1, self.size // 2)
                log.warning("CUDA out of memory: lowering the forward batch to %d (gradients accumulate, "
                            "the optimiser batch is unchanged)", self.size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if reset is not None:
                    reset()
