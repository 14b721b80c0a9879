"""Parameter storage for one shard.

Parameters that share one dtype and shape (the usual case: every embedding of a
model) live in a growable numpy table, one row per id. Int ids find their row
through a vectorized hash index (psserver.index), str ids through a dict.
Pulls gather rows and pushes scatter into them with one numpy call per batch;
a batch of int ids costs no Python work per key. A parameter whose initial
value has another dtype or shape falls back to a per-id store of arrays, so
any numeric value still works (on a slower path).

Batches are `Rows`: int ids (an int64 array), str ids, and one value row per id
in that order. The store is not thread-safe; the shard serializes access.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from psclient.codec import ALLOWED_KINDS, INT_IDS_DTYPE
from psclient.errors import WireError
from psclient.partition import Id
from psserver.index import IntIndex
from psserver.specs import InitFn, UpdateFn, UserFunctionError

# The first table holds up to 1,024 rows but no more than 1 MiB: a vector of a
# few floats gets room to grow, and one 50 MB parameter gets one row, not 50 GB.
_FIRST_ROWS = 1024
_FIRST_BYTES = 1 << 20
_GROWTH = 1.5  # of the table's bytes; 2x would leave up to half of a large table unused
Signature = tuple[np.dtype, tuple[int, ...]]
_NO_INTS = np.empty(0, dtype=INT_IDS_DTYPE)


@dataclass(slots=True)
class Rows:
    """A batch: `values[k]` belongs to the k-th id of int_ids followed by str_ids."""

    int_ids: np.ndarray
    str_ids: list[str]
    values: np.ndarray

    def ids(self) -> list[Id]:
        return [*self.int_ids.tolist(), *self.str_ids]


def split_ids(ids: Sequence[Id]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Int ids, str ids, and the permutation that puts `ids` in ints-then-strs order."""
    is_str = [isinstance(i, str) for i in ids]
    int_pos = [p for p, s in enumerate(is_str) if not s]
    str_pos = [p for p, s in enumerate(is_str) if s]
    int_ids = np.array([ids[p] for p in int_pos], dtype=INT_IDS_DTYPE)
    return int_ids, [ids[p] for p in str_pos], np.array(int_pos + str_pos, dtype=np.intp)  # type: ignore[misc]


def _signature(value: np.ndarray) -> Signature:
    return value.dtype, value.shape


def _check_result(value: Any, what: str, param_id: Id) -> np.ndarray:
    """A user function's result as an array a shard can store and send."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # e.g. a ragged list
        raise UserFunctionError(
            f"{what} returned an unusable {type(value).__name__} for id {param_id!r}: {exc}"
        ) from exc
    if array.dtype.kind not in ALLOWED_KINDS:
        raise UserFunctionError(
            f"{what} returned {type(value).__name__} of dtype {array.dtype} for id {param_id!r}, not a number"
        )
    return array


def _first_unique(ids: np.ndarray) -> np.ndarray:
    """Distinct ids in order of first appearance."""
    if len(ids) < 2:
        return ids
    unique, first = np.unique(ids, return_index=True)
    return unique[np.argsort(first, kind="stable")]


class ParameterStore:
    def __init__(self, init: InitFn, update: UpdateFn):
        self.init = init
        self.update = update
        self._int_rows = IntIndex()
        self._str_rows: dict[str, int] = {}
        self._table: np.ndarray | None = None  # shape (capacity, *row_shape)
        self._size = 0
        self._other: dict[Id, np.ndarray] = {}  # values off the table's signature

    def __len__(self) -> int:
        return self._size + len(self._other)

    @property
    def signature(self) -> Signature | None:
        return None if self._table is None else (self._table.dtype, self._table.shape[1:])

    # -- creation -----------------------------------------------------------

    def _initial_values(self, int_ids: np.ndarray, str_ids: list[str]) -> np.ndarray | list[np.ndarray]:
        ids: Sequence[Id] | np.ndarray = int_ids
        if str_ids or not self.init.vectorized:
            ids = [*int_ids.tolist(), *str_ids]
        values = self.init.batch(ids)
        if isinstance(values, np.ndarray):
            return values
        return [_check_result(v, f"param_init {self.init.name}", i) for i, v in zip(ids, values, strict=True)]

    def _append_rows(self, rows: np.ndarray) -> np.ndarray:
        """Copy `rows` into the table; return their row numbers."""
        if self._table is None:
            row_bytes = max(1, rows[0].nbytes)
            first = max(len(rows), min(_FIRST_ROWS, max(1, _FIRST_BYTES // row_bytes)))
            self._table = np.zeros((first, *rows.shape[1:]), dtype=rows.dtype)
        needed = self._size + len(rows)
        if needed > len(self._table):
            grown = np.zeros((max(needed, int(len(self._table) * _GROWTH)), *self._table.shape[1:]), self._table.dtype)
            grown[: self._size] = self._table[: self._size]
            self._table = grown
        self._table[self._size : needed] = rows
        numbers = np.arange(self._size, needed, dtype=np.int64)
        self._size = needed
        return numbers

    def _insert(self, int_ids: np.ndarray, str_ids: list[str], values: np.ndarray | list[np.ndarray]) -> None:
        """Store new parameters: table rows where the signature fits, else `_other`."""
        count = len(int_ids)
        if isinstance(values, np.ndarray):  # a batch init: one signature for all
            fits = np.full(len(values), self.signature in (None, (values.dtype, values.shape[1:])))
        else:
            table_signature = self.signature or (_signature(values[0]) if values else None)
            fits = np.array([_signature(v) == table_signature for v in values], dtype=bool)
        ids_fit = np.flatnonzero(fits)
        if len(ids_fit):
            rows = self._append_rows(
                np.stack([values[k] for k in ids_fit]) if isinstance(values, list) else values[ids_fit]
            )
            int_fit = ids_fit[ids_fit < count]
            self._int_rows.insert(int_ids[int_fit], rows[: len(int_fit)])
            for k, row in zip(ids_fit[len(int_fit) :].tolist(), rows[len(int_fit) :].tolist(), strict=True):
                self._str_rows[str_ids[k - count]] = row
        for k in np.flatnonzero(~fits).tolist():
            param_id: Id = int(int_ids[k]) if k < count else str_ids[k - count]
            self._other[param_id] = np.array(values[k])

    def _missing(self, int_ids: np.ndarray, str_ids: list[str]) -> tuple[np.ndarray, list[str], bool]:
        """Distinct ids of the batch not stored yet (in order of appearance), and
        whether the batch names any id that is in the table already."""
        absent = int_ids[self._int_rows.lookup(int_ids) < 0]
        touches_table = len(absent) < len(int_ids)
        if len(absent) and self._other:
            absent = absent[[i not in self._other for i in absent.tolist()]]
        str_rows, other = self._str_rows, self._other
        new_strs = []
        for s in dict.fromkeys(str_ids):
            if s in str_rows:
                touches_table = True
            elif s not in other:
                new_strs.append(s)
        return _first_unique(absent), new_strs, touches_table

    def _ensure(self, int_ids: np.ndarray, str_ids: list[str]) -> None:
        new_ints, new_strs, _ = self._missing(int_ids, str_ids)
        if len(new_ints) or new_strs:
            self._insert(new_ints, new_strs, self._initial_values(new_ints, new_strs))

    def _table_rows(self, int_ids: np.ndarray, str_ids: list[str]) -> np.ndarray:
        """Table rows of stored ids (all of them must be table parameters)."""
        rows = self._int_rows.lookup(int_ids)
        if str_ids:
            rows = np.concatenate([rows, np.fromiter((self._str_rows[s] for s in str_ids), np.int64, len(str_ids))])
        return rows

    # -- pull ---------------------------------------------------------------

    def pull_rows(self, int_ids: np.ndarray, str_ids: list[str]) -> list[Rows]:
        """Values of the ids (created if absent), grouped by signature, order kept per group."""
        if not self._other and not str_ids and self._table is not None:
            # The hot path: int ids only, one table. Usually every id exists already.
            rows = self._int_rows.lookup(int_ids)
            if np.any(rows < 0):
                self._ensure(int_ids, str_ids)
                rows = self._int_rows.lookup(int_ids)
            return [Rows(int_ids, str_ids, self._table[rows])]
        self._ensure(int_ids, str_ids)
        if not len(int_ids) and not str_ids:
            return []
        if not self._other:
            assert self._table is not None
            return [Rows(int_ids, str_ids, self._table[self._table_rows(int_ids, str_ids)])]
        return self._grouped([*int_ids.tolist(), *str_ids])

    def _grouped(self, ids: Sequence[Id]) -> list[Rows]:
        """The slow path for batches that touch `_other`: group id by id."""
        groups: dict[Signature | None, tuple[list[Id], list[np.ndarray]]] = {}
        for param_id in ids:
            value = self._other.get(param_id)
            if value is None:
                key, value = None, self._current(param_id)
            else:
                key = _signature(value)
            group = groups.setdefault(key, ([], []))
            group[0].append(param_id)
            group[1].append(value)
        batches = []
        for group_ids, values in groups.values():
            int_ids, str_ids, order = split_ids(group_ids)
            batches.append(Rows(int_ids, str_ids, np.stack(values)[order]))
        return batches

    def pull(self, ids: Sequence[Id]) -> list[tuple[list[Id], np.ndarray]]:
        """`pull_rows` for a list of mixed ids."""
        int_ids, str_ids, order = split_ids(ids)
        groups = self.pull_rows(int_ids, str_ids)
        if len(groups) == 1:  # one group holds every id: give it back in the order asked
            return [(list(ids), groups[0].values[np.argsort(order)])]
        return [(rows.ids(), rows.values) for rows in groups]

    # -- push ---------------------------------------------------------------

    def push_rows(self, batches: Sequence[Rows]) -> None:
        """Apply every batch of deltas, or none: validation precedes any write."""
        plans = [(batch, *self._plan(batch)) for batch in batches]
        for batch, new_ints, new_strs, _ in plans:
            # An earlier batch of this request may have created some of these ids.
            if len(new_ints) or new_strs:
                self._ensure(new_ints, new_strs)  # an earlier batch may have created some
            self._apply(batch)

    def push(self, batches: Sequence[tuple[Sequence[Id], np.ndarray]]) -> None:
        """`push_rows` for (list of mixed ids, deltas) pairs."""
        rows = []
        for ids, deltas in batches:
            int_ids, str_ids, order = split_ids(ids)
            rows.append(Rows(int_ids, str_ids, np.asarray(deltas)[order]))
        self.push_rows(rows)

    def _plan(self, batch: Rows) -> tuple[np.ndarray, list[str], Any]:
        """Check the deltas' dtype and shape against every target; compute inits of new ids."""
        new_ints, new_strs, touches_table = self._missing(batch.int_ids, batch.str_ids)
        new_values = self._initial_values(new_ints, new_strs) if len(new_ints) or new_strs else []
        deltas = batch.values
        targets: set[Signature] = set()
        if isinstance(new_values, np.ndarray):
            targets.add((new_values.dtype, new_values.shape[1:]))
        else:
            targets.update(_signature(v) for v in new_values)
        if touches_table:
            targets.add(self.signature)  # type: ignore[arg-type]
        if self._other:
            targets.update(_signature(self._other[i]) for i in batch.ids() if i in self._other)
        for dtype, shape in targets:
            if deltas.shape[1:] != shape:
                raise WireError(f"delta shape {deltas.shape[1:]} does not match parameter shape {shape}")
            if not np.can_cast(deltas.dtype, dtype, casting="same_kind"):
                raise WireError(f"delta dtype {deltas.dtype} cannot update parameters of dtype {dtype}")
        return new_ints, new_strs, new_values

    def _apply(self, batch: Rows) -> None:
        update = self.update
        if not self._other and update.scalar is None:
            assert self._table is not None
            rows = self._table_rows(batch.int_ids, batch.str_ids)
            deltas = batch.values.astype(self._table.dtype, copy=False)
            if update.replace:
                # Keep the last delta of an id repeated in the batch.
                _, last = np.unique(rows[::-1], return_index=True)
                keep = len(rows) - 1 - last
                self._table[rows[keep]] = deltas[keep]
            elif update.ufunc is not None:
                update.ufunc.at(self._table, rows, deltas)
            return
        # Compute every new value first and write only when all succeeded, so an
        # exception in a user update function leaves the store untouched.
        staged: dict[Id, np.ndarray] = {}
        for param_id, delta in zip(batch.ids(), batch.values, strict=True):
            old = staged.get(param_id)
            if old is None:
                old = self._current(param_id)
            staged[param_id] = self._updated(old, delta, param_id)
        for param_id, new in staged.items():
            if param_id in self._other:
                self._other[param_id] = np.array(new, dtype=self._other[param_id].dtype)
            else:
                self._table[self._row_of(param_id)] = new  # type: ignore[index]

    def _row_of(self, param_id: Id) -> int:
        if isinstance(param_id, str):
            return self._str_rows[param_id]
        return int(self._int_rows.lookup(np.array([param_id], dtype=INT_IDS_DTYPE))[0])

    def _current(self, param_id: Id) -> np.ndarray:
        value = self._other.get(param_id)
        return value if value is not None else self._table[self._row_of(param_id)]  # type: ignore[index]

    def _updated(self, old: np.ndarray, delta: np.ndarray, param_id: Id) -> np.ndarray:
        update = self.update
        if update.replace:
            return delta
        if update.ufunc is not None:
            return update.ufunc(old, delta.astype(old.dtype, copy=False))
        given = old.item() if old.ndim == 0 else old.copy()
        result = update.call(given, delta.item() if delta.ndim == 0 else delta.copy(), param_id)
        new = _check_result(result, f"param_update {update.name}", param_id)
        if new.shape != old.shape or not np.can_cast(new.dtype, old.dtype, casting="same_kind"):
            raise WireError(
                f"update {update.spec!r} returned {new.dtype}{list(new.shape)} for a "
                f"parameter of {old.dtype}{list(old.shape)}"
            )
        return new

    # -- snapshot -----------------------------------------------------------

    def chunk_rows(self, max_rows: int) -> Iterator[list[Rows]]:
        """The whole store in chunks of at most `max_rows` ids, each grouped by signature.

        Taken lazily: interleave with pushes only under the shard's lock.
        """
        size = self._size  # rows added while the chunks are taken are not part of them
        if size:
            int_keys, int_rows = self._int_rows.items()
            row_ids = np.zeros(size, dtype=INT_IDS_DTYPE)
            row_ids[int_rows] = int_keys
            row_strs = {row: s for s, row in self._str_rows.items()}
            is_str = np.zeros(size, dtype=bool)
            is_str[list(row_strs)] = True
            for start in range(0, size, max_rows):
                stop = min(start + max_rows, size)
                values = self._table[start:stop]  # type: ignore[index]
                strs = np.flatnonzero(is_str[start:stop])
                if not len(strs):
                    yield [Rows(row_ids[start:stop].copy(), [], values.copy())]
                    continue
                ints = np.flatnonzero(~is_str[start:stop])
                order = np.concatenate([ints, strs])
                str_ids = [row_strs[start + k] for k in strs.tolist()]
                yield [Rows(row_ids[start:stop][ints], str_ids, values[order])]
        other_ids = list(self._other)
        for start in range(0, len(other_ids), max_rows):
            yield self._grouped(other_ids[start : start + max_rows])

    def chunks(self, max_rows: int) -> Iterator[list[tuple[list[Id], np.ndarray]]]:
        """`chunk_rows` with ids as lists."""
        for chunk in self.chunk_rows(max_rows):
            yield [(rows.ids(), rows.values) for rows in chunk]

    def nbytes(self) -> int:
        """Bytes held by the table and the int index (the bulk of a large shard)."""
        return (0 if self._table is None else self._table.nbytes) + self._int_rows.nbytes()
