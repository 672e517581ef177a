"""Turning source records into model inputs: images are read, hashed, decoded and transformed in
DataLoader worker processes; text is hashed in the main process (tokenising is the model's job)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..sources import Record, SkippedInput, SourceOptions, content_hash, iter_records
from ..sources.images import ImageDecodeError, decode_image


@dataclass
class Prepared:
    """A record whose content changed (or is new), with its hashes; `tensor` for images."""

    record: Record
    content_hash: str
    record_hash: str
    tensor: torch.Tensor | None = None


@dataclass
class Unchanged:
    id: str
    source: str


Item = Prepared | Unchanged | SkippedInput


def prepare(record: Record | SkippedInput, known: dict[str, str]) -> Item:
    """Hash a record and decide whether it needs embedding (reads image files)."""
    if isinstance(record, SkippedInput):
        return record
    try:
        data = record.payload_bytes()
    except OSError as exc:
        return SkippedInput(record.source, f"cannot read file: {exc.strerror or exc}", record.id)
    chash = content_hash(data)
    rhash = record.record_hash(chash)
    if known.get(record.id) == rhash:
        return Unchanged(record.id, record.source)
    if record.text is None:
        record.data = data  # decoded by the caller; saves a second read
    return Prepared(record, chash, rhash)


class ImageInputs(IterableDataset):
    """Each worker walks the same sources and takes every n-th record, so nothing is listed up front."""

    def __init__(self, paths: list[str], opts: SourceOptions, known: dict[str, str],
                 transform: Callable[[Any], torch.Tensor], min_size: int | None):
        self.paths, self.opts, self.known = paths, opts, known
        self.transform, self.min_size = transform, min_size

    def __iter__(self) -> Iterator[tuple[Item, float, float]]:
        """(item, seconds reading and hashing it, seconds decoding and transforming it)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for n, record in enumerate(iter_records(self.paths, self.opts)):
            if n % workers == worker:
                start = time.perf_counter()
                item = prepare(record, self.known)
                read = time.perf_counter()
                item = decode(item, self.transform, self.min_size)
                yield item, read - start, time.perf_counter() - read


def decode(item: Item, transform: Callable[[Any], torch.Tensor], min_size: int | None) -> Item:
    """A Prepared image's bytes -> its model input in `tensor`; an undecodable image becomes a SkippedInput."""
    if not isinstance(item, Prepared):
        return item
    record = item.record
    data, record.data = record.data, None
    try:
        image = decode_image(data, min_size)
        item.tensor = transform(image)
    except ImageDecodeError as exc:
        return SkippedInput(record.source, str(exc), record.id)
    except Exception as exc:  # noqa: BLE001 - an odd image must not stop the run
        return SkippedInput(record.source, f"cannot preprocess image: {exc}", record.id)
    return item


def _collate(loaded: list[tuple[Item, float, float]]) -> dict[str, Any]:
    items = [item for item, _, _ in loaded]
    prepared = [i for i in items if isinstance(i, Prepared)]
    pixels = torch.stack([p.tensor for p in prepared]) if prepared else None
    for p in prepared:
        p.tensor = None  # the stacked batch carries the pixels; don't pickle them twice
    return {"pixels": pixels, "items": items,
            "read_s": sum(r for _, r, _ in loaded), "decode_s": sum(d for _, _, d in loaded)}


def image_batches(dataset: ImageInputs, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """Batches of {"pixels": (n, 3, h, w) for the Prepared items in order, "items": [...],
    "read_s"/"decode_s": the seconds a worker spent reading/decoding them}."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                      pin_memory=pin_memory, prefetch_factor=4 if workers else None,
                      persistent_workers=False,
                      # lance and lancedb run native threads that fork() cannot safely copy
                      multiprocessing_context="forkserver" if workers else None)
