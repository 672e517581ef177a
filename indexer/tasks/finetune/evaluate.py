"""Before and after: every row embedded by the backbone (frozen base, then fine-tuned), scored by k-NN
and a linear probe."""

from __future__ import annotations

import numpy as np

from ...models import Embedder
from .batches import Batches, ForwardSize


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


def compare_features(features: np.ndarray, labels: list[str], train: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """k-NN and linear-probe scores of `features`: fitted on the `train` rows, scored on the `test` rows."""
    from ..knn import knn_eval_arrays
    from ..probe import probe_eval_arrays

    fit_y, test_y = [labels[i] for i in train], [labels[i] for i in test]
    knn = knn_eval_arrays(features[train], fit_y, features[test], test_y)
    probe = probe_eval_arrays(features[train], fit_y, features[test], test_y)
    return {"knn_accuracy": knn["accuracy"], "knn_macro_f1": knn["macro_f1"], "probe_accuracy": probe["accuracy"],
            "probe_macro_f1": probe["macro_f1"]}
