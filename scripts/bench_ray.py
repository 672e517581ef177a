"""Benchmark the Ray ingest engine against the local engine on the same machine and inputs.

Run from the repository root:

    .venv/bin/python scripts/bench_ray.py [--quick] [--texts N] [--mem-texts K] [--out bench-out/bench_ray.json]

What it measures, in one run (JSON on stdout and in --out, progress on stderr):

1. Throughput: `indexer ingest` of N generated passages (bench_ingest.make_texts, model minilm, batch 64)
   into a fresh collection, each run a fresh CLI process: the local engine, then `--engine ray` with
   1 and with 2 embedding workers (one per GPU on a GPU machine: 1 and all GPUs). Ray runs join one
   cluster this script starts (CPUs: all cores, no dashboard), so its start-up is not billed to a run.
   Reported: the summary's items/s (wall time of the whole ingest, model loading included), and items/s
   without start-up (the same command on 64 texts, timed first, is subtracted: what a long run
   converges to). Target: Ray with 2 workers >= 0.8x the local engine without start-up on 2 cores.
2. Exactness: the Ray collections hold the local one's ids, and vectors within 1e-5.
3. Streaming: the Ray driver's peak RSS (VmHWM) for K and 10*K texts, each in a fresh process.
   Flat (ratio near 1) means the driver holds no vectors.

`--quick`: 1,000 texts, K=300 (a few minutes on two busy cores); defaults: 10,000 texts, K=2,000.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_ingest import make_texts  # noqa: E402
from benchlib import machine, write_jsonl, write_report  # noqa: E402

log = logging.getLogger("bench_ray")
BATCH = 64

_PEAK_RSS = """
import json, sys
from indexer import ingest
s = ingest(sys.argv[1], [sys.argv[2]], model="minilm", batch_size=64, progress=False, engine="ray", address=sys.argv[3])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": hwm / 1024, "added": s.added}))
"""


def ingest_cli(coll: Path, src: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "indexer.cli", "ingest", str(coll), str(src), "--model", "minilm",
           "--batch-size", str(BATCH), "--json", "-q", *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    summary["process_s"] = time.perf_counter() - started
    return summary


def measure(name: str, work: Path, src: Path, warm: Path, *extra: str) -> dict:
    """An engine's run on `src`, and its start-up (connecting, starting workers, loading the model)
    measured as the same command's time on a 64-text input: items/s without start-up is what a long
    run converges to."""
    startup = ingest_cli(work / f"{name}-startup.idx", warm, *extra)["seconds"]
    run = ingest_cli(work / f"{name}.idx", src, *extra)
    run["startup_s"] = startup
    run["items_per_s_without_startup"] = run["added"] / max(1e-9, run["seconds"] - startup)
    return run


def vectors(coll: Path) -> dict[str, np.ndarray]:
    from indexer.store import Collection

    rows = Collection.open(coll).dataset().to_table(columns=["id", "vector"]).to_pylist()
    return {r["id"]: np.asarray(r["vector"]) for r in rows}


def same_as(local: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict:
    common = sorted(set(local) & set(other))
    diff = max((float(np.abs(local[i] - other[i]).max()) for i in common), default=float("nan"))
    return {"same_ids": set(local) == set(other), "max_abs_diff": diff}


def peak_rss(n: int, work: Path, address: str) -> dict:
    src = write_jsonl(make_texts(n, seed=7), work / f"mem-{n}.jsonl")
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(work / f"mem-{n}.idx"), str(src), address],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return {"n": n, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--texts", type=int)
    ap.add_argument("--mem-texts", type=int)
    ap.add_argument("--out", type=Path, default=Path("bench-out/bench_ray.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    n = args.texts or (1000 if args.quick else 10_000)
    k = args.mem_texts or (300 if args.quick else 2000)

    import ray
    import torch

    gpus = torch.cuda.device_count()
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, num_gpus=gpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=min(4 * 2**30, max(500 * 2**20, int(0.2 * _total_memory()))))
    address = ray.get_runtime_context().gcs_address
    report: dict = {"machine": {**machine(), "gpus": gpus, "torch_threads": torch.get_num_threads()},
                    "texts": n}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            work = Path(tmp)
            src = write_jsonl(make_texts(n), work / "texts.jsonl")
            warm = write_jsonl(make_texts(64, seed=3), work / "warm.jsonl")
            log.info("local engine: %d texts", n)
            runs = {"local": measure("local", work, src, warm)}
            for workers in sorted({1, gpus or 2}):  # one per GPU on a GPU machine
                log.info("ray engine, %d workers: %d texts", workers, n)
                runs[f"ray_{workers}"] = measure(f"ray_{workers}", work, src, warm, "--engine", "ray",
                                                 "--address", address, "--workers", str(workers))
            local_vectors = vectors(work / "local.idx")
            for name in runs:
                if name != "local":
                    runs[name]["vs_local"] = same_as(local_vectors, vectors(work / f"{name}.idx"))
            keys = ("added", "errors", "seconds", "items_per_s", "startup_s", "items_per_s_without_startup",
                    "process_s", "vs_local")
            report["runs"] = {name: {key: r.get(key) for key in keys} for name, r in runs.items()}
            local = runs["local"]
            report["ratio_vs_local"] = {
                name: {"items_per_s": r["items_per_s"] / local["items_per_s"],
                       "without_startup": r["items_per_s_without_startup"] / local["items_per_s_without_startup"]}
                for name, r in runs.items() if name != "local"}
            ray2 = report["ratio_vs_local"].get("ray_2", {}).get("without_startup", 0)
            report["target_ray2_ge_0.8x_local_without_startup"] = ray2 >= 0.8
            log.info("driver memory: %d and %d texts", k, 10 * k)
            small, large = peak_rss(k, work, address), peak_rss(10 * k, work, address)
            report["driver_peak_rss"] = {"small": small, "large": large,
                                         "ratio": large["peak_rss_mb"] / small["peak_rss_mb"]}
    finally:
        ray.shutdown()
    print(write_report(args.out, report).read_text())


def _total_memory() -> int:
    import psutil

    return psutil.virtual_memory().total


if __name__ == "__main__":
    main()
