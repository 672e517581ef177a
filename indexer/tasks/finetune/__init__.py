"""Partial fine-tuning: the top N blocks of a pretrained backbone and a linear head trained on labelled data,
written as a model directory ingest can use (`indexer ingest COLL SOURCE --model MODEL_DIR`).

The training forward is the embedder's own (`Embedder.forward_features`): the same preprocessing,
layer and pooling ingest uses, so the features that were trained are the features that get indexed.
The head sees the L2-normalised feature (what the collection stores and what cosine search, k-NN and
probes compare) scaled by sqrt(d), so each coordinate has roughly unit scale and a plain Linear layer
with its default initialisation and learning rate trains as it would on raw features.

Modules, each importing only those listed before it:
  data.py        labelled inputs, their classes and the train / validation / test split
  batches.py     batches of model inputs, and the forward size that fits in memory
  trainer.py     the training loop: blocks + head, optimiser, schedule, one epoch
  checkpoint.py  the checkpoint a killed run continues from, and which MODEL_DIR may be written
  evaluate.py    base vs fine-tuned features, scored by k-NN and a linear probe
  report.py      FinetuneReport and the training-curve PNG
  run.py         `finetune()`: one run from the arguments to MODEL_DIR

>>> r = finetune(["texts.jsonl"], "label", model="minilm", unfreeze=2, out="minilm-ft")   # doctest: +SKIP
>>> r.comparison["finetuned"]["knn_accuracy"]                                              # doctest: +SKIP
0.97
"""

from .batches import Batches, ForwardSize
from .data import LabelledSet, Splits, check_labels, read_labelled, split_rows
from .report import FinetuneReport
from .run import finetune
from .trainer import Hyper, Trainer

__all__ = ["Batches", "FinetuneReport", "ForwardSize", "Hyper", "LabelledSet", "Splits", "Trainer", "check_labels",
           "finetune", "read_labelled", "split_rows"]
