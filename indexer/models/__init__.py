"""Backbones: one Embedder contract, a registry of named models and families."""

from .base import Embedder, Modality, ModelSpec
from .device import Runtime, resolve_runtime
from .registry import DEFAULT_MODELS, list_models, load_embedder, resolve_spec, respec

__all__ = ["Embedder", "Modality", "ModelSpec", "Runtime", "resolve_runtime", "DEFAULT_MODELS", "list_models",
           "load_embedder", "resolve_spec", "respec"]
