"""How many items a forward pass takes on a GPU: sized from its free memory, halved when it runs out.

A batch that does not fit raises torch.cuda.OutOfMemoryError; the same items are then embedded again
in halves (and the smaller size kept for the rest of the run), so no item is lost or embedded twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.6  # of the free memory a batch's activations may take: the allocator fragments, others share the GPU
MAX_BATCH = 1024  # past this a GPU is saturated; larger batches only delay the writer


def batch_size_from_memory(free_bytes: int, bytes_per_item: float, default: int, cap: int = MAX_BATCH) -> int:
    """The largest power of two (1 to `cap`) whose batch fits MEMORY_SHARE of `free_bytes`; `default`
    when nothing was measured.

    >>> batch_size_from_memory(8 * 2**30, 20 * 2**20, 64)  # 0.6 * 8 GiB / 20 MiB = 245 items
    128
    """
    if bytes_per_item <= 0:
        return min(default, cap)
    fits = int(free_bytes * MEMORY_SHARE / bytes_per_item)
    return max(1, min(cap, 1 << (fits.bit_length() - 1) if fits >= 1 else 1))


def gpu_batch_size(embed: Callable[[Sequence[Any]], np.ndarray], probe: Sequence[Any], device: torch.device,
                   default: int) -> int:
    """Measure one forward pass of `probe` (a batch of the largest inputs the model takes) on `device`
    and size batches from the memory it took per item and the memory free now."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    embed(probe)
    per_item = (torch.cuda.max_memory_allocated(device) - before) / max(len(probe), 1)
    free, _total = torch.cuda.mem_get_info(device)
    size = batch_size_from_memory(free, per_item, default)
    log.info("batch size %d from free GPU memory (%.1f GiB free, %.1f MiB per item)", size, free / 2**30,
             per_item / 2**20)
    return size


class Backoff:
    """Runs a batch function over items in pieces of at most `size`; a piece that runs out of GPU
    memory is retried in halves, and `size` stays halved for the next calls."""

    def __init__(self, size: int | None = None):
        self.size = size  # None: no limit until the first out-of-memory error

    def run(self, fn: Callable[[Sequence[Any]], np.ndarray], items: Sequence[Any]) -> np.ndarray:
        """fn(items) as one (n, d) array, in input order, each item embedded once."""
        out, start = [], 0
        while start < len(items):
            size = self.size or len(items)
            piece = items[start : start + size]
            try:
                out.append(fn(piece))
            except torch.cuda.OutOfMemoryError:
                if len(piece) == 1:
                    raise  # one item does not fit: nothing smaller to try
                self.size = len(piece) // 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # give the failed batch's blocks back before the retry
                log.warning("out of GPU memory at a batch of %d: retrying in batches of %d", len(piece), self.size)
                continue
            start += len(piece)
        return out[0] if len(out) == 1 else np.concatenate(out)
