"""The one contract every backbone implements: a batch of items in, an (n, d) float32 array out."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..spec import Modality, ModelSpec
from ..timing import Stages
from .batching import Backoff, gpu_batch_size
from .device import Runtime

PREPARE_AHEAD = 2  # batches tokenised ahead of the GPU: one ready, one in the making


class Embedder(ABC):
    """Turns a batch of items into an (n, d) float32 array.

    Subclasses implement `_forward` on a prepared batch; batching, normalisation, device moves and
    precision live here once.

    >>> emb = load_embedder("minilm")                     # doctest: +SKIP
    >>> emb.embed(["a cat", "a dog"]).shape               # doctest: +SKIP
    (2, 384)
    """

    spec: ModelSpec
    runtime: Runtime
    default_batch_size: int = 32
    backends: tuple[str, ...] = ("torch",)  # the runtimes/ backends this family can run on
    prepare_in_thread: bool = False  # True: on a GPU, batches are prepared in a thread ahead of the model

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def modality(self) -> Modality:
        return self.spec.modality

    @property
    def needs_calibration(self) -> bool:
        """Whether `calibrate` must run before embedding: a static int8 model (CNNs on onnx/openvino)."""
        return False

    def calibrate(self, pixels: torch.Tensor | None, key: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} is not statically quantised")

    def preprocess_fn(self) -> Callable[[Any], Any] | None:
        """A picklable per-item transform run in data-loading workers (images), or None."""
        return None

    @abstractmethod
    def _prepare(self, items: Sequence[Any]) -> Any:
        """Collate raw or preprocessed items into model inputs on the runtime's device."""

    @abstractmethod
    def _forward(self, inputs: Any) -> torch.Tensor:
        """Model inputs -> (n, d) features (before normalisation)."""

    def embed_batch(self, items: Sequence[Any], stages: Stages | None = None) -> np.ndarray:
        """One forward pass over `items` (already a sensible batch). Returns (n, d) float32.
        `stages` is told how long collating/tokenising (preprocess) and the model (embed) took.
        A batch the GPU has no memory for is embedded in halves (batching.Backoff)."""
        if len(items) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        backoff = self.__dict__.setdefault("_backoff", Backoff())  # one per embedder: the halved size sticks
        return backoff.run(lambda piece: self._embed_pass(piece, stages), items)

    def probe_items(self, n: int) -> Sequence[Any] | None:
        """`n` of the largest inputs the model takes, to size GPU batches with; None: not sized."""
        return None

    def batch_size(self) -> int:
        """The batch size when none is given: on CUDA the one free memory holds, else the default."""
        probe = self.probe_items(self.default_batch_size) if self.runtime.is_cuda else None
        if probe is None:
            return self.default_batch_size
        return gpu_batch_size(lambda b: self._embed_pass(b, None), probe, self.runtime.device,
                              self.default_batch_size)

    def _embed_pass(self, items: Sequence[Any], stages: Stages | None) -> np.ndarray:
        stages = stages or Stages()
        with torch.inference_mode(), self.runtime.autocast(), stages.time("preprocess", len(items)):
            inputs = self._prepare(items)
        return self._run_model(inputs, len(items), stages)

    def _run_model(self, inputs: Any, n: int, stages: Stages) -> np.ndarray:
        with torch.inference_mode(), self.runtime.autocast(), stages.time("embed", n):
            feats = self._forward(inputs).float()
            if self.spec.normalize:
                feats = F.normalize(feats, dim=-1)
            return feats.cpu().numpy()

    def forward_features(self, items: Sequence[Any]) -> torch.Tensor:
        """(n, d) features before normalisation, with autograd on: the path fine-tuning trains through,
        the same preprocessing and pooling as `embed_batch`."""
        return self._forward(self._prepare(items))

    def batch_order(self, items: Sequence[Any]) -> list[int]:
        """The order to process items in; text sorts by length so padding is minimal."""
        return list(range(len(items)))

    def embed(self, items: Sequence[Any], batch_size: int | None = None, stages: Stages | None = None) -> np.ndarray:
        """Embed any number of items in batches; output rows follow the input order."""
        batch_size = batch_size or self.default_batch_size
        order = self.batch_order(items)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        ahead = self._ahead()
        if ahead and len(batches) > 1:
            self._embed_overlapped(items, batches, ahead, out, stages or Stages())
            return out
        for idx in batches:
            out[idx] = self.embed_batch([items[i] for i in idx], stages)
        return out

    def _ahead(self) -> int:
        """Batches to prepare in a thread while the model runs: on a GPU, for a family whose preparing is
        heavy CPU work (tokenising), so the GPU does not wait for it; 0 elsewhere."""
        return PREPARE_AHEAD if self.prepare_in_thread and self.runtime.is_cuda else 0

    def _embed_overlapped(self, items: Sequence[Any], batches: list[list[int]], ahead: int, out: np.ndarray,
                          stages: Stages) -> None:
        """`embed` with each batch prepared (tokenised, copied to the device) by one thread, `ahead`
        batches before the model runs it; its seconds count as preprocess (overlapping embed's)."""
        def prepare(idx: list[int]) -> tuple[Any, float]:
            start = time.perf_counter()
            with torch.inference_mode():
                inputs = self._prepare([items[i] for i in idx])
            return inputs, time.perf_counter() - start

        with ThreadPoolExecutor(1, thread_name_prefix="prepare") as pool:
            pending = deque(pool.submit(prepare, idx) for idx in batches[:ahead])
            for n, idx in enumerate(batches):
                if n + ahead < len(batches):
                    pending.append(pool.submit(prepare, batches[n + ahead]))
                inputs, seconds = pending.popleft().result()
                stages.add("preprocess", seconds, len(idx))
                try:
                    out[idx] = self._run_model(inputs, len(idx), stages)
                except torch.cuda.OutOfMemoryError:
                    del inputs
                    out[idx] = self.embed_batch([items[i] for i in idx], stages)  # prepared again, in halves
