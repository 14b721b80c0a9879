"""Parameter storage for one shard.

Parameters live in tables, one per signature (dtype and shape): a growable numpy
array with one row per parameter. Usually every parameter has one signature
(every embedding of a model) and one table holds them all. Each parameter has a
handle, its number in order of creation: int ids find it through a vectorized
hash index (psserver.index), str ids through a dict. Pulls gather rows and
pushes scatter into them with one numpy call per table and batch; a batch of int
ids costs no Python work per key.

A parameter's value, dtype included, is what folding its deltas in arrival order
into init(id) with the update function gives under numpy's rules: `add`, `max`
and `min` are numpy's ufuncs (an int parameter given a float delta becomes a
float), `replace` takes the delta, and a user's function decides (its result's
dtype and shape become the parameter's). A parameter whose signature changes
moves to the table of its new signature; no other parameter changes.

Batches are `Rows`: int ids (an int64 array), str ids, and one value row per id
in that order. The store is not thread-safe; the shard serializes access.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from psclient.errors import WireError
from psclient.specs import InitFn, UpdateFn, UserFunctionError
from psclient.wire.codec import ALLOWED_KINDS, INT_IDS_DTYPE
from psclient.wire.partition import Id
from psserver.index import IntIndex

# The first table holds up to 1,024 rows but no more than 1 MiB: a vector of a
# few floats gets room to grow, and one 50 MB parameter gets one row, not 50 GB.
# Later tables (promoted parameters, other shapes) start at the rows they need.
_FIRST_ROWS = 1024
_FIRST_BYTES = 1 << 20
_GROWTH = 1.5  # of the table's bytes; 2x would leave up to half of a large table unused
Signature = tuple[np.dtype, tuple[int, ...]]


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


# Below this many rows ufunc.at is as fast as sorting them first.
_SORTED_FOLD_ROWS = 32


def _fold_at(ufunc: np.ufunc, values: np.ndarray, rows: np.ndarray, deltas: np.ndarray) -> None:
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


class _Table:
    """The rows of one signature. A row whose parameter moved to another table
    stays as a hole; a table that every parameter left gives its memory back."""

    __slots__ = ("first_bytes", "live", "size", "values")

    def __init__(self, signature: Signature, first_bytes: int):
        self.values = np.zeros((0, *signature[1]), dtype=signature[0])
        self.first_bytes = first_bytes
        self.size = 0
        self.live = 0

    def append(self, rows: np.ndarray) -> np.ndarray:
        """Copy `rows` in; return their row numbers."""
        needed = self.size + len(rows)
        if needed > len(self.values):
            if len(self.values):
                capacity = max(needed, int(len(self.values) * _GROWTH))
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


class ParameterStore:
    def __init__(self, init: InitFn, update: UpdateFn):
        self.init = init
        self.update = update
        self._int_handles = IntIndex()
        self._str_handles: dict[str, int] = {}
        self._tables: list[_Table] = []
        self._table_numbers: dict[Signature, int] = {}
        self._count = 0
        # While one table holds every parameter and none has moved, handle h is
        # row h of table 0 and these arrays stay empty: the usual shard pays no
        # memory and no lookups for them.
        self._tracked = False
        self._where_table = np.empty(0, dtype=np.int32)
        self._where_row = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self._count

    # -- where parameters are ---------------------------------------------------

    def _handles(self, int_ids: np.ndarray, str_ids: list[str]) -> np.ndarray:
        """The handle of each id, -1 where absent."""
        handles = self._int_handles.lookup(int_ids)
        if str_ids:
            get = self._str_handles.get
            strs = np.fromiter((get(s, -1) for s in str_ids), np.int64, len(str_ids))
            handles = np.concatenate([handles, strs])
        return handles

    def _locate(self, handles: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Table numbers (None: all in table 0) and rows of handles."""
        if not self._tracked:
            return None, handles
        return self._where_table[handles], self._where_row[handles]

    def _track(self) -> None:
        """Keep each handle's table and row from now on."""
        if self._tracked:
            return
        self._tracked = True
        self._where_table = np.zeros(self._count, dtype=np.int32)
        self._where_row = np.arange(self._count, dtype=np.int64)

    def _reserve(self, count: int) -> None:
        if self._tracked and count > len(self._where_table):
            capacity = max(count, int(len(self._where_table) * _GROWTH))
            for name in ("_where_table", "_where_row"):
                old = getattr(self, name)
                grown = np.zeros(capacity, dtype=old.dtype)
                grown[: len(old)] = old
                setattr(self, name, grown)

    def _table_for(self, signature: Signature) -> int:
        number = self._table_numbers.get(signature)
        if number is None:
            if self._tables:
                self._track()
            number = len(self._tables)
            self._tables.append(_Table(signature, 0 if self._tables else _FIRST_BYTES))
            self._table_numbers[signature] = number
        return number

    def _move(self, handles: np.ndarray, values: np.ndarray) -> None:
        """Put new values of distinct parameters into the table of their signature."""
        target = self._table_for((values.dtype, values.shape[1:]))
        self._track()
        sources = self._where_table[handles]
        rows = self._tables[target].append(values)
        for number, count in zip(*np.unique(sources, return_counts=True), strict=True):
            self._tables[number].release(int(count))
        self._where_table[handles] = target
        self._where_row[handles] = rows

    # -- creation -------------------------------------------------------------

    def _initial_values(self, int_ids: np.ndarray, str_ids: list[str]) -> np.ndarray | list[np.ndarray]:
        ids: Sequence[Id] | np.ndarray = int_ids
        if str_ids or not self.init.vectorized:
            ids = [*int_ids.tolist(), *str_ids]
        values = self.init.batch(ids)
        if isinstance(values, np.ndarray):
            return values
        return [_check_result(v, f"param_init {self.init.name}", i) for i, v in zip(ids, values, strict=True)]

    @staticmethod
    def _absent(int_ids: np.ndarray, str_ids: list[str], handles: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Distinct ids without a handle, in order of first appearance."""
        missing = handles < 0
        count = len(int_ids)
        new_ints = _first_unique(int_ids[missing[:count]])
        new_strs = [s for s, m in zip(str_ids, missing[count:].tolist(), strict=True) if m]
        return new_ints, list(dict.fromkeys(new_strs))

    def _create(self, int_ids: np.ndarray, str_ids: list[str], values: np.ndarray | list[np.ndarray]) -> None:
        """Store new parameters (distinct, absent ids) with their initial values."""
        count = len(int_ids) + len(str_ids)
        if not count:
            return
        handles = np.arange(self._count, self._count + count, dtype=np.int64)
        if isinstance(values, np.ndarray):  # a batch init: one signature for all
            groups = [(np.arange(count), values)]
        else:
            positions: dict[Signature, list[int]] = {}
            for k, value in enumerate(values):
                positions.setdefault(_signature(value), []).append(k)
            groups = [(np.array(ks), np.stack([values[k] for k in ks])) for ks in positions.values()]
        numbers = [self._table_for((stacked.dtype, stacked.shape[1:])) for _, stacked in groups]
        self._reserve(self._count + count)
        for number, (ks, stacked) in zip(numbers, groups, strict=True):
            rows = self._tables[number].append(stacked)
            if self._tracked:
                self._where_table[handles[ks]] = number
                self._where_row[handles[ks]] = rows
        self._count += count
        self._int_handles.insert(int_ids, handles[: len(int_ids)])
        for param_id, handle in zip(str_ids, handles[len(int_ids) :].tolist(), strict=True):
            self._str_handles[param_id] = handle

    def _existing(self, int_ids: np.ndarray, str_ids: list[str]) -> np.ndarray:
        """Handles of the ids, creating absent ones from init."""
        handles = self._handles(int_ids, str_ids)
        if len(handles) and handles.min() < 0:
            new_ints, new_strs = self._absent(int_ids, str_ids, handles)
            self._create(new_ints, new_strs, self._initial_values(new_ints, new_strs))
            handles = self._fill_missing(int_ids, str_ids, handles)
        return handles

    def _fill_missing(self, int_ids: np.ndarray, str_ids: list[str], handles: np.ndarray) -> np.ndarray:
        """`handles` with the absent (-1) entries looked up again, after parameters were
        created: a handle never changes once given, so the others need no lookup."""
        missing = handles < 0
        count = len(int_ids)
        missing_strs = [s for s, m in zip(str_ids, missing[count:].tolist(), strict=True) if m]
        handles[missing] = self._handles(int_ids[missing[:count]], missing_strs)
        return handles

    # -- pull -------------------------------------------------------------------

    def pull_rows(self, int_ids: np.ndarray, str_ids: list[str]) -> list[Rows]:
        """Values of the ids (created if absent), grouped by signature, order kept per group."""
        return self._gather(int_ids, str_ids, self._existing(int_ids, str_ids))

    def _gather(self, int_ids: np.ndarray, str_ids: list[str], handles: np.ndarray) -> list[Rows]:
        if not len(handles):
            return []
        tables, rows = self._locate(handles)
        if tables is None:
            return [Rows(int_ids, str_ids, self._tables[0].values[rows])]
        first = int(tables[0])
        if (tables == first).all():
            return [Rows(int_ids, str_ids, self._tables[first].values[rows])]
        count, groups = len(int_ids), []
        for number in np.unique(tables).tolist():
            mask = tables == number
            strs = [s for s, m in zip(str_ids, mask[count:].tolist(), strict=True) if m]
            groups.append(Rows(int_ids[mask[:count]], strs, self._tables[number].values[rows[mask]]))
        return groups

    def pull(self, ids: Sequence[Id]) -> list[tuple[list[Id], np.ndarray]]:
        """`pull_rows` for a list of mixed ids."""
        int_ids, str_ids, order = split_ids(ids)
        groups = self.pull_rows(int_ids, str_ids)
        if len(groups) == 1:  # one group holds every id: give it back in the order asked
            return [(list(ids), groups[0].values[np.argsort(order)])]
        return [(rows.ids(), rows.values) for rows in groups]

    # -- push -------------------------------------------------------------------

    def push_rows(self, batches: Sequence[Rows]) -> None:
        """Apply every batch of deltas, or none: validation precedes any write."""
        if self.update.scalar is not None:
            self._push_user(batches)
            return
        plans = [self._plan(batch) for batch in batches]
        for batch, (handles, new_ints, new_strs, new_values) in zip(batches, plans, strict=True):
            if not len(handles):
                continue
            if handles.min() < 0:
                handles = self._fill_missing(batch.int_ids, batch.str_ids, handles)  # earlier batches' creations
            if handles.min() < 0:
                still_ints, still_strs = self._absent(batch.int_ids, batch.str_ids, handles)
                if len(still_ints) == len(new_ints) and len(still_strs) == len(new_strs):
                    self._create(new_ints, new_strs, new_values)
                else:  # an earlier batch of this request created some of them
                    self._create(still_ints, still_strs, self._initial_values(still_ints, still_strs))
                handles = self._fill_missing(batch.int_ids, batch.str_ids, handles)
            self._fold_batch(batch.values, handles)

    def push(self, batches: Sequence[tuple[Sequence[Id], np.ndarray]]) -> None:
        """`push_rows` for (list of mixed ids, deltas) pairs."""
        rows = []
        for ids, deltas in batches:
            int_ids, str_ids, order = split_ids(ids)
            rows.append(Rows(int_ids, str_ids, np.asarray(deltas)[order]))
        self.push_rows(rows)

    def _result_dtype(self, param: np.dtype, delta: np.dtype) -> np.dtype:
        """The dtype a built-in update gives: numpy's in-place rule, promoted across kinds.

        As `param += delta` does, a delta that casts to the parameter's dtype within
        its kind (float64 into float32, int into float) keeps the parameter's dtype,
        so a float32 model stays float32 whatever precision its deltas come in. A
        delta of a wider kind (a float into an int parameter) promotes the
        parameter as numpy's `result_type` would, where `+=` would fail.
        """
        if np.can_cast(delta, param, "same_kind"):
            return param
        if self.update.replace:
            return delta
        assert self.update.ufunc is not None
        try:
            return self.update.ufunc.resolve_dtypes((param, delta, None))[-1]
        except TypeError:
            raise WireError(f"delta dtype {delta} cannot update parameters of dtype {param}") from None

    def _plan(self, batch: Rows) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | list[np.ndarray]]:
        """Check the deltas' shape against every target; the ids' handles (-1: absent),
        and the absent ids with their inits."""
        handles = self._handles(batch.int_ids, batch.str_ids)
        new_ints, new_strs = self._absent(batch.int_ids, batch.str_ids, handles)
        new_values = self._initial_values(new_ints, new_strs) if len(new_ints) or new_strs else []
        targets: set[Signature] = set()
        if isinstance(new_values, np.ndarray):
            targets.add((new_values.dtype, new_values.shape[1:]))
        else:
            targets.update(_signature(v) for v in new_values)
        existing = handles[handles >= 0]
        if len(existing):
            tables, _ = self._locate(existing)
            numbers = [0] if tables is None else np.unique(tables).tolist()
            targets.update(_table_signature(self._tables[n]) for n in numbers)
        deltas = batch.values
        for dtype, shape in targets:
            if deltas.shape[1:] != shape:
                raise WireError(f"delta shape {deltas.shape[1:]} does not match parameter shape {shape}")
            self._result_dtype(dtype, deltas.dtype)
        return handles, new_ints, new_strs, new_values

    def _fold_batch(self, deltas: np.ndarray, handles: np.ndarray) -> None:
        tables, rows = self._locate(handles)
        if tables is None:
            self._fold(0, rows, handles, deltas)
            return
        numbers = np.unique(tables).tolist()
        if len(numbers) == 1:
            self._fold(numbers[0], rows, handles, deltas)
            return
        for number in numbers:
            mask = tables == number
            self._fold(number, rows[mask], handles[mask], deltas[mask])

    def _fold(self, number: int, rows: np.ndarray, handles: np.ndarray, deltas: np.ndarray) -> None:
        """Apply a built-in update to parameters of one table, moving them if their dtype changes."""
        values = self._tables[number].values
        dtype = self._result_dtype(values.dtype, deltas.dtype)
        if dtype != values.dtype:
            distinct = np.unique(handles)
            if self.update.replace:  # every moved row gets a delta: the old values are not needed
                moved = np.zeros((len(distinct), *values.shape[1:]), dtype=dtype)
            else:  # numpy casts the old value the same way before it applies the ufunc
                moved = values[self._locate(distinct)[1]].astype(dtype)
            self._move(distinct, moved)
            tables, rows = self._locate(handles)
            assert tables is not None
            values = self._tables[int(tables[0])].values
        if self.update.replace:
            # Keep the last delta of an id repeated in the batch.
            _, last = np.unique(rows[::-1], return_index=True)
            keep = len(rows) - 1 - last
            values[rows[keep]] = deltas[keep]
        else:
            assert self.update.ufunc is not None
            _fold_at(self.update.ufunc, values, rows, deltas)

    def _push_user(self, batches: Sequence[Rows]) -> None:
        """A user's update, called once per (old, delta) pair in arrival order.

        Every new value is computed before any is written, so an exception in
        the user's function leaves the store untouched.
        """
        staged: dict[int, np.ndarray] = {}  # handle -> new value
        fresh: dict[Id, np.ndarray] = {}  # id this request creates -> its value
        for batch in batches:
            handles = self._handles(batch.int_ids, batch.str_ids)
            if len(handles) and handles.min() < 0:
                new_ints, new_strs = self._absent(batch.int_ids, batch.str_ids, handles)
                ints = [i for i in new_ints.tolist() if i not in fresh]
                strs = [s for s in new_strs if s not in fresh]
                if ints or strs:
                    inits = self._initial_values(np.array(ints, dtype=INT_IDS_DTYPE), strs)
                    fresh.update(zip([*ints, *strs], inits, strict=True))
            tables, rows = self._locate(handles)
            numbers = [0] * len(handles) if tables is None else tables.tolist()
            positions = zip(batch.ids(), batch.values, handles.tolist(), numbers, rows.tolist(), strict=True)
            for param_id, delta, handle, number, row in positions:
                if handle < 0:
                    fresh[param_id] = self._updated(fresh[param_id], delta, param_id)
                    continue
                old = staged.get(handle)
                if old is None:
                    old = self._tables[number].values[row]
                staged[handle] = self._updated(old, delta, param_id)
        if staged:
            self._write(np.fromiter(staged, np.int64, len(staged)), list(staged.values()))
        if fresh:
            ints = [i for i in fresh if not isinstance(i, str)]
            strs = [s for s in fresh if isinstance(s, str)]
            values = [fresh[i] for i in ints] + [fresh[s] for s in strs]
            self._create(np.array(ints, dtype=INT_IDS_DTYPE), strs, values)

    def _updated(self, old: np.ndarray, delta: np.ndarray, param_id: Id) -> np.ndarray:
        given = old.item() if old.ndim == 0 else old.copy()
        result = self.update.call(given, delta.item() if delta.ndim == 0 else delta.copy(), param_id)
        return _check_result(result, f"param_update {self.update.name}", param_id)

    def _write(self, handles: np.ndarray, values: list[np.ndarray]) -> None:
        """Store new values of existing distinct parameters, each in the table of its signature."""
        positions: dict[Signature, list[int]] = {}
        for k, value in enumerate(values):
            positions.setdefault(_signature(value), []).append(k)
        tables, rows = self._locate(handles)
        for signature, ks in positions.items():
            stacked = np.stack([values[k] for k in ks])
            number = self._table_numbers.get(signature, -1)
            current = np.zeros(len(ks), dtype=np.int32) if tables is None else tables[ks]
            stay = current == number
            if stay.any():
                self._tables[number].values[rows[ks][stay]] = stacked[stay]
            if not stay.all():
                self._move(handles[ks][~stay], stacked[~stay])

    # -- snapshot ---------------------------------------------------------------

    def chunk_rows(self, max_rows: int) -> Iterator[list[Rows]]:
        """The whole store in chunks of at most `max_rows` ids, each grouped by signature.

        Taken lazily: interleave with pushes only under the shard's lock. The
        parameters are those that exist when the first chunk is taken, each
        exactly once, with its value when its chunk is taken.
        """
        count = self._count
        if not count:
            return
        int_keys, int_handles = self._int_handles.items()
        int_of = np.zeros(count, dtype=INT_IDS_DTYPE)
        int_of[int_handles] = int_keys
        str_of = {handle: s for s, handle in self._str_handles.items() if handle < count}
        is_str = np.zeros(count, dtype=bool)
        is_str[list(str_of)] = True
        for start in range(0, count, max_rows):
            span = np.arange(start, min(start + max_rows, count), dtype=np.int64)
            strs = span[is_str[span]]
            if not len(strs):
                yield self._gather(int_of[span], [], span)
                continue
            ints = span[~is_str[span]]
            handles = np.concatenate([ints, strs])
            yield self._gather(int_of[ints], [str_of[h] for h in strs.tolist()], handles)

    def chunks(self, max_rows: int) -> Iterator[list[tuple[list[Id], np.ndarray]]]:
        """`chunk_rows` with ids as lists."""
        for chunk in self.chunk_rows(max_rows):
            yield [(rows.ids(), rows.values) for rows in chunk]

    def nbytes(self) -> int:
        """Bytes held by the tables and the indexes (the bulk of a large shard)."""
        tables = sum(table.values.nbytes for table in self._tables)
        return tables + self._int_handles.nbytes() + self._where_table.nbytes + self._where_row.nbytes


def _table_signature(table: _Table) -> Signature:
    return table.values.dtype, table.values.shape[1:]
