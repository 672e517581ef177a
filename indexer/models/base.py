"""The one contract every backbone implements: a batch of items in, an (n, d) float32 array out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..spec import Modality, ModelSpec
from ..timing import Stages
from .device import Runtime


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
        `stages` is told how long collating/tokenising (preprocess) and the model (embed) took."""
        if len(items) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        stages = stages or Stages()
        with torch.inference_mode(), self.runtime.autocast():
            with stages.time("preprocess", len(items)):
                inputs = self._prepare(items)
            with stages.time("embed", len(items)):
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
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.embed_batch([items[i] for i in idx], stages)
        return out
