"""Benchmark retrieval for RAG: chunking speed, full-text index build and refresh, query latency by mode.

Run from the repository root:

    nice -n 5 .venv/bin/python scripts/bench_rag.py [--quick] [--rows 100000] [--queries 200]
                                                     [--out bench-out/bench_rag.json]

In one process and one run:

* Chunking: a ~1 MB document of generated prose (paragraphs of sentences) split by the MiniLM tokenizer
  into 200-token passages with 32 overlap: MB/s and passages/s, next to MiniLM's embedding rate for a
  sample of those passages, so the share of ingest time chunking costs is a ratio from the same run.
* Collection: --rows passages of generated text (sentences over a 5,000-word vocabulary, a few rare
  terms planted) with precomputed random unit vectors under the MiniLM spec (`--vector-field`, so text
  queries still embed with MiniLM), ingested with the full-text refresh switched off and the FAISS
  auto-index past 100k rows too, so the FTS build is timed alone; then a 1% append and its refresh.
* Queries: --queries text queries of 2-4 vocabulary words, through `indexer.search(path, q, k=10,
  mode=...)` end to end (opening the collection by path each time, as the CLI and server do): p50/p99
  latency for vector (the FAISS index `indexer index` builds, auto kind; the query embedded by MiniLM),
  text (BM25), hybrid (both + RRF) and hybrid --group-by-doc.

Prints the machine load average beside the figures; writes everything to --out. `--quick`: a 0.2 MB
document, 10,000 rows and 50 queries (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from benchlib import latency_ms, load_average, no_auto_index, timed, unit_rows, write_parquet, write_report


def _vocabulary(rng: np.random.Generator, n: int = 5000) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = {"".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(n * 2)}
    return sorted(words)[:n]


def _sentence(rng: np.random.Generator, vocab: list[str]) -> str:
    # Zipf-like word frequencies: a few common words, a long tail.
    idx = np.minimum(rng.zipf(1.3, size=rng.integers(8, 24)) - 1, len(vocab) - 1)
    return " ".join(vocab[i] for i in idx).capitalize() + "."


def bench_chunking(rng: np.random.Generator, vocab: list[str], text_bytes: int = 1_000_000) -> dict:
    from indexer.ingest.chunking import make_chunker
    from indexer.models import load_embedder

    embedder = load_embedder("minilm")
    paragraphs, size = [], 0
    while size < text_bytes:
        p = " ".join(_sentence(rng, vocab) for _ in range(rng.integers(2, 8)))
        paragraphs.append(p)
        size += len(p) + 2
    text = "\n\n".join(paragraphs)
    chunker = make_chunker(embedder, 200, 32)
    spans, chunk_s = timed(chunker.spans, text)
    sample = [text[s.start:s.end] for s in spans[:256]]
    embedder.embed(sample[:32])  # warm-up
    _, embed_s = timed(embedder.embed, sample)
    out = {"text_mb": round(len(text) / 1e6, 2), "passages": len(spans), "chunk_seconds": round(chunk_s, 3),
           "chunk_mb_per_s": round(len(text) / 1e6 / chunk_s, 2), "chunk_passages_per_s": round(len(spans) / chunk_s),
           "embed_passages_per_s": round(len(sample) / embed_s, 1)}
    out["chunking_share_of_embedding_time"] = round(out["embed_passages_per_s"] / out["chunk_passages_per_s"], 4)
    return out


def bench_collection(tmp: Path, rng: np.random.Generator, vocab: list[str], rows: int, n_queries: int) -> dict:
    import indexer.index as index_mod
    from indexer import ingest, search
    from indexer.index.fulltext import update_fts_index
    from indexer.store import Collection

    rare = ["quazzite", "zyxquux", "mollibrand"]
    texts = [_sentence(rng, vocab) + " " + _sentence(rng, vocab) for _ in range(rows)]
    for i, word in enumerate(rare):
        texts[(i + 1) * rows // 4] += f" It mentions {word}."

    def parquet(name: str, start: int, end: int) -> Path:
        v = unit_rows(rng.standard_normal((end - start, 384)).astype(np.float32))
        return write_parquet(tmp / name, [f"p{i}" for i in range(start, end)], v, "embedding",
                             text=texts[start:end], doc_id=[f"doc{i // 8}" for i in range(start, end)])

    main_rows = rows - rows // 100
    first, appended = parquet("a.parquet", 0, main_rows), parquet("b.parquet", main_rows, rows)
    path = tmp / "rag.idx"

    def refresh_fts() -> None:
        with coll.write_lock("full-text index"):
            update_fts_index(coll)

    no_auto_index()  # the FAISS index is built (and timed) below
    saved = index_mod.update_fts_index
    index_mod.update_fts_index = lambda coll: None
    try:
        _, ingest_s = timed(ingest, path, [str(first)], vector_field="embedding", model="minilm", progress=False)
        coll = Collection.open(path)
        _, build_s = timed(refresh_fts)
        ingest(path, [str(appended)], vector_field="embedding", progress=False)
        _, refresh_s = timed(refresh_fts)
    finally:
        index_mod.update_fts_index = saved

    from indexer.index import build_index

    info, index_s = timed(build_index, path)  # what ingest builds itself past 100k rows
    index_kind = info["kind"]
    queries = [" ".join(vocab[i] for i in rng.integers(0, 300, size=rng.integers(2, 5))) for _ in range(n_queries)]
    found_rare = [search(path, w, k=1, mode="text")[0]["text"].endswith(f"{w}.") for w in rare]
    latency = {}
    for label, kwargs in (("vector", {"mode": "vector"}), ("text", {"mode": "text"}),
                          ("hybrid", {"mode": "hybrid"}), ("hybrid_group_by_doc", {"mode": "hybrid",
                                                                                   "group_by_doc": True})):
        for q in queries[:5]:
            search(path, q, k=10, **kwargs)  # warm-up: model, index and file caches
        times = [timed(search, path, q, k=10, **kwargs)[1] for q in queries]
        latency[label] = latency_ms(times)
        print(f"  {label:22} p50 {latency[label]['p50_ms']:7.2f} ms   p99 {latency[label]['p99_ms']:7.2f} ms",
              file=sys.stderr)
    return {"rows": rows, "ingest_seconds_without_fts": round(ingest_s, 2), "fts_build_seconds": round(build_s, 2),
            "fts_refresh_seconds_after_1pct_append": round(refresh_s, 2),
            "rare_terms_found_first": all(found_rare), "faiss_index": index_kind,
            "faiss_build_seconds": round(index_s, 1), "latency": latency}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", default="bench-out/bench_rag.json")
    ap.add_argument("--quick", action="store_true", help="a 0.2 MB document, 10000 rows, 50 queries (about a minute)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.queries = 10_000, 50
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(0)
    vocab = _vocabulary(rng)
    report = {"load_before": load_average()}
    report["chunking"] = bench_chunking(rng, vocab, 200_000 if args.quick else 1_000_000)
    print(json.dumps(report["chunking"]), file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        report["collection"] = bench_collection(Path(tmp), rng, vocab, args.rows, args.queries)
    report["load_after"] = load_average()
    write_report(args.out, report)
    c, s = report["chunking"], report["collection"]
    print(f"chunking: {c['chunk_mb_per_s']} MB/s, {c['chunk_passages_per_s']} passages/s of 200 tokens; "
          f"MiniLM embeds {c['embed_passages_per_s']} passages/s (chunking costs "
          f"{100 * c['chunking_share_of_embedding_time']:.2f}% of embedding time)")
    print(f"full-text index over {s['rows']} passages: built in {s['fts_build_seconds']} s, refreshed after a 1% "
          f"append in {s['fts_refresh_seconds_after_1pct_append']} s; rare terms found first: "
          f"{s['rare_terms_found_first']}")
    print(f"vector side: FAISS {s['faiss_index']} index, built in {s['faiss_build_seconds']} s")
    for mode, lat in s["latency"].items():
        print(f"search --mode {mode:22} p50 {lat['p50_ms']:7.2f} ms  p99 {lat['p99_ms']:7.2f} ms")
    print(f"load average before {report['load_before']}, after {report['load_after']} (os.getloadavg)")


if __name__ == "__main__":
    main()
