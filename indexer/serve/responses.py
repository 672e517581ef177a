"""How answers are written: strict JSON, and a stored row as the API shows it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi.responses import JSONResponse

from ..sources.images import IMAGE_EXTENSIONS
from .service import Served


class JSON(JSONResponse):
    """JSON that tolerates stored fields json does not know (dates, decimals) by printing them, and
    writes NaN and infinities (a stored field can hold them) as null: they are not JSON, and clients'
    parsers reject them."""

    def render(self, content: Any) -> bytes:
        try:
            return _dumps(content)
        except ValueError:  # rare: clean a copy only then
            return _dumps(_finite(content))


def _dumps(content: Any) -> bytes:
    return json.dumps(content, ensure_ascii=False, allow_nan=False, default=str, separators=(",", ":")).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def present(served: Served, row: dict[str, Any]) -> dict[str, Any]:
    """A result as the API shows it: bytes fields left out, an image_url for image items."""
    out = {k: v for k, v in row.items() if not isinstance(v, bytes | bytearray)}
    path = row.get("path")
    if served.modality == "image" and isinstance(path, str) and Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        out["image_url"] = f"/items/{quote(served.name, safe='')}/{quote(str(row['id']), safe='/')}/image"
    return out
