"""SIGKILL during each writing command (at a seeded moment after its first progress) and a plain rerun: the
result equals an uninterrupted run's. Ingest (text, images through DataLoader workers, chunked documents,
new rows into an indexed collection): exactly the clean run's ids, no duplicates, the same vectors, and the
FAISS and full-text indexes agree with the table. `index` and `dedup --apply`: the same surviving rows and
indexes that agree. `finetune`: the same weights. scripts/reliability_report.py runs more rounds."""

from __future__ import annotations

import pytest

from .faults import SCENARIOS, index_problems, kill_rounds, run_cli, stored, vector_ingest_args, vectors_table


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_killed_command_reruns_to_a_clean_runs_result(tmp_path, name):
    [result] = kill_rounds(SCENARIOS[name], tmp_path, seeds=[1])
    assert result["killed"], result  # seed 1 kills early in the run's second part, whatever the machine's speed
    assert result["survived"], result


@pytest.mark.slow
def test_rerun_after_a_kill_inside_the_index_save_rebuilds_the_index(tmp_path):
    """A kill between the index's file replacements (faiss.index new, rows.parquet and index.json not yet)
    is a window of milliseconds that seeded kills rarely hit, so the files it leaves are made here: the
    rerun of the ingest that was updating the index ends with an index that agrees with the table."""
    coll = tmp_path / "c.idx"
    run_cli(vector_ingest_args(coll, vectors_table(tmp_path / "first.parquet", 2000)))
    run_cli(["index", str(coll), "--kind", "flat", "-q"])
    old = {name: (coll / "index" / name).read_bytes() for name in ("rows.parquet", "index.json")}
    more = vectors_table(tmp_path / "more.parquet", 500, seed=1, start=2000)
    run_cli(vector_ingest_args(coll, more))
    for name, data in old.items():
        (coll / "index" / name).write_bytes(data)
    assert index_problems_or_error(coll)  # as the kill left it: the index does not open
    run_cli(vector_ingest_args(coll, more))
    assert index_problems(coll) == []
    assert len(stored(coll, ("id",))) == 2500



@pytest.mark.slow
def test_rerun_after_a_kill_between_the_dedup_delete_and_the_index_catch_up(tmp_path):
    """`dedup --apply` killed after its delete commit, before the index followed (the report's seeded rounds
    hit it): the rerun finds nothing left to drop and still brings the index in step with the table."""
    import lance

    coll = tmp_path / "c.idx"
    run_cli(vector_ingest_args(coll, vectors_table(tmp_path / "first.parquet", 2000, duplicates=100)))
    run_cli(["index", str(coll), "--kind", "flat", "-q"])
    copies = ", ".join(f"'v{i}'" for i in range(1900, 2000))  # the near copies --keep first drops
    lance.dataset(str(coll / "lance" / "items.lance")).delete(f"id IN ({copies})")  # the killed run's commit
    run_cli(["dedup", str(coll), "--threshold", "0.95", "--apply", "-q"])
    assert index_problems(coll) == []
    assert len(stored(coll, ("id",))) == 1900

def index_problems_or_error(coll) -> list[str]:
    from indexer.errors import IndexerError

    try:
        return index_problems(coll)
    except IndexerError as exc:
        return [str(exc)]
