"""One thread policy for the query path: a query or a few run on one thread, in FAISS and in torch.

Both keep their own pool of OpenMP threads. For one query the work is tiny and a parallel region costs
more than it saves: it waits for every thread of the pool, and on a busy machine one of them is often
descheduled for a whole time slice; after the region, FAISS's threads spin on the cores that torch's then
wait for. Measured on 2 shared cores: a MiniLM query took 5 ms alone but 58 ms right after an exact search,
every layer op ~7 ms (a time slice) on a loaded machine. Batches keep the pools: there the threads pay.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

FEW = 4  # up to this many queries run on one thread


@contextmanager
def few_threads(n_items: int):
    """Within: FAISS (and torch, where it is loaded) on one thread when `n_items` <= FEW."""
    if n_items > FEW:
        yield
        return
    import faiss

    torch = sys.modules.get("torch")  # not imported for a query that needs no model
    omp, intra = faiss.omp_get_max_threads(), torch.get_num_threads() if torch else None
    faiss.omp_set_num_threads(1)
    if torch:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(omp)
        if torch:
            torch.set_num_threads(intra)
