"""Partial fine-tuning: unfreeze the top N blocks of a pretrained backbone, train them with a linear
head on labelled data, and write the adapted backbone as a model directory ingest can use.

The training forward is the embedder's own (`Embedder.forward_features`): the same preprocessing,
layer and pooling ingest uses, so the features that were trained are the features that get indexed.
The head sees the L2-normalised feature (what the collection stores and what cosine search, k-NN and
probes compare) scaled by sqrt(d), so each coordinate has roughly unit scale and a plain Linear layer
with its default initialisation and learning rate trains as it would on raw features.

>>> r = finetune(["texts.jsonl"], "label", model="minilm", unfreeze=2, out="minilm-ft")   # doctest: +SKIP
>>> r.comparison["finetuned"]["knn_accuracy"]                                              # doctest: +SKIP
0.97
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IndexerError
from ..index.files import write_atomic
from ..models import DEFAULT_MODELS, Embedder, ModelSpec, load_embedder, resolve_runtime, resolve_spec
from ..models.blocks import Block, backbone_blocks, unfreeze_top
from ..models.finetuned import FORMAT, MODEL_MANIFEST, root_family, save_backbone
from ..sources import Record, SkippedInput, guess_modality
from ..sources.images import ImageDecodeError, decode_image
from ..store.manifest import now_iso, package_versions, write_json_atomic
from .features import check_classes, read_inputs, stratified_holdout

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 10
DEFAULT_LR = 1e-3  # the head's; the backbone trains at BACKBONE_LR_RATIO of it (pretrained weights move gently)
BACKBONE_LR_RATIO = 0.1
DEFAULT_BATCH_SIZE = 32
DEFAULT_PATIENCE = 3  # epochs without a better validation score before stopping
DEFAULT_VAL_FRACTION = 0.2  # of the rows left after the test split: early stopping
DEFAULT_TEST_FRACTION = 0.2  # held out of training and early stopping: the before/after comparison
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.05
CHECKPOINT = "checkpoint"
SMALL_IMAGE_SET = 200  # below this, images are decoded in the main process (worker start-up costs more)


# ---- labelled inputs ----------------------------------------------------------------------------------

@dataclass
class LabelledSet:
    """Inputs with labels: text strings, or image Records decoded batch by batch."""

    ids: list[str]
    items: list[Any]
    labels: list[str]
    skipped: list[SkippedInput]


def read_labelled(sources: Sequence[str], modality: str, label_field: str, *, text_field: str = "text",
                  image_field: str = "image", id_field: str | None = None) -> LabelledSet:
    """Every labelled input of the sources. Rows without a label are skipped and reported (a model
    cannot learn from them, and one bad row should not cost a run), as are unreadable inputs."""
    inputs = read_inputs(sources, modality, label_field=label_field, text_field=text_field, image_field=image_field,
                         id_field=id_field, records=True)  # images stay undecoded until their batch
    out = LabelledSet([], [], [], inputs.skipped)
    for rec, label in zip(inputs.items, inputs.labels):
        if not label:
            out.skipped.append(SkippedInput(rec.source, f"no label in field {label_field!r}", rec.id))
            continue
        out.ids.append(rec.id)
        out.items.append(rec.text if modality == "text" else rec)
        out.labels.append(label)
    if not out.ids:
        raise IndexerError(f"no labelled {modality} input in {', '.join(sources)} (label field {label_field!r}; "
                           f"{len(out.skipped)} inputs skipped)")
    return out


def check_labels(labels: Sequence[str]) -> list[str]:
    """The sorted classes; fine-tuning needs two classes and two examples of each (one to train on,
    one to validate on)."""
    classes = check_classes(labels, "labelled data")
    counts = Counter(labels)
    single = [c for c in classes if counts[c] < 2]
    if single:
        shown = ", ".join(repr(c) for c in single[:10]) + (" ..." if len(single) > 10 else "")
        raise IndexerError(f"{len(single)} class(es) have a single example ({shown}): each class needs at least "
                           "two, one to train on and one to validate on; add examples or drop those rows")
    return classes


@dataclass(frozen=True)
class Splits:
    """Row indices: `train` fits the head and blocks, `val` drives early stopping, `test` (empty when
    a class has too few examples) is held out of both and scores the before/after comparison."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def evaluated_on(self) -> Literal["test", "validation"]:
        return "test" if len(self.test) else "validation"

    @property
    def evaluation(self) -> np.ndarray:
        return self.test if len(self.test) else self.val


def split_rows(labels: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """A stratified test split (when every class keeps two rows besides it), then a stratified
    validation split of the rest; every class has at least one training and one validation row."""
    y = np.asarray(labels, dtype=object)
    test = stratified_holdout(y, test_fraction, seed) if test_fraction > 0 else np.zeros(len(y), dtype=bool)
    if test.any() and min(Counter(y[~test]).values()) < 2:
        log.warning("a class has too few examples for a separate test split (it needs 3+): the before/after "
                    "comparison uses the validation split, which also chose the best epoch (optimistic)")
        test[:] = False
    rest = np.flatnonzero(~test)
    val = np.zeros(len(y), dtype=bool)
    val[rest[stratified_holdout(y[rest], val_fraction, seed + 1)]] = True
    return Splits(np.flatnonzero(~(test | val)), np.flatnonzero(val), np.flatnonzero(test))


# ---- batches ------------------------------------------------------------------------------------------

class _Images(torch.utils.data.Dataset):
    """Image records decoded and transformed exactly as ingest does; failures come back as messages."""

    def __init__(self, records: list[Record], transform: Callable[[Any], torch.Tensor], min_size: int | None):
        self.records, self.transform, self.min_size = records, transform, min_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        try:
            return i, self.transform(decode_image(self.records[i].payload_bytes(), self.min_size))
        except (ImageDecodeError, OSError) as exc:
            return i, str(exc)


def _collate(items: list[tuple[int, torch.Tensor | str]]) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    good = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
    failed = {i: x for i, x in items if isinstance(x, str)}
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, failed


# Row lists in, (rows, model inputs) out: the Batches themselves, or (head only) cached features.
BatchSource = Callable[[list[list[int]]], Iterator[tuple[list[int], Any]]]


class Batches:
    """Batches of model inputs (text strings or image tensors) over chosen rows of a labelled set."""

    def __init__(self, data: LabelledSet, embedder: Embedder, workers: int | None = None):
        self.data, self.embedder = data, embedder
        self.text = embedder.modality == "text"
        self.failed: dict[int, str] = {}
        if not self.text:
            resize = embedder.spec.preprocessing.get("resize")  # JPEG draft decoding down to it, as ingest does
            self.images = _Images(data.items, embedder.preprocess_fn(), resize)
            small = len(data.items) < SMALL_IMAGE_SET
            self.workers = workers if workers is not None else 0 if small else min(4, os.cpu_count() or 1)

    def __call__(self, batches: list[list[int]]) -> Iterator[tuple[list[int], Any]]:
        if self.text:
            for idx in batches:
                yield idx, [self.data.items[i] for i in idx]
            return
        loader = torch.utils.data.DataLoader(self.images, batch_sampler=batches, num_workers=self.workers,
                                             collate_fn=_collate, pin_memory=self.embedder.runtime.is_cuda)
        for idx, pixels, failed in loader:
            self.failed.update(failed)
            if idx:
                yield idx, pixels

    def in_order(self, rows: np.ndarray, batch_size: int) -> list[list[int]]:
        """Rows in batches for evaluation; texts sorted by length so padding stays small."""
        rows = [int(i) for i in rows]
        if self.text:
            rows.sort(key=lambda i: len(self.data.items[i]))
        return [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]


class ForwardSize:
    """The most items one forward pass takes. On CUDA out-of-memory it halves (and says so); the
    optimiser batch stays the same through gradient accumulation, so training is unchanged."""

    def __init__(self, size: int):
        self.size = size

    def run(self, n: int, fn: Callable[[slice], Any], reset: Callable[[], None] | None = None) -> list[Any]:
        while True:
            try:
                return [fn(slice(s, s + self.size)) for s in range(0, n, self.size)]
            except torch.cuda.OutOfMemoryError:
                if self.size == 1:
                    raise IndexerError("out of GPU memory with one item per forward pass: use a smaller "
                                       "model, fewer unfrozen blocks, or --device cpu") from None
                self.size = max(1, self.size // 2)
                log.warning("CUDA out of memory: lowering the forward batch to %d (gradients accumulate, "
                            "the optimiser batch is unchanged)", self.size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if reset is not None:
                    reset()


# ---- the trainer ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hyper:
    epochs: int = DEFAULT_EPOCHS
    lr: float = DEFAULT_LR
    backbone_lr: float = DEFAULT_LR * BACKBONE_LR_RATIO
    batch_size: int = DEFAULT_BATCH_SIZE
    weight_decay: float = WEIGHT_DECAY
    patience: int = DEFAULT_PATIENCE
    val_fraction: float = DEFAULT_VAL_FRACTION
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = 0


def _mixed_precision(device: str) -> str:
    """bf16 autocast where the GPU supports it (no loss scaling needed), else fp16 with a GradScaler;
    fp32 on CPU."""
    runtime = resolve_runtime(device, "auto")
    if runtime.is_cuda and torch.cuda.is_bf16_supported():
        return "bf16"
    return runtime.precision


class Trainer:
    """The unfrozen blocks + a linear head, an AdamW optimiser with two learning rates, a warm-up then
    cosine schedule, and the state a checkpoint needs to continue exactly."""

    def __init__(self, embedder: Embedder, blocks: list[Block], n_classes: int, hyper: Hyper, steps: int):
        self.embedder, self.blocks, self.hyper = embedder, blocks, hyper
        runtime = embedder.runtime
        self.scale = math.sqrt(embedder.dim)
        torch.manual_seed(hyper.seed)
        self.head = nn.Linear(embedder.dim, n_classes).to(runtime.device)
        backbone = [p for b in blocks for p in b.parameters()]
        groups = [{"params": self.head.parameters(), "lr": hyper.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": hyper.backbone_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=hyper.weight_decay)
        warmup = max(1, int(steps * WARMUP_FRACTION))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=runtime.is_cuda and runtime.precision == "fp16")
        self.forward_size = ForwardSize(hyper.batch_size)
        # With no block unfrozen the backbone is a fixed function: its features are computed once.
        self.frozen_features = not blocks

    def train_mode(self, on: bool) -> None:
        """Everything frozen stays in eval mode (BatchNorm statistics and dropout off); the unfrozen
        blocks and the head train."""
        self.embedder.model.eval()
        self.head.train(on)
        for block in self.blocks:
            for module in block.modules.values():
                module.train(on)

    def logits(self, inputs: Any) -> torch.Tensor:
        """Inputs for the model, or (head only) its features computed once before training."""
        return self.head_logits(inputs if self.frozen_features else self.embedder.forward_features(inputs))

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(features.float(), dim=-1) * self.scale)

    def step(self, inputs: Any, targets: torch.Tensor) -> float:
        n = len(targets)

        def part(sl: slice) -> float:
            with self.embedder.runtime.autocast():
                logits = self.logits(inputs[sl])
            loss = F.cross_entropy(logits.float(), targets[sl], reduction="sum") / n
            self.scaler.scale(loss).backward()
            return float(loss.detach())

        self.optimizer.zero_grad(set_to_none=True)
        loss = sum(self.forward_size.run(n, part, reset=lambda: self.optimizer.zero_grad(set_to_none=True)))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss

    @torch.inference_mode()
    def evaluate(self, batches: Iterator[tuple[list[int], Any]], y: np.ndarray) -> tuple[float, float]:
        """(loss, accuracy) of the head on the given rows."""
        total, correct, n = 0.0, 0, 0
        for idx, inputs in batches:
            targets = torch.as_tensor(y[idx], device=self.embedder.runtime.device)

            def part(sl: slice, inputs=inputs) -> torch.Tensor:
                with self.embedder.runtime.autocast():
                    return self.logits(inputs[sl]).float()

            logits = torch.cat(self.forward_size.run(len(idx), part))
            total += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(1) == targets).sum())
            n += len(idx)
        return total / max(n, 1), correct / max(n, 1)

    # -- what a checkpoint holds of the model: the unfrozen blocks (parameters and BN buffers) and the head
    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        state = {name: module.state_dict() for b in self.blocks for name, module in b.modules.items()}
        state["__head__"] = self.head.state_dict()
        return {k: {n: t.detach().to("cpu", copy=True) for n, t in v.items()} for k, v in state.items()}

    def load_trainable_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.head.load_state_dict(state["__head__"])
        for b in self.blocks:
            for name, module in b.modules.items():
                module.load_state_dict(state[name])


def embed_rows(embedder: Embedder, batches: Batches, rows: np.ndarray, forward: ForwardSize,
               batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows that embedded, their L2-normalised features) with the model in eval mode."""
    embedder.model.eval()
    done, feats = [], []
    for idx, inputs in batches(batches.in_order(rows, batch_size)):
        parts = forward.run(len(idx), lambda sl, inputs=inputs: embedder.embed_batch(inputs[sl]))
        done.extend(idx)
        feats.append(np.concatenate(parts))
    order = np.argsort(done, kind="stable")
    dim = embedder.dim
    return np.asarray(done, dtype=np.int64)[order], (np.concatenate(feats) if feats else np.zeros((0, dim)))[order]


def _epoch(trainer: Trainer, epoch: int, epochs: int, batches_of: BatchSource, train_batches: list[list[int]],
           val_batches: list[list[int]], y: np.ndarray, progress: bool) -> dict[str, float]:
    """One pass over the training rows, then the validation score; a progress bar on stderr."""
    from tqdm import tqdm

    t0, cpu0 = time.perf_counter(), time.process_time()
    device = trainer.embedder.runtime.device
    trainer.train_mode(True)
    bar = tqdm(total=len(train_batches), desc=f"epoch {epoch}/{epochs}", unit="batch", disable=not progress,
               dynamic_ncols=True, leave=True)
    losses = []
    for idx, inputs in batches_of(train_batches):
        losses.append(trainer.step(inputs, torch.as_tensor(y[idx], device=device)))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    trainer.train_mode(False)
    val_loss, val_acc = trainer.evaluate(batches_of(val_batches), y)
    train_loss = float(np.mean(losses)) if losses else float("nan")
    bar.set_postfix(loss=f"{train_loss:.4f}", val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.3f}")
    bar.close()
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc,
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0}


# ---- checkpoints ---------------------------------------------------------------------------------------

def _save_checkpoint(path: Path, trainer: Trainer, state: dict[str, Any], epochs: int) -> None:
    """Everything the next epoch needs, written atomically; state.json beside it for people."""
    full = {**state, "trainable": trainer.trainable_state(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(), "rng": _rng_state(),
            "forward_batch": trainer.forward_size.size}
    write_atomic(path, lambda tmp: torch.save(full, tmp))
    write_json_atomic(path.parent / "state.json", {"epoch": state["epoch"], "epochs": epochs,
                                                   "history": state["history"], "best_epoch": state["best"]["epoch"]})


def _load_checkpoint(path: Path, key: str, trainer: Trainer, fresh: dict[str, Any]) -> dict[str, Any]:
    saved = torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states are not tensors
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
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _run_key(base: ModelSpec, data: LabelledSet, unfreeze: int, hyper: Hyper, label_field: str) -> str:
    """What must match for a checkpoint to be continued: the base weights, the data and the settings.
    Not the number of epochs: a run resumed with a larger --epochs trains on (its cosine schedule
    stretched to the new total)."""
    settings = {k: v for k, v in asdict(hyper).items() if k != "epochs"}
    digest = hashlib.sha256(json.dumps([base.weights_sha256, base.name, base.layer, base.pooling, unfreeze,
                                        settings, label_field]).encode())
    for rid, label in zip(data.ids, data.labels):
        digest.update(f"{rid}\0{label}\n".encode())
    return digest.hexdigest()


# ---- the report ---------------------------------------------------------------------------------------

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


def _compare(features: np.ndarray, labels: list[str], train: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """k-NN and linear-probe scores of `features`: fitted on the `train` rows, scored on the `test` rows."""
    from .knn import knn_eval_arrays
    from .probe import probe_eval_arrays

    fit_y, test_y = [labels[i] for i in train], [labels[i] for i in test]
    knn = knn_eval_arrays(features[train], fit_y, features[test], test_y)
    probe = probe_eval_arrays(features[train], fit_y, features[test], test_y)
    return {"knn_accuracy": knn["accuracy"], "knn_macro_f1": knn["macro_f1"], "probe_accuracy": probe["accuracy"],
            "probe_macro_f1": probe["macro_f1"]}


def _plot_curve(history: list[dict[str, float]], path: Path, title: str) -> str | None:
    from .plots import _pyplot

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


# ---- the task -------------------------------------------------------------------------------------------

def _check_out(out: Path) -> None:
    """MODEL_DIR: new, empty, or holding this run's checkpoint; never a finished model."""
    if out.exists() and not out.is_dir():
        raise IndexerError(f"--out {out} is a file: give a directory")
    if (out / CHECKPOINT).exists():
        return
    if (out / MODEL_MANIFEST).exists():
        raise IndexerError(f"{out} already holds a fine-tuned model: choose another --out or delete it")
    if out.is_dir() and any(out.iterdir()):
        raise IndexerError(f"--out {out} exists and is not empty: give a new directory")


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
    _check_out(out_dir)
    runtime = resolve_runtime(device, _mixed_precision(device))
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
        log.warning("%d inputs skipped (no label or unreadable); first: %s: %s", len(data.skipped),
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
    key = _run_key(run.base, run.data, run.unfreeze, hyper, run.label_field)
    ckpt_dir = run.out / CHECKPOINT
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_file = ckpt_dir / "state.pt"
    state: dict[str, Any] = {"key": key, "epoch": 0, "history": [], "best": None, "best_state": None,
                             "bad_epochs": 0}
    resumed_from = None
    if ckpt_file.exists():
        state = _load_checkpoint(ckpt_file, key, trainer, state)
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
        entry = _epoch(trainer, epoch, hyper.epochs, batches_of, train_batches, val_batches, run.y, progress)
        state["history"].append(entry)
        best = state["best"]
        if best is None or (entry["val_accuracy"], -entry["val_loss"]) > (best["val_accuracy"], -best["val_loss"]):
            state["best"], state["best_state"], state["bad_epochs"] = entry, trainer.trainable_state(), 0
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        _save_checkpoint(ckpt_file, trainer, state, hyper.epochs)
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
    comparison = {"base": _compare(run.before, run.data.labels, splits.train, scored),
                  "finetuned": {**_compare(after, run.data.labels, splits.train, scored),
                                "head_accuracy": head_accuracy}}
    history = state["history"]
    kind, sha = save_backbone(run.embedder, run.base, run.out)
    curve = _plot_curve(history, run.out / "training-curve.png",
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
