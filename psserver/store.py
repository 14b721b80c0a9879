"""Parameter storage for one shard.

Parameters live in tables, one per signature (dtype and shape): a growable numpy
array with one row per parameter (psserver.tables). Usually every parameter has
one signature (every embedding of a model) and one table holds them all. Each
parameter has a handle, its number in order of creation: int ids find it
through a vectorized hash index (psserver.index), str ids through a dict.
Pulls gather rows and pushes scatter into them with one numpy call per table
and batch; a batch of int ids costs no Python work per key.

A parameter's value, dtype included, is what folding its deltas in arrival order
into init(id) with the update function gives under numpy's rules: `add`, `max`
and `min` are numpy's ufuncs (an int parameter given a float delta becomes a
float), `replace` takes the delta, and a user's function decides (its result's
dtype and shape become the parameter's). A parameter whose signature changes
moves to the table of its new signature; no other parameter changes.

Batches are `DecodedBatch`es (psclient.wire.codec): int ids (an int64 array), str ids,
and one value row per id in that order. The store is not thread-safe; the shard
serializes access.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from psclient.errors import WireError
from psclient.specs import InitFn, UpdateFn, UserFunctionError
from psclient.wire.codec import ALLOWED_KINDS, INT_IDS_DTYPE, DecodedBatch, split_ids
from psclient.wire.partition import Id, check_id
from psserver.index import IntIndex
from psserver.tables import Signature, Tables, fold_at, signature


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


def _rows(batch: DecodedBatch) -> np.ndarray:
    """The values of a batch of deltas or of pulled values (never ids only)."""
    if batch.values is None:
        raise WireError("batch carries ids but no values")
    return batch.values


def _take(int_ids: np.ndarray, str_ids: list[str], mask: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The ids of a batch (ints, then strs) where `mask` is true."""
    count = len(int_ids)
    return int_ids[mask[:count]], [s for s, m in zip(str_ids, mask[count:].tolist(), strict=True) if m]


class ParameterStore:
    def __init__(self, init: InitFn, update: UpdateFn):
        self.init = init
        self.update = update
        self._int_handles = IntIndex()
        self._str_handles: dict[str, int] = {}
        self._tables = Tables()

    def __len__(self) -> int:
        return self._tables.count

    def __contains__(self, param_id: object) -> bool:
        try:
            param_id = check_id(param_id)
        except (TypeError, ValueError):
            return False
        if isinstance(param_id, str):
            return param_id in self._str_handles
        return bool(self._int_handles.lookup(np.array([param_id], dtype=INT_IDS_DTYPE))[0] >= 0)

    def ids(self) -> list[Id]:
        """Every id, in order of creation."""
        int_of, str_of = self._ids_by_handle()
        ids: list[Id] = int_of.tolist()
        for handle, param_id in str_of.items():
            ids[handle] = param_id
        return ids

    def _ids_by_handle(self) -> tuple[np.ndarray, dict[int, str]]:
        """The int id of each handle (0 at a str id's), and the str ids by handle."""
        int_of = np.zeros(len(self), dtype=INT_IDS_DTYPE)
        int_keys, int_handles = self._int_handles.items()
        int_of[int_handles] = int_keys
        return int_of, {handle: s for s, handle in self._str_handles.items()}

    def put(self, batch: DecodedBatch) -> None:
        """Set distinct ids to the rows of `batch.values`, creating absent ones: the
        state that other writers' pushes would have left (for tests and restores)."""
        handles = self._handles(batch.int_ids, batch.str_ids)
        present = handles >= 0
        if present.any():
            self._tables.set(handles[present], list(_rows(batch)[present]))
        if not present.all():
            # One stacked array (one signature), not a list of rows: a snapshot's million
            # rows are restored in one copy, not sorted by signature row by row.
            self._create(*_take(batch.int_ids, batch.str_ids, ~present), _rows(batch)[~present])

    # -- where parameters are ---------------------------------------------------

    def _handles(self, int_ids: np.ndarray, str_ids: list[str]) -> np.ndarray:
        """The handle of each id, -1 where absent."""
        handles = self._int_handles.lookup(int_ids)
        if str_ids:
            get = self._str_handles.get
            strs = np.fromiter((get(s, -1) for s in str_ids), np.int64, len(str_ids))
            handles = np.concatenate([handles, strs])
        return handles

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
        new_ints, new_strs = _take(int_ids, str_ids, handles < 0)
        return _first_unique(new_ints), list(dict.fromkeys(new_strs))

    def _create(self, int_ids: np.ndarray, str_ids: list[str], values: np.ndarray | list[np.ndarray]) -> None:
        """Store new parameters (distinct, absent ids) with their initial values."""
        count = len(int_ids) + len(str_ids)
        if not count:
            return
        first = len(self)
        self._tables.add(values)
        self._int_handles.insert(int_ids, np.arange(first, first + len(int_ids), dtype=np.int64))
        self._str_handles.update(zip(str_ids, range(first + len(int_ids), first + count), strict=True))

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
        handles[missing] = self._handles(*_take(int_ids, str_ids, missing))
        return handles

    # -- pull -------------------------------------------------------------------

    def pull_rows(self, int_ids: np.ndarray, str_ids: list[str]) -> list[DecodedBatch]:
        """Values of the ids (created if absent), grouped by signature, order kept per group."""
        return self._gather(int_ids, str_ids, self._existing(int_ids, str_ids))

    def _gather(self, int_ids: np.ndarray, str_ids: list[str], handles: np.ndarray) -> list[DecodedBatch]:
        groups = []
        for number, mask, rows in self._tables.by_table(handles):
            ints, strs = (int_ids, str_ids) if mask is None else _take(int_ids, str_ids, mask)
            groups.append(DecodedBatch(ints, strs, self._tables.values(number)[rows]))
        return groups

    def pull(self, ids: Sequence[Id]) -> list[tuple[list[Id], np.ndarray]]:
        """`pull_rows` for a list of mixed ids."""
        int_ids, str_ids, order = split_ids(ids)
        groups = self.pull_rows(int_ids, str_ids)
        if len(groups) == 1:  # one group holds every id: give it back in the order asked
            return [(list(ids), _rows(groups[0])[np.argsort(order)])]
        return [(rows.ids(), _rows(rows)) for rows in groups]

    # -- push -------------------------------------------------------------------

    def push_rows(self, batches: Sequence[DecodedBatch]) -> None:
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
            self._fold_batch(_rows(batch), handles)

    def push(self, batches: Sequence[tuple[Sequence[Id], np.ndarray]]) -> None:
        """`push_rows` for (list of mixed ids, deltas) pairs."""
        rows = []
        for ids, deltas in batches:
            int_ids, str_ids, order = split_ids(ids)
            rows.append(DecodedBatch(int_ids, str_ids, np.asarray(deltas)[order]))
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

    def _plan(self, batch: DecodedBatch) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | list[np.ndarray]]:
        """Check the deltas' shape against every target; the ids' handles (-1: absent),
        and the absent ids with their inits."""
        handles = self._handles(batch.int_ids, batch.str_ids)
        new_ints, new_strs = self._absent(batch.int_ids, batch.str_ids, handles)
        new_values = self._initial_values(new_ints, new_strs) if len(new_ints) or new_strs else []
        targets: set[Signature] = set()
        if isinstance(new_values, np.ndarray):
            targets.add((new_values.dtype, new_values.shape[1:]))
        else:
            targets.update(signature(v) for v in new_values)
        targets.update(self._tables.signature(n) for n, _, _ in self._tables.by_table(handles[handles >= 0]))
        deltas = _rows(batch)
        for dtype, shape in targets:
            if deltas.shape[1:] != shape:
                raise WireError(f"delta shape {deltas.shape[1:]} does not match parameter shape {shape}")
            self._result_dtype(dtype, deltas.dtype)
        return handles, new_ints, new_strs, new_values

    def _fold_batch(self, deltas: np.ndarray, handles: np.ndarray) -> None:
        for number, mask, rows in self._tables.by_table(handles):
            if mask is None:
                self._fold(number, rows, handles, deltas)
            else:
                self._fold(number, rows, handles[mask], deltas[mask])

    def _fold(self, number: int, rows: np.ndarray, handles: np.ndarray, deltas: np.ndarray) -> None:
        """Apply a built-in update to parameters of one table, moving them if their dtype changes."""
        values = self._tables.values(number)
        dtype = self._result_dtype(values.dtype, deltas.dtype)
        if dtype != values.dtype:
            distinct = np.unique(handles)
            if self.update.replace:  # every moved row gets a delta: the old values are not needed
                moved = np.zeros((len(distinct), *values.shape[1:]), dtype=dtype)
            else:  # numpy casts the old value the same way before it applies the ufunc
                moved = values[self._tables.locate(distinct)[1]].astype(dtype)
            self._tables.move(distinct, moved)
            ((number, _, rows),) = self._tables.by_table(handles)
            values = self._tables.values(number)
        if self.update.replace:
            # Keep the last delta of an id repeated in the batch.
            _, last = np.unique(rows[::-1], return_index=True)
            keep = len(rows) - 1 - last
            values[rows[keep]] = deltas[keep]
        else:
            assert self.update.ufunc is not None
            fold_at(self.update.ufunc, values, rows, deltas)

    def _push_user(self, batches: Sequence[DecodedBatch]) -> None:
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
            tables, rows = self._tables.locate(handles)
            numbers = [0] * len(handles) if tables is None else tables.tolist()
            positions = zip(batch.ids(), _rows(batch), handles.tolist(), numbers, rows.tolist(), strict=True)
            for param_id, delta, handle, number, row in positions:
                if handle < 0:
                    fresh[param_id] = self._updated(fresh[param_id], delta, param_id)
                    continue
                old = staged.get(handle)
                if old is None:
                    old = self._tables.values(number)[row]
                staged[handle] = self._updated(old, delta, param_id)
        if staged:
            self._tables.set(np.fromiter(staged, np.int64, len(staged)), list(staged.values()))
        if fresh:
            ints = [i for i in fresh if not isinstance(i, str)]
            strs = [s for s in fresh if isinstance(s, str)]
            values = [fresh[i] for i in ints] + [fresh[s] for s in strs]
            self._create(np.array(ints, dtype=INT_IDS_DTYPE), strs, values)

    def _updated(self, old: np.ndarray, delta: np.ndarray, param_id: Id) -> np.ndarray:
        given = old.item() if old.ndim == 0 else old.copy()
        result = self.update.call(given, delta.item() if delta.ndim == 0 else delta.copy(), param_id)
        return _check_result(result, f"param_update {self.update.name}", param_id)

    # -- snapshot ---------------------------------------------------------------

    def chunk_rows(self, max_rows: int) -> Iterator[list[DecodedBatch]]:
        """The whole store in chunks of at most `max_rows` ids, each grouped by signature.

        Taken lazily: interleave with pushes only under the shard's lock. The
        parameters are those that exist when the first chunk is taken, each
        exactly once, with its value when its chunk is taken.
        """
        count = len(self)
        if not count:
            return
        int_of, str_of = self._ids_by_handle()
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
            yield [(rows.ids(), _rows(rows)) for rows in chunk]

    def nbytes(self) -> int:
        """Bytes held by the tables and the indexes (the bulk of a large shard)."""
        return self._tables.nbytes() + self._int_handles.nbytes()
