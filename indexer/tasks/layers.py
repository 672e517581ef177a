"""Which layer to index with: k-NN and linear-probe accuracy of every layer (and pooling) of a
backbone on the user's labelled data, measured with the same folds, in one forward pass per batch."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexerError
from ..models import DEFAULT_MODELS, is_joint, load_embedder, resolve_runtime, resolve_spec
from ..sources import guess_modality
from ..wording import counted
from .features import DEFAULT_FOLDS, LabelledVectors, check_classes, read_inputs, scores, stratified_folds
from .knn import DEFAULT_K, DEFAULT_TEMPERATURE, KnnSettings, Reference
from .probe import fit_probe

log = logging.getLogger(__name__)


def sweep_layers(sources: Sequence[str], label_field: str = "label", *, model: str | None = None,
                 layers: str | None = None, pooling: Sequence[str] | None = None, weights: str | None = None,
                 folds: int = DEFAULT_FOLDS, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                 out: str | os.PathLike | None = None, batch_size: int | None = None, device: str = "auto",
                 precision: str = "default", backend: str = "torch", text_field: str = "text",
                 image_field: str = "image", id_field: str | None = None, max_items: int | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Cross-validated k-NN and linear-probe accuracy per layer; the best row is marked and its
    ingest flags given.

    >>> r = sweep_layers(["labelled.jsonl"], "topic", model="minilm")       # doctest: +SKIP
    >>> r["best"]["flags"]
    '--model minilm --layer 5 --pooling mean'
    """
    start = time.perf_counter()
    if backend != "torch":
        raise IndexerError(f"--backend {backend}: layers reads every layer from one torch forward pass; the "
                           f"{backend} export gives the final features only (use --backend torch)")
    runtime = resolve_runtime(device, precision, backend)  # before the model loads, so a bad flag fails at once
    sources = list(sources)
    modality = guess_modality(sources, text_field, image_field)
    model = model or DEFAULT_MODELS[modality]
    from ..models.layers import embed_layers, parse_layers

    spec = resolve_spec(model, weights=weights, modality=modality)  # a joint model: the sources' tower
    if spec.modality == "text" and spec.pooling is None and not is_joint(model):
        # The sweep pools every way itself; a directory that configures no pooling still loads.
        spec = replace(spec, pooling="mean")
    embedder = load_embedder(spec, runtime)

    keys = parse_layers(layers, embedder, pooling)
    inputs = read_inputs(sources, embedder.modality, label_field=label_field, text_field=text_field,
                         image_field=image_field, id_field=id_field, limit=max_items,
                         min_size=embedder.spec.preprocessing.get("resize"))
    keep = [i for i, y in enumerate(inputs.labels) if y is not None]
    if len(keep) < len(inputs.labels):
        log.warning("%s no %s: left out", counted(len(inputs.labels) - len(keep), "input has", "inputs have"),
                    label_field)
    labels = np.array([inputs.labels[i] for i in keep], dtype=object)
    classes = check_classes(labels, "labelled input")
    fold = stratified_folds(labels, folds)
    log.info("%s: %d layer features of %d items, %d classes, %d folds", embedder.spec.name, len(keys),
             len(keep), len(classes), folds)
    features = embed_layers(embedder, [inputs.items[i] for i in keep], keys, batch_size, progress=progress)
    rows = [_evaluate(key, features[key], labels, fold, classes, k, temperature) for key in keys]
    best = _mark_best(rows)
    best["flags"] = _flags(embedder.spec.name, best, weights)
    if runtime.precision == "int8":  # the layers were compared in int8: index with it too
        best["flags"] += " --precision int8"
    result = {
        "model": embedder.spec.name, "modality": embedder.modality, "label_field": label_field,
        "n_items": len(keep), "n_classes": len(classes), "unlabelled": len(inputs.labels) - len(keep),
        "skipped": len(inputs.skipped), "folds": folds, "k": min(k, len(keep)), "temperature": temperature,
        "rows": rows, "best": best, "seconds": round(time.perf_counter() - start, 2),
    }
    if out is not None:
        result["files"] = _write(result, Path(out))
    return result


def _evaluate(key, x: np.ndarray, labels: np.ndarray, fold: np.ndarray, classes: list[str], k: int,
              temperature: float) -> dict[str, Any]:
    ref = Reference(LabelledVectors([str(i) for i in range(len(labels))], x, labels, 0))
    settings = KnnSettings(min(k, len(labels)), temperature)
    knn_pred = np.empty(len(labels), dtype=object)
    probe_pred = np.empty(len(labels), dtype=object)
    C = None
    for f in sorted(set(fold)):
        test, train = fold == f, fold != f
        knn_pred[test] = np.asarray(ref.classes, dtype=object)[ref.predict(x[test], settings, exclude=test)]
        # C is chosen on the first fold's validation split and kept: the same regularisation for every fold.
        head = fit_probe(x[train], labels[train], C=C)
        C = head.C
        probe_pred[test] = head.predict(x[test])
    knn_s, probe_s = scores(labels, knn_pred, classes), scores(labels, probe_pred, classes)
    return {"layer": key[0], "pooling": key[1], "dim": int(x.shape[1]),
            "knn_accuracy": round(knn_s["accuracy"], 4), "knn_macro_f1": round(knn_s["macro_f1"], 4),
            "probe_accuracy": round(probe_s["accuracy"], 4), "probe_macro_f1": round(probe_s["macro_f1"], 4),
            "probe_C": C, "best": False}


def _mark_best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the best mean of k-NN and probe accuracy (then macro-F1; then the shallower,
    cheaper layer: rows are in depth order and max keeps the first)."""
    def merit(r):
        return (round((r["knn_accuracy"] + r["probe_accuracy"]) / 2, 4),
                round((r["knn_macro_f1"] + r["probe_macro_f1"]) / 2, 4))

    best = max(rows, key=merit)
    best["best"] = True
    return dict(best)


def _flags(model: str, row: dict[str, Any], weights: str | None) -> str:
    parts = [f"--model {model}"]
    if weights:
        parts.append(f"--weights {weights}")
    if row["layer"] == "projection":  # a joint text-image model's own output: its default
        pass
    elif row["pooling"] == "avg":  # CNN: a module name, or nothing for the default penultimate layer
        if row["layer"] != "penultimate":
            parts.append(f"--layer {row['layer']}")
    else:
        parts += [f"--layer {row['layer']}", f"--pooling {row['pooling']}"]
    return " ".join(parts)


def _write(result: dict[str, Any], out: Path) -> dict[str, str]:
    from .plots import layers_png

    out.mkdir(parents=True, exist_ok=True)
    report = out / "layers.json"
    png = layers_png(result["rows"], out / "layers.png",
                     f"{result['model']}: {result['n_items']} items, {result['n_classes']} classes, "
                     f"{result['folds']}-fold CV")
    files = {"report": str(report), "plot_png": str(png)}
    report.write_text(json.dumps({**result, "files": files}, indent=2, default=str))
    return files
