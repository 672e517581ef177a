"""Concurrent load shared by tests/reliability/test_concurrency.py and scripts/reliability_report.py: rows
whose every field says which version of the row it is, searchers that record every answer while writers
run (the Python API in its own process, HTTP against a real `indexer serve` on a thread), and the check
that each answer is the exact top k of one committed Lance version."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

from .faults import ENV

DIM, K = 16, 10


def vector(item_id: str, gen: int) -> np.ndarray:
    """Row `item_id`'s vector in its generation `gen` (an upsert bumps the generation)."""
    return np.random.default_rng(zlib.crc32(f"{item_id}:{gen}".encode())).standard_normal(DIM).astype(np.float32)


def rows_file(path: Path, ids: list[str], gen: int = 0, same_as: dict[str, str] | None = None) -> Path:
    """JSONL rows whose text names their id and generation; `same_as` gives an id another's vector (a
    duplicate for dedup)."""
    same_as = same_as or {}
    with open(path, "w") as fh:
        for i in ids:
            fh.write(json.dumps({"id": i, "vector": vector(same_as.get(i, i), gen).tolist(), "text": f"{i} gen {gen}",
                                 "gen": gen}) + "\n")
    return path


def query_vectors(n: int = 8) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((n, DIM)).astype(np.float32)


def cli(*args: str, stdin: bool = False) -> subprocess.Popen:
    """`indexer ARGS` in its own process; with `stdin`, the test writes its standard input."""
    return subprocess.Popen([sys.executable, "-m", "indexer.cli", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE if stdin else None, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300, stdin: str | None = None) -> tuple[int, str, str]:
    """Wait for `proc` (writing `stdin` to it, then closing it): its exit status, stdout and stderr."""
    out, err = proc.communicate(stdin, timeout=timeout)
    return proc.returncode, out, err


# ---- searchers ------------------------------------------------------------------------------------------------

API_LOOP = """
import json, sys, time
from pathlib import Path
import numpy as np
import indexer
coll, queries, out, stop, k = sys.argv[1], np.load(sys.argv[2]), open(sys.argv[3], "w"), Path(sys.argv[4]), int(sys.argv[5])
n = 0
while not stop.exists():
    q = n % len(queries)
    try:
        line = {"q": q, "hits": indexer.search(coll, vector=queries[q].tolist(), k=k, fields="text,gen")}
    except Exception as exc:
        line = {"q": q, "error": f"{type(exc).__name__}: {exc}"}
    out.write(json.dumps(line) + "\\n")
    out.flush()
    n += 1
"""


class Searchers:
    """Searches in a loop until stopped: one Python API process, and (with a server URL) one HTTP client
    thread. Every answer is kept: {"q", "hits"} or {"q", "error"}; HTTP answers also carry "status"."""

    def __init__(self, coll: Path, workdir: Path, url: str | None = None):
        self.queries = query_vectors()
        np.save(workdir / "queries.npy", self.queries)
        self.api_out, self.stop_file = workdir / "api.jsonl", workdir / "stop"
        self.proc = subprocess.Popen([sys.executable, "-c", API_LOOP, str(coll), str(workdir / "queries.npy"),
                                      str(self.api_out), str(self.stop_file), str(K)], env=ENV, stderr=subprocess.PIPE,
                                     text=True)
        self.http: list[dict] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._http_loop, args=(url,), daemon=True) if url else None
        if self.thread:
            self.thread.start()

    def _http_loop(self, url: str) -> None:
        with httpx.Client(timeout=60) as client:
            n = 0
            while not self._stop.is_set():
                q = n % len(self.queries)
                try:
                    r = client.post(f"{url}/search", json={"vector": self.queries[q].tolist(), "k": K,
                                                           "fields": ["text", "gen"]})
                    body = r.json()
                    line = {"q": q, "status": r.status_code, **({"hits": body["results"]} if r.status_code == 200
                                                                else {"error": body})}
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    line = {"q": q, "status": None, "error": f"{type(exc).__name__}: {exc}"}
                self.http.append(line)
                n += 1

    def api(self) -> list[dict]:
        if not self.api_out.exists():
            return []
        return [json.loads(line) for line in self.api_out.read_text().splitlines() if line.endswith("}")]

    def wait_for_answers(self, n: int = 3, timeout: float = 180) -> None:
        """Until both searchers have answered (the server and the API process have loaded)."""
        deadline = time.monotonic() + timeout
        while len(self.api()) < n or (self.thread and len(self.http) < n):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"searchers did not start: {self.proc.stderr.read() if self.proc.poll() is not None else ''}")
            time.sleep(0.2)

    def stop(self) -> tuple[list[dict], list[dict]]:
        self.stop_file.touch()
        self._stop.set()
        if self.thread:
            self.thread.join(timeout=120)
        _, err = self.proc.communicate(timeout=120)
        if self.proc.returncode:
            raise RuntimeError(f"the API searcher crashed: {err[-2000:]}")
        return self.api(), self.http


# ---- checking the answers -------------------------------------------------------------------------------------

def committed_versions(coll: Path) -> tuple[list[dict[str, str]], list[int]]:
    """Every Lance version of the collection: {id: text} of its rows, and its number of fragments."""
    import lance

    ds = lance.dataset(str(coll / "lance" / "items.lance"))
    rows, fragments = [], []
    for v in ds.versions():
        at = ds.checkout_version(v["version"])
        tbl = at.to_table(columns=["id", "text"])
        rows.append(dict(zip(tbl.column("id").to_pylist(), tbl.column("text").to_pylist())))
        fragments.append(len(at.get_fragments()))
    return rows, fragments


def exact_top(version: dict[str, str], queries: np.ndarray, same_as: dict[str, str]) -> list[np.ndarray]:
    """Per query, the exact top-K cosine scores in one version (rows' vectors from their text)."""
    gens = [(i, int(text.rsplit(" ", 1)[1])) for i, text in version.items()]
    x = np.stack([vector(same_as.get(i, i), g) for i, g in gens])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ x.T
    return [np.sort(s)[::-1][:K] for s in sims]


def problems(answer: dict, queries: np.ndarray, versions: list[dict[str, str]], tops: list[list[np.ndarray]],
             same_as: dict[str, str]) -> list[str]:
    """What is wrong with one answer (nothing: []). Valid: K hits, no id twice, scores best first, each hit's
    fields those of one stored row (text and gen agree, the score is that row's vector's cosine), and
    all hits the exact top K of one committed version."""
    if "hits" not in answer:
        return [f"error: {answer.get('status')} {answer['error']}"]
    hits = answer["hits"]
    ids = [h["id"] for h in hits]
    out = []
    if len(hits) != K:
        out.append(f"{len(hits)} hits, not {K}")
    if len(set(ids)) != len(ids):
        out.append(f"an id twice: {ids}")
    scores = [h["score"] for h in hits]
    if scores != sorted(scores, reverse=True):
        out.append(f"scores not best first: {scores}")
    q = queries[answer["q"]] / np.linalg.norm(queries[answer["q"]])
    for h in hits:
        if set(h) != {"id", "score", "text", "gen"} or h["text"] != f"{h['id']} gen {h['gen']}":
            out.append(f"fields of two rows or missing: {h}")
            continue
        v = vector(same_as.get(h["id"], h["id"]), h["gen"])
        if abs(float(q @ v / np.linalg.norm(v)) - h["score"]) > 1e-4:
            out.append(f"score of another version of {h['id']!r}: {h}")
    if not out and not any(all(ver.get(h["id"]) == h["text"] for h in hits)
                           and np.allclose(top[answer["q"]], scores, atol=1e-4)
                           for ver, top in zip(versions, tops)):
        out.append(f"not the top {K} of any one committed version: {ids}")
    return out
