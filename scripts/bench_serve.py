"""Benchmark the HTTP service: N concurrent clients sending text queries to a real `indexer serve` process.

Run from the repository root (with `nice -n 5` on a shared machine):

    .venv/bin/python scripts/bench_serve.py [--rows 100000] [--seconds 15] [--clients 1,8,64]
                                           [--out bench-out/bench_serve.json] [--quick]

* Collection: ROWS rows of synthetic text (12-20 words from a fixed vocabulary) with synthetic clustered
  384-d vectors (1000 gaussian centres + noise, L2-normalised), ingested as precomputed embeddings
  under the `minilm` model (`--vector-field emb --model minilm`), so that text queries are embedded by
  MiniLM exactly as for real data; embedding 100k texts with MiniLM on 2 CPU cores would take ~35 min and
  the vectors' meaning does not change the work a query does. Ingest builds the FAISS index (past
  100k rows it does so itself; below that `build_index` is called), tuned to recall@10 >= 0.95. The
  collection is kept in bench-out/ and reused by the next run with the same --rows.
* Server: `indexer serve COLL --port 0` as a subprocess, with its default micro-batching (`--max-batch 32`,
  `--batch-wait-ms 3`: each batch's first query is held 3 ms for more to join), with batching but no wait
  (`--batch-wait-ms 0`), and without batching (`--max-batch 1`): one after the other, never two at once.
* Clients: C asyncio connections (HTTP/1.1 keep-alive, a minimal client so the load generator costs
  little CPU next to the server on the same machine), each sending POST /search {"query", "k": 10}
  back to back for SECONDS seconds, queries drawn from 500 distinct random sentences. Latency is from
  sending the request to reading the whole response. An error is a non-200 answer or a failed
  connection.
* Reported per configuration and C: requests, errors, throughput, p50/p90/p99/max latency, the mean
  number of queries per search_batch call (from /metrics), and the 1-minute load average before and
  after. Targets (issue 15): zero errors and p99 <= 60 ms at 8 clients, zero errors and p99 <= 500 ms at
  64 clients, with batching, on a 100k collection. `--baseline REF` runs the batched server of an older
  commit too (a temporary git worktree under the report's folder), in the same run: the ratio holds on a
  noisy machine where absolute figures do not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import clustered, latency_ms, machine, timed, write_parquet, write_report

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DIM = 384
VOCAB = ("the a of and to in river city market bank loan price music song game team win lose star moon sun "
         "galaxy telescope bread flour oven recipe garden tree flower rain storm wind cloud road car train "
         "station bridge mountain valley forest ocean island harbour ship sail engine motor battery power "
         "energy plant cell protein gene doctor patient medicine school teacher student library book page "
         "word story history war peace law court vote election computer network data model search index").split()


def log(msg: str) -> None:
    print(f"bench_serve: {msg}", file=sys.stderr, flush=True)


def sentences(rng: np.random.Generator, n: int) -> list[str]:
    lengths = rng.integers(12, 21, n)
    words = rng.integers(0, len(VOCAB), lengths.sum())
    out, pos = [], 0
    for length in lengths:
        out.append(" ".join(VOCAB[w] for w in words[pos:pos + length]).capitalize() + ".")
        pos += length
    return out


def build_collection(rows: int, root: Path) -> Path:
    """The synthetic collection, built once per size and reused."""
    import indexer
    from indexer.index import build_index

    path = root / f"serve-{rows}.idx"
    if indexer.Collection.exists(path) and indexer.Collection.open(path).count() == rows \
            and (path / "index" / "index.json").exists():
        log(f"reusing {path}")
        return path
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((1000, DIM)).astype(np.float32)
    x, _ = clustered(rows, centres, 0.6, rng)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_parquet(Path(tmp) / "vectors.parquet", [f"doc-{i}" for i in range(rows)], x, "emb",
                            text=sentences(rng, rows), label=[f"topic-{i % 20}" for i in range(rows)])
        summary, seconds = timed(indexer.ingest, path, [str(src)], model="minilm", vector_field="emb", progress=False)
        log(f"ingested {summary.added} rows in {seconds:.0f}s")
    if not (path / "index" / "index.json").exists():
        _, seconds = timed(build_index, path, target_recall=0.95)
        log(f"built the FAISS index in {seconds:.0f}s")
    return path


class Server:
    def __init__(self, coll: Path, *args: str, checkout: Path | None = None):
        """`indexer serve` from this checkout, or from `checkout` (another version of the code, for a baseline)."""
        cmd = [sys.executable, "-m", "indexer.cli", "serve", str(coll.resolve()), "--port", "0", "--json", *args]
        env = {**os.environ, "PYTHONPATH": str(checkout)} if checkout else None
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     cwd=checkout)
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"indexer serve failed: {self.log.read()}")
        self.url = json.loads(line)["url"]
        host, port = self.url.split("//")[1].rstrip("/").rsplit(":", 1)
        self.host, self.port = host, int(port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


async def request(reader, writer, host: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    writer.write(head + body)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return int(status_line.split()[1]), await reader.readexactly(length)


async def client(server: Server, queries: list[bytes], start: int, until: float, latencies: list[float],
                 errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    i = start
    try:
        while time.perf_counter() < until:
            body = queries[i % len(queries)]
            i += 7
            t = time.perf_counter()
            try:
                status, data = await request(reader, writer, server.host, "POST", "/search", body)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                errors.append(repr(exc))
                writer.close()
                reader, writer = await asyncio.open_connection(server.host, server.port)
                continue
            if status != 200:
                errors.append(f"{status} {data[:200]!r}")
            else:
                latencies.append(time.perf_counter() - t)
    finally:
        writer.close()


async def get(server: Server, path: str) -> bytes:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        return (await request(reader, writer, server.host, "GET", path))[1]
    finally:
        writer.close()


def batch_stats(metrics: bytes) -> tuple[float, float]:
    values = dict(line.rsplit(" ", 1) for line in metrics.decode().splitlines()
                  if line.startswith("indexer_search_batch_size_"))
    return float(values.get("indexer_search_batch_size_count", 0)), float(values.get("indexer_search_batch_size_sum", 0))


async def level(server: Server, queries: list[bytes], clients: int, seconds: float) -> dict:
    # Warm-up: every connection's first requests, untimed.
    warm_until = time.perf_counter() + min(2.0, seconds / 5)
    await asyncio.gather(*(client(server, queries, c * 13, warm_until, [], []) for c in range(clients)))
    calls0, queries0 = batch_stats(await get(server, "/metrics"))
    load_before = os.getloadavg()[0]
    latencies: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    until = t0 + seconds
    await asyncio.gather(*(client(server, queries, c * 31 + 1, until, latencies, errors) for c in range(clients)))
    wall = time.perf_counter() - t0
    calls1, queries1 = batch_stats(await get(server, "/metrics"))
    return {"clients": clients, "requests": len(latencies) + len(errors), "errors": len(errors),
            "error_examples": errors[:3], "throughput_rps": len(latencies) / wall,
            **latency_ms(latencies, (50, 90, 99)), "mean_batch": (queries1 - queries0) / max(calls1 - calls0, 1),
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=15.0, help="Timed seconds per concurrency level.")
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--out", default="bench-out/bench_serve.json")
    ap.add_argument("--quick", action="store_true", help="20k rows, 5 s per level (a smoke run).")
    ap.add_argument("--baseline", metavar="GIT_REF",
                    help="Also run the batched server from this commit (a temporary git worktree), same run.")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.seconds = 20_000, 5.0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    coll = build_collection(args.rows, out.parent)
    rng = np.random.default_rng(11)
    queries = [json.dumps({"query": " ".join(s.split()[:rng.integers(3, 9)]), "k": 10}).encode()
               for s in sentences(rng, 500)]
    levels = [int(c) for c in args.clients.split(",")]
    configs = {"batched (default: --max-batch 32 --batch-wait-ms 3)": [],
               "batched, no wait (--batch-wait-ms 0)": ["--max-batch", "32", "--batch-wait-ms", "0"],
               "unbatched (--max-batch 1)": ["--max-batch", "1"]}
    report = {"rows": args.rows, "seconds_per_level": args.seconds, "machine": machine(), "results": {}}
    checkouts = {name: None for name in configs}
    if args.baseline:
        baseline = out.parent.resolve() / f"baseline-{args.baseline}"
        if not baseline.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], check=True,
                           stdout=subprocess.DEVNULL)
        name = f"baseline {args.baseline} (--max-batch 32)"
        configs[name], checkouts[name] = ["--max-batch", "32"], baseline
    for name, flags in configs.items():
        log(f"starting the server, {name}")
        server = Server(coll, *flags, checkout=checkouts[name])
        try:
            asyncio.run(get(server, "/health"))
            info = json.loads(asyncio.run(get(server, "/collections")))["collections"][0]
            report["index"] = info["index"]
            rows = []
            for c in levels:
                log(f"{name}: {c} clients for {args.seconds:.0f}s")
                rows.append(asyncio.run(level(server, queries, c, args.seconds)))
            report["results"][name] = rows
        finally:
            server.stop()
    write_report(out, report)
    print(f"\nPOST /search, text queries (MiniLM) on {args.rows} rows, {report['index']['kind']} index "
          f"(recall@10 {report['index']['recall_at_10']:.3f}); {args.seconds:.0f}s per level, "
          f"{os.cpu_count()} CPUs shared by server and clients")
    print(f"{'configuration':52} {'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>7} "
          f"{'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'batch':>5} {'load1':>10}")
    for name, rows in report["results"].items():
        for r in rows:
            print(f"{name:52} {r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['throughput_rps']:>7.1f} "
                  f"{r['p50_ms']:>7.1f} {r['p90_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['max_ms']:>7.1f} "
                  f"{r['mean_batch']:>5.1f} {r['load_before']:>4.2f}->{r['load_after']:.2f}")
    batched = {r["clients"]: r for r in report["results"]["batched (default: --max-batch 32 --batch-wait-ms 3)"]}
    plain = {r["clients"]: r for r in report["results"]["unbatched (--max-batch 1)"]}
    for c in levels:
        print(f"{c:>3} clients: batching gives {batched[c]['throughput_rps'] / max(plain[c]['throughput_rps'], 1e-9):.2f}x "
              f"throughput, p99 {batched[c]['p99_ms']:.1f} vs {plain[c]['p99_ms']:.1f} ms")
    if args.baseline:
        before = {r["clients"]: r for r in report["results"][f"baseline {args.baseline} (--max-batch 32)"]}
        for c in levels:
            print(f"{c:>3} clients: p99 {batched[c]['p99_ms']:.1f} ms vs {before[c]['p99_ms']:.1f} ms before "
                  f"({before[c]['p99_ms'] / max(batched[c]['p99_ms'], 1e-9):.2f}x), throughput "
                  f"{batched[c]['throughput_rps'] / max(before[c]['throughput_rps'], 1e-9):.2f}x")
    for c, p99 in ((8, 60), (64, 500)):
        if c in batched:
            ok = batched[c]["errors"] == 0 and batched[c]["p99_ms"] <= p99
            print(f"target ({c} clients, batched: 0 errors, p99 <= {p99} ms): {'met' if ok else 'NOT met'}")
    print(f"report: {out}")


if __name__ == "__main__":
    main()
