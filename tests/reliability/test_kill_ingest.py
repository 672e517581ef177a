"""SIGKILL during `indexer ingest` (seeded random moments) and a plain rerun: the collection ends with
exactly a clean run's ids, no duplicates, the same vectors. scripts/reliability_report.py runs more rounds."""

from __future__ import annotations

import pytest

from .faults import kill_and_resume_round, run_ingest, stored, text_corpus


@pytest.mark.slow
def test_killed_ingest_resumes_to_a_clean_runs_collection(tmp_path):
    source = text_corpus(tmp_path / "texts.jsonl", 700)
    seconds = run_ingest(tmp_path / "clean.idx", source)
    reference = stored(tmp_path / "clean.idx")
    assert len(reference) == 700
    results = [kill_and_resume_round(tmp_path, source, reference, seed, seconds) for seed in (1, 2)]
    for r in results:
        assert r["survived"], r
    assert any(r["killed"] for r in results)
