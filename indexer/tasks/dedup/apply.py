"""Changing the collection: deleting the items to drop (`--apply`), and bringing them back (`--restore`).

Both write one Lance version and bring the derived index up to date.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import IndexerError
from ...store import Collection


def delete(coll: Collection, ids: list[str]) -> int:
    """Delete `ids` in one Lance commit (one version to restore from); the index follows. The new version."""
    coll.delete(ids)
    after_write(coll)
    return coll.version()


def restore(collection: Collection | str, version: int) -> dict[str, Any]:
    """Undo a `dedup --apply`: the rows of `version` (the one before the apply) that are no longer stored
    come back, as a new version; rows written since stay. The index catches up with the new rows."""
    from ...store.arrow import conform

    coll = collection if isinstance(collection, Collection) else Collection.open(collection)
    table = coll.table
    if table is None:
        raise IndexerError(f"{coll.path} is empty: nothing to restore")
    known = [v["version"] for v in table.list_versions()]
    if version not in known:
        raise IndexerError(f"{coll.path} has no Lance version {version} (it has {known[0]}..{known[-1]})")
    with coll.write_lock("dedup --restore"):
        before = coll.version()
        present = {i for b in coll.scan(["id"], batch_size=65536) for i in b.column("id").to_pylist()}
        old = coll.dataset().checkout_version(version)
        back = [b.filter(np.array([i not in present for i in b.column("id").to_pylist()], dtype=bool))
                for b in old.to_batches(batch_size=65536)]
        back = [b for b in back if b.num_rows]
        restored = sum(b.num_rows for b in back)
        if restored:
            import pyarrow as pa

            data, new_fields = conform(pa.Table.from_batches(back), table.schema)
            if new_fields:  # columns dropped since that version: bring them back too
                table.add_columns(new_fields)
            table.add(data)
            after_write(coll)
        return {"collection": str(coll.path), "restored": version, "rows_restored": restored,
                "version_before": before, "version_after": coll.version(), "rows": coll.count()}


def after_write(coll: Collection) -> None:
    """The table at its newest version, the derived index caught up, the manifest touched."""
    from ...index import update_after_ingest

    coll.table.checkout_latest()
    update_after_ingest(coll)  # FAISS: tombstones the deleted rows (or adds restored ones) and saves
    coll.touch()
