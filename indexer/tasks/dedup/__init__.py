"""Deduplication: exact and near duplicates in a collection (or against another), grouped, one kept per group.

Modules, each importing only those listed before it:
  records.py      Vectors, Pairs, DedupReport: what the others share
  stored.py       a collection's vectors and items read back
  pairs.py        every pair with cosine >= a threshold (exact, k-means lists, SemDeDup)
  phash.py        the perceptual-hash signal (`--signal combined`)
  groups.py       pairs into groups, and the item each keeps (`--keep`)
  transforms.py   known edits that make near-duplicates
  calibration.py  `--calibrate`: precision/recall per threshold on edited copies of the collection's items
  sets.py         generated near-duplicate sets with known groups (tests, README)
  report.py       `--out` as JSON, CSV or an HTML page
  apply.py        `--apply` (delete) and `--restore`
  run.py          `dedup()`: one run from the arguments to the report

>>> r = dedup("photos.idx")                                          # doctest: +SKIP
>>> r.groups[:1], r.drop[:2], r.threshold                           # doctest: +SKIP
([['cat.jpg', 'cat-small.png']], ['cat-small.png', ...], 0.9)
"""

from .apply import restore
from .calibration import Calibration, calibrate
from .groups import KEEPS, components
from .pairs import METHODS, find_pairs, find_pairs_against, range_pairs_exact, range_pairs_partitioned
from .phash import phash, phash_pair, phash_similarity
from .records import DedupReport, Pairs, Vectors
from .report import write_output
from .run import DEFAULT_THRESHOLDS, dedup
from .sets import pair_scores, write_near_duplicate_sets
from .stored import load_item, load_vectors
from .transforms import IMAGE_TRANSFORMS, TEXT_TRANSFORMS, boilerplate, reorder, typos

__all__ = ["DEFAULT_THRESHOLDS", "IMAGE_TRANSFORMS", "KEEPS", "METHODS", "TEXT_TRANSFORMS", "Calibration", "DedupReport",
           "Pairs", "Vectors", "boilerplate", "calibrate", "components", "dedup", "find_pairs", "find_pairs_against",
           "load_item", "load_vectors", "pair_scores", "phash", "phash_pair", "phash_similarity", "range_pairs_exact",
           "range_pairs_partitioned", "reorder", "restore", "typos", "write_near_duplicate_sets", "write_output"]
