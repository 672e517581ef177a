"""SIGKILL during each writing command (at a seeded moment after its first progress) and a plain rerun: the
result equals an uninterrupted run's. Ingest (text, images through DataLoader workers, chunked documents,
new rows into an indexed collection): exactly the clean run's ids, no duplicates, the same vectors, and the
FAISS and full-text indexes agree with the table. `index` and `dedup --apply`: the same surviving rows and
indexes that agree. `finetune`: the same weights. scripts/reliability_report.py runs more rounds."""

from __future__ import annotations

import pytest

from .faults import SCENARIOS, kill_rounds


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_killed_command_reruns_to_a_clean_runs_result(tmp_path, name):
    [result] = kill_rounds(SCENARIOS[name], tmp_path, seeds=[1])
    assert result["killed"], result  # seed 1 kills early in the run's second part, whatever the machine's speed
    assert result["survived"], result
