"""What a logic may pass to `push`, `push_many`, `pull_many`: checked where it is called.

A delta no shard could apply is refused at the call, where the record that
made it is known, with one line naming the id and the value; ids of the batch
calls become int64 arrays (no Python work per id) or object arrays of strs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from psclient.errors import StreampsError
from psclient.wire.codec import ALLOWED_KINDS, INT_IDS_DTYPE
from psclient.wire.partition import Id, check_id

RECORD_REPR_LIMIT = 160


def short_repr(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= RECORD_REPR_LIMIT else text[: RECORD_REPR_LIMIT - 3] + "..."


class InvalidDelta(StreampsError, ValueError):
    """A pushed delta that no shard could apply: refused at `ps.push`, where the
    record that made it is known, rather than when its batch is sent."""


_INT64_MIN, _INT64_END = -(1 << 63), 1 << 63


def check_delta(param_id: Id, delta: Any) -> None:
    """Raise InvalidDelta unless `delta` is a finite number or numeric numpy array.

    This runs on every push, so the common kinds (an array, a Python number)
    take short paths.
    """
    cls = type(delta)
    if cls is np.ndarray:
        kind = delta.dtype.kind
        if kind == "f":
            # The sum of squares is finite only when every element is: a NaN or
            # an Inf carries through and squares cannot cancel. It costs half
            # of isfinite().all(), which decides only when the sum overflows.
            if math.isfinite(np.vdot(delta, delta)) or np.isfinite(delta).all():
                return
            raise _non_finite(param_id, delta)
        if kind == "c":
            if np.isfinite(delta).all():
                return
            raise _non_finite(param_id, delta)
        if kind in ALLOWED_KINDS:
            return
        raise _not_numeric(param_id, delta)
    if cls is float:
        if math.isfinite(delta):
            return
        raise _non_finite(param_id, delta)
    if cls is int:
        if _INT64_MIN <= delta < _INT64_END:
            return
        raise InvalidDelta(f"push of {short_repr(delta)} (int) to id {param_id!r}: an int delta must fit in int64")
    if cls is bool:
        return
    if isinstance(delta, (str, bytes)) or delta is None:
        raise _not_numeric(param_id, delta)
    try:
        array = np.asarray(delta)  # numpy scalars, nested lists of numbers, ...
    except (TypeError, ValueError):  # ragged nesting, or an object numpy cannot take
        raise _not_numeric(param_id, delta) from None
    kind = array.dtype.kind
    if kind not in ALLOWED_KINDS:
        raise _not_numeric(param_id, delta)
    if kind in "fc" and not np.isfinite(array).all():
        raise _non_finite(param_id, delta)


def _what(delta: Any) -> str:
    dtype = getattr(delta, "dtype", None)
    return type(delta).__name__ if dtype is None else f"{type(delta).__name__} of dtype {dtype}"


def _not_numeric(param_id: Id, delta: Any) -> InvalidDelta:
    return InvalidDelta(
        f"push of {short_repr(delta)} ({_what(delta)}) to id {param_id!r}: "
        "a delta must be a number or a numeric numpy array"
    )


def _non_finite(param_id: Id, delta: Any) -> InvalidDelta:
    # The shard would refuse the whole batch holding it: refuse the one push instead.
    return InvalidDelta(
        f"push of {short_repr(delta)} ({_what(delta)}) to id {param_id!r}: "
        "a delta must be finite (NaN and Inf are refused)"
    )


def check_deltas(ids: Any, deltas: Any, count: int) -> np.ndarray:
    """`deltas` as an array with one numeric, finite row per id, or InvalidDelta.

    The `push_many` form of `check_delta`: whole-array checks; the message
    names the first id whose row is not finite.
    """
    try:
        array = deltas if type(deltas) is np.ndarray else np.asarray(deltas)
    except (TypeError, ValueError):  # ragged rows, or objects numpy cannot take
        array = None
    if array is None or array.dtype.kind not in ALLOWED_KINDS:
        raise InvalidDelta(
            f"push_many of {short_repr(deltas)} ({_what(deltas)}) to {count} ids: "
            "the deltas must be a numeric numpy array"
        )
    if array.ndim == 0 or array.shape[0] != count:
        raise InvalidDelta(f"push_many of deltas of shape {array.shape} to {count} ids: the deltas need one row per id")
    if array.dtype.kind in "fc":
        finite = np.isfinite(array)
        if not finite.all():
            row = int(np.flatnonzero(~finite.reshape(count, -1).all(axis=1))[0])
            param_id = ids[row]
            if isinstance(param_id, np.generic):
                param_id = param_id.item()
            raise InvalidDelta(
                f"push_many of {short_repr(array[row])} (row {row} of {count}) to id {param_id!r}: "
                "a delta must be finite (NaN and Inf are refused)"
            )
    return array


def _int_ids(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "u" and array.size and int(array.max()) > _INT64_END - 1:
        raise ValueError(f"int parameter id {int(array.max())} does not fit in signed 64 bits")
    return np.ascontiguousarray(array, dtype=INT_IDS_DTYPE)


def id_groups(ids: Any) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The ids of a `pull_many`/`push_many` as (chunk, rows) pairs.

    A chunk is an int64 array, or an object array of str ids (str ids need a
    hash each, int ids need no Python work at all); `rows` are the positions of
    the chunk's ids in `ids`, None for all of them in order. A sequence mixing
    ints and strs gives one chunk of each. Raises TypeError or ValueError for
    what is not an id.
    """
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"ids must be one-dimensional, got shape {ids.shape}")
        if ids.dtype.kind in "iu":
            return [(_int_ids(ids), None)] if len(ids) else []
        if ids.dtype.kind not in "UO":
            raise TypeError(f"parameter ids are int or str, not {ids.dtype}")
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"pull_many and push_many take an array or a sequence of ids, not {type(ids).__name__}")
    if not ids:
        return []
    types = set(map(type, ids))
    if types == {str}:
        return [(np.array(ids, dtype=object), None)]
    if str not in types:
        try:
            array = np.asarray(ids) if types <= {int, np.int64, np.int32} else None
        except OverflowError:
            array = None
        if array is None or array.dtype.kind not in "iu":  # bools, floats, ints past 64 bits: say which
            array = np.asarray([check_id(i) for i in ids], dtype=INT_IDS_DTYPE)
        return [(_int_ids(array), None)]
    checked = [check_id(i) for i in ids]
    is_str = np.fromiter((type(i) is str for i in checked), dtype=bool, count=len(checked))
    int_rows, str_rows = np.flatnonzero(~is_str), np.flatnonzero(is_str)
    ints = np.asarray([checked[r] for r in int_rows.tolist()], dtype=INT_IDS_DTYPE)
    strs = np.array([checked[r] for r in str_rows.tolist()], dtype=object)
    return [(ints, int_rows), (strs, str_rows)]
