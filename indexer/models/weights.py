"""Reading weight files without running code from them: the one loader for --weights files and the bases
of fine-tuned CNNs."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ..errors import IndexerError


def read_state_dict(path: str | Path) -> Any:
    """A weights file's tensors, never running code from it: safetensors, or torch's weights-only
    unpickler (a pickle that names anything but tensors and plain containers is refused, not run)."""
    import torch

    if str(path).endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise IndexerError(f"cannot load weights {path}: damaged safetensors file ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise IndexerError(f"refusing to load weights {path}: it holds pickled objects other than tensors, "
                           "which could run code; save a plain state dict (torch.save(model.state_dict())) "
                           "or a .safetensors file") from exc
    except Exception as exc:  # noqa: BLE001 - truncated zips, random bytes: torch raises many kinds
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IndexerError(f"cannot load weights {path}: damaged or not a PyTorch file ({reason})") from exc
