"""Backbones: the Embedder contract, the text and vision families, the registry that names them, layer
taps and fine-tuned model directories."""

from .base import Embedder
from .device import BACKENDS, Runtime, query_runtime, resolve_runtime
from .registry import DEFAULT_MODELS, is_joint, list_models, load_embedder, resolve_spec, respec

__all__ = ["BACKENDS", "Embedder", "Runtime", "query_runtime", "resolve_runtime", "DEFAULT_MODELS", "is_joint",
           "list_models",
           "load_embedder", "resolve_spec", "respec"]
