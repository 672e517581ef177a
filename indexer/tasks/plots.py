"""PNG figures for the learning reports (matplotlib without a display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_LABELLED_CLASSES = 50


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def confusion_png(result: dict[str, Any], path: Path, title: str) -> Path:
    """The confusion matrix of a scores() result, rows = true class, normalised per row, counts printed."""
    import numpy as np

    plt = _pyplot()
    classes, counts = result["classes"], np.asarray(result["confusion"], dtype=float)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    labelled = len(classes) <= MAX_LABELLED_CLASSES  # past that, names and counts would not be readable
    size = min(max(4.0, 0.45 * len(classes) + 2), 14.0)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    if labelled:
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 30:  # counts in the cells
        for i in range(len(classes)):
            for j in range(len(classes)):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_title(f"{title}\naccuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layers_png(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """k-NN and linear-probe accuracy per layer, one line per pooling, best layer marked."""
    plt = _pyplot()
    layers = list(dict.fromkeys(str(r["layer"]) for r in rows))
    poolings = list(dict.fromkeys(r.get("pooling") for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(layers) + 3), 4.5))
    for n, pooling in enumerate(poolings):
        sel = [r for r in rows if r.get("pooling") == pooling]
        x = [layers.index(str(r["layer"])) for r in sel]
        suffix = f" ({pooling})" if pooling != "avg" else ""
        color = f"C{n}"  # one colour per pooling; solid k-NN, dashed probe
        ax.plot(x, [r["knn_accuracy"] for r in sel], marker="o", color=color, label=f"k-NN{suffix}")
        ax.plot(x, [r["probe_accuracy"] for r in sel], marker="s", linestyle="--", color=color,
                label=f"linear probe{suffix}")
    best = next((r for r in rows if r.get("best")), None)
    if best is not None:
        ax.axvline(layers.index(str(best["layer"])), color="grey", alpha=0.4, linewidth=6, label="recommended")
    ax.set_xticks(range(len(layers)), layers, rotation=45 if len(layers) > 8 else 0, ha="right")
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy (cross-validated)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_eval_report(result: dict[str, Any], out: str | Path, name: str, title: str) -> dict[str, str]:
    """`<name>.json` (the full result) and `<name>_confusion.png` under `out`; returns their paths."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"{name}.json"
    report.write_text(json.dumps(result, indent=2, default=str))
    png = confusion_png(result, out / f"{name}_confusion.png", title)
    return {"report": str(report), "confusion_png": str(png)}
