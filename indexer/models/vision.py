"""Image encoders: CNNs (penultimate layer or any named module, globally average-pooled) and HF
vision transformers (CLS or mean of patch tokens)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..errors import IndexerError
from ..spec import ModelSpec
from .base import Embedder
from .device import Runtime
from .runtimes import Calibration, compile_module
from .text import pool


@dataclass(frozen=True)
class ImageTransform:
    """Resize the short side, centre-crop, normalise: the classic ImageNet evaluation transform.
    A plain dataclass so it pickles into DataLoader workers."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __call__(self, image) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF

        return self.from_tensor(TF.pil_to_tensor(image))

    def from_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """The same on a decoded (3, h, w) uint8 image, on whatever device it is (a GPU decodes JPEGs)."""
        import torchvision.transforms.v2.functional as TF
        from torchvision.transforms import InterpolationMode

        x = _resize_short_side(x, self.resize, self.crop, InterpolationMode(self.interpolation))
        x = TF.center_crop(x, [self.crop])
        x = TF.to_dtype(x, torch.float32, scale=True)
        return TF.normalize(x, list(self.mean), list(self.std))

    def to_dict(self) -> dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}


def _resize_short_side(x: torch.Tensor, resize: int, crop: int, interpolation) -> torch.Tensor:
    """Resize a (c, h, w) image so its short side is `resize` (torchvision's rule for the long side).

    An extreme aspect ratio (a 100000x2 strip) would be resized to millions of pixels on its long side
    (GBs) only for the centre crop to throw them away: such an image is first cut to the centre the crop
    keeps, plus a margin for the resampling kernel, and resized at the same scale. Shapes up to 64:1 are
    resized whole, so their vectors do not change."""
    import torchvision.transforms.v2.functional as TF

    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    out_long = int(resize * long / short)
    if out_long <= 64 * resize:
        return TF.resize(x, [resize], interpolation=interpolation, antialias=True)
    scale = out_long / long
    keep = min(long, math.ceil(crop / scale) + 2 * (math.ceil(2 / scale) + 2))
    start = (long - keep) // 2
    size = round(keep * scale)
    if w > h:
        return TF.resize(x[..., start : start + keep], [resize, size], interpolation=interpolation, antialias=True)
    return TF.resize(x[..., start : start + keep, :], [size, resize], interpolation=interpolation, antialias=True)


@dataclass(frozen=True)
class HFImageTransform:
    """A transformers image processor applied to one image (picklable)."""

    processor: Any

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class _StopForward(Exception):
    """Raised by a hook once the requested layer has run: nothing above it is computed."""


def _last_linear(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the classifier: the last nn.Linear registered in the model."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = name
    if found is None:
        raise IndexerError("cannot find the classifier (an nn.Linear) for the penultimate layer: pass --layer")
    parent_name, _, attr = found.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, attr


def _global_pool(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() == 4:  # (n, c, h, w)
        return out.mean(dim=(2, 3))
    if out.dim() == 3:  # (n, tokens, d)
        return out.mean(dim=1)
    return out.flatten(1)


class PooledCNN(nn.Module):
    """A CNN whose classifier is removed and its output pooled: pixels -> (n, d) features. What the
    other backends export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return _global_pool(self.model(pixels))


class CNNEmbedder(Embedder):
    """Penultimate features (the pooled input of the classifier) or a named module's output,
    global-average-pooled. `model` is any nn.Module taking (n, 3, h, w)."""

    default_batch_size = 64
    backends = ("torch", "onnx", "openvino")  # penultimate features (a hooked layer runs in torch only)
    CALIBRATION_BATCH = 16

    def __init__(self, spec: ModelSpec, runtime: Runtime, model: nn.Module, transform: ImageTransform):
        self._captured: torch.Tensor | None = None
        self.exported = None  # the features graph another backend runs, set once the spec is known
        if spec.layer in (None, "penultimate"):
            parent, attr = _last_linear(model)
            setattr(parent, attr, nn.Identity())  # the model now returns the classifier's input
            layer = "penultimate"
        else:
            modules = dict(model.named_modules())
            if spec.layer not in modules or spec.layer == "":
                top = [n for n, _ in model.named_children()]
                raise IndexerError(f"--layer {spec.layer!r} is not a module of {spec.name}; "
                                   f"top-level modules: {', '.join(top)} (nested names use dots, e.g. layer3.1)")
            modules[spec.layer].register_forward_hook(self._capture)
            layer = spec.layer
        self.model = runtime.prepare_model(model, convolutional=True)
        self.runtime = runtime
        self.transform = transform
        self._hooked = layer != "penultimate"
        probe = torch.zeros(1, 3, transform.crop, transform.crop, device=runtime.device)
        with torch.inference_mode():
            dim = self._torch_features(probe).shape[-1]
        self.spec = ModelSpec(**{**spec.to_dict(), "layer": layer, "pooling": "avg", "dim": int(dim),
                                 "preprocessing": transform.to_dict()})
        if runtime.backend != "torch":
            if self._hooked:
                raise IndexerError(f"--backend {runtime.backend} runs a CNN's penultimate features; "
                                   f"--layer {layer} needs --backend torch")
            if runtime.precision != "int8":
                self._compile(None)
            elif spec.calibration:  # the static int8 model calibrated before, from the export cache
                self._compile(Calibration.keyed(spec.calibration))
            # else: int8 waits for `calibrate` (dynamic quantisation suits Linear layers, not convolutions)

    @property
    def needs_calibration(self) -> bool:
        return self.runtime.backend != "torch" and self.runtime.precision == "int8" and self.exported is None

    def calibrate(self, pixels: torch.Tensor | None, key: str) -> None:
        """Static int8 from `pixels` (preprocessed images, a sample of the user's own inputs) under
        `key`; `pixels=None`: the int8 model made from the sample `key` before, if still cached."""
        self.spec = replace(self.spec, calibration=key)
        batches = None if pixels is None else [{"pixels": pixels[i : i + self.CALIBRATION_BATCH]}
                                               for i in range(0, len(pixels), self.CALIBRATION_BATCH)]
        self._compile(Calibration.keyed(key, batches))

    def _compile(self, calibration: Calibration | None) -> None:
        example = torch.zeros(2, 3, self.transform.crop, self.transform.crop)
        self.exported = compile_module(PooledCNN(self.model), {"pixels": example}, {"pixels": (0,)}, self.spec,
                                       self.runtime, calibration)

    def _capture(self, _module, _inputs, output):
        self._captured = _global_pool(output)
        raise _StopForward

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.exported is not None:
            return self.exported({"pixels": x})
        if self.runtime.backend != "torch":  # never torch fp32 vectors in place of int8 ones
            raise IndexerError("a static int8 CNN embeds only once calibrated on a sample of its inputs (ingest)")
        return self._torch_features(x)

    def _torch_features(self, x: torch.Tensor) -> torch.Tensor:
        if not self._hooked:
            return _global_pool(self.model(x))
        try:
            self.model(x)
        except _StopForward:
            pass
        out, self._captured = self._captured, None
        return out

    def preprocess_fn(self) -> Callable:
        return self.transform

    def probe_items(self, n: int) -> torch.Tensor:
        return torch.zeros(n, 3, self.transform.crop, self.transform.crop)

    def _prepare(self, items: Sequence[Any]) -> torch.Tensor:
        if isinstance(items, torch.Tensor):
            batch = items
        else:
            batch = torch.stack([x if isinstance(x, torch.Tensor) else self.transform(x) for x in items])
        batch = self.runtime.to_device(batch)
        if self.runtime.is_cuda:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._features(inputs)


class HFVisionEmbedder(Embedder):
    """ViT, DINOv2 and other transformers image encoders: `cls`, `mean` (of patch tokens), `pooler`."""

    default_batch_size = 32

    def __init__(self, spec: ModelSpec, runtime: Runtime):
        from transformers import AutoImageProcessor, AutoModel

        self.processor = AutoImageProcessor.from_pretrained(spec.path)
        model = AutoModel.from_pretrained(spec.path)
        self.model = runtime.prepare_model(model)
        self.runtime = runtime
        cfg = getattr(model.config, "vision_config", model.config)
        n_layers = cfg.num_hidden_layers
        layer = -1 if spec.layer is None else int(spec.layer)
        if not -(n_layers + 1) <= layer <= n_layers:
            raise IndexerError(f"--layer {layer}: {spec.name} has hidden states 0..{n_layers}")
        layer %= n_layers + 1
        self._last_layer = layer == n_layers
        pooling = spec.pooling or "cls"
        if pooling not in ("cls", "mean", "pooler"):
            raise IndexerError(f"--pooling {pooling}: image transformers support cls, mean, pooler")
        if pooling == "pooler" and not self._last_layer:
            raise IndexerError("--pooling pooler only applies to the last layer")
        # Tokens before the patches: CLS plus any register tokens (DINOv2 with registers).
        self._prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.spec = ModelSpec(**{**spec.to_dict(), "layer": layer, "pooling": pooling, "dim": cfg.hidden_size,
                                 "preprocessing": {"processor": type(self.processor).__name__}})

    def preprocess_fn(self) -> Callable:
        return HFImageTransform(self.processor)

    def _prepare(self, items: Sequence[Any]) -> torch.Tensor:
        if isinstance(items, torch.Tensor):
            return self.runtime.to_device(items)
        fn = self.preprocess_fn()
        return self.runtime.to_device(
            torch.stack([x if isinstance(x, torch.Tensor) else fn(x) for x in items]))

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=inputs, output_hidden_states=not self._last_layer)
        if self.spec.pooling == "pooler":
            if out.pooler_output is None:
                raise IndexerError(f"{self.spec.name} has no pooler: use --pooling cls or mean")
            return out.pooler_output
        hidden = out.last_hidden_state if self._last_layer else out.hidden_states[self.spec.layer]
        if self.spec.pooling == "cls":
            return hidden[:, 0]
        patches = hidden[:, self._prefix :]
        return pool(patches, torch.ones(patches.shape[:2], device=patches.device), "mean")
