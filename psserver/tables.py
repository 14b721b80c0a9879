"""Where a shard's parameter values live: one growable table per signature.

A signature is a dtype and a row shape; a table is a numpy array with one row
per parameter of that signature. A parameter is known here by its handle, its
number in order of creation. While one table holds every parameter and none has
moved, handle h is row h of table 0 and nothing else is kept: the usual shard
(one signature for every parameter) pays no memory and no lookups for where its
parameters are. From the second signature on, each handle's table and row are
kept in two arrays. A parameter whose signature changes moves to the table of
its new signature; no other parameter moves.
"""

from __future__ import annotations

import math

import numpy as np

# The first table holds up to 1,024 rows but no more than 1 MiB: a vector of a
# few floats gets room to grow, and one 50 MB parameter gets one row, not 50 GB.
# Later tables (promoted parameters, other shapes) start at the rows they need.
_FIRST_ROWS = 1024
_FIRST_BYTES = 1 << 20
GROWTH = 1.5  # of the table's bytes; 2x would leave up to half of a large table unused
# Below this many rows ufunc.at is as fast as sorting them first.
_SORTED_FOLD_ROWS = 32

Signature = tuple[np.dtype, tuple[int, ...]]


def signature(value: np.ndarray) -> Signature:
    return value.dtype, value.shape


def by_signature(values: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(positions, stacked values) per signature of `values`, in order of first appearance."""
    positions: dict[Signature, list[int]] = {}
    for k, value in enumerate(values):
        positions.setdefault(signature(value), []).append(k)
    return [(np.array(ks), np.stack([values[k] for k in ks])) for ks in positions.values()]


def fold_at(ufunc: np.ufunc, values: np.ndarray, rows: np.ndarray, deltas: np.ndarray) -> None:
    """`ufunc.at(values, rows, deltas)`, with the same result, in a fraction of its time.

    ufunc.at pays per row; a fancy-index update pays per batch but applies one
    delta per row. So each row's first delta goes in by fancy index and only the
    later deltas of repeated rows (few, in a batch of distinct-ish ids) by
    ufunc.at, in arrival order: every parameter sees the same operations in the
    same order as with ufunc.at alone, bit for bit.
    """
    if len(rows) < _SORTED_FOLD_ROWS or deltas.dtype != values.dtype:
        ufunc.at(values, rows, deltas)
        return
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    first = np.empty(len(rows), dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    heads = order[first]
    targets = rows[heads]
    values[targets] = ufunc(values[targets], deltas[heads])
    if len(heads) < len(rows):
        later = np.sort(order[~first])
        ufunc.at(values, rows[later], deltas[later])


class Table:
    """The rows of one signature. A row whose parameter moved to another table
    stays as a hole; a table that every parameter left gives its memory back."""

    __slots__ = ("first_bytes", "live", "size", "values")

    def __init__(self, sig: Signature, first_bytes: int):
        self.values = np.zeros((0, *sig[1]), dtype=sig[0])
        self.first_bytes = first_bytes
        self.size = 0
        self.live = 0

    def append(self, rows: np.ndarray) -> np.ndarray:
        """Copy `rows` in; return their row numbers."""
        needed = self.size + len(rows)
        if needed > len(self.values):
            if len(self.values):
                capacity = max(needed, int(len(self.values) * GROWTH))
            else:
                row_bytes = max(1, rows[0].nbytes)
                capacity = max(needed, min(_FIRST_ROWS, max(1, self.first_bytes // row_bytes)))
            grown = np.zeros((capacity, *self.values.shape[1:]), self.values.dtype)
            grown[: self.size] = self.values[: self.size]
            self.values = grown
        self.values[self.size : needed] = rows
        numbers = np.arange(self.size, needed, dtype=np.int64)
        self.size = needed
        self.live += len(rows)
        return numbers

    def release(self, count: int) -> None:
        """`count` parameters moved away."""
        self.live -= count
        if not self.live:
            self.values = np.zeros((0, *self.values.shape[1:]), self.values.dtype)
            self.size = 0


class Tables:
    """Every table of a shard, and where each handle's row is."""

    def __init__(self) -> None:
        self._tables: list[Table] = []
        self._numbers: dict[Signature, int] = {}
        self.count = 0  # handles placed
        self._tracked = False
        self._where_table = np.empty(0, dtype=np.int32)
        self._where_row = np.empty(0, dtype=np.int64)

    def values(self, number: int) -> np.ndarray:
        return self._tables[number].values

    def signature(self, number: int) -> Signature:
        values = self._tables[number].values
        return values.dtype, values.shape[1:]

    def locate(self, handles: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Table numbers (None: all in table 0) and rows of handles."""
        if not self._tracked:
            return None, handles
        return self._where_table[handles], self._where_row[handles]

    def by_table(self, handles: np.ndarray) -> list[tuple[int, np.ndarray | None, np.ndarray]]:
        """(table number, which handles are in it (None: all), their rows) per table."""
        if not len(handles):
            return []
        tables, rows = self.locate(handles)
        if tables is None:
            return [(0, None, rows)]
        first = int(tables[0])
        if (tables == first).all():
            return [(first, None, rows)]
        masks = [(number, tables == number) for number in np.unique(tables).tolist()]
        return [(number, mask, rows[mask]) for number, mask in masks]

    def add(self, values: np.ndarray | list[np.ndarray]) -> None:
        """Place new parameters (handles from `count` on): one stacked array, or
        one array each, each put in the table of its signature."""
        count = len(values)
        handles = np.arange(self.count, self.count + count, dtype=np.int64)
        groups = [(np.arange(count), values)] if isinstance(values, np.ndarray) else by_signature(values)
        numbers = [self._number((stacked.dtype, stacked.shape[1:])) for _, stacked in groups]
        self._reserve(self.count + count)
        for number, (ks, stacked) in zip(numbers, groups, strict=True):
            rows = self._tables[number].append(stacked)
            if self._tracked:
                self._where_table[handles[ks]] = number
                self._where_row[handles[ks]] = rows
        self.count += count

    def set(self, handles: np.ndarray, values: list[np.ndarray]) -> None:
        """Store new values of existing distinct parameters, each in the table of its signature."""
        tables, rows = self.locate(handles)
        for ks, stacked in by_signature(values):
            number = self._numbers.get((stacked.dtype, stacked.shape[1:]), -1)
            current = np.zeros(len(ks), dtype=np.int32) if tables is None else tables[ks]
            stay = current == number
            if stay.any():
                self._tables[number].values[rows[ks][stay]] = stacked[stay]
            if not stay.all():
                self.move(handles[ks][~stay], stacked[~stay])

    def move(self, handles: np.ndarray, values: np.ndarray) -> None:
        """Put new values of distinct parameters into the table of their signature."""
        target = self._number((values.dtype, values.shape[1:]))
        self._track()
        sources = self._where_table[handles]
        rows = self._tables[target].append(values)
        for number, count in zip(*np.unique(sources, return_counts=True), strict=True):
            self._tables[number].release(int(count))
        self._where_table[handles] = target
        self._where_row[handles] = rows

    def widest_row(self) -> int:
        """Bytes of one value in the table of the largest values (0 when there is none)."""
        return max((table.values.itemsize * math.prod(table.values.shape[1:]) for table in self._tables), default=0)

    def nbytes(self) -> int:
        tables = sum(table.values.nbytes for table in self._tables)
        return tables + self._where_table.nbytes + self._where_row.nbytes

    def _number(self, sig: Signature) -> int:
        number = self._numbers.get(sig)
        if number is None:
            if self._tables:
                self._track()
            number = len(self._tables)
            self._tables.append(Table(sig, 0 if self._tables else _FIRST_BYTES))
            self._numbers[sig] = number
        return number

    def _track(self) -> None:
        """Keep each handle's table and row from now on."""
        if self._tracked:
            return
        self._tracked = True
        self._where_table = np.zeros(self.count, dtype=np.int32)
        self._where_row = np.arange(self.count, dtype=np.int64)

    def _reserve(self, count: int) -> None:
        if self._tracked and count > len(self._where_table):
            capacity = max(count, int(len(self._where_table) * GROWTH))
            for name in ("_where_table", "_where_row"):
                old = getattr(self, name)
                grown = np.zeros(capacity, dtype=old.dtype)
                grown[: len(old)] = old
                setattr(self, name, grown)
