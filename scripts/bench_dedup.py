"""Benchmark near-duplicate detection: ours vs exact chunked brute force vs sentence-transformers
`util.paraphrase_mining_embeddings`, on the same vectors, in one run.

Run from the repository root:

    nice -n 5 .venv/bin/python scripts/bench_dedup.py [--quick] [--n 1000000] [--subset 100000]
                                                       [--mining 200000] [--threshold 0.9]
                                                       [--out bench-out/bench_dedup.json]

* Data: N synthetic 384-d embeddings in clusters (CENTERS gaussian centres; a point is centre + noise,
  L2-normalised, so distinct points of one cluster sit near cosine 0.5), with DUP_RATE of them given a
  planted near-duplicate (cosine spread over about 0.85-0.995, so some fall just under the threshold)
  and a few exact copies. Written to .npy and ingested with `indexer.ingest(..., model="none")`.
* ours (N): `indexer.tasks.dedup.dedup(collection, threshold=T)` end to end (method auto: k-means lists
  joined by matrix products, with the spread of lists tuned to a measured pair recall; loading from
  Lance, pairs, union-find groups, keep policy); wall time and peak RSS growth.
* exact (SUBSET): all pairs >= T among the first SUBSET items by chunked brute force (numpy blocks of
  4096 rows times the subset, never n x n). Pair recall of the N run = the exact subset pairs it found
  (pairs inside the subset are pairs of the whole set too); plus our methods run on the subset alone.
* paraphrase_mining (MINING): `util.paraphrase_mining_embeddings` (top_k 100, max_pairs unlimited, its
  default chunk sizes) against ours (`find_pairs`, method knn, no Lance) on the same array, both with
  their pair recall against chunked brute force. paraphrase_mining compares every pair in chunks (n^2 by
  construction): it runs on min(MINING, --mining-cap) vectors and its time at MINING is extrapolated as
  n^2 from that (said so in the output); ours is measured at MINING itself.
Targets: N=1M in <= 600 s with pair recall >= 0.99 on the 100k subset; >= 10x faster than
paraphrase_mining at 200k. `--quick`: N=100k, subset 20k, mining 20k (two minutes).
Results go to stdout and to --out as JSON; the machine's load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from benchlib import load_average, measured, no_auto_index, unit_rows, write_report

DIM = 384
CENTERS = 2000
DUP_RATE = 0.02
EXACT_COPIES = 100


def make_vectors(n: int, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors, the last DUP_RATE * n of them near-duplicates of earlier ones, shuffled."""
    rng = np.random.default_rng(seed)
    n_dup = int(n * DUP_RATE)
    base_n = n - n_dup - EXACT_COPIES
    centers = unit_rows(rng.standard_normal((CENTERS, DIM)).astype(np.float32))
    x = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, base_n, 100_000):
        stop = min(base_n, start + 100_000)
        noise = unit_rows(rng.standard_normal((stop - start, DIM)).astype(np.float32))
        x[start:stop] = centers[rng.integers(0, CENTERS, stop - start)] + noise
    x[:base_n] = unit_rows(x[:base_n])
    src = rng.integers(0, base_n, n_dup)
    # cos(x, x + e*u) ~ 1 / sqrt(1 + e^2) for a random unit u orthogonal-ish to x: e in [0.1, 0.62]
    eps = rng.uniform(0.1, 0.62, n_dup).astype(np.float32)
    u = unit_rows(rng.standard_normal((n_dup, DIM)).astype(np.float32))
    x[base_n : base_n + n_dup] = x[src] + eps[:, None] * u
    x[base_n + n_dup :] = x[rng.integers(0, base_n, EXACT_COPIES)]
    return unit_rows(x)[rng.permutation(n)]


def exact_pairs(x: np.ndarray, threshold: float, block: int = 4096) -> set[tuple[int, int]]:
    """Every pair i < j with x_i . x_j >= threshold: blocks of rows against the rest, never n x n."""
    out: set[tuple[int, int]] = set()
    for start in range(0, len(x), block):
        sims = x[start : start + block] @ x[start:].T
        qi, qj = np.nonzero(sims >= threshold)
        qj = qj + start
        qi = qi + start
        keep = qi < qj
        out.update(zip(qi[keep].tolist(), qj[keep].tolist()))
    return out


def as_set(i: np.ndarray, j: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(np.minimum(i, j).tolist(), np.maximum(i, j).tolist()))


def recall(found: set, truth: set) -> float:
    return len(found & truth) / len(truth) if truth else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--subset", type=int, default=100_000)
    ap.add_argument("--mining", type=int, default=200_000)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--mining-cap", type=int, default=50_000, help="run paraphrase_mining on at most this many "
                    "vectors and extrapolate its time quadratically to --mining (it is O(n^2) by construction)")
    ap.add_argument("--skip-mining", action="store_true", help="leave paraphrase_mining out (it is the slow part)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_dedup.json"))
    args = ap.parse_args()
    if args.quick:
        args.n, args.subset, args.mining = 100_000, 20_000, 20_000
    import faiss

    import indexer
    from indexer.tasks.dedup import Vectors, dedup, find_pairs

    no_auto_index()  # ingest must not build an ANN index: not part of dedup
    t = args.threshold
    res: dict = {"n": args.n, "dim": DIM, "threshold": t, "subset": args.subset, "mining": args.mining,
                 "cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(), "load_before": load_average()}
    print(f"{os.cpu_count()} CPUs, faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
          f"load average {res['load_before']}", flush=True)
    x = make_vectors(args.n)
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        npy = Path(tmp) / "v.npy"
        np.save(npy, x)
        _, secs, _ = measured(indexer.ingest, Path(tmp) / "v.idx", [str(npy)], model="none", progress=False)
        res["ingest_seconds"] = round(secs, 1)
        print(f"ingest {args.n:,} x {DIM} (not part of dedup): {secs:.1f} s", flush=True)
        report, secs, rss = measured(dedup, Path(tmp) / "v.idx", threshold=t)
    # Ids are "v.npy:<row + 1>": positions again.
    pos = lambda s: int(s.rsplit(":", 1)[1]) - 1  # noqa: E731
    ours_full = {(min(pos(p["a"]), pos(p["b"])), max(pos(p["a"]), pos(p["b"]))) for p in report.pairs}
    res["ours_full"] = {"seconds": round(secs, 1), "peak_rss_mb": rss and round(rss), "pairs": len(ours_full),
                        "groups": len(report.groups), "drop": len(report.drop), "method": report.method,
                        "stats": report.stats, "load": load_average()}
    print(f"ours ({report.method}) on {args.n:,}: {secs:.1f} s, peak RSS +{rss or 0:,.0f} MiB, "
          f"{len(ours_full):,} pairs, {len(report.groups):,} groups; {report.stats}", flush=True)

    sub = np.ascontiguousarray(x[: args.subset])
    truth, secs, rss = measured(exact_pairs, sub, t)
    in_sub = {p for p in ours_full if p[1] < args.subset}
    res["exact_subset"] = {"seconds": round(secs, 1), "peak_rss_mb": rss and round(rss), "pairs": len(truth)}
    res["ours_full_recall_on_subset"] = round(recall(in_sub, truth), 5)
    res["ours_full_precision_on_subset"] = round(len(in_sub & truth) / max(len(in_sub), 1), 5)
    print(f"exact brute force on {args.subset:,}: {secs:.1f} s, {len(truth):,} pairs; the {args.n:,} run found "
          f"{res['ours_full_recall_on_subset']:.4f} of them (precision {res['ours_full_precision_on_subset']:.4f})",
          flush=True)
    vec = lambda a: Vectors([str(k) for k in range(len(a))], [str(k) for k in range(len(a))], a)  # noqa: E731
    for method in ("exact", "knn", "semdedup") if args.subset <= 50_000 else ("knn", "semdedup"):
        (pairs, _, stats), secs, rss = measured(find_pairs, vec(sub), t, method)
        found = as_set(pairs[0], pairs[1])
        res[f"subset_{method}"] = {"seconds": round(secs, 2), "peak_rss_mb": rss and round(rss),
                                   "recall": round(recall(found, truth), 5), "pairs": len(found)}
        print(f"  ours {method:8} on {args.subset:,}: {secs:6.2f} s, pair recall {recall(found, truth):.4f}",
              flush=True)

    m = min(args.mining, args.n)
    xm = np.ascontiguousarray(x[:m])
    (pairs, _, stats), ours_s, ours_rss = measured(find_pairs, vec(xm), t, "knn")
    ours_m = as_set(pairs[0], pairs[1])
    res["mining_ours"] = {"seconds": round(ours_s, 2), "peak_rss_mb": ours_rss and round(ours_rss), "pairs": len(ours_m),
                          "stats": stats}
    print(f"ours (knn) on {m:,}: {ours_s:.1f} s, peak RSS +{ours_rss or 0:,.0f} MiB, {len(ours_m):,} pairs", flush=True)
    if not args.skip_mining:
        import torch
        from sentence_transformers import util

        cap = min(m, args.mining_cap)
        xc = np.ascontiguousarray(x[:cap])
        found, st_s, st_rss = measured(util.paraphrase_mining_embeddings, torch.from_numpy(xc), top_k=100,
                                       max_pairs=10**9)
        st = {(min(i, j), max(i, j)) for s, i, j in found if s >= t}
        truth_c = exact_pairs(xc, t)
        (pairs_c, _, _), ours_c, _ = measured(find_pairs, vec(xc), t, "knn")
        st_at_m = st_s * (m / cap) ** 2  # measured when cap == m
        res["mining_st"] = {"n": cap, "seconds": round(st_s, 1), "peak_rss_mb": st_rss and round(st_rss),
                            "pairs": len(st), "recall": round(recall(st, truth_c), 5),
                            "ours_seconds_same_n": round(ours_c, 2),
                            "ours_recall_same_n": round(recall(as_set(pairs_c[0], pairs_c[1]), truth_c), 5),
                            "seconds_at_mining_n": round(st_at_m, 1), "extrapolated": cap < m,
                            "torch_threads": torch.get_num_threads()}
        res["mining_speedup_same_n"] = round(st_s / ours_c, 1)
        res["mining_speedup"] = round(st_at_m / ours_s, 1)
        print(f"paraphrase_mining on {cap:,}: {st_s:.1f} s, peak RSS +{st_rss or 0:,.0f} MiB, pair recall "
              f"{res['mining_st']['recall']:.4f}; ours on the same {cap:,}: {ours_c:.1f} s, recall "
              f"{res['mining_st']['ours_recall_same_n']:.4f}: {res['mining_speedup_same_n']}x faster", flush=True)
        how = "extrapolated as n^2 from the run above" if cap < m else "measured"
        print(f"at {m:,}: paraphrase_mining {st_at_m:.0f} s ({how}) vs ours {ours_s:.1f} s (measured): "
              f"{res['mining_speedup']}x faster", flush=True)
    res["load_after"] = load_average()
    print(f"load average after: {res['load_after']}")
    write_report(args.out, res)


if __name__ == "__main__":
    main()
