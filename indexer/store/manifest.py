"""manifest.json: the collection's model identity, metric and provenance, written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from ..spec import ModelSpec
from ..version import DISTRIBUTION, __version__

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_TRACKED_PACKAGES = ("torch", "torchvision", "transformers", "lancedb", "pylance", "faiss-cpu", "numpy")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions(names: tuple[str, ...] = _TRACKED_PACKAGES) -> dict[str, str]:
    """Ours and the installed versions of `names` (those installed)."""
    out = {DISTRIBUTION: __version__}  # ours from the source: right whatever is installed under the name
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class Manifest:
    model: ModelSpec
    metric: str = "cosine"
    schema_version: int = SCHEMA_VERSION
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    packages: dict[str, str] = field(default_factory=package_versions)
    chunking: dict[str, int] | None = None  # {"tokens", "overlap"} when texts are stored as passages
    # The name the labels had in the sources (`--label-field topic`): stored in the `label` column
    # (the layout other tools read), and accepted as that column's name by knn, probe and the API.
    label_field: str | None = None
    # Vectors made with another backend or int8: how far they are from torch fp32's, measured on a sample
    # ({"backend", "precision", "sample", "mean_cosine", "overlap_at_10", "min_overlap", "seconds"}).
    drift: dict[str, Any] | None = None
    # --precision auto: the way picked and what was measured ({"backend", "precision", "reason", "device",
    # "sample", "min_overlap", "measurements": [{"backend", "precision", "items_per_s", "overlap_at_10", ...}]})
    auto_precision: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "model": self.model.to_dict(), "metric": self.metric,
                "created": self.created, "updated": self.updated, "packages": self.packages,
                "chunking": self.chunking, "label_field": self.label_field, "drift": self.drift,
                "auto_precision": self.auto_precision}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(model=ModelSpec.from_dict(data["model"]), metric=data.get("metric", "cosine"),
                   schema_version=data.get("schema_version", SCHEMA_VERSION), created=data.get("created", ""),
                   updated=data.get("updated", ""), packages=data.get("packages", {}),
                   chunking=data.get("chunking"), label_field=data.get("label_field"), drift=data.get("drift"),
                   auto_precision=data.get("auto_precision"))

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        return cls.from_dict(json.loads(data))
