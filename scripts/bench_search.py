"""Benchmark vector search: exact FAISS flat vs LanceDB's default index vs our FAISS and Lance engines.

Run from the repository root:

    .venv/bin/python scripts/bench_search.py [--quick] [--sizes 100000,1000000] [--dim 384]
                                             [--queries 1000] [--threads T] [--out bench-out/bench_search.json]

For each size N, in one process and one run:

* Data: synthetic clustered embeddings (CENTERS gaussian centres, points = centre + NOISE * gaussian,
  L2-normalised), written to an .npy file and loaded the way users do it:
  `indexer.ingest(coll, [npy], model="none", progress=False)` (timed). `indexer.index.AUTO_INDEX_ROWS`
  is patched to a huge value for the run so ingest does not build an index itself; every index
  below is built explicitly and timed on its own. Queries are FRESH points from the same
  distribution (never in the collection), plus a few more for untimed warm-up.
* Methods, side by side, measured in this order (so the FAISS index is current when searched end to
  end, before any Lance index changes the table version):
  1. exact: `faiss.IndexFlatIP` over the same vectors, built directly; ground truth and speed baseline.
  2. ours faiss: `indexer.index.build_index(coll, kind="auto", target_recall=0.95)`, searched through
     `FaissIndex.open(coll).search(queries, 10)`; and end to end through `indexer.search(path,
     vector=v, k=10)` (opens the collection and index, catches up, fetches the rows) and
     `indexer.search_batch` for the batch.
  3. lance default: `table.create_index(metric="cosine")` with no tuning, queried with
     `table.search(v).distance_type("cosine").limit(10).select(["id", "_distance"])` (default nprobes,
     no refine; only the id is fetched, as for the other methods).
  4. ours lance: `build_index(coll, engine="lance", target_recall=0.95)`, then `lance_search` with the
     tuned nprobes / refine_factor (it replaces the default Lance index).
* Per method: recall@10 on the fresh queries vs exact; single-query latency p50/p99 (one query per
  call, after WARMUP untimed calls) and throughput (1 / mean latency) and its ratio to exact; batched
  QPS (all queries in one call, where the API takes a batch); build time; index size (files on disk,
  or codes in memory for exact); peak RSS growth during the build (VmHWM after resetting it through
  /proc/self/clear_refs; absent where the kernel refuses that).
* Sweeps: our FAISS index at knob values around the tuned one, our Lance engine at nprobes x
  refine_factor around its tuned setting; recall vs single-query QPS drawn in
  <out dir>/recall_vs_qps_<N>.png (needs matplotlib, a benchmark-only dependency).
* Targets (defined at 1M x 384, shown for every size): ours faiss recall@10 >= 0.95, single-query
  throughput >= 20x exact and p50 <= 1 ms; ours lance recall@10 >= 0.95 at its tuned setting.

FAISS runs on --threads OpenMP threads throughout (index builds included); Lance uses its own pools.
Tables go to stdout, progress to stderr, everything to the JSON report (--out). `--quick` runs one
20000-vector size with 200 queries (about 1-2 minutes); the defaults take about 30-40 minutes on two
cores. Scratch collections live in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")  # index stats without the centroids

import faiss
import lance
import lancedb
import numpy as np
from benchlib import clustered, latency_ms, measured, no_auto_index, write_report

import indexer
from indexer import Collection, Query
from indexer.index import FaissIndex, build_index, lance_meta, lance_search
from indexer.index.lance_engine import NPROBES, REFINE
from indexer.index.tuning import EF_SWEEP, NPROBE_SWEEP

log = logging.getLogger("bench_search")

K = 10
SEED = 1234
CENTERS = 1000
NOISE = 0.6  # per-dimension noise around standard-normal centres (as in tests/test_index.py)
WARMUP = 10
SINGLE = 300  # queries timed one at a time
TARGET_RECALL = 0.95
TARGET_N = 1_000_000
TARGET_SPEEDUP, TARGET_P50_MS = 20.0, 1.0
NPY = "vectors.npy"


@dataclass
class Result:
    method: str
    params: str
    recall: float
    p50_ms: float
    p99_ms: float
    single_qps: float
    latency_queries: int
    batch_qps: float | None = None
    build_s: float | None = None
    index_bytes: int | None = None
    build_peak_rss_mb: float | None = None
    speedup: float = 0.0  # single-query throughput / exact's
    note: str = ""


@dataclass
class Timing:
    ids: np.ndarray  # (queries, K) collection row numbers, -1 where none
    latencies_s: list[float] = field(default_factory=list)
    batch_qps: float | None = None


# ---- data -----------------------------------------------------------------------------------------------

def make_data(n: int, dim: int, queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base, fresh queries, warm-up queries) from the same CENTERS clusters."""
    rng = np.random.default_rng(SEED + n)
    centers = rng.standard_normal((CENTERS, dim), dtype=np.float32)
    base, _ = clustered(n, centers, NOISE, rng)
    extra, _ = clustered(queries + WARMUP, centers, NOISE, rng)
    return base, extra[:queries], extra[queries:]


def row_numbers(ids: list[str]) -> np.ndarray:
    """Collection ids `vectors.npy:<i + 1>` (how ingest names .npy rows) -> row numbers i."""
    return np.array([int(i.rsplit(":", 1)[1]) - 1 for i in ids], dtype=np.int64)


def ingest(x: np.ndarray, work: Path) -> tuple[Collection, dict]:
    work.mkdir(parents=True)
    npy = work / NPY
    np.save(npy, x)
    path = work / "bench.idx"
    log.info("ingest of %d vectors from %s (AUTO_INDEX_ROWS patched: no automatic index)", len(x), npy)
    summary, seconds, rss = measured(indexer.ingest, path, [str(npy)], model="none", progress=False)
    if summary.added != len(x) or summary.errors:
        raise SystemExit(f"ingest added {summary.added} of {len(x)} ({summary.errors} errors)")
    npy.unlink()
    return Collection.open(path), {"seconds": seconds, "rows_per_s": len(x) / seconds, "peak_rss_mb": rss}


# ---- measuring ------------------------------------------------------------------------------------------

def single_queries(search_one: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
                   warmup: np.ndarray) -> Timing:
    """One query per call, each timed; WARMUP untimed calls first."""
    for q in warmup:
        search_one(q)
    ids = np.full((len(queries), K), -1, dtype=np.int64)
    latencies = []
    for i, q in enumerate(queries):
        start = time.perf_counter()
        found = search_one(q)
        latencies.append(time.perf_counter() - start)
        ids[i, : len(found)] = found[:K]
    return Timing(ids, latencies)


def batched(search_all: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, warmup: np.ndarray) -> Timing:
    search_all(warmup)
    start = time.perf_counter()
    ids = search_all(queries)
    return Timing(ids, batch_qps=len(queries) / (time.perf_counter() - start))


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[f >= 0], t)) / K for f, t in zip(found, truth)]))


def summarize(method: str, params: str, truth: np.ndarray, batch: Timing | None, single: Timing,
              **extra) -> Result:
    """Recall from the batch call where there is one (else from the single-query loop)."""
    lat = latency_ms(single.latencies_s)
    found = batch.ids if batch is not None else single.ids
    return Result(method, params, recall_at_k(found, truth), lat["p50_ms"], lat["p99_ms"], 1000 / lat["mean_ms"],
                  len(single.latencies_s), batch_qps=batch.batch_qps if batch is not None else None, **extra)


# ---- 1. exact flat ----------------------------------------------------------------------------------------

def bench_exact(x: np.ndarray, queries: np.ndarray, warmup: np.ndarray, n_single: int) -> tuple[Result, np.ndarray]:
    log.info("exact: faiss.IndexFlatIP over %d vectors", len(x))

    def build() -> faiss.IndexFlatIP:
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        return index

    flat, build_s, rss = measured(build)
    batch = batched(lambda q: flat.search(q, K)[1], queries, warmup)
    single = single_queries(lambda q: flat.search(q[None, :], K)[1][0], queries[:n_single], warmup)
    result = summarize("exact flat (faiss)", "IndexFlatIP", batch.ids, batch, single, build_s=build_s,
                       index_bytes=flat.ntotal * flat.d * 4, build_peak_rss_mb=rss,
                       note="index size: vectors in memory (no file)")
    return result, batch.ids


# ---- 2. our FAISS index -----------------------------------------------------------------------------------

def faiss_searchers(index: FaissIndex, knobs: dict | None = None):
    pos_to_row = np.append(row_numbers(index.ids.to_pylist()), -1)  # position -1 (no hit) -> -1

    def one(q: np.ndarray) -> np.ndarray:
        return pos_to_row[index.search(q[None, :], K, knobs=knobs)[0][0]]

    def many(qs: np.ndarray) -> np.ndarray:
        return pos_to_row[index.search(qs, K, knobs=knobs)[0]]

    return one, many


def _knobs_text(knobs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in knobs.items()) or "-"


def bench_ours_faiss(coll: Collection, queries: np.ndarray, warmup: np.ndarray, truth: np.ndarray,
                     n_single: int) -> tuple[list[Result], dict]:
    log.info("ours faiss: build_index(kind='auto', target_recall=%.2f)", TARGET_RECALL)
    info, build_s, rss = measured(build_index, coll, kind="auto", target_recall=TARGET_RECALL)
    index = FaissIndex.open(coll)
    files = {p.name: p.stat().st_size for p in (coll.path / "index").iterdir() if p.is_file()}
    one, many = faiss_searchers(index)
    direct = summarize(f"ours faiss ({info['kind']})", f"{info['factory']} {_knobs_text(info['params'])}", truth,
                       batched(many, queries, warmup), single_queries(one, queries[:n_single], warmup),
                       build_s=build_s, index_bytes=sum(files.values()), build_peak_rss_mb=rss,
                       note="FaissIndex.open(coll).search; size: index dir")

    log.info("ours faiss end to end: indexer.search / indexer.search_batch")
    path = str(coll.path)

    def e2e_one(q: np.ndarray) -> np.ndarray:
        return row_numbers([h["id"] for h in indexer.search(path, vector=q, k=K)])

    def e2e_many(qs: np.ndarray) -> np.ndarray:
        hits = indexer.search_batch(path, [Query(vector=q) for q in qs], k=K)
        out = np.full((len(qs), K), -1, dtype=np.int64)
        for i, h in enumerate(hits):
            out[i, : len(h)] = row_numbers([r["id"] for r in h])
        return out

    e2e = summarize("ours faiss end to end", "indexer.search(path, vector=v)", truth,
                    batched(e2e_many, queries, warmup), single_queries(e2e_one, queries[:n_single], warmup),
                    note="opens collection + index per call, fetches rows")

    sweep = sweep_faiss(index, info, queries, warmup, truth, n_single)
    return [direct, e2e], {"info": info, "files": files, "sweep": sweep}


def _around(values: list, center, width: int) -> list:
    """`center` (a tuned value, always one of the engine's own sweep values) and `width` neighbours each side."""
    i = values.index(center)
    return values[max(0, i - width) : i + width + 1]


def sweep_faiss(index: FaissIndex, info: dict, queries: np.ndarray, warmup: np.ndarray, truth: np.ndarray,
                n_single: int) -> list[dict]:
    """Recall and single-query QPS at the index's main knob around its tuned value (others kept)."""
    params = info["params"]
    if "ef" in params:
        knob, values = "ef", _around(list(EF_SWEEP), params["ef"], 3)
    elif "nprobe" in params:
        nlist = faiss.extract_index_ivf(index.index).nlist
        knob, values = "nprobe", _around([p for p in NPROBE_SWEEP if p <= nlist], params["nprobe"], 3)
    else:
        return []  # flat: nothing to sweep
    log.info("ours faiss sweep: %s in %s", knob, values)
    points = []
    for v in values:
        one, many = faiss_searchers(index, {**params, knob: v})
        r = summarize("sweep", f"{knob}={v}", truth, batched(many, queries, warmup),
                      single_queries(one, queries[:n_single], warmup))
        points.append({knob: v, "recall": r.recall, "single_qps": r.single_qps, "p50_ms": r.p50_ms,
                       "batch_qps": r.batch_qps, "tuned": v == params[knob]})
    return points


# ---- 3. Lance default index ------------------------------------------------------------------------------

def lance_index_stats(coll: Collection) -> dict:
    ds = coll.dataset()
    desc = next(d for d in ds.describe_indices() if "vector" in d.field_names)
    stats = ds.stats.index_stats(desc.name)["indices"][0]
    return {"name": desc.name, "bytes": desc.total_size_bytes, "index_type": stats["index_type"],
            "num_partitions": stats.get("num_partitions"),
            "num_sub_vectors": stats.get("sub_index", {}).get("num_sub_vectors")}


def bench_lance_default(coll: Collection, queries: np.ndarray, warmup: np.ndarray, truth: np.ndarray,
                        n_single: int) -> tuple[Result, dict]:
    log.info("lance default: table.create_index(metric='cosine')")
    table = coll.table
    _, build_s, rss = measured(table.create_index, metric="cosine")
    stats = lance_index_stats(coll)

    def one(q: np.ndarray) -> np.ndarray:
        hits = table.search(q).distance_type("cosine").limit(K).select(["id", "_distance"]).to_arrow()
        return row_numbers(hits.column("id").to_pylist())

    def many(qs: np.ndarray) -> np.ndarray:
        hits = table.search(qs).distance_type("cosine").limit(K).select(["id", "_distance"]).to_arrow()
        out = np.full((len(qs), K), -1, dtype=np.int64)
        qi, rows = hits.column("query_index").to_numpy(), row_numbers(hits.column("id").to_pylist())
        for i in range(len(qs)):
            found = rows[qi == i]  # already best first within each query
            out[i, : len(found)] = found[:K]
        return out

    params = (f"{stats['index_type']} partitions={stats['num_partitions']} sub_vectors={stats['num_sub_vectors']}"
              " nprobes=default refine=none")
    result = summarize("lance default", params, truth, batched(many, queries, warmup),
                       single_queries(one, queries[:n_single], warmup), build_s=build_s,
                       index_bytes=stats["bytes"], build_peak_rss_mb=rss, note="table.search(list of vectors) batch")
    return result, stats


# ---- 4. our Lance engine ---------------------------------------------------------------------------------

def lance_searcher(coll: Collection, knobs: dict) -> Callable[[np.ndarray], np.ndarray]:
    return lambda q: row_numbers([h["id"] for h in lance_search(coll, q, K, knobs, columns=["id"])])


def bench_ours_lance(coll: Collection, queries: np.ndarray, warmup: np.ndarray,
                     truth: np.ndarray) -> tuple[Result, dict]:
    log.info("ours lance: build_index(engine='lance', target_recall=%.2f)", TARGET_RECALL)
    info, build_s, rss = measured(build_index, coll, engine="lance", target_recall=TARGET_RECALL)
    stats = lance_index_stats(coll)
    knobs = info["params"]
    # lance_search takes one query per call: recall and latency both come from the loop over every query.
    result = summarize(f"ours lance ({info['kind']})", f"{info['index_type']} {info['build_params']} "
                       f"{_knobs_text(knobs)}", truth, None, single_queries(lance_searcher(coll, knobs), queries, warmup),
                       build_s=build_s, index_bytes=stats["bytes"], build_peak_rss_mb=rss,
                       note="lance_search: no batch form")
    sweep = sweep_lance(coll, info, queries, warmup, truth)
    return result, {"info": info, "tuning_sweep": lance_meta(coll)["sweep"], "stats": stats, "sweep": sweep}


def sweep_lance(coll: Collection, info: dict, queries: np.ndarray, warmup: np.ndarray,
                truth: np.ndarray) -> list[dict]:
    tuned = info["params"]
    nprobes = _around([p for p in NPROBES if p <= info["build_params"]["num_partitions"]], tuned["nprobes"], 2)
    refines = [None, *[r for r in _around(list(REFINE), tuned["refine_factor"], 1) if r is not None]]
    log.info("ours lance sweep: nprobes %s x refine_factor %s", nprobes, refines)
    points = []
    for refine in refines:
        for p in nprobes:
            knobs = {"nprobes": p, "refine_factor": refine}
            r = summarize("sweep", _knobs_text(knobs), truth, None,
                          single_queries(lance_searcher(coll, knobs), queries, warmup))
            points.append({**knobs, "recall": r.recall, "single_qps": r.single_qps, "p50_ms": r.p50_ms,
                           "tuned": knobs == tuned})
    return points


# ---- one size -----------------------------------------------------------------------------------------------

def bench_size(n: int, dim: int, n_queries: int, work: Path) -> dict:
    log.info("== N=%d dim=%d: generating data (%d centres, noise %.2f) and %d fresh queries",
             n, dim, CENTERS, NOISE, n_queries)
    x, queries, warmup = make_data(n, dim, n_queries)
    n_single = min(SINGLE, n_queries)
    coll, ingest_stats = ingest(x, work / f"n{n}")
    exact, truth = bench_exact(x, queries, warmup, n_single)
    del x  # the collection holds the vectors from here on
    ours_faiss, faiss_extra = bench_ours_faiss(coll, queries, warmup, truth, n_single)
    lance_default, default_stats = bench_lance_default(coll, queries, warmup, truth, n_single)
    ours_lance, lance_extra = bench_ours_lance(coll, queries, warmup, truth)
    results = [exact, *ours_faiss, lance_default, ours_lance]
    for r in results:
        r.speedup = r.single_qps / exact.single_qps
    faiss_direct = ours_faiss[0]
    checks = [
        ("ours faiss recall@10", f"{faiss_direct.recall:.3f}", f">= {TARGET_RECALL}", faiss_direct.recall >= TARGET_RECALL),
        ("ours faiss single-query throughput vs exact", f"{faiss_direct.speedup:.1f}x", f">= {TARGET_SPEEDUP:g}x",
         faiss_direct.speedup >= TARGET_SPEEDUP),
        ("ours faiss single-query p50", f"{faiss_direct.p50_ms:.3f} ms", f"<= {TARGET_P50_MS:g} ms",
         faiss_direct.p50_ms <= TARGET_P50_MS),
        ("ours lance recall@10 (tuned)", f"{ours_lance.recall:.3f}", f">= {TARGET_RECALL}", ours_lance.recall >= TARGET_RECALL),
    ]
    return {
        "n": n, "dim": dim, "queries": n_queries, "single_queries": n_single, "ingest": ingest_stats,
        "results": [asdict(r) for r in results], "ours_faiss": faiss_extra, "lance_default": default_stats,
        "ours_lance": lance_extra,
        "checks": [{"check": c, "value": v, "target": t, "passed": p} for c, v, t, p in checks],
    }


# ---- report ---------------------------------------------------------------------------------------------

def _opt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def print_size(report: dict, threads: int) -> None:
    n, ing = report["n"], report["ingest"]
    print(f"\n== N = {n:,} x {report['dim']}: {report['queries']} fresh queries, latency over "
          f"{report['single_queries']} one at a time (all {report['queries']} for ours lance); faiss threads {threads} ==")
    print(f"ingest (.npy, model none, AUTO_INDEX_ROWS patched): {ing['seconds']:.1f} s "
          f"({ing['rows_per_s']:,.0f} rows/s), peak RSS +{_opt(ing['peak_rss_mb'], ',.0f')} MiB")
    head = ("method", "recall@10", "p50 ms", "p99 ms", "1-q QPS", "x exact", "batch QPS", "build s", "index MiB",
            "build RSS+MiB")
    rows = [(r["method"], f"{r['recall']:.3f}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['single_qps']:,.0f}",
             f"{r['speedup']:.1f}", _opt(r["batch_qps"], ",.0f"), _opt(r["build_s"], ".1f"),
             _opt(None if r["index_bytes"] is None else r["index_bytes"] / 2**20, ",.1f"),
             _opt(r["build_peak_rss_mb"], ",.0f"))
            for r in report["results"]]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print("  params:")
    for r in report["results"]:
        print(f"    {r['method']}: {r['params']}" + (f"  [{r['note']}]" if r["note"] else ""))
    for title, points in (("ours faiss sweep", report["ours_faiss"]["sweep"]), ("ours lance sweep", report["ours_lance"]["sweep"])):
        if points:
            print(f"  {title} (recall@10 / single-query QPS / p50 ms; * = tuned):")
            for p in points:
                knobs = " ".join(f"{k}={v}" for k, v in p.items() if k not in ("recall", "single_qps", "p50_ms", "batch_qps", "tuned"))
                print(f"    {'*' if p['tuned'] else ' '} {knobs:<28} {p['recall']:.3f}  {p['single_qps']:>9,.0f}  {p['p50_ms']:.3f}")
    print(f"  targets (defined at {TARGET_N:,} x 384):")
    for c in report["checks"]:
        print(f"    {c['check']:<45} {c['value']:>10}  {c['target']:<9} {'PASS' if c['passed'] else 'MISS'}")


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s", path)
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    faiss_points = report["ours_faiss"]["sweep"]
    if faiss_points:
        knob = next(k for k in ("ef", "nprobe") if k in faiss_points[0])
        ax.plot([p["recall"] for p in faiss_points], [p["single_qps"] for p in faiss_points], "o-",
                label=f"ours faiss ({report['ours_faiss']['info']['kind']}), {knob} sweep")
        for p in faiss_points:
            ax.annotate(str(p[knob]), (p["recall"], p["single_qps"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lance_points = report["ours_lance"]["sweep"]
    for refine in dict.fromkeys(p["refine_factor"] for p in lance_points):
        pts = [p for p in lance_points if p["refine_factor"] == refine]
        ax.plot([p["recall"] for p in pts], [p["single_qps"] for p in pts], "s--",
                label=f"ours lance, nprobes sweep, refine={refine}")
        for p in pts:
            ax.annotate(str(p["nprobes"]), (p["recall"], p["single_qps"]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
    for r, marker in zip(report["results"], ("X", "*", "P", "D", "*")):
        ax.plot(r["recall"], r["single_qps"], marker, markersize=12, linestyle="none", label=f"{r['method']} (as built)")
    ax.axvline(TARGET_RECALL, color="grey", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("recall@10 (fresh queries, vs exact)")
    ax.set_ylabel("single-query throughput (queries/s, log)")
    ax.set_title(f"recall vs single-query QPS, N={report['n']:,} x {report['dim']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- main -------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated collection sizes (default %(default)s)")
    p.add_argument("--dim", type=int, default=384, help="vector dimension (default %(default)s)")
    p.add_argument("--queries", type=int, help="fresh queries per size (default 1000; quick 200)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="FAISS OpenMP threads (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="one size of 20000 and 200 queries (about 1-2 minutes)")
    p.add_argument("--out", type=Path, default=Path("bench-out/bench_search.json"), help="JSON report path")
    args = p.parse_args()
    args.sizes = [20_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    args.queries = args.queries or (200 if args.quick else 1000)
    return args


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    logging.getLogger("indexer").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # lancedb's create_index(metric=...) notice
    args = parse_args()
    faiss.omp_set_num_threads(args.threads)
    no_auto_index()  # ingest must not build an index: each build is timed here
    print(f"faiss {faiss.__version__} with {faiss.omp_get_max_threads()} OpenMP threads; lancedb {lancedb.__version__}, "
          f"lance {lance.__version__}; {os.cpu_count()} CPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sizes = []
    with tempfile.TemporaryDirectory(prefix="bench-search-", dir="/tmp") as tmp:
        for n in args.sizes:
            size_start = time.perf_counter()
            report = bench_size(n, args.dim, args.queries, Path(tmp))
            report["seconds"] = time.perf_counter() - size_start
            png = args.out.parent / f"recall_vs_qps_{n}.png"
            report["png"] = str(png) if plot(report, png) else None
            print_size(report, faiss.omp_get_max_threads())
            sys.stdout.flush()
            sizes.append(report)
            save_report(args, sizes, time.perf_counter() - started)  # after every size: a partial run still reports
    target = next((s for s in sizes if s["n"] == TARGET_N and s["dim"] == 384), None)
    if target is None:
        print(f"\ntargets are defined at {TARGET_N:,} x 384, which this run did not include", end="")
    else:
        print(f"\nat {TARGET_N:,} x 384: {sum(c['passed'] for c in target['checks'])}/{len(target['checks'])} targets met", end="")
    print(f"; total wall time {time.perf_counter() - started:.0f} s")


def save_report(args: argparse.Namespace, sizes: list[dict], seconds: float) -> None:
    report = {
        "config": {"sizes": args.sizes, "dim": args.dim, "queries": args.queries, "quick": args.quick,
                   "faiss_threads": faiss.omp_get_max_threads(), "cpus": os.cpu_count(), "k": K,
                   "centers": CENTERS, "noise": NOISE, "seed": SEED, "warmup": WARMUP,
                   "auto_index_rows_patched": True, "faiss": faiss.__version__, "lancedb": lancedb.__version__,
                   "lance": lance.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "sizes": sizes, "total_seconds": seconds,
    }
    write_report(args.out, report)
    log.info("report written to %s", args.out)


if __name__ == "__main__":
    main()
