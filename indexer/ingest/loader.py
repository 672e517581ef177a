"""Turning source records into model inputs: images are read, hashed, decoded and transformed in
DataLoader worker processes; text is hashed in the main process (tokenising is the model's job), its
records read by a thread ahead of it when a GPU runs the model (read_ahead)."""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..sources import Record, SkippedInput, SourceOptions, content_hash, iter_records
from ..sources.images import ImageDecodeError, decode_image, plain_jpeg


@dataclass
class Prepared:
    """A record whose content changed (or is new), with its hashes; `tensor` for images, or `jpeg`:
    the bytes of a JPEG left for the model's GPU to decode."""

    record: Record
    content_hash: str
    record_hash: str
    tensor: torch.Tensor | None = None
    jpeg: bytes | None = None


@dataclass
class Unchanged:
    id: str
    source: str


Item = Prepared | Unchanged | SkippedInput
T = TypeVar("T")


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
                 transform: Callable[[Any], torch.Tensor], min_size: int | None, defer_jpegs: bool = False):
        self.paths, self.opts, self.known = paths, opts, known
        self.transform, self.min_size = transform, min_size
        self.defer_jpegs = defer_jpegs  # plain JPEGs pass through undecoded: decode_on_device decodes them

    def __iter__(self) -> Iterator[tuple[Item, float, float]]:
        """(item, seconds reading and hashing it, seconds decoding and transforming it)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for n, record in enumerate(iter_records(self.paths, self.opts)):
            if n % workers == worker:
                start = time.perf_counter()
                item = prepare(record, self.known)
                read = time.perf_counter()
                item = decode(item, self.transform, self.min_size, self.defer_jpegs)
                yield item, read - start, time.perf_counter() - read


def decode(item: Item, transform: Callable[[Any], torch.Tensor], min_size: int | None,
           defer_jpegs: bool = False) -> Item:
    """A Prepared image's bytes -> its model input in `tensor`; an undecodable image becomes a SkippedInput.
    `defer_jpegs`: a plain JPEG's bytes move to `jpeg` undecoded instead, for decode_on_device."""
    if not isinstance(item, Prepared):
        return item
    record = item.record
    if defer_jpegs and plain_jpeg(record.data):
        item.jpeg, record.data = record.data, None
        return item
    data, record.data = record.data, None
    try:
        image = decode_image(data, min_size)
        item.tensor = transform(image)
    except ImageDecodeError as exc:
        return SkippedInput(record.source, str(exc), record.id)
    except Exception as exc:  # noqa: BLE001 - an odd image must not stop the run
        return SkippedInput(record.source, f"cannot preprocess image: {exc}", record.id)
    return item


def decodes_on_device(transform) -> bool:
    """Whether decode_on_device can serve this transform: it runs on decoded image tensors (`from_tensor`),
    so JPEGs can be decoded and transformed where the model runs."""
    return hasattr(transform, "from_tensor")


def decode_on_device(batch: dict[str, Any], transform, min_size: int | None, device: torch.device) -> None:
    """Decode the batch's deferred JPEGs on `device` (nvjpeg on a GPU, the whole batch in one call) and
    transform them there: afterwards batch["pixels"] holds every Prepared item's input, in order, on
    `device`. A JPEG the decoder rejects is decoded by PIL as any other image (and becomes an error
    entry if that fails too)."""
    items = batch["items"]
    deferred = [i for i, item in enumerate(items) if isinstance(item, Prepared) and item.jpeg is not None]
    if not deferred:
        return
    decoded = dict(zip(deferred, _decode_jpegs([items[i].jpeg for i in deferred], device)))
    rows = iter(batch["pixels"] if batch["pixels"] is not None else [])  # decoded by the workers
    pixels = []
    for i, item in enumerate(items):
        if not isinstance(item, Prepared):
            continue
        if i not in decoded:
            pixels.append(next(rows).to(device, non_blocking=True))
        elif decoded[i] is not None:
            item.jpeg = None
            pixels.append(transform.from_tensor(decoded[i]))
        else:
            item.record.data, item.jpeg = item.jpeg, None
            items[i] = decode(item, transform, min_size)
            if isinstance(items[i], Prepared):
                pixels.append(items[i].tensor.to(device))
                items[i].tensor = None
    batch["pixels"] = torch.stack(pixels) if pixels else None


def _decode_jpegs(data: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """(3, h, w) uint8 RGB images on `device`; None for one the decoder cannot read."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass  # one bad file fails the whole call: find it, one at a time
        out = []
        for one in encoded:
            try:
                out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


ITEMS_AHEAD = 1024  # images a worker keeps ready: a batch of 224 px pixels is 0.6 MB an image in host memory


def loader_workers(cpus: int, cuda: bool, batch_size: int) -> tuple[int, int]:
    """(decoding processes, batches each keeps ready). On a CPU the model needs the cores too: up to 4
    workers. A GPU needs one core to feed it, so every other core decodes, each a few batches ahead so
    that a slow file never leaves the GPU waiting (2 to 6 batches: fewer of the large ones a GPU takes)."""
    if cuda:
        return max(1, min(cpus - 1, 32)), max(2, min(6, ITEMS_AHEAD // batch_size))
    return max(1, min(4, cpus)), 4


def _collate(loaded: list[tuple[Item, float, float]]) -> dict[str, Any]:
    items = [item for item, _, _ in loaded]
    prepared = [i for i in items if isinstance(i, Prepared) and i.jpeg is None]
    pixels = torch.stack([p.tensor for p in prepared]) if prepared else None
    for p in prepared:
        p.tensor = None  # the stacked batch carries the pixels; don't pickle them twice
    return {"pixels": pixels, "items": items,
            "read_s": sum(r for _, r, _ in loaded), "decode_s": sum(d for _, _, d in loaded)}


def image_batches(dataset: ImageInputs, batch_size: int, workers: int, pin_memory: bool,
                  prefetch: int = 4) -> DataLoader:
    """Batches of {"pixels": (n, 3, h, w) for the Prepared items in order (but deferred JPEGs: see
    decode_on_device), "items": [...], "read_s"/"decode_s": the seconds a worker spent reading/decoding them}."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                      pin_memory=pin_memory, prefetch_factor=prefetch if workers else None,
                      persistent_workers=False,
                      # lance and lancedb run native threads that fork() cannot safely copy
                      multiprocessing_context="forkserver" if workers else None)


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def read_ahead(items: Iterable[T], ahead: int, chunk: int = 256) -> Iterator[T]:
    """`items`, produced by a thread up to about `ahead` items before the consumer takes them (in chunks
    of `chunk`: one queue operation per item would cost more than parsing a short JSON row). An
    exception of the producer is raised here after the items before it. Closing this generator stops
    the thread and closes `items` there, the only thread that ever touches it (once a read under way
    returns: a thread blocked on stdin is not waited for)."""
    chunks: queue.Queue = queue.Queue(max(1, ahead // chunk))
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                chunks.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source, pending = iter(items), []
        try:
            for item in source:
                pending.append(item)
                if len(pending) == chunk:
                    if not put(pending):
                        return
                    pending = []
            put(pending)
            put(None)
        except BaseException as exc:  # noqa: BLE001 -- handed to the consumer, which raises it
            put(pending)
            put(_Raised(exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while (got := chunks.get()) is not None:
            if isinstance(got, _Raised):
                raise got.exc
            yield from got
    finally:
        stop.set()
        thread.join(timeout=1.0)
