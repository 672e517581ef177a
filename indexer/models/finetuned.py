"""A fine-tuned model directory (written by `indexer finetune`), loadable as `--model MODEL_DIR`.

Text and HF vision models are saved as full transformers / sentence-transformers directories (weights,
tokenizer or processor, pooling config); CNNs as the base architecture's complete state dict (`model.pt`,
also usable as `--weights`). `indexer-model.json` names the base model and records the provenance;
the registry reads it (`built_as`) to build the right embedder, and the spec's identity carries the new weights'
hash, so a collection built with the base model refuses the fine-tuned one and vice versa.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..errors import IndexerError
from ..files import sha256_files, write_atomic
from ..spec import ModelSpec
from .base import Embedder
from .weights import read_state_dict

MODEL_MANIFEST = "indexer-model.json"
FORMAT = "indexer-finetuned/1"
STATE_DICT_FILE = "model.pt"
# The base's model card would describe the wrong model; a fine-tuned base's own record and curve are its own.
_NOT_COPIED = ("README.md", ".gitattributes", MODEL_MANIFEST, "training-curve.png")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".onnx", ".ot", ".pt", ".pth")
# What `indexer info` shows of a collection's fine-tuned model (the full record stays in MODEL_DIR).
_PROVENANCE_KEYS = ("base", "base_weights_sha256", "unfreeze", "unfrozen_blocks", "n_blocks", "sources",
                    "label_field", "labels", "validation", "evaluation", "epochs_run", "created")


def is_model_dir(name: str) -> bool:
    return (Path(name).expanduser() / MODEL_MANIFEST).is_file()


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir).expanduser() / MODEL_MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IndexerError(f"{path} is unreadable or damaged ({exc}); fine-tune again") from exc
    if data.get("format") != FORMAT:
        raise IndexerError(f"{path}: unknown format {data.get('format')!r} (expected {FORMAT})")
    return data


def family(manifest: dict[str, Any]) -> str:
    """The architecture a model directory is built as: "hf" (transformers), "efficientnet-lite0" or
    "torchvision" (with `arch`). Recorded by finetune; derived for directories written before it was."""
    if manifest.get("family"):
        return manifest["family"]
    if manifest["kind"] == "transformers":
        return "hf"
    return "efficientnet-lite0" if manifest["base"] == "efficientnet-lite0" else "torchvision"


def root_family(base: ModelSpec, kind: str) -> dict[str, str | None]:
    """{"family", "arch"} for a model fine-tuned from `base`: a fine-tuned base passes on its own (its
    name is its directory), so a model fine-tuned twice is still built as the original architecture."""
    if base.options.get("finetuned") is not None:
        manifest = read_manifest(base.name)
        return {"family": family(manifest), "arch": manifest.get("arch")}
    if kind == "transformers":
        return {"family": "hf", "arch": None}
    if base.name == "efficientnet-lite0":
        return {"family": "efficientnet-lite0", "arch": None}
    return {"family": "torchvision", "arch": base.options["arch"]}


def weights_files(model_dir: Path, manifest: dict[str, Any]) -> list[Path]:
    if manifest["kind"] == "state_dict":
        return [model_dir / STATE_DICT_FILE]
    return sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))


# ---- writing -------------------------------------------------------------------------------------------

def save_backbone(embedder: Embedder, base: ModelSpec, out: Path) -> tuple[str, str]:
    """Write the embedder's (fine-tuned) backbone into `out`. Returns (kind, weights sha256)."""
    out.mkdir(parents=True, exist_ok=True)
    model = embedder.model
    if base.path and Path(base.path).is_dir():
        from transformers.utils import logging as hf_logging

        _copy_model_files(Path(base.path), out)
        hf_logging.disable_progress_bar()  # stderr belongs to our own progress bars
        model.save_pretrained(out, safe_serialization=True)
        if embedder.modality == "text" and not (out / "modules.json").exists():
            _write_sentence_transformers_config(out, embedder.spec)
        return "transformers", sha256_files(weights_files(out, {"kind": "transformers"}))
    # A CNN: the base state dict (keeping its classifier) updated with the trained backbone.
    state = _plain_state_dict(read_state_dict(base.path))
    state.update({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    written = write_atomic(out / STATE_DICT_FILE, lambda tmp: torch.save(state, tmp))
    return "state_dict", written["sha256"]  # one file: its sha256 is sha256_files([it])


def _plain_state_dict(state: Any) -> dict[str, torch.Tensor]:
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return dict(state)


def _copy_model_files(src: Path, out: Path) -> None:
    """Tokenizer / processor / sentence-transformers files of the base directory (not its weights)."""
    for item in src.iterdir():
        if item.is_file() and item.suffix not in _WEIGHT_SUFFIXES and item.name not in _NOT_COPIED:
            shutil.copyfile(item, out / item.name)
    modules = src / "modules.json"
    if modules.exists():
        for module in json.loads(modules.read_text()):
            sub = src / module.get("path", "")
            if module.get("path") and sub.is_dir():
                shutil.copytree(sub, out / module["path"], dirs_exist_ok=True)


def _write_sentence_transformers_config(out: Path, spec: ModelSpec) -> None:
    """A plain transformers base had its pooling from a flag: record it so the directory embeds the
    same way on its own (and loads in sentence-transformers)."""
    if spec.pooling not in ("cls", "mean", "max"):
        return  # `pooler` has no sentence-transformers equivalent: the manifest records it
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": spec.dim, "pooling_mode_cls_token": spec.pooling == "cls",
        "pooling_mode_mean_tokens": spec.pooling == "mean", "pooling_mode_max_tokens": spec.pooling == "max"}))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": spec.max_length}))


# ---- reading (the registry's fine-tuned family) ------------------------------------------------------

def resolve_model_dir(name: str, weights: str | None) -> tuple[str, str, dict]:
    if weights:
        raise IndexerError(f"{name} is a fine-tuned model directory: it carries its own weights (drop --weights)")
    model_dir = Path(name).expanduser().resolve()
    manifest = read_manifest(model_dir)
    files = weights_files(model_dir, manifest)
    missing = [str(f) for f in files if not f.is_file()] or ([] if files else [str(model_dir / "*.safetensors")])
    if missing:
        raise IndexerError(f"{model_dir}: weights missing ({', '.join(missing)}); fine-tune again")
    sha = sha256_files(files)
    if sha != manifest["weights_sha256"]:
        raise IndexerError(f"{model_dir}: the weights ({', '.join(f.name for f in files)}) are damaged or changed "
                           f"since fine-tuning (sha256 {sha[:12]} vs "
                           f"{manifest['weights_sha256'][:12]} in {MODEL_MANIFEST}); fine-tune again")
    options: dict[str, Any] = {"finetuned": provenance(manifest)}
    if manifest.get("arch"):
        options["arch"] = manifest["arch"]
    path = files[0] if manifest["kind"] == "state_dict" else model_dir
    return str(path), sha, options


def provenance(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in _PROVENANCE_KEYS if k in manifest}


def built_as(spec: ModelSpec) -> tuple[str, ModelSpec]:
    """The family a model directory is built as (the registry's builder for it) and the spec to build
    it from."""
    manifest = read_manifest(spec.name)
    if spec.pooling is None and manifest.get("pooling") == "pooler":
        spec = replace(spec, pooling="pooler")  # the one pooling a sentence-transformers config cannot say
    return family(manifest), spec
