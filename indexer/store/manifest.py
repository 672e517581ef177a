"""manifest.json: the collection's model identity, metric and provenance, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from ..models.base import ModelSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_TRACKED_PACKAGES = ("indexer", "torch", "torchvision", "transformers", "lancedb", "pylance", "faiss-cpu", "numpy")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_json_atomic(path: Path, data: Any) -> None:
    """Temp file + fsync + rename: a reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Manifest:
    model: ModelSpec
    metric: str = "cosine"
    schema_version: int = SCHEMA_VERSION
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    packages: dict[str, str] = field(default_factory=package_versions)
    chunking: dict[str, int] | None = None  # {"tokens", "overlap"} when texts are stored as passages

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "model": self.model.to_dict(), "metric": self.metric,
                "created": self.created, "updated": self.updated, "packages": self.packages,
                "chunking": self.chunking}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(model=ModelSpec.from_dict(data["model"]), metric=data.get("metric", "cosine"),
                   schema_version=data.get("schema_version", SCHEMA_VERSION), created=data.get("created", ""),
                   updated=data.get("updated", ""), packages=data.get("packages", {}),
                   chunking=data.get("chunking"))

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        return cls.from_dict(json.loads(data))
