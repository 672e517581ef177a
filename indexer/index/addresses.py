"""Lance row addresses -> positions in an array of them, by table lookup.

A Lance row address is (fragment id << 32) | offset in the fragment. A filter's matching addresses are
turned into FAISS positions this way (the alternative, matching ids as strings, costs ~0.8 s for half of
1M rows; a sort-based lookup ~60 ms; this one a few ms), and resident hit fields are found the same way.

>>> AddressMap(np.array([(3 << 32) | 1, 3 << 32, 7 << 32], np.uint64)).positions(
...     np.array([3 << 32, 7 << 32, 5 << 32], np.uint64)).tolist()
[1, 2, -1]
"""

from __future__ import annotations

import numpy as np

OFFSET_BITS = 32


class AddressMap:
    """Where each address of `addresses` sits in it: one dense slot per offset of each fragment seen
    (fragments are a few thousand rows to a few million; their offsets run from 0)."""

    def __init__(self, addresses: np.ndarray):
        addresses = np.asarray(addresses, dtype=np.uint64)
        fragment, offset = addresses >> OFFSET_BITS, addresses & np.uint64((1 << OFFSET_BITS) - 1)
        self.fragments, which = np.unique(fragment, return_inverse=True)
        self.sizes = np.zeros(len(self.fragments), dtype=np.int64)
        np.maximum.at(self.sizes, which, offset.astype(np.int64) + 1)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.slots = np.full(int(self.sizes.sum()), -1, dtype=np.int64)
        self.slots[self.starts[which] + offset.astype(np.int64)] = np.arange(len(addresses))

    def positions(self, addresses: np.ndarray) -> np.ndarray:
        """The position of each address (the last one, if it was given twice), -1 for those not in the map."""
        addresses = np.asarray(addresses, dtype=np.uint64)
        out = np.full(len(addresses), -1, dtype=np.int64)
        if not len(self.fragments) or not len(addresses):
            return out
        fragment, offset = addresses >> OFFSET_BITS, (addresses & np.uint64((1 << OFFSET_BITS) - 1)).astype(np.int64)
        which = np.minimum(np.searchsorted(self.fragments, fragment), len(self.fragments) - 1)
        known = (self.fragments[which] == fragment) & (offset < self.sizes[which])
        out[known] = self.slots[self.starts[which[known]] + offset[known]]
        return out
