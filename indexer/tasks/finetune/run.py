"""`finetune()`: one run from the arguments to MODEL_DIR (prepare, train, keep the best epoch, write).

Partial fine-tuning: unfreeze the top N blocks of a pretrained backbone, train them with a linear head on
labelled data (trainer.py), and write the adapted backbone as a model directory ingest can use. A killed
run continues from its checkpoint (checkpoint.py); the base and fine-tuned features are compared at the
end (evaluate.py) in a FinetuneReport (report.py).

>>> r = finetune(["texts.jsonl"], "label", model="minilm", unfreeze=2, out="minilm-ft")   # doctest: +SKIP
>>> r.comparison["finetuned"]["knn_accuracy"]                                              # doctest: +SKIP
0.97
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import IndexerError
from ...files import write_json_atomic
from ...models import DEFAULT_MODELS, Embedder, load_embedder, resolve_runtime, resolve_spec
from ...models.blocks import Block, backbone_blocks, unfreeze_top
from ...models.finetuned import FORMAT, MODEL_MANIFEST, root_family, save_backbone
from ...sources import SkippedInput, guess_modality
from ...spec import ModelSpec
from ...store.manifest import now_iso, package_versions
from ...wording import counted
from .batches import Batches, BatchSource, ForwardSize
from .checkpoint import CHECKPOINT, check_out, load_checkpoint, run_key, save_checkpoint
from .data import LabelledSet, Splits, check_labels, read_labelled, split_rows
from .evaluate import compare_features, embed_rows
from .report import FinetuneReport, plot_curve
from .trainer import (
    BACKBONE_LR_RATIO,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_PATIENCE,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    WEIGHT_DECAY,
    Hyper,
    Trainer,
    mixed_precision,
    train_epoch,
)

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """Everything a training run works with, built once by `_prepare`."""

    sources: list[str]
    label_field: str
    out: Path
    base: ModelSpec
    embedder: Embedder
    unfreeze: int
    blocks: list[Block]
    n_blocks: int
    hyper: Hyper
    data: LabelledSet
    batches: Batches
    classes: list[str]
    y: np.ndarray  # class number per row of `data`
    splits: Splits
    before: np.ndarray  # the frozen base's L2-normalised features, row i = row i of `data`
    trainer: Trainer

    def batches_of(self) -> BatchSource:
        """The training inputs: the model's own batches, or (head only) the frozen features computed once."""
        if not self.trainer.frozen_features:
            return self.batches
        features = torch.from_numpy(self.before).to(self.embedder.runtime.device)
        return lambda lists: ((idx, features[idx]) for idx in lists)


def finetune(sources: Sequence[str] | str, label_field: str, *, out: str | os.PathLike, model: str | None = None,
             weights: str | None = None, unfreeze: int = 1, pooling: str | None = None,
             epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR, backbone_lr: float | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE, val_fraction: float = DEFAULT_VAL_FRACTION,
             test_fraction: float = DEFAULT_TEST_FRACTION, patience: int = DEFAULT_PATIENCE, seed: int = 0,
             device: str = "auto", text_field: str = "text", image_field: str = "image", id_field: str | None = None,
             workers: int | None = None, progress: bool = True) -> FinetuneReport:
    """Fine-tune the top `unfreeze` blocks of `model` plus a linear head on the labelled `sources`,
    keep the epoch with the best validation accuracy, write `out` as a model directory
    (`indexer ingest COLL SOURCE --model OUT`), and score base vs fine-tuned on a held-out test split.
    A killed run continues from its last epoch when the same call is made again."""
    started = time.perf_counter()
    if epochs < 1 or batch_size < 1 or patience < 1:
        raise IndexerError("--epochs, --batch-size and --patience must be at least 1")
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1:
        raise IndexerError("--val-fraction must be between 0 and 1, --test-fraction from 0 to below 1")
    hyper = Hyper(epochs, lr, lr * BACKBONE_LR_RATIO if backbone_lr is None else backbone_lr, batch_size,
                  WEIGHT_DECAY, patience, val_fraction, test_fraction, seed)
    run = _prepare([sources] if isinstance(sources, str) else list(sources), label_field, Path(out).expanduser(),
                   model, weights, pooling, unfreeze, hyper, device, workers,
                   {"text_field": text_field, "image_field": image_field, "id_field": id_field})
    state, resumed_from = _train(run, progress)
    report = _finalize(run, state, resumed_from)
    report.seconds = time.perf_counter() - started
    return report


def _prepare(sources: list[str], label_field: str, out_dir: Path, model: str | None, weights: str | None,
             pooling: str | None, unfreeze: int, hyper: Hyper, device: str, workers: int | None,
             fields: dict[str, str | None]) -> _Run:
    """Read and check the data, load the model and unfreeze its top blocks, embed every row with the
    frozen base (the "before" features, and the pass that finds undecodable images), split the rows."""
    if model is None:
        model = DEFAULT_MODELS[guess_modality(sources)]
        log.info("no --model given: using %s", model)
    base = resolve_spec(model, weights=weights, pooling=pooling)
    data = read_labelled(sources, base.modality, label_field, **fields)
    check_labels(data.labels)  # before loading the model: a one-class file fails at once
    check_out(out_dir)
    runtime = resolve_runtime(device, mixed_precision(device))
    embedder = load_embedder(base, runtime)
    base = embedder.spec
    n_blocks = len(backbone_blocks(embedder.model, pooling=base.pooling))
    blocks = unfreeze_top(embedder.model, unfreeze, pooling=base.pooling, name=base.name)
    batches = Batches(data, embedder, workers)
    forward = ForwardSize(hyper.batch_size)
    rows, before = embed_rows(embedder, batches, np.arange(len(data.ids)), forward, hyper.batch_size)
    for i, reason in sorted(batches.failed.items()):
        data.skipped.append(SkippedInput(data.items[i].source, reason, data.ids[i]))
    data = LabelledSet([data.ids[i] for i in rows], [data.items[i] for i in rows], [data.labels[i] for i in rows],
                       data.skipped)
    for s in data.skipped:
        log.debug("skipped %s: %s", s.id or s.source, s.reason)
    if data.skipped:
        log.warning("%s skipped (no label or unreadable); first: %s: %s", counted(len(data.skipped), "input"),
                    data.skipped[0].id or data.skipped[0].source, data.skipped[0].reason)
    classes = check_labels(data.labels)
    class_of = {c: n for n, c in enumerate(classes)}
    splits = split_rows(data.labels, hyper.val_fraction, hyper.test_fraction, hyper.seed)
    trainer = Trainer(embedder, blocks, len(classes), hyper,
                      steps=math.ceil(len(splits.train) / hyper.batch_size) * hyper.epochs)
    trainer.forward_size = forward
    return _Run(sources, label_field, out_dir, base, embedder, unfreeze, blocks, n_blocks, hyper, data,
                Batches(data, embedder, workers), classes,
                np.array([class_of[label] for label in data.labels], dtype=np.int64), splits, before, trainer)


def _train(run: _Run, progress: bool) -> tuple[dict[str, Any], int | None]:
    """Epochs until --epochs or early stopping, a checkpoint after each; continues a killed run's
    checkpoint. Returns the final state (history, best epoch and its weights) and the resumed epoch."""
    hyper, trainer = run.hyper, run.trainer
    key = run_key(run.base, run.data, run.unfreeze, hyper, run.label_field)
    ckpt_dir = run.out / CHECKPOINT
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_file = ckpt_dir / "state.pt"
    state: dict[str, Any] = {"key": key, "epoch": 0, "history": [], "best": None, "best_state": None,
                             "bad_epochs": 0}
    resumed_from = None
    if ckpt_file.exists():
        state = load_checkpoint(ckpt_file, key, trainer, state)
        resumed_from = state["epoch"]
        log.info("resuming %s after epoch %d of %d", run.out, state["epoch"], hyper.epochs)
    batches_of = run.batches_of()
    val_batches = run.batches.in_order(run.splits.val, trainer.forward_size.size)
    while state["bad_epochs"] < hyper.patience and state["epoch"] < hyper.epochs:
        epoch = state["epoch"] + 1
        order = np.random.default_rng([hyper.seed, epoch]).permutation(run.splits.train)
        size = hyper.batch_size
        train_batches = [[int(i) for i in order[s : s + size]] for s in range(0, len(order), size)]
        if len(train_batches) > 1 and len(train_batches[-1]) == 1:
            train_batches.pop()  # a batch of one breaks BatchNorm in train mode and is noise anyway
        entry = train_epoch(trainer, epoch, hyper.epochs, batches_of, train_batches, val_batches, run.y, progress)
        state["history"].append(entry)
        best = state["best"]
        if best is None or (entry["val_accuracy"], -entry["val_loss"]) > (best["val_accuracy"], -best["val_loss"]):
            state["best"], state["best_state"], state["bad_epochs"] = entry, trainer.trainable_state(), 0
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        save_checkpoint(ckpt_file, trainer, state, hyper.epochs)
    return state, resumed_from


def _finalize(run: _Run, state: dict[str, Any], resumed_from: int | None) -> FinetuneReport:
    """The best epoch's weights become the model: embed every row with it (the "after" features), score
    base vs fine-tuned on the evaluation split, write MODEL_DIR and its manifest, drop the checkpoint."""
    trainer, splits, hyper = run.trainer, run.splits, run.hyper
    trainer.load_trainable_state(state["best_state"])
    trainer.train_mode(False)
    rows, after = embed_rows(run.embedder, run.batches, np.arange(len(run.data.ids)), trainer.forward_size,
                             hyper.batch_size)
    if len(rows) != len(run.data.ids):
        raise IndexerError(f"{len(run.data.ids) - len(rows)} images became unreadable during the run; rerun")
    scored = splits.evaluation
    with torch.inference_mode():
        logits = trainer.head_logits(torch.from_numpy(after[scored]).to(run.embedder.runtime.device))
    head_accuracy = float(np.mean(logits.argmax(1).cpu().numpy() == run.y[scored]))
    comparison = {"base": compare_features(run.before, run.data.labels, splits.train, scored),
                  "finetuned": {**compare_features(after, run.data.labels, splits.train, scored),
                                "head_accuracy": head_accuracy}}
    history = state["history"]
    kind, sha = save_backbone(run.embedder, run.base, run.out)
    curve = plot_curve(history, run.out / "training-curve.png",
                        f"{run.base.name.split('/')[-1]}: top {run.unfreeze} of {run.n_blocks} blocks")
    runtime = run.embedder.runtime
    report = FinetuneReport(
        out=str(run.out), base_model=run.base.name, unfreeze=run.unfreeze,
        unfrozen_blocks=[b.name for b in run.blocks], n_blocks=run.n_blocks, labels=run.classes,
        n_train=len(splits.train), n_val=len(splits.val), n_test=len(splits.test), evaluated_on=splits.evaluated_on,
        skipped=len(run.data.skipped), epochs_run=len(history), best_epoch=state["best"]["epoch"],
        stopped_early=state["epoch"] < hyper.epochs, resumed_from_epoch=resumed_from, history=history,
        seconds_per_epoch=float(np.mean([h["seconds"] for h in history])), comparison=comparison,
        device=str(runtime.device), precision=runtime.precision, forward_batch_size=trainer.forward_size.size,
        hyperparameters=asdict(hyper), curve=curve,
        skipped_examples=[{"id": s.id, "source": s.source, "reason": s.reason} for s in run.data.skipped[:20]])
    _write_manifest(run, report, kind, sha, state["best"]["val_accuracy"])
    shutil.rmtree(run.out / CHECKPOINT, ignore_errors=True)
    return report


def _write_manifest(run: _Run, report: FinetuneReport, kind: str, sha: str, best_val_accuracy: float) -> None:
    spec = run.embedder.spec
    write_json_atomic(run.out / MODEL_MANIFEST, {
        "format": FORMAT, "kind": kind, **root_family(run.base, kind), "modality": spec.modality,
        "base": run.base.name, "base_weights_sha256": run.base.weights_sha256,
        "weights_sha256": sha, "layer": spec.layer, "pooling": spec.pooling, "dim": spec.dim,
        "unfreeze": report.unfreeze, "unfrozen_blocks": report.unfrozen_blocks, "n_blocks": report.n_blocks,
        "sources": [s if s == "-" else str(Path(s).resolve()) for s in run.sources], "label_field": run.label_field,
        "labels": report.labels, "n_train": report.n_train, "n_val": report.n_val, "n_test": report.n_test,
        "skipped": report.skipped, "hyperparameters": report.hyperparameters,
        "evaluation": {"split": report.evaluated_on, "n": len(run.splits.evaluation), "best_epoch": report.best_epoch,
                       "best_val_accuracy": best_val_accuracy,
                       **{f"{k}_{m}": v for k, row in report.comparison.items() for m, v in row.items()}},
        "epochs_run": report.epochs_run, "stopped_early": report.stopped_early, "history": report.history,
        "seconds_per_epoch": report.seconds_per_epoch, "device": report.device, "precision": report.precision,
        "created": now_iso(), "packages": package_versions(),
    })
