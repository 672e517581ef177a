"""The training loop: the unfrozen blocks and a linear head, their optimiser and schedule, one epoch."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...models import Embedder, resolve_runtime
from ...models.blocks import Block
from .batches import BatchSource, ForwardSize

DEFAULT_EPOCHS = 10
DEFAULT_LR = 1e-3  # the head's; the backbone trains at BACKBONE_LR_RATIO of it (pretrained weights move gently)
BACKBONE_LR_RATIO = 0.1
DEFAULT_BATCH_SIZE = 32
DEFAULT_PATIENCE = 3  # epochs without a better validation score before stopping
DEFAULT_VAL_FRACTION = 0.2  # of the rows left after the test split: early stopping
DEFAULT_TEST_FRACTION = 0.2  # held out of training and early stopping: the before/after comparison
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.05


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


def mixed_precision(device: str) -> str:
    """bf16 autocast where the GPU supports it (no loss scaling needed), else fp16 with a GradScaler;
    fp32 on CPU."""
    runtime = resolve_runtime(device)
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


def train_epoch(trainer: Trainer, epoch: int, epochs: int, batches_of: BatchSource, train_batches: list[list[int]],
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
