"""`dedup()`: one run from the arguments to the report (checks, pairs, groups, output, apply).

Every argument is checked before anything is searched or deleted. The pieces it wires: pairs.py finds the
pairs, phash.py rescores them for `--signal combined`, groups.py groups them and picks who stays,
report.py writes `--out`, apply.py deletes.

>>> r = dedup("photos.idx")                                          # doctest: +SKIP
>>> r.groups[:1], r.drop[:2], r.threshold                           # doctest: +SKIP
([['cat.jpg', 'cat-small.png']], ['cat-small.png', ...], 0.9)
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Literal

from ...errors import IndexerError
from ...store import Collection
from .apply import delete
from .groups import KEEPS, Keep, check_keep, groups_against, groups_within
from .pairs import METHODS, TARGET_PAIR_RECALL, Method, find_pairs, find_pairs_against, join_lists
from .phash import rescore_combined
from .records import DedupReport
from .report import check_out, html_sample, write_output
from .stored import load_vectors

log = logging.getLogger(__name__)

Signal = Literal["embedding", "combined"]


# Default thresholds per modality of the embeddings, chosen on the generated near-duplicate sets
# (README "Deduplication" gives the measurements): MiniLM texts and EfficientNet-Lite0 photos.
DEFAULT_THRESHOLDS = {"text": 0.85, "image": 0.85, "vector": 0.90}


def dedup(collection: Collection | str, *, threshold: float | None = None, method: Method = "auto",
          keep: Keep = "first", against: Collection | str | None = None, apply: bool = False,
          signal: Signal = "embedding", out: str | Path | None = None, target_recall: float = TARGET_PAIR_RECALL,
          seed: int = 0, engine: str = "local", address: str | None = None) -> DedupReport:
    """Find exact and near duplicates; with `apply`, delete the ones to drop as a new Lance version.

    signal: `embedding` scores pairs by cosine; `combined` (images) by the mean of the cosine and a
      flip-invariant perceptual-hash similarity, which `--calibrate` often finds separates better.
      Since the pHash similarity is at most 1, a pair reaches T with a cosine as low as 2T - 1: the
      candidates are searched at that bound.

    keep (which item of a group stays; ties go to `first`):
      first    the smallest id (ids sort the same on every run)
      oldest   the one stored earliest (ingest appends; an item re-ingested with changes counts as new)
      longest  the longest text (characters)
      largest  images: most pixels, then most bytes; text: most UTF-8 bytes
      central  the medoid: highest summed cosine to the rest of its group
    against: find the items of `collection` that duplicate something in `against` (leakage between
      train and test, or "have we seen this before?"); those are the ones to drop.
    out: also write the result (.json, .csv or .html). Every argument is checked before anything is
      searched or deleted; the HTML page's sample is taken before `apply` deletes.
    engine: `local`, or `ray`: the list joins run on the Ray cluster at `address` (same pairs, same
      groups; dedup/distributed.py).
    """

    started = time.perf_counter()
    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    if method not in METHODS:
        raise IndexerError(f"--method {method}: choose one of {', '.join(METHODS)}")
    if keep not in KEEPS:
        raise IndexerError(f"--keep {keep}: choose one of {', '.join(KEEPS)}")
    if engine not in ("local", "ray"):
        raise IndexerError(f"--engine {engine}: choose local or ray")
    out = None if out is None else check_out(out)
    modality = coll.spec.modality
    source = "given"
    if threshold is None:
        threshold, source = DEFAULT_THRESHOLDS.get(modality, DEFAULT_THRESHOLDS["vector"]), \
            f"default for {modality} embeddings"
    if not -1.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise IndexerError(f"--threshold {threshold}: cosine similarity lies in [-1, 1] (0.9 is a typical start)")
    if signal not in ("embedding", "combined"):
        raise IndexerError(f"--signal {signal}: choose embedding or combined")
    if signal == "combined" and (modality != "image" or "path" not in coll.result_columns()):
        raise IndexerError("--signal combined compares image files; "
                           f"{coll.path} holds {modality} embeddings without them")
    other = None
    if against is not None:
        if signal == "combined":
            raise IndexerError("--signal combined works within one collection; use the embedding with --against")
        if method == "semdedup":
            raise IndexerError("--against compares two collections; use --method exact or knn")
        other = against if isinstance(against, Collection) else Collection.open(against)
        if other.location.identity() == coll.location.identity():
            raise IndexerError("--against names the same collection: run dedup without --against")
        coll.check_compatible(other.spec)
    else:
        check_keep(coll, keep)
    join = join_lists
    if engine == "ray":
        from .distributed import ray_join

        join = ray_join(address)
    with coll.write_lock("dedup --apply") if apply else contextlib.nullcontext():
        version = coll.version()
        vecs = load_vectors(coll)
        if other is None:
            search_t = max(-1.0, 2 * threshold - 1) if signal == "combined" else threshold
            pairs, used, stats = find_pairs(vecs, search_t, method, target_recall, seed, join)
            if signal == "combined":
                pairs = rescore_combined(coll, vecs, pairs, threshold)
            groups, drop, dropped = groups_within(coll, vecs, pairs, keep)
            names = (vecs.ids, vecs.ids)
        else:
            ref = load_vectors(other)
            pairs, used, stats = find_pairs_against(vecs, ref, threshold, method, target_recall, seed, join)
            groups, drop, dropped = groups_against(vecs, ref, pairs)
            names = (vecs.ids, ref.ids)
        report = DedupReport(
            collection=str(coll.path), method=used, threshold=float(threshold), threshold_source=source,
            modality=modality, keep=keep, items=len(vecs.ids), groups=groups, drop=drop, dropped=dropped,
            against=None if other is None else str(other.path), version_before=version, version_after=version,
            stats={"signal": signal, "engine": engine, **stats}, pair_arrays=pairs, pair_ids=names)
        # The page shows the items it samples: take them while the ones to drop are still stored.
        sample = html_sample(report) if out is not None and out.suffix.lower() in (".html", ".htm") else None
        if apply and drop:
            report.version_after = delete(coll, drop)
            report.applied = True
        elif apply:  # nothing left to drop, but a killed --apply may have deleted without the index following
            from ...index import update_after_ingest

            update_after_ingest(coll)
    report.stats["seconds"] = round(time.perf_counter() - started, 3)
    if out is not None:
        write_output(report, out, sample)
    log.debug("%s", report.line())
    return report
