"""Embeddings made elsewhere, ingested as they are: the same contract, no model to run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..spec import ModelSpec
from .base import Embedder
from .device import Runtime


class PrecomputedVectors(Embedder):
    """`embed` stacks (and, per the spec, L2-normalises) vectors a source already carries.

    The spec names the model that made them (so text or image queries still work) or `none`
    (a collection searched by vector and id only)."""

    default_batch_size = 4096

    def __init__(self, spec: ModelSpec, runtime: Runtime):
        self.spec, self.runtime = spec, runtime

    def _prepare(self, items: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(items).astype(np.float32, copy=False))

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs
