"""Parameter storage for one shard.

Parameters that share one dtype and shape (the usual case: every embedding of a
model) live in a growable numpy table, one row per id, with an id -> row index.
Pulls gather rows and pushes scatter into them with one vectorized call per
batch. A parameter whose initial value has another dtype or shape falls back to
a per-id store of arrays, so any numeric value still works.

The store is not thread-safe; the shard serializes access with one lock.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from psclient.codec import ALLOWED_KINDS
from psclient.errors import WireError
from psclient.partition import Id
from psserver.specs import InitFn, UpdateFn

_MIN_CAPACITY = 1024
Signature = tuple[np.dtype, tuple[int, ...]]


def _signature(value: np.ndarray) -> Signature:
    return value.dtype, value.shape


def _check_value(value: Any, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in ALLOWED_KINDS:
        raise WireError(f"{what} has non-numeric dtype {array.dtype}")
    return array


class ParameterStore:
    def __init__(self, init: InitFn, update: UpdateFn):
        self.init = init
        self.update = update
        self._index: dict[Id, int] = {}
        self._row_ids: list[Id] = []
        self._table: np.ndarray | None = None  # shape (capacity, *row_shape)
        self._size = 0
        self._other: dict[Id, np.ndarray] = {}  # values off the table's signature

    def __len__(self) -> int:
        return self._size + len(self._other)

    @property
    def signature(self) -> Signature | None:
        return None if self._table is None else _signature(self._table[0])

    # -- creation -----------------------------------------------------------

    def _initial_values(self, ids: Sequence[Id]) -> list[np.ndarray] | np.ndarray:
        values = self.init.batch(ids)
        if isinstance(values, np.ndarray):
            return _check_value(values, f"init {self.init.spec!r}")
        return [_check_value(v, f"init {self.init.spec!r} of id {i!r}") for i, v in zip(ids, values, strict=True)]

    def _append_rows(self, ids: Sequence[Id], rows: np.ndarray) -> None:
        if self._table is None:
            capacity = max(_MIN_CAPACITY, len(ids))
            self._table = np.zeros((capacity, *rows.shape[1:]), dtype=rows.dtype)
        needed = self._size + len(ids)
        if needed > len(self._table):
            grown = np.zeros((max(needed, 2 * len(self._table)), *self._table.shape[1:]), self._table.dtype)
            grown[: self._size] = self._table[: self._size]
            self._table = grown
        self._table[self._size : needed] = rows
        for offset, param_id in enumerate(ids):
            self._index[param_id] = self._size + offset
        self._row_ids.extend(ids)
        self._size = needed

    def _insert(self, ids: Sequence[Id], values: list[np.ndarray] | np.ndarray) -> None:
        """Store new parameters: table rows where the signature fits, else `_other`."""
        if isinstance(values, np.ndarray):  # a batch init: one signature for all
            sig = (values.dtype, values.shape[1:])
            if self._table is None or self.signature == sig:
                self._append_rows(ids, values)
            else:
                self._other.update(zip(ids, values.copy(), strict=True))
            return
        table_ids: list[Id] = []
        table_rows: list[np.ndarray] = []
        for param_id, value in zip(ids, values, strict=True):
            table_signature = self.signature or (_signature(table_rows[0]) if table_rows else None)
            if table_signature is None or _signature(value) == table_signature:
                table_ids.append(param_id)
                table_rows.append(value)
            else:
                self._other[param_id] = value.copy()
        if table_ids:
            self._append_rows(table_ids, np.stack(table_rows))

    def _missing(self, ids: Sequence[Id]) -> list[Id]:
        index, other = self._index, self._other
        seen: set[Id] = set()
        missing = []
        for param_id in ids:
            if param_id not in index and param_id not in other and param_id not in seen:
                seen.add(param_id)
                missing.append(param_id)
        return missing

    def ensure(self, ids: Sequence[Id]) -> None:
        missing = self._missing(ids)
        if missing:
            self._insert(missing, self._initial_values(missing))

    # -- pull ---------------------------------------------------------------

    def pull(self, ids: Sequence[Id]) -> list[tuple[list[Id], np.ndarray]]:
        """Values of `ids` (created if absent), grouped by signature, order kept per group."""
        self.ensure(ids)
        if not self._other:
            assert self._table is not None or not ids
            if not ids:
                return []
            rows = np.fromiter((self._index[i] for i in ids), dtype=np.intp, count=len(ids))
            return [(list(ids), self._table[rows])]  # type: ignore[index]
        return self._grouped(ids)

    def _grouped(self, ids: Sequence[Id]) -> list[tuple[list[Id], np.ndarray]]:
        table_ids = [i for i in ids if i in self._index]
        groups: list[tuple[list[Id], np.ndarray]] = []
        if table_ids:
            rows = np.fromiter((self._index[i] for i in table_ids), dtype=np.intp, count=len(table_ids))
            groups.append((table_ids, self._table[rows]))  # type: ignore[index]
        by_sig: dict[Signature, tuple[list[Id], list[np.ndarray]]] = {}
        for param_id in ids:
            value = self._other.get(param_id)
            if value is not None:
                group = by_sig.setdefault(_signature(value), ([], []))
                group[0].append(param_id)
                group[1].append(value)
        groups.extend((gids, np.stack(values)) for gids, values in by_sig.values())
        return groups

    # -- push ---------------------------------------------------------------

    def push(self, batches: Sequence[tuple[Sequence[Id], np.ndarray]]) -> None:
        """Apply every (ids, deltas) batch, or none: validation precedes any write."""
        plans = [self._plan(ids, deltas) for ids, deltas in batches]
        for ids, deltas, new_ids, new_values in plans:
            if new_ids:
                self._insert(new_ids, new_values)
            self._apply(ids, deltas)

    def _plan(self, ids: Sequence[Id], deltas: np.ndarray) -> tuple[Sequence[Id], np.ndarray, list[Id], Any]:
        """Check dtype and shape of `deltas` against each target; compute inits of new ids."""
        missing = self._missing(ids)
        new_values = self._initial_values(missing) if missing else []
        row_shape = deltas.shape[1:]
        if isinstance(new_values, np.ndarray):
            new_sigs = {(new_values.dtype, new_values.shape[1:])} if missing else set()
        else:
            new_sigs = {_signature(v) for v in new_values}
        targets = set(new_sigs)
        if self._table is not None and any(i in self._index for i in ids):
            targets.add(self.signature)  # type: ignore[arg-type]
        targets.update(_signature(self._other[i]) for i in ids if i in self._other)
        for dtype, shape in targets:
            if shape != row_shape:
                raise WireError(f"delta shape {row_shape} does not match parameter shape {shape}")
            if not np.can_cast(deltas.dtype, dtype, casting="same_kind"):
                raise WireError(f"delta dtype {deltas.dtype} cannot update parameters of dtype {dtype}")
        return ids, deltas, missing, new_values

    def _apply(self, ids: Sequence[Id], deltas: np.ndarray) -> None:
        update = self.update
        if not self._other and update.scalar is None:
            assert self._table is not None
            rows = np.fromiter((self._index[i] for i in ids), dtype=np.intp, count=len(ids))
            deltas = deltas.astype(self._table.dtype, copy=False)
            if update.replace:
                # Keep the last delta of an id repeated in the batch.
                _, last = np.unique(rows[::-1], return_index=True)
                keep = len(rows) - 1 - last
                self._table[rows[keep]] = deltas[keep]
            else:
                assert update.ufunc is not None
                update.ufunc.at(self._table, rows, deltas)
            return
        # Compute every new value first and write only when all succeeded, so an
        # exception in a user update function leaves the store untouched.
        staged: dict[Id, np.ndarray] = {}
        for param_id, delta in zip(ids, deltas, strict=True):
            old = staged.get(param_id)
            if old is None:
                old = self._current(param_id)
            staged[param_id] = self._updated(old, delta)
        for param_id, new in staged.items():
            row = self._index.get(param_id)
            if row is not None:
                self._table[row] = new  # type: ignore[index]
            else:
                self._other[param_id] = np.array(new, dtype=self._other[param_id].dtype)

    def _current(self, param_id: Id) -> np.ndarray:
        row = self._index.get(param_id)
        return self._table[row] if row is not None else self._other[param_id]  # type: ignore[index]

    def _updated(self, old: np.ndarray, delta: np.ndarray) -> np.ndarray:
        update = self.update
        if update.replace:
            return delta
        if update.ufunc is not None:
            return update.ufunc(old, delta.astype(old.dtype, copy=False))
        assert update.scalar is not None
        given = old.item() if old.ndim == 0 else old.copy()
        result = update.scalar(given, delta.item() if delta.ndim == 0 else delta.copy())
        new = _check_value(result, "update result")
        if new.shape != old.shape or not np.can_cast(new.dtype, old.dtype, casting="same_kind"):
            raise WireError(
                f"update {update.spec!r} returned {new.dtype}{list(new.shape)} for a "
                f"parameter of {old.dtype}{list(old.shape)}"
            )
        return new

    # -- snapshot -----------------------------------------------------------

    def chunks(self, max_rows: int) -> Iterator[list[tuple[list[Id], np.ndarray]]]:
        """The whole store in chunks of at most `max_rows` ids, each grouped by signature."""
        for start in range(0, self._size, max_rows):
            stop = min(start + max_rows, self._size)
            yield [(self._row_ids[start:stop], self._table[start:stop].copy())]  # type: ignore[index]
        other_ids = list(self._other)
        for start in range(0, len(other_ids), max_rows):
            yield self._grouped(other_ids[start : start + max_rows])
