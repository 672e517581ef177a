"""Where an ingest's time goes: seconds and items per stage (read, preprocess, embed, write), so a
user sees the bottleneck. Plain Python: the models, the loader and the writer all report into one."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal, TypeVar

Stage = Literal["read", "preprocess", "embed", "write"]
STAGES: tuple[Stage, ...] = ("read", "preprocess", "embed", "write")

T = TypeVar("T")


class Stages:
    """Seconds and item counts per stage. Each stage is timed on one thread (write on the writer's
    own), so adding from several threads needs no lock.

    >>> stages = Stages()
    >>> with stages.time("embed", 32):
    ...     pass
    >>> sorted(stages.to_dict()["embed"])
    ['items_per_s', 'seconds']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.items: dict[str, int] = dict.fromkeys(STAGES, 0)

    def add(self, stage: Stage, seconds: float, items: int = 0) -> None:
        self.seconds[stage] += seconds
        self.items[stage] += items

    @contextmanager
    def time(self, stage: Stage, items: int = 0):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start, items)

    def iterate(self, stage: Stage, items: Iterable[T]) -> Iterator[T]:
        """`items`, timing how long each one takes to produce."""
        it = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.add(stage, time.perf_counter() - start)
                return
            self.add(stage, time.perf_counter() - start, 1)
            yield item

    def bottleneck(self) -> Stage | None:
        """The stage that took longest, or None before anything was timed."""
        stage = max(STAGES, key=self.seconds.__getitem__)
        return stage if self.seconds[stage] > 0 else None

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {s: {"seconds": round(self.seconds[s], 4),
                    "items_per_s": round(self.items[s] / self.seconds[s], 1) if self.seconds[s] else 0.0}
                for s in STAGES}

    def line(self) -> str:
        return ", ".join(f"{s} {self.seconds[s]:.2f}s" for s in STAGES)
