"""Benchmark the linear probe: ours (`indexer.tasks.probe.fit_probe`, C chosen on a validation split)
vs scikit-learn's `LogisticRegression()` with its defaults, in one run, on the same arrays.

Run from the repository root:

    .venv/bin/python scripts/bench_probe.py [--rows 6000] [--dim 384] [--classes 12] [--spread 2.75]
                                            [--repeat 3] [--out bench-out/bench_probe.json]

Data: `bench_knn.make_data`'s synthetic embeddings (each class a few gaussian topics, L2-normalised,
20% of the labels replaced at random), `--spread` wide enough that the classes overlap and accuracy
sits near 0.7; 80% of the rows train, 20% are held out and scored. Both methods are timed end to end
(ours: standardising, the regularisation path on a validation split, the refit on every training row;
scikit-learn: one fit at C=1 on the raw features, as `LogisticRegression().fit(x, y)` runs it), best
of `--repeat` runs, on the machine's default threads; scikit-learn is also timed with one BLAS
thread (ours uses one for products this small: on shared cores a parallel region stalls). Prints one JSON line (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_knn import make_data  # noqa: E402
from benchlib import load_average, machine, write_report  # noqa: E402


def best_time(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--spread", type=float, default=2.75)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench-out/bench_probe.json")
    args = ap.parse_args()

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from indexer.tasks.probe import fit_probe

    n_test = args.rows // 5
    (train_x, train_y), (test_x, test_y) = make_data(args.rows - n_test, n_test, args.dim, args.classes,
                                                     spread=args.spread)
    load_before = load_average()

    head, ours_s, ours_runs = best_time(lambda: fit_probe(train_x, train_y), args.repeat)
    ours_acc = float(np.mean(np.asarray(head.predict(test_x)) == test_y.astype(str)))

    def sklearn_fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # its default max_iter=100 may stop early
            return LogisticRegression().fit(train_x, train_y)

    model, sk_s, sk_runs = best_time(sklearn_fit, args.repeat)
    sk_acc = float(np.mean(model.predict(test_x) == test_y))
    with threadpool_limits(1, user_api="blas"):  # what ours runs on for products this small
        _, sk1_s, sk1_runs = best_time(sklearn_fit, args.repeat)

    report = {
        "rows": args.rows, "dim": args.dim, "classes": args.classes, "spread": args.spread, "n_train": len(train_x),
        "n_test": n_test,
        "ours": {"seconds": round(ours_s, 3), "runs": [round(t, 3) for t in ours_runs], "accuracy": round(ours_acc, 4),
                 "C": head.C, "validation_accuracy_by_C": head.info["validation_accuracy_by_C"],
                 "refit_iterations": head.info["iterations"]},
        "sklearn": {"seconds": round(sk_s, 3), "runs": [round(t, 3) for t in sk_runs], "accuracy": round(sk_acc, 4),
                    "C": 1.0, "iterations": int(model.n_iter_.max())},
        "sklearn_one_blas_thread": {"seconds": round(sk1_s, 3), "runs": [round(t, 3) for t in sk1_runs]},
        "speedup": round(sk_s / ours_s, 2),
        "ours_at_most_sklearn_time_at_least_its_accuracy": ours_s <= min(sk_s, sk1_s) and ours_acc >= sk_acc,
        "load_avg_before": load_before, "machine": machine(),
    }
    write_report(args.out, report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
