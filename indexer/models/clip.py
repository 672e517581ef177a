"""Joint text-image models (CLIP, SigLIP, open_clip): two towers projecting into one space, behind the
same Embedder contract. A batch of strings goes through the text tower, a batch of images (decoded, or
tensors the image tower's preprocessing made) through the image tower; the spec records both.

`layer` is "projection" (the joint space, the default) or a hidden-state number of the tower of the
collection's items (`spec.modality`): those features are that tower's own, so they answer only
queries of the same kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import IndexerError, attempt_import
from ..spec import Modality, ModelSpec
from ..timing import Stages
from .base import Embedder
from .device import Runtime
from .text import pool
from .vision import HFImageTransform

PROJECTION = "projection"


def item_kind(items: Sequence[Any] | torch.Tensor) -> Modality:
    """What a batch holds: strings are text; decoded images and pixel tensors are images."""
    if isinstance(items, torch.Tensor) or not isinstance(items[0], str):
        return "image"
    return "text"


class JointEmbedder(Embedder):
    """Shared by the transformers and open_clip families: a mixed batch (a --queries file of words and
    pictures) is split by kind, each part through its tower."""

    def embed_batch(self, items: Sequence[Any], stages: Stages | None = None) -> np.ndarray:
        if isinstance(items, torch.Tensor) or len(items) == 0:
            return super().embed_batch(items, stages)
        kinds = np.array([item_kind([x]) for x in items])
        if (kinds == kinds[0]).all():
            return super().embed_batch(items, stages)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        for kind in ("text", "image"):
            idx = np.flatnonzero(kinds == kind)
            if len(idx):
                out[idx] = super().embed_batch([items[i] for i in idx], stages)
        return out

    def batch_order(self, items: Sequence[Any]) -> list[int]:
        # Texts by length (less padding), images after them.
        return sorted(range(len(items)), key=lambda i: (0, len(items[i])) if isinstance(items[i], str) else (1, 0))

    def logit_head(self) -> tuple[float, float | None]:
        """(scale, bias) that turn cosine similarities into the model's logits; a bias means a sigmoid
        head (SigLIP), none a softmax over the texts (CLIP)."""
        scale = getattr(self.model, "logit_scale", None)
        bias = getattr(self.model, "logit_bias", None)
        if scale is None:
            raise IndexerError(f"{self.spec.name} has no logit_scale: zero-shot needs a contrastively trained head")
        return float(scale.detach().float().exp()), None if bias is None else float(bias.detach().float())


def _features(out: Any) -> torch.Tensor:
    """get_*_features returns the projected tensor (transformers 4) or an output whose pooler_output it is (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEmbedder(JointEmbedder):
    """Any transformers model with `get_text_features` and `get_image_features` (CLIPModel, SiglipModel,
    ...), preprocessing from its own AutoProcessor."""

    default_batch_size = 32

    def __init__(self, spec: ModelSpec, runtime: Runtime):
        from transformers import AutoModel, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(spec.path)
        except (OSError, ValueError) as exc:
            raise IndexerError(f"{spec.name}: cannot load its processor (tokenizer + image processor): {exc}") from exc
        model = AutoModel.from_pretrained(spec.path)
        if not all(hasattr(model, f) for f in ("get_text_features", "get_image_features")):
            raise IndexerError(f"{spec.name} ({type(model).__name__}) is not a joint text-image model: it has no "
                               "get_text_features/get_image_features (use hf: for a single-tower model)")
        self.tokenizer = getattr(processor, "tokenizer", None)
        self.image_processor = getattr(processor, "image_processor", None)
        if self.tokenizer is None or self.image_processor is None:
            raise IndexerError(f"{spec.name}: its processor lacks a tokenizer or an image processor")
        self.model = runtime.prepare_model(model)
        self.runtime = runtime
        self.truncated = 0
        cfg = model.config
        text_cfg, vision_cfg = cfg.text_config, cfg.vision_config
        # SigLIP was trained on texts padded to the full length (it pools the last token): pad the same way.
        self._padding = "max_length" if cfg.model_type.startswith("siglip") else True
        max_length = int(min(text_cfg.max_position_embeddings, self.tokenizer.model_max_length))
        towers = {
            "text": {"tokenizer": type(self.tokenizer).__name__, "max_length": max_length,
                     "padding": self._padding},
            "image": {"processor": type(self.image_processor).__name__,
                      "size": _image_size(self.image_processor)},
        }
        self.spec = ModelSpec(**{**spec.to_dict(), "max_length": max_length})
        layer = PROJECTION if spec.layer in (None, PROJECTION) else spec.layer
        if layer == PROJECTION:
            if spec.pooling is not None:
                raise IndexerError(f"--pooling applies to a hidden layer (--layer N); {spec.name} projects by itself")
            self.spec = ModelSpec(**{**self.spec.to_dict(), "layer": layer, "pooling": None, "towers": towers,
                                     "preprocessing": towers[spec.modality]})
            dim = self._probe_dim()
        else:
            tower_cfg = text_cfg if spec.modality == "text" else vision_cfg
            layer, pooling = _hidden_layer(spec, tower_cfg.num_hidden_layers)
            dim = tower_cfg.hidden_size
            self.spec = ModelSpec(**{**self.spec.to_dict(), "layer": layer, "pooling": pooling, "towers": {},
                                     "preprocessing": towers[spec.modality]})
        self.spec = ModelSpec(**{**self.spec.to_dict(), "dim": int(dim)})

    def _probe_dim(self) -> int:
        with torch.inference_mode():
            return self._forward(self._prepare(["a"])).shape[-1]

    def preprocess_fn(self) -> Callable:
        return HFImageTransform(self.image_processor)

    def _prepare(self, items: Sequence[Any]) -> tuple[Modality, Any]:
        if item_kind(items) == "text":
            enc = self.tokenizer(list(items), padding=self._padding, truncation=True,
                                 max_length=self.spec.max_length, return_tensors="pt")
            if enc.encodings is not None:
                self.truncated += sum(1 for e in enc.encodings if e.overflowing)
            return "text", {k: self.runtime.to_device(v) for k, v in enc.items()}
        if isinstance(items, torch.Tensor):
            pixels = items
        else:
            fn = self.preprocess_fn()
            pixels = torch.stack([x if isinstance(x, torch.Tensor) else fn(x) for x in items])
        return "image", {"pixel_values": self.runtime.to_device(pixels)}

    def tower_outputs(self, kind: Modality, inputs: dict[str, torch.Tensor], hidden: bool = False) -> Any:
        fn = self.model.get_text_features if kind == "text" else self.model.get_image_features
        return fn(**inputs, output_hidden_states=True) if hidden else fn(**inputs)

    def _forward(self, inputs: tuple[Modality, Any]) -> torch.Tensor:
        kind, tensors = inputs
        if self.spec.layer == PROJECTION:
            return _features(self.tower_outputs(kind, tensors))
        if kind != self.spec.modality:
            raise IndexerError(f"layer {self.spec.layer} of {self.spec.name} is its {self.spec.modality} tower's: "
                               f"it cannot embed {kind}")
        return self.pool_hidden(kind, tensors, self._hidden_states(kind, tensors)[self.spec.layer], self.spec.pooling)

    def _hidden_states(self, kind: Modality, tensors: dict[str, torch.Tensor]) -> Sequence[torch.Tensor]:
        out = self.tower_outputs(kind, tensors, hidden=True)
        states = getattr(out, "hidden_states", None)
        if states is None:
            raise IndexerError(f"{self.spec.name}: its {kind} tower returns no hidden states; use the projection")
        return states

    def pool_hidden(self, kind: Modality, tensors: dict[str, torch.Tensor], hidden: torch.Tensor,
                    pooling: str) -> torch.Tensor:
        if kind == "text":
            return pool(hidden, tensors["attention_mask"], pooling)
        return hidden[:, 0] if pooling == "cls" else hidden.mean(dim=1)

    def hidden_states(self, inputs: tuple[Modality, Any]) -> Sequence[torch.Tensor]:
        """Every hidden state of the tower the inputs go through (for the layer sweep)."""
        return self._hidden_states(*inputs)

    @property
    def num_layers(self) -> int:
        cfg = self.model.config
        return (cfg.text_config if self.spec.modality == "text" else cfg.vision_config).num_hidden_layers


def _hidden_layer(spec: ModelSpec, n_layers: int) -> tuple[int, str]:
    try:
        layer = int(spec.layer)
    except (TypeError, ValueError):
        raise IndexerError(f"--layer {spec.layer!r}: {spec.name} takes `projection` or a hidden-state number "
                           f"0..{n_layers} of its {spec.modality} tower") from None
    if not -(n_layers + 1) <= layer <= n_layers:
        raise IndexerError(f"--layer {layer}: the {spec.modality} tower of {spec.name} has hidden states 0..{n_layers}")
    allowed = ("cls", "mean", "max") if spec.modality == "text" else ("cls", "mean")
    pooling = spec.pooling or "mean"
    if pooling not in allowed:
        raise IndexerError(f"--pooling {pooling}: the {spec.modality} tower's layers pool by {', '.join(allowed)}")
    return layer % (n_layers + 1), pooling


def _image_size(image_processor: Any) -> Any:
    size = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None)
    return dict(size) if size is not None else None


# ---- open_clip ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpenClipTransform:
    """open_clip's evaluation transform for one image (picklable: built again in each worker)."""

    transform: Any

    def __call__(self, image) -> torch.Tensor:
        return self.transform(image)


class OpenClipEmbedder(JointEmbedder):
    """open_clip models (`open_clip:ARCH/PRETRAINED`, or `open_clip:ARCH --weights FILE`): encode_text and
    encode_image, the projection only."""

    default_batch_size = 32

    def __init__(self, spec: ModelSpec, runtime: Runtime):
        open_clip = import_open_clip()
        if spec.layer not in (None, PROJECTION) or spec.pooling is not None:
            raise IndexerError(f"{spec.name}: open_clip models give the projection only (no --layer/--pooling)")
        arch = spec.options["arch"]
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=spec.path)
        self.model = runtime.prepare_model(model.eval())
        self.runtime = runtime
        # Not `tokenizer`: that name promises a transformers tokenizer (passage chunking, token counts).
        self.text_tokenizer = open_clip.get_tokenizer(arch)
        self.transform = OpenClipTransform(transform)
        self.truncated = 0
        context = int(getattr(self.text_tokenizer, "context_length", 77))
        towers = {"text": {"tokenizer": type(self.text_tokenizer).__name__, "max_length": context},
                  "image": {"transform": repr(transform)}}
        self.spec = ModelSpec(**{**spec.to_dict(), "layer": PROJECTION, "pooling": None, "towers": towers,
                                 "max_length": context, "preprocessing": towers[spec.modality]})
        with torch.inference_mode():
            dim = self._forward(self._prepare(["a"])).shape[-1]
        self.spec = ModelSpec(**{**self.spec.to_dict(), "dim": int(dim)})

    def preprocess_fn(self) -> Callable:
        return self.transform

    def _prepare(self, items: Sequence[Any]) -> tuple[Modality, torch.Tensor]:
        if item_kind(items) == "text":
            return "text", self.runtime.to_device(self.text_tokenizer(list(items)))
        if isinstance(items, torch.Tensor):
            pixels = items
        else:
            pixels = torch.stack([x if isinstance(x, torch.Tensor) else self.transform(x) for x in items])
        return "image", self.runtime.to_device(pixels)

    def _forward(self, inputs: tuple[Modality, torch.Tensor]) -> torch.Tensor:
        kind, x = inputs
        return self.model.encode_text(x) if kind == "text" else self.model.encode_image(x)


def import_open_clip():
    return attempt_import("open_clip", "clip")
