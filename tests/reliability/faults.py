"""Fault injection shared by the tests and scripts/reliability_report.py: SIGKILL an `indexer ingest`
process at a seeded random moment, resume it, and compare the collection with an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

INGEST = [sys.executable, "-m", "indexer.cli", "ingest"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
WORDS = ("river stone market bank loan city music song game ball team win lose sun moon star water fire tree "
         "house car road red blue green cat dog mat ran fast slow").split()


def text_corpus(path: Path, n: int, seed: int = 0) -> Path:
    """n short labelled texts with ids, as JSONL (enough rows for several commits of 256)."""
    rng = random.Random(seed)
    rows = [{"id": f"t{i}", "text": " ".join(rng.choices(WORDS, k=rng.randint(4, 24))), "label": f"l{i % 5}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ingest_args(coll: Path, source: Path) -> list[str]:
    # Batches of 4: text is embedded in windows of 64 batches, so 700 rows make three commits, not one.
    return [str(coll), str(source), "--model", "minilm", "--batch-size", "4", "--device", "cpu", "-q"]


def stored(coll: Path) -> list[dict]:
    import lance

    path = coll / "lance" / "items.lance"
    if not path.exists():
        return []
    return lance.dataset(str(path)).to_table(columns=["id", "vector"]).to_pylist()


def run_ingest(coll: Path, source: Path, timeout: float = 600) -> float:
    """An uninterrupted ingest process; returns its wall time in seconds (start-up included)."""
    started = time.monotonic()
    subprocess.run([*INGEST, *ingest_args(coll, source)], env=ENV, check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.monotonic() - started


def kill_during_ingest(coll: Path, source: Path, delay: float) -> dict:
    """Start an ingest, SIGKILL it after `delay` seconds (if still running); returns what the kill left."""
    proc = subprocess.Popen([*INGEST, *ingest_args(coll, source)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"killed": killed, "rows_at_kill": len(stored(coll))}


def compare(coll: Path, reference: list[dict]) -> dict:
    """The resumed collection against a clean run's rows: lost and extra ids, duplicates, vector drift."""
    rows = stored(coll)
    ids = [r["id"] for r in rows]
    ref = {r["id"]: np.asarray(r["vector"]) for r in reference}
    got = {r["id"]: np.asarray(r["vector"]) for r in rows}
    common = sorted(ref.keys() & got.keys())
    drift = max((float(np.abs(ref[i] - got[i]).max()) for i in common), default=0.0)
    return {"lost": len(ref.keys() - got.keys()), "extra": len(got.keys() - ref.keys()),
            "duplicates": len(ids) - len(set(ids)), "max_vector_diff": drift}


def kill_and_resume_round(workdir: Path, source: Path, reference: list[dict], seed: int,
                          clean_seconds: float) -> dict:
    """One round: a kill at a seeded moment in the second half of a run as long as the clean one took
    (start-up, model load and reading fill the first), then a plain rerun."""
    delay = random.Random(seed).uniform(0.45, 0.98) * clean_seconds
    coll = workdir / f"killed-{seed}.idx"
    out = {"seed": seed, "delay_s": round(delay, 2), **kill_during_ingest(coll, source, delay)}
    run_ingest(coll, source)
    out.update(compare(coll, reference))
    out["survived"] = out["lost"] == 0 and out["extra"] == 0 and out["duplicates"] == 0 \
        and out["max_vector_diff"] < 1e-4
    return out
