"""Features of many layers from one forward pass per batch, for choosing the layer to index with.

A layer key is what `ingest --layer/--pooling` takes: text and vision transformers `(hidden-state
number, pooling)`, CNNs `(module name, "avg")` with "penultimate" for the classifier's input.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IndexerError
from .base import Embedder
from .text import pool

LayerKey = tuple[int | str, str]


def available_layers(embedder: Embedder, poolings: Sequence[str] | None = None) -> list[LayerKey]:
    """Every layer the sweep can read, in depth order (shallow first)."""
    from .clip import PROJECTION, ClipEmbedder
    from .text import TextEmbedder
    from .vision import CNNEmbedder, HFVisionEmbedder

    if isinstance(embedder, CNNEmbedder):
        return [(name, "avg") for name in cnn_stages(embedder)] + [("penultimate", "avg")]
    if isinstance(embedder, ClipEmbedder):
        # The tower of the items' modality, layer by layer, then the joint projection it ends in.
        allowed = ("cls", "mean", "max") if embedder.modality == "text" else ("cls", "mean")
        poolings = tuple(poolings or allowed)
        bad = [p for p in poolings if p not in allowed]
        if bad:
            raise IndexerError(f"--pooling {bad[0]}: the {embedder.modality} tower's layers pool by {', '.join(allowed)}")
        return [(i, p) for i in range(embedder.num_layers + 1) for p in poolings] + [(PROJECTION, PROJECTION)]
    if not isinstance(embedder, (TextEmbedder, HFVisionEmbedder)):
        raise IndexerError(f"{embedder.spec.name}: no per-layer features for this kind of model")
    text = isinstance(embedder, TextEmbedder)
    allowed = ("cls", "mean", "max") if text else ("cls", "mean")
    poolings = tuple(poolings or allowed)
    bad = [p for p in poolings if p not in (*allowed, "pooler")]
    if bad:
        raise IndexerError(f"--pooling {bad[0]}: choose from {', '.join((*allowed, 'pooler'))}")
    has_pooler = getattr(embedder.model, "pooler", None) is not None
    if "pooler" in poolings and not has_pooler:
        raise IndexerError(f"--pooling pooler: {embedder.spec.name} has no pooler")
    n = getattr(embedder.model.config, "vision_config", embedder.model.config).num_hidden_layers
    keys: list[LayerKey] = [(i, p) for i in range(n + 1) for p in poolings if p != "pooler"]
    if "pooler" in poolings:
        keys.append((n, "pooler"))  # the pooler reads the last layer only
    return keys


def parse_layers(text: str | None, embedder: Embedder, poolings: Sequence[str] | None = None) -> list[LayerKey]:
    """`all` (default) or a comma list: hidden-state numbers (negative from the top) or module names."""
    keys = available_layers(embedder, poolings)
    if text in (None, "", "all"):
        return keys
    from .clip import PROJECTION, ClipEmbedder
    from .text import TextEmbedder
    from .vision import HFVisionEmbedder

    wanted = [w.strip() for w in text.split(",") if w.strip()]
    if isinstance(embedder, (TextEmbedder, HFVisionEmbedder, ClipEmbedder)):
        n = max(k[0] for k in keys if isinstance(k[0], int))
        out = []
        for w in wanted:
            if w == PROJECTION and isinstance(embedder, ClipEmbedder):
                out.append((PROJECTION, PROJECTION))
                continue
            try:
                layer = int(w)
            except ValueError:
                raise IndexerError(f"--layers {w!r}: give hidden-state numbers 0..{n} (or negative from the top)") from None
            if not -(n + 1) <= layer <= n:
                raise IndexerError(f"--layers {layer}: {embedder.spec.name} has hidden states 0..{n}")
            out += [k for k in keys if k[0] == layer % (n + 1)]
        if not out:
            raise IndexerError(f"--layers {text} with --pooling pooler: the pooler reads layer {n} only")
        return out
    modules = dict(embedder.model.named_modules())
    for w in wanted:
        if w != "penultimate" and w not in modules:
            stages = ", ".join(k[0] for k in keys)
            raise IndexerError(f"--layers {w!r} is not a module of {embedder.spec.name}; stages: {stages}")
    return [(w, "avg") for w in wanted]


def embed_layers(embedder: Embedder, items: Sequence[Any], keys: Sequence[LayerKey], batch_size: int | None = None,
                 progress: bool = False) -> dict[LayerKey, np.ndarray]:
    """{layer key: (n, d) L2-normalised float32}, every key from the same forward pass per batch."""
    from tqdm import tqdm

    batch_size = batch_size or embedder.default_batch_size
    order = embedder.batch_order(items)
    out: dict[LayerKey, np.ndarray] = {}
    forward = _layer_forward(embedder, keys)
    starts = range(0, len(order), batch_size)
    with forward as run:
        for start in tqdm(starts, desc="layers", unit="batch", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            with torch.inference_mode(), embedder.runtime.autocast():
                feats = run(embedder._prepare([items[i] for i in idx]))
            for key, f in feats.items():
                if key not in out:
                    out[key] = np.empty((len(items), f.shape[-1]), dtype=np.float32)
                out[key][idx] = F.normalize(f.float(), dim=-1).cpu().numpy()
    return out


def _layer_forward(embedder: Embedder, keys: Sequence[LayerKey]):
    from .clip import ClipEmbedder
    from .text import TextEmbedder
    from .vision import CNNEmbedder

    if isinstance(embedder, CNNEmbedder):
        return _cnn_taps(embedder, [k[0] for k in keys])
    if isinstance(embedder, ClipEmbedder):
        return _clip_taps(embedder, keys)
    return _transformer_taps(embedder, keys, text=isinstance(embedder, TextEmbedder))


@contextmanager
def _transformer_taps(embedder: Embedder, keys: Sequence[LayerKey], text: bool) -> Iterator:
    def run(inputs) -> dict[LayerKey, torch.Tensor]:
        out = embedder.model(**inputs, output_hidden_states=True) if text else \
            embedder.model(pixel_values=inputs, output_hidden_states=True)
        feats = {}
        for layer, pooling in keys:
            if pooling == "pooler":
                feats[(layer, pooling)] = out.pooler_output
                continue
            # The last layer as ingest reads it: ViTs apply a final LayerNorm that hidden_states lacks.
            last = layer == len(out.hidden_states) - 1
            hidden = out.last_hidden_state if last else out.hidden_states[layer]
            if text:
                feats[(layer, pooling)] = pool(hidden, inputs["attention_mask"], pooling)
            elif pooling == "cls":
                feats[(layer, pooling)] = hidden[:, 0]
            else:
                feats[(layer, pooling)] = hidden[:, embedder._prefix :].mean(dim=1)
        return feats

    yield run


@contextmanager
def _clip_taps(embedder, keys: Sequence[LayerKey]) -> Iterator:
    """One pass through the items' tower: its hidden states pooled, and its projection."""
    from .clip import PROJECTION, _features

    def run(inputs) -> dict[LayerKey, torch.Tensor]:
        kind, tensors = inputs
        out = embedder.tower_outputs(kind, tensors, hidden=True)
        return {(layer, pooling): _features(out) if layer == PROJECTION
                else embedder.pool_hidden(kind, tensors, out.hidden_states[layer], pooling)
                for layer, pooling in keys}

    yield run


@contextmanager
def _cnn_taps(embedder, names: Sequence[str]) -> Iterator:
    """Forward hooks on the requested modules for the duration of the sweep; the penultimate feature is
    the model's own output (the embedder replaced the classifier with Identity)."""
    from .vision import _global_pool

    if embedder._hooked:
        raise IndexerError("the layer sweep needs the embedder built for the penultimate layer")
    captured: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(embedder.model.named_modules())
    for name in names:
        if name != "penultimate":
            handles.append(modules[name].register_forward_hook(
                lambda _m, _i, output, name=name: captured.__setitem__(name, _global_pool(output))))

    def run(inputs: torch.Tensor) -> dict[LayerKey, torch.Tensor]:
        captured.clear()
        final = _global_pool(embedder.model(inputs))
        return {(n, "avg"): final if n == "penultimate" else captured[n] for n in names}

    try:
        yield run
    finally:
        for h in handles:
            h.remove()


def cnn_stages(embedder) -> list[str]:
    """The module names that end a CNN's stages, shallow first: of the blocks `finetune` counts
    (ResNet layer1..4, EfficientNet-Lite's MBConv blocks and conv head, torchvision `features[i]`), those
    after which the feature map changes shape, found by one probe forward pass."""
    from .blocks import backbone_blocks

    try:
        blocks = backbone_blocks(embedder.model)
    except IndexerError:
        raise IndexerError(f"{embedder.spec.name}: cannot find the stages of this CNN; name modules with "
                           "--layers") from None
    names = [list(b.modules)[-1] for b in blocks]  # a block's output is its last module's
    modules = dict(embedder.model.named_modules())
    shapes: dict[str, tuple] = {}
    handles = [modules[n].register_forward_hook(
        lambda _m, _i, output, n=n: shapes.__setitem__(
            n, tuple((output[0] if isinstance(output, (tuple, list)) else output).shape[1:])))
        for n in names]
    crop = embedder.transform.crop
    try:
        with torch.inference_mode():
            embedder.model(torch.zeros(1, 3, crop, crop, device=embedder.runtime.device))
    finally:
        for h in handles:
            h.remove()
    order = [n for n in names if n in shapes]
    return [n for i, n in enumerate(order) if i == len(order) - 1 or shapes[order[i + 1]] != shapes[n]]
