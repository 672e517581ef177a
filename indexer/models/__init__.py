"""Backbones: the Embedder contract, the text and vision families, the registry that names them, layer
taps and fine-tuned model directories."""

from ..spec import ModelSpec  # transitional: tasks/finetune.py imports it from here until it is rewired
from .base import Embedder
from .device import Runtime, resolve_runtime
from .registry import DEFAULT_MODELS, list_models, load_embedder, resolve_spec, respec

__all__ = ["Embedder", "ModelSpec", "Runtime", "resolve_runtime", "DEFAULT_MODELS", "list_models",
           "load_embedder", "resolve_spec", "respec"]
