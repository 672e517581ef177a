"""What a fine-tuning run reports: the FinetuneReport, its table and summary, the training-curve PNG."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)


@dataclass
class FinetuneReport:
    out: str
    base_model: str
    unfreeze: int
    unfrozen_blocks: list[str]
    n_blocks: int
    labels: list[str]
    n_train: int
    n_val: int
    n_test: int  # 0: too few examples per class for a test split; the comparison is on the validation split
    evaluated_on: Literal["test", "validation"]  # the split the comparison is scored on
    skipped: int
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    resumed_from_epoch: int | None
    history: list[dict[str, float]]
    seconds_per_epoch: float
    comparison: dict[str, dict[str, float]]  # {"base": {...}, "finetuned": {...}} on the `evaluated_on` split
    device: str
    precision: str
    forward_batch_size: int
    hyperparameters: dict[str, Any]
    curve: str | None
    seconds: float = 0.0
    skipped_examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """Before vs after on the evaluation split, one row per backbone."""
        head = f"{'backbone':<12}{'k-NN acc':>10}{'k-NN F1':>10}{'probe acc':>11}{'probe F1':>10}{'head acc':>10}"
        lines = [head]
        for name, row in self.comparison.items():
            head_acc = row.get("head_accuracy")
            lines.append(f"{name:<12}{row['knn_accuracy']:>10.3f}{row['knn_macro_f1']:>10.3f}"
                         f"{row['probe_accuracy']:>11.3f}{row['probe_macro_f1']:>10.3f}"
                         + (f"{head_acc:>10.3f}" if head_acc is not None else f"{'-':>10}"))
        return "\n".join(lines)

    def summary(self) -> str:
        blocks = ", ".join(self.unfrozen_blocks) or "none (head only)"
        stop = " (early stop)" if self.stopped_early else ""
        resumed = f", resumed after epoch {self.resumed_from_epoch}" if self.resumed_from_epoch else ""
        if self.evaluated_on == "test":
            where = f"test split ({self.n_test} rows held out of training and early stopping):"
        else:
            where = ("validation split (NO separate test split: a class has fewer than 3 examples; these rows also "
                     "chose the best epoch, so the fine-tuned row is optimistic):")
        return (f"{self.out}: fine-tuned {self.base_model}, top {self.unfreeze} of {self.n_blocks} blocks "
                f"unfrozen ({blocks}); {len(self.labels)} classes, {self.n_train} train / {self.n_val} validation / "
                f"{self.n_test} test, {self.skipped} skipped; {self.epochs_run} epochs{stop}{resumed}, best epoch "
                f"{self.best_epoch}, {self.seconds_per_epoch:.1f}s/epoch on {self.device} ({self.precision})\n"
                f"{where}\n{self.table()}")


def plot_curve(history: list[dict[str, float]], path: Path, title: str) -> str | None:
    from ..plots import _pyplot

    try:
        plt = _pyplot()
    except ImportError:  # the PNG is a convenience; the numbers are in the manifest
        log.warning("matplotlib is not installed: no training-curve PNG")
        return None
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_accuracy"] for h in history], "^--", color="tab:green", label="validation accuracy")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1.02)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
