"""A vectorized hash index from int64 ids to table rows.

Open addressing with linear probing over two flat numpy arrays (keys, rows;
row -1 marks a free slot), kept at most half full. Lookups and inserts of a
whole batch run as a few numpy passes, one per probe step, instead of one
Python dict operation per id: at 12 bytes a slot it also takes a fraction of
a dict's memory per id.
"""

from __future__ import annotations

import numpy as np

_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads sequential ids
_MIN_BITS = 10
# Keys still probing below which lookup finishes them one by one.
_SCALAR_TAIL = 16


class IntIndex:
    def __init__(self) -> None:
        self._allocate(_MIN_BITS)
        self._count = 0

    def _allocate(self, bits: int) -> None:
        self._bits = bits
        self._keys = np.zeros(1 << bits, dtype=np.int64)
        self._rows = np.full(1 << bits, -1, dtype=np.int32)  # 2**31 rows is past any shard

    def __len__(self) -> int:
        return self._count

    def _home(self, keys: np.ndarray) -> np.ndarray:
        # Integer arrays wrap on overflow without a warning: no errstate needed.
        hashed = keys.view(np.uint64) * _MULTIPLIER
        return (hashed >> np.uint64(64 - self._bits)).astype(np.int64)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key, or -1 where the key is absent."""
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        slots = self._home(keys)
        rows = self._rows[slots]
        occupied = rows >= 0
        hit = occupied & (self._keys[slots] == keys)
        result = np.where(hit, rows, -1).astype(np.int64)  # int64: ready to index with
        # Keys whose home slot holds another key probe on: `slots[i]` is where
        # `pending[i]` looked last.
        probe_on = occupied & ~hit
        pending, slots = np.flatnonzero(probe_on), slots[probe_on]
        mask = (1 << self._bits) - 1
        while len(pending) > _SCALAR_TAIL:
            slots = (slots + 1) & mask
            rows = self._rows[slots]
            occupied = rows >= 0
            hit = occupied & (self._keys[slots] == keys[pending])
            result[pending[hit]] = rows[hit]
            probe_on = occupied & ~hit
            pending, slots = pending[probe_on], slots[probe_on]
        if len(pending):
            self._probe_each(keys, slots, pending, result, mask)
        return result

    def _probe_each(
        self, keys: np.ndarray, slots: np.ndarray, pending: np.ndarray, result: np.ndarray, mask: int
    ) -> None:
        # The last few keys of a batch may probe long runs; another whole-array
        # numpy pass per step costs more than this loop over them.
        table_keys, table_rows = self._keys, self._rows
        for index, last in zip(pending.tolist(), slots.tolist(), strict=True):
            key, slot = int(keys[index]), (last + 1) & mask
            while (row := int(table_rows[slot])) >= 0:
                if int(table_keys[slot]) == key:
                    result[index] = row
                    break
                slot = (slot + 1) & mask

    def insert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Add keys that are absent and distinct from each other."""
        if (self._count + len(keys)) * 2 > (1 << self._bits):
            self._grow(self._count + len(keys))
        self._place(np.ascontiguousarray(keys, dtype=np.int64), np.asarray(rows, dtype=np.int32))
        self._count += len(keys)

    def _place(self, keys: np.ndarray, rows: np.ndarray) -> None:
        mask = (1 << self._bits) - 1
        pending = np.arange(len(keys))
        slots = self._home(keys)
        while len(pending):
            free = self._rows[slots] < 0
            # Several keys may probe the same free slot: the first of each wins it,
            # the others probe on like keys that met an occupied slot.
            free_slots, first = np.unique(slots[free], return_index=True)
            winners = pending[free][first]
            self._keys[free_slots] = keys[winners]
            self._rows[free_slots] = rows[winners]
            placed = np.zeros(len(pending), dtype=bool)
            placed[np.flatnonzero(free)[first]] = True
            pending, slots = pending[~placed], (slots[~placed] + 1) & mask

    def _grow(self, needed: int) -> None:
        occupied = self._rows >= 0
        keys, rows = self._keys[occupied], self._rows[occupied]
        bits = self._bits
        while needed * 2 > (1 << bits):
            bits += 1
        self._allocate(bits)
        self._place(keys, rows)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of every entry, in slot order."""
        occupied = self._rows >= 0
        return self._keys[occupied], self._rows[occupied]

    def nbytes(self) -> int:
        return self._keys.nbytes + self._rows.nbytes
