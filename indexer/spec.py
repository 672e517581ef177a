"""The plain records that name a model's vectors: ModelSpec, Modality, Pooling. No torch, so the store,
the manifest and `indexer info` stand alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Modality = Literal["text", "image"]
# Dynamic int8 recipes a spec records (its `quantization`; models/runtimes/per_token.py): the graph and the
# activation scales are part of the vectors.
PER_TOKEN = "per-token"  # per-token scales on ONNX Runtime's fused transformer kernels
PER_TOKEN_PLAIN = "per-token-plain"  # per-token scales on the plain export, where the fused kernels are not used
PER_TENSOR = "per-tensor"  # ONNX Runtime's own quantize_dynamic: what int8 text collections were made with first
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
    pooling: Pooling | None = None
    normalize: bool = True
    max_length: int | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # what the loader needs: weights file, base name
    # A joint text-image model (CLIP, SigLIP): each tower's preprocessing, by modality. `modality` is
    # then the kind of item the collection stores; queries of either kind go through their own tower.
    towers: dict[str, Any] = field(default_factory=dict)
    # How the vectors were computed: "torch", "onnx" or "openvino"; "fp32", "fp16", "bf16" or "int8"
    backend: str = "torch"
    precision: str = "fp32"
    # A statically quantised model (int8 CNNs on onnx/openvino): the key of the sample of the user's own
    # inputs it was calibrated on. Another calibration gives other vectors, so queries use this one.
    calibration: str | None = None
    # Dynamic int8 where a backend has more than one way (onnx text models): PER_TOKEN, PER_TOKEN_PLAIN
    # or PER_TENSOR.
    quantization: str | None = None

    @property
    def joint(self) -> bool:
        return len(self.towers) > 1

    def accepts(self, kind: str) -> bool:
        """Whether a query of this kind ("text" or "image") can be embedded into these vectors."""
        return kind == self.modality or (self.joint and kind in self.towers)

    def identity(self) -> dict[str, Any]:
        ident = {
            "model": self.weights_sha256 or self.name,
            "modality": self.modality,
            "dim": self.dim,
            "layer": self.layer,
            "pooling": self.pooling,
            "normalize": self.normalize,
            # Another backend or int8 drifts from fp32 vectors: mixing them would be silently worse.
            "backend": self.backend,
            "int8": self.precision == "int8",
            "calibration": self.calibration,
            "quantization": self.quantization,
        }
        if self.joint:  # one space for both towers: a text and an image collection are comparable
            ident["modality"] = "+".join(sorted(self.towers))
        return ident

    def describe(self) -> str:
        parts = [self.name, "+".join(sorted(self.towers)) + f" ({self.modality} items)" if self.joint
                 else self.modality, f"dim={self.dim}"]
        if self.layer is not None:
            parts.append(f"layer={self.layer}")
        if self.pooling:
            parts.append(f"pooling={self.pooling}")
        parts.append("normalized" if self.normalize else "raw")
        if self.backend != "torch" or self.precision == "int8":
            parts.append(" ".join(filter(None, (self.backend, self.precision, self.quantization))))
        if self.calibration:
            parts.append(f"calibration={self.calibration[:12]}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f for f in cls.__dataclass_fields__}
        spec = cls(**{k: v for k, v in data.items() if k in known})
        if "quantization" not in data and spec.backend == "onnx" and spec.precision == "int8" and not spec.calibration:
            # Recorded before per-token int8 existed: these vectors came from ONNX Runtime's per-tensor one.
            spec = replace(spec, quantization=PER_TENSOR)
        return spec
