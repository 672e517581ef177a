"""Benchmark the k-NN classifier: ours vs the DINO reference vs scikit-learn, in one run.

Run from the repository root:

    .venv/bin/python scripts/bench_knn.py [--quick] [--train 100000] [--test 10000] [--dim 384]
                                          [--classes 100] [--out bench-out/bench_knn.json]

Data: synthetic labelled embeddings clustered like real ones (SUBCLUSTERS gaussian topics per class,
points = topic centre + SPREAD * gaussian, L2-normalised), with LABEL_NOISE of the labels replaced at
random, so accuracy is well below 1 and equal accuracies are a real check. The same train/test vectors go to every method; the protocol is DINO's
(cosine, k=20, votes exp(sim / 0.07)).

Methods, each timed end to end on the same arrays (fit + predict):
  1. dino: the DINO repository's `knn_classifier` (torch.mm + topk + one-hot votes) in chunks of
     128 test vectors, exactly as eval_knn.py runs it.
  2. sklearn: `KNeighborsClassifier(n_neighbors=20, algorithm="brute", metric="cosine",
     weights=lambda d: exp((1 - d) / 0.07))`: the same protocol (cosine distance = 1 - similarity).
  3. ours exact: `indexer.tasks.knn.knn_eval_arrays` (blocked torch mm + topk, vectorised votes).
  4. ours via the collection: the train vectors ingested into a collection (`model="none"`, labels
     stored) with its tuned FAISS index (`indexer index`, auto kind), the test vectors into a second
     collection, `knn_eval(coll, test=coll2)`: what `indexer knn --eval --test` runs. Ingest and
     index build are timed separately from the evaluation.

Reported: accuracy and macro-F1 per method, whether predictions are identical to the DINO reference,
seconds, and time ratios. Torch and FAISS use all cores. `--quick`: 20k x 2k.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
from benchlib import clustered, machine, no_auto_index, timed, write_parquet, write_report

K, T = 20, 0.07
SUBCLUSTERS, SPREAD, LABEL_NOISE = 5, 1.0, 0.2


def make_data(n_train: int, n_test: int, dim: int, classes: int, seed: int = 0, *, spread: float = SPREAD,
              label_noise: float = LABEL_NOISE):
    """Clustered like real embeddings (each class a few topics, points spread around them), with
    LABEL_NOISE of the labels replaced at random so accuracy stays well below 1."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes * SUBCLUSTERS, dim)).astype(np.float32)

    def draw(n):
        x, topic = clustered(n, centres, spread, rng)
        y = topic // SUBCLUSTERS
        flip = rng.random(n) < label_noise
        y[flip] = rng.integers(0, classes, int(flip.sum()))
        return x, y

    return draw(n_train), draw(n_test)


def dino_knn(train_x, train_y, test_x, classes: int) -> np.ndarray:
    """eval_knn.py's knn_classifier, chunk size 128 as in the DINO repository."""
    import torch

    train = torch.from_numpy(train_x).t()
    labels = torch.from_numpy(train_y)
    preds = []
    one_hot = torch.zeros(K, classes)
    for start in range(0, len(test_x), 128):
        feats = torch.from_numpy(test_x[start : start + 128])
        b = feats.shape[0]
        similarity = torch.mm(feats, train)
        distances, indices = similarity.topk(K, largest=True, sorted=True)
        candidates = labels.view(1, -1).expand(b, -1)
        retrieved = torch.gather(candidates, 1, indices)
        one_hot.resize_(b * K, classes).zero_()
        one_hot.scatter_(1, retrieved.view(-1, 1), 1)
        weights = distances.clone().div_(T).exp_()
        probs = torch.sum(torch.mul(one_hot.view(b, -1, classes), weights.view(b, -1, 1)), 1)
        preds.append(probs.argmax(1))
    return torch.cat(preds).numpy()


def sklearn_knn(train_x, train_y, test_x) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=K, algorithm="brute", metric="cosine",
                               weights=lambda d: np.exp((1 - d) / T), n_jobs=-1)
    return clf.fit(train_x, train_y).predict(test_x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train", type=int, default=100_000)
    ap.add_argument("--test", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--out", default="bench-out/bench_knn.json")
    args = ap.parse_args()
    if args.quick:
        args.train, args.test = 20_000, 2_000

    from sklearn.metrics import f1_score

    from indexer import ingest
    from indexer.index import build_index
    from indexer.tasks.knn import knn_eval, knn_eval_arrays

    no_auto_index()  # the index is built (and timed) explicitly below
    (train_x, train_y), (test_x, test_y) = make_data(args.train, args.test, args.dim, args.classes)
    print(f"k-NN benchmark: {args.train} train x {args.test} test, dim {args.dim}, {args.classes} classes, "
          f"k={K}, T={T}; load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    results = {}

    dino_pred, secs = timed(lambda: dino_knn(train_x, train_y, test_x, args.classes))
    results["dino"] = {"pred": dino_pred, "seconds": secs}
    sk_pred, secs = timed(lambda: sklearn_knn(train_x, train_y, test_x))
    results["sklearn"] = {"pred": sk_pred, "seconds": secs}
    names = np.array([f"c{i:03d}" for i in range(args.classes)], dtype=object)
    ours, secs = timed(lambda: knn_eval_arrays(train_x, names[train_y], test_x, names[test_y], k=K, temperature=T))
    results["ours exact"] = {"accuracy": ours["accuracy"], "macro_f1": ours["macro_f1"], "seconds": secs}

    with tempfile.TemporaryDirectory() as tmp:
        for x, y, name, prefix in ((train_x, train_y, "train", "r"), (test_x, test_y, "test", "q")):
            write_parquet(f"{tmp}/{name}.parquet", [f"{prefix}{i}" for i in range(len(x))], x, label=names[y].tolist())
        _, ingest_s = timed(lambda: (
            ingest(f"{tmp}/train.idx", [f"{tmp}/train.parquet"], model="none", vector_field="vector", progress=False),
            ingest(f"{tmp}/test.idx", [f"{tmp}/test.parquet"], model="none", vector_field="vector", progress=False)))
        index, index_s = timed(lambda: build_index(f"{tmp}/train.idx"))
        coll, secs = timed(lambda: knn_eval(f"{tmp}/train.idx", test=f"{tmp}/test.idx", k=K, temperature=T))
        results["ours index"] = {"accuracy": coll["accuracy"], "macro_f1": coll["macro_f1"], "seconds": secs,
                                 "engine": coll["engine"], "index_recall_at_10": index["recall_at_10"],
                                 "ingest_seconds": ingest_s, "index_build_seconds": index_s}

    for name in ("dino", "sklearn"):
        r = results[name]
        pred = r.pop("pred")
        r["accuracy"] = float(np.mean(pred == test_y))
        r["macro_f1"] = float(f1_score(test_y, pred, average="macro"))
        if name == "sklearn":
            r["identical_to_dino"] = bool(np.array_equal(pred, dino_pred))
    base = results["dino"]["seconds"]
    print(f"{'method':12} {'accuracy':>9} {'macro-F1':>9} {'seconds':>9} {'vs dino':>8} {'vs sklearn':>11}")
    for name, r in results.items():
        r["speedup_vs_dino"] = base / r["seconds"]
        r["speedup_vs_sklearn"] = results["sklearn"]["seconds"] / r["seconds"]
        print(f"{name:12} {r['accuracy']:9.4f} {r['macro_f1']:9.4f} {r['seconds']:9.2f} "
              f"{r['speedup_vs_dino']:7.2f}x {r['speedup_vs_sklearn']:10.2f}x")
    same = results["ours exact"]["accuracy"] == results["dino"]["accuracy"] == results["sklearn"]["accuracy"]
    print(f"identical accuracy (ours exact, dino, sklearn): {same}; ours via {results['ours index']['engine']} "
          f"(index recall@10 {results['ours index']['index_recall_at_10']:.3f}): "
          f"accuracy {results['ours index']['accuracy']:.4f}")
    report = {"train": args.train, "test": args.test, "dim": args.dim, "classes": args.classes, "k": K,
              "temperature": T, "identical_accuracy": same, "methods": results, "machine": machine()}
    write_report(args.out, report)


if __name__ == "__main__":
    main()
