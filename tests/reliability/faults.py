"""Fault injection shared by the tests and scripts/reliability_report.py: run an `indexer` command, SIGKILL it
at a seeded moment, run it again, and compare what it left with an uninterrupted run's result.

A `Scenario` names what to build once (inputs, a collection each round starts from), the command, and how
a target is compared with the clean run's; `kill_rounds` runs it. The scenarios in SCENARIOS cover ingest
(text, images, chunked documents, new rows into an indexed collection), `index`, `dedup --apply` and
`finetune`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CLI = [sys.executable, "-m", "indexer.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
WORDS = ("river stone market bank loan city music song game ball team win lose sun moon star water fire tree "
         "house car road red blue green cat dog mat ran fast slow").split()


# ---- running and killing a command ------------------------------------------------------------------------

def run_cli(args: list[str], timeout: float = 600) -> float:
    """An uninterrupted `indexer ARGS` process that must succeed; returns its wall time (start-up included)."""
    started = time.monotonic()
    proc = subprocess.run([*CLI, *args], env=ENV, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode:
        raise AssertionError(f"indexer {' '.join(args)} exited {proc.returncode}: {proc.stderr[-3000:]}")
    return time.monotonic() - started


def drive(args: list[str], started: Callable[[], bool], delay: float | None = None) -> dict[str, Any]:
    """Run `indexer ARGS`; `delay` seconds after `started()` first holds (polled), SIGKILL it if it still runs
    (only the main process, as the OOM killer or `kill -9 PID` would). Without a delay it runs to the end.
    Returns {"killed", "seconds" (the whole run), "started_s" (when started() held; None if never)}."""
    t0 = time.monotonic()
    proc = subprocess.Popen([*CLI, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started_at = None
    while proc.poll() is None:
        if started_at is None and started():
            started_at = time.monotonic()
        if started_at is not None and delay is not None and time.monotonic() >= started_at + delay:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return {"killed": True, "seconds": time.monotonic() - t0, "started_s": started_at - t0}
        time.sleep(0.01)
    stderr = proc.stderr.read()
    if proc.returncode:
        raise AssertionError(f"indexer {' '.join(args)} exited {proc.returncode}: {stderr[-3000:]}")
    return {"killed": False, "seconds": time.monotonic() - t0,
            "started_s": None if started_at is None else started_at - t0}


@dataclass(frozen=True)
class Scenario:
    """One command under SIGKILL. `setup(workdir)` builds the inputs once and returns named paths;
    `base`, if given, names the collection among them that every target starts as a copy of;
    `args(paths, target)` is the command; `check(target, clean)` compares a rerun target with the clean
    run's ({"ok": bool, "lost": rows lost, ...}); `done(target)` says how far a killed run got (rows
    committed, epochs checkpointed). Kills land at a seeded fraction in `window` of the clean run's time
    after its first progress (start-up, imports and model loading come before it), or after its start
    for a command whose progress does not show before it ends."""

    name: str
    setup: Callable[[Path], dict[str, Path]]
    args: Callable[[dict[str, Path], Path], list[str]]
    check: Callable[[Path, Path], dict[str, Any]]
    done: Callable[[Path], int]
    base: str | None = None
    window: tuple[float, float] = (0.0, 0.95)


def _fresh(scenario: Scenario, paths: dict[str, Path], target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    if scenario.base:
        shutil.copytree(paths[scenario.base], target)
    return target


def kill_rounds(scenario: Scenario, workdir: Path, seeds: list[int]) -> list[dict[str, Any]]:
    """A clean run, then per seed: a fresh target, a kill at the seed's moment, a plain rerun, a comparison."""
    paths = scenario.setup(workdir)
    clean = _fresh(scenario, paths, workdir / "clean")
    before = scenario.done(clean)
    # The clean run is timed from the moment it first makes progress (its first commit or deletion, its
    # first epoch), or from its start if none shows before it ends: kills land in the part after it.
    timing = drive(scenario.args(paths, clean), lambda: scenario.done(clean) != before)
    offset = timing["started_s"] or 0.0
    results = []
    for seed in seeds:
        target = _fresh(scenario, paths, workdir / f"killed-{seed}")
        delay = random.Random(seed).uniform(*scenario.window) * (timing["seconds"] - offset)
        ready = (lambda t=target: scenario.done(t) != before) if timing["started_s"] else (lambda: True)
        killed = drive(scenario.args(paths, target), ready, delay)["killed"]
        out = {"scenario": scenario.name, "seed": seed, "delay_s": round(offset + delay, 2),
               "clean_s": round(timing["seconds"], 2), "killed": killed, "done_at_kill": scenario.done(target)}
        if killed:
            run_cli(scenario.args(paths, target))
        out.update(scenario.check(target, clean))
        out["survived"] = bool(out.pop("ok"))
        results.append(out)
    return results


# ---- inputs -----------------------------------------------------------------------------------------------

def text_corpus(path: Path, n: int, seed: int = 0) -> Path:
    """n short labelled texts with ids, as JSONL (enough rows for several commits of 256)."""
    rng = random.Random(seed)
    rows = [{"id": f"t{i}", "text": " ".join(rng.choices(WORDS, k=rng.randint(4, 24))), "label": f"l{i % 5}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def image_folder(path: Path, n: int, seed: int = 0) -> Path:
    """n small JPEGs of random colour blocks, in two sub-folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        (path / f"g{i % 2}").mkdir(parents=True, exist_ok=True)
        blocks = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((48, 48), Image.NEAREST).save(path / f"g{i % 2}" / f"img{i:04d}.jpg", quality=85)
    return path


def documents(path: Path, n: int, seed: int = 0) -> Path:
    """n Markdown documents of a few headed sections each (several passages per document when chunked)."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sections = [f"## Part {s}\n\n" + "\n\n".join(" ".join(rng.choices(WORDS, k=rng.randint(20, 40))) + "."
                                                     for _ in range(3)) for s in range(rng.randint(2, 4))]
        (path / f"doc{i:03d}.md").write_text(f"# Document {i}\n\n" + "\n\n".join(sections) + "\n")
    return path


def vectors_table(path: Path, n: int, dim: int = 32, seed: int = 0, duplicates: int = 0, start: int = 0,
                  changed: int = 0) -> Path:
    """Parquet rows {id, text, embedding} of precomputed vectors (ingested with --model none, no model to run):
    ids v{start}..; `duplicates` of them near copies of earlier rows (cosine > 0.99); the first `changed`
    ids of an earlier table (start 0) again with new vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    for j in range(duplicates):
        x[n - 1 - j] = x[j] + 0.01 * rng.standard_normal(dim).astype(np.float32)
    ids = [f"v{i}" for i in range(start, start + n)]
    if changed:
        ids[:changed] = [f"v{i}" for i in range(changed)]
    text = [" ".join(rng.choice(WORDS, 8)) for _ in range(n)]
    pq.write_table(pa.table({"id": ids, "text": text, "embedding": list(x)}), path)
    return path


def ingest_args(coll: Path, source: Path) -> list[str]:
    # Batches of 4: text is embedded in windows of 64 batches, so 700 rows make three commits, not one.
    return ["ingest", str(coll), str(source), "--model", "minilm", "--batch-size", "4", "--device", "cpu", "-q"]


def vector_ingest_args(coll: Path, source: Path) -> list[str]:
    # Batches of 64: commits of 512 rows, so a few thousand rows make several.
    return ["ingest", str(coll), str(source), "--vector-field", "embedding", "--model", "none", "--batch-size", "64",
            "-q"]


# ---- what a target holds ----------------------------------------------------------------------------------

def stored(coll: Path, columns: tuple[str, ...] = ("id", "vector")) -> list[dict]:
    import lance

    path = coll / "lance" / "items.lance"
    if not path.exists():
        return []
    return lance.dataset(str(path)).to_table(columns=list(columns)).to_pylist()


def rows_done(coll: Path) -> int:
    """Rows committed so far; polled while a writer runs, so a table still being created counts as none."""
    try:
        return len(stored(coll, ("id",)))
    except (ValueError, OSError):
        return 0


def lance_version(coll: Path) -> int:
    """The table's latest version (its commits so far), read the same way as rows_done."""
    try:
        import lance

        return lance.dataset(str(coll / "lance" / "items.lance")).version
    except (ValueError, OSError):
        return 0


def compare(coll: Path, reference: list[dict]) -> dict[str, Any]:
    """The resumed collection against a clean run's rows: lost and extra ids, duplicates, vector drift."""
    rows = stored(coll)
    ids = [r["id"] for r in rows]
    ref = {r["id"]: np.asarray(r["vector"]) for r in reference}
    got = {r["id"]: np.asarray(r["vector"]) for r in rows}
    common = sorted(ref.keys() & got.keys())
    drift = max((float(np.abs(ref[i] - got[i]).max()) for i in common), default=0.0)
    return {"lost": len(ref.keys() - got.keys()), "extra": len(got.keys() - ref.keys()),
            "duplicates": len(ids) - len(set(ids)), "max_vector_diff": drift}


def same_rows(target: Path, clean: Path) -> dict[str, Any]:
    out = compare(target, stored(clean))
    out["ok"] = out["lost"] == 0 and out["extra"] == 0 and out["duplicates"] == 0 and out["max_vector_diff"] < 1e-4
    return out


def index_problems(coll_path: Path, samples: int = 20) -> list[str]:
    """Where the collection's FAISS and full-text indexes disagree with its table (empty: they agree): the
    index's live entries are exactly the table's ids and reflect its last version; sampled vector and
    full-text searches find their row (or, for vectors, one as near) and return only stored rows."""
    from indexer import search
    from indexer.index import FaissIndex, fts_search
    from indexer.index.fulltext import has_fts_index, has_text
    from indexer.store import Collection

    coll = Collection.open(coll_path)
    columns = ["id", "vector", *(["text"] if has_text(coll) else [])]
    table = {r["id"]: r for r in coll.dataset().to_table(columns=columns).to_pylist()}
    sample = random.Random(0).sample(sorted(table), min(samples, len(table)))
    problems = []
    index = FaissIndex.open(coll)
    if index is not None:
        live = [i for i, alive in zip(index.ids.to_pylist(), index.live) if alive]
        if len(live) != len(set(live)):
            problems.append(f"{len(live) - len(set(live))} ids live twice in the index")
        if set(live) != set(table):
            problems.append(f"index: {len(set(live) - set(table))} ids not in the table, "
                            f"{len(set(table) - set(live))} table ids missing")
        if not index.is_current(coll):
            problems.append(f"index reflects version {index.meta.get('lance_version')}, table is at {coll.version()}")
        hits = [search(coll, vector=table[i]["vector"], k=10, engine="faiss") for i in sample]
        if any(h["id"] not in table for hit in hits for h in hit):
            problems.append("a vector search returned a row that is not stored")
        # A stored vector's nearest hit is itself (or a row just as near: tiny models give ties).
        if sum(bool(hit) and hit[0]["score"] > 0.999 for hit in hits) < 0.9 * len(sample):
            problems.append("vector searches by stored vectors miss their own rows")
    if has_fts_index(coll):
        for i in sample:
            words = " ".join(table[i]["text"].split()[:6])
            found = {h["id"] for h in fts_search(coll, words, k=len(table), columns=["id"])}
            if not found <= table.keys():
                problems.append(f"full-text search for {words!r} returned rows that are not stored")
            if i not in found:
                problems.append(f"full-text search for {words!r} misses row {i}")
    return problems


def rows_and_indexes(target: Path, clean: Path) -> dict[str, Any]:
    out = same_rows(target, clean)
    out["index_problems"] = index_problems(target)
    out["ok"] = out["ok"] and not out["index_problems"]
    return out


def same_weights(target: Path, clean: Path) -> dict[str, Any]:
    """A fine-tuned MODEL_DIR against the clean run's: every weight tensor, the best epoch, no checkpoint left."""
    from safetensors.torch import load_file

    if not (target / "model.safetensors").exists():
        return {"ok": False, "lost": None, "problem": f"no model in {target}"}
    got, ref = load_file(target / "model.safetensors"), load_file(clean / "model.safetensors")
    diff = max(float((got[k].double() - ref[k].double()).abs().max()) for k in ref) if got.keys() == ref.keys() \
        else float("inf")
    best = [json.loads((d / "indexer-model.json").read_text())["evaluation"]["best_epoch"] for d in (target, clean)]
    return {"ok": diff == 0.0 and best[0] == best[1] and not (target / "checkpoint").exists(), "lost": 0,
            "max_weight_diff": diff, "best_epoch": best}


def epochs_done(out: Path) -> int:
    state = out / "checkpoint" / "state.json"
    return json.loads(state.read_text())["epoch"] if state.exists() else 0


# ---- the scenarios ----------------------------------------------------------------------------------------

def _text(workdir: Path) -> dict[str, Path]:
    return {"source": text_corpus(workdir / "texts.jsonl", 700)}


def _images(workdir: Path) -> dict[str, Path]:
    from tests.tiny_models import tiny_vit

    # 600 images: three commits of 256, and past the 200 below which ingest decodes in its own process, so
    # DataLoader workers run.
    return {"source": image_folder(workdir / "images", 600), "model": tiny_vit(workdir / "tiny-vit")}


def _documents(workdir: Path) -> dict[str, Path]:
    from tests.tiny_models import tiny_bert

    return {"source": documents(workdir / "docs", 40), "model": tiny_bert(workdir / "tiny-bert")}


def _vectors(workdir: Path, indexed: bool = False) -> dict[str, Path]:
    """A text collection of 3,000 precomputed vectors (full-text index included), with a FAISS index if asked,
    and a second table: 1,500 new rows and 300 changed ones."""
    base = workdir / "base.idx"
    run_cli(vector_ingest_args(base, vectors_table(workdir / "first.parquet", 3000, duplicates=150)))
    if indexed:
        run_cli(["index", str(base), "--kind", "hnsw", "-q"])
    more = vectors_table(workdir / "more.parquet", 1800, seed=1, start=3000, changed=300)
    return {"base": base, "more": more}


def _finetune(workdir: Path) -> dict[str, Path]:
    from tests.tiny_models import tiny_bert

    return {"source": text_corpus(workdir / "labelled.jsonl", 120), "model": tiny_bert(workdir / "tiny-bert")}


SCENARIOS = {s.name: s for s in [
    Scenario("ingest text", _text, lambda p, t: ingest_args(t, p["source"]), same_rows, rows_done),
    Scenario("ingest images", _images,
             lambda p, t: ["ingest", str(t), str(p["source"]), "--model", f"hf:{p['model']}", "--batch-size", "16",
                           "--workers", "2", "--device", "cpu", "-q"], same_rows, rows_done),
    Scenario("ingest chunked documents", _documents,
             lambda p, t: ["ingest", str(t), str(p["source"]), "--model", f"hf:{p['model']}", "--pooling", "mean",
                           "--chunk-tokens", "24", "--chunk-overlap", "4", "--batch-size", "4", "--device", "cpu",
                           "-q"], rows_and_indexes, rows_done),
    Scenario("ingest into an indexed collection", lambda w: _vectors(w, indexed=True),
             lambda p, t: vector_ingest_args(t, p["more"]), rows_and_indexes, rows_done, base="base"),
    Scenario("index", _vectors, lambda p, t: ["index", str(t), "--kind", "hnsw", "-q"], rows_and_indexes,
             lance_version, base="base"),
    Scenario("dedup --apply", lambda w: _vectors(w, indexed=True),
             lambda p, t: ["dedup", str(t), "--threshold", "0.95", "--apply", "-q"], rows_and_indexes, rows_done,
             base="base"),
    Scenario("finetune", _finetune,
             lambda p, t: ["finetune", str(p["source"]), "--label-field", "label", "--model", f"hf:{p['model']}",
                           "--pooling", "mean", "--unfreeze", "1", "--epochs", "4", "--patience", "4",
                           "--batch-size", "16", "--device", "cpu", "--out", str(t), "-q"], same_weights, epochs_done),
]}
