"""A run's state in MODEL_DIR: the checkpoint written after each epoch, what must match to continue
it, and which MODEL_DIR may be written to."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import IndexerError
from ...files import write_atomic, write_json_atomic
from ...models.finetuned import MODEL_MANIFEST
from ...spec import ModelSpec
from .data import LabelledSet
from .trainer import Hyper, Trainer

CHECKPOINT = "checkpoint"


def check_out(out: Path) -> None:
    """MODEL_DIR: new, empty, or holding this run's checkpoint; never a finished model."""
    if out.exists() and not out.is_dir():
        raise IndexerError(f"--out {out} is a file: give a directory")
    if (out / CHECKPOINT).exists():
        return
    if (out / MODEL_MANIFEST).exists():
        raise IndexerError(f"{out} already holds a fine-tuned model: choose another --out or delete it")
    if out.is_dir() and any(out.iterdir()):
        raise IndexerError(f"--out {out} exists and is not empty: give a new directory")


def save_checkpoint(path: Path, trainer: Trainer, state: dict[str, Any], epochs: int) -> None:
    """Everything the next epoch needs, written atomically; state.json beside it for people."""
    full = {**state, "trainable": trainer.trainable_state(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(), "rng": _rng_state(),
            "forward_batch": trainer.forward_size.size}
    write_atomic(path, lambda tmp: torch.save(full, tmp))
    write_json_atomic(path.parent / "state.json", {"epoch": state["epoch"], "epochs": epochs,
                                                   "history": state["history"], "best_epoch": state["best"]["epoch"]})


def load_checkpoint(path: Path, key: str, trainer: Trainer, fresh: dict[str, Any]) -> dict[str, Any]:
    import pickle

    try:
        # Weights-only even for our own file: MODEL_DIR may come from elsewhere, and a pickle can run code.
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise IndexerError(f"refusing to load {path}: it holds pickled objects other than tensors (written by an "
                           f"older indexer, or not by indexer); delete it to start the run over") from exc
    except Exception as exc:  # noqa: BLE001 - a truncated or damaged zip: torch raises many kinds
        raise IndexerError(f"{path} is damaged ({type(exc).__name__}); delete it to start the run over") from exc
    if saved.get("key") != key:
        raise IndexerError(f"{path.parent.parent} holds a checkpoint of a different run (other data, model or "
                           "settings; only --epochs may change): rerun the original command, or choose another --out")
    trainer.load_trainable_state(saved["trainable"])
    trainer.optimizer.load_state_dict(saved["optimizer"])
    trainer.scheduler.load_state_dict(saved["scheduler"])
    trainer.scaler.load_state_dict(saved["scaler"])
    trainer.forward_size.size = saved.get("forward_batch", trainer.forward_size.size)
    _set_rng_state(saved["rng"])
    return {k: saved[k] for k in fresh}


def _rng_state() -> dict[str, Any]:
    # numpy's key array as a tensor: the weights-only loader reads tensors and plain containers only.
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss,
                                                        gauss), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_key(base: ModelSpec, data: LabelledSet, unfreeze: int, hyper: Hyper, label_field: str) -> str:
    """What must match for a checkpoint to be continued: the base weights, the data and the settings.
    Not the number of epochs: a run resumed with a larger --epochs trains on (its cosine schedule
    stretched to the new total)."""
    settings = {k: v for k, v in asdict(hyper).items() if k != "epochs"}
    digest = hashlib.sha256(json.dumps([base.weights_sha256, base.name, base.layer, base.pooling, unfreeze,
                                        settings, label_field]).encode())
    for rid, label in zip(data.ids, data.labels):
        digest.update(f"{rid}\0{label}\n".encode())
    return digest.hexdigest()
