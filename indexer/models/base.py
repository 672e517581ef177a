"""The one contract every backbone implements, and the spec that identifies a model's vectors."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .device import Runtime

Modality = Literal["text", "image"]
Pooling = Literal["cls", "pooler", "mean", "max"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to reproduce a model's vectors; stored in the collection's manifest.

    `identity()` is the part that must match for two vectors to be comparable: a query embedded with
    another model, layer or pooling is refused rather than silently wrong.
    """

    name: str
    modality: Modality
    dim: int
    path: str | None = None
    weights_sha256: str | None = None
    layer: int | str | None = None
    pooling: str | None = None
    normalize: bool = True
    max_length: int | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # what the loader needs: weights file, base name

    def identity(self) -> dict[str, Any]:
        return {
            "model": self.weights_sha256 or self.name,
            "modality": self.modality,
            "dim": self.dim,
            "layer": self.layer,
            "pooling": self.pooling,
            "normalize": self.normalize,
        }

    def describe(self) -> str:
        parts = [self.name, self.modality, f"dim={self.dim}"]
        if self.layer is not None:
            parts.append(f"layer={self.layer}")
        if self.pooling:
            parts.append(f"pooling={self.pooling}")
        parts.append("normalized" if self.normalize else "raw")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def sha256_files(paths: Sequence[Path]) -> str:
    """One digest over the weight files, in a stable order, read in chunks (weights can be GBs)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


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

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def modality(self) -> Modality:
        return self.spec.modality

    def preprocess_fn(self) -> Callable[[Any], Any] | None:
        """A picklable per-item transform run in data-loading workers (images), or None."""
        return None

    @abstractmethod
    def _prepare(self, items: Sequence[Any]) -> Any:
        """Collate raw or preprocessed items into model inputs on the runtime's device."""

    @abstractmethod
    def _forward(self, inputs: Any) -> torch.Tensor:
        """Model inputs -> (n, d) features (before normalisation)."""

    def embed_batch(self, items: Sequence[Any]) -> np.ndarray:
        """One forward pass over `items` (already a sensible batch). Returns (n, d) float32."""
        if len(items) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode(), self.runtime.autocast():
            feats = self._forward(self._prepare(items))
        feats = feats.float()
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

    def embed(self, items: Sequence[Any], batch_size: int | None = None) -> np.ndarray:
        """Embed any number of items in batches; output rows follow the input order."""
        batch_size = batch_size or self.default_batch_size
        order = self.batch_order(items)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.embed_batch([items[i] for i in idx])
        return out
