"""The one place where numpy arrays and parameter ids become wire bytes and back.

Values travel as raw C-contiguous bytes plus dtype and shape (`Tensor`), ids as
packed little-endian int64 bytes or repeated strings (`ParamBatch`). Nothing is
pickled. Decoding validates everything a peer controls (dtype, shape, byte
count, batch length) and raises `WireError` with a message fit for a gRPC status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from psclient.errors import WireError
from psclient.wire.partition import Id
from psclient.wire.proto import tensor_pb2

# Numeric kinds only: bool, signed/unsigned ints, floats, complex. Object,
# string, void and datetime dtypes never cross the wire.
ALLOWED_KINDS = frozenset("biufc")
INT_IDS_DTYPE = np.dtype("<i8")
# Guard against a declared shape that would allocate absurd memory.
MAX_ELEMENTS = 1 << 31


def wire_dtype(dtype: np.dtype) -> np.dtype:
    """The little-endian form of a numeric dtype, or WireError."""
    if dtype.kind not in ALLOWED_KINDS:
        raise WireError(f"dtype {dtype} is not numeric (allowed: bool, int, uint, float, complex)")
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def encode_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    array = np.asarray(array)
    dtype = wire_dtype(array.dtype)
    array = np.require(array, dtype=dtype, requirements="C")  # keeps 0-d arrays 0-d
    return tensor_pb2.Tensor(dtype=dtype.str, shape=array.shape, data=array.tobytes())


def decode_tensor(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """A read-only array viewing the message bytes (no copy)."""
    try:
        dtype = np.dtype(tensor.dtype)
    except TypeError as exc:
        raise WireError(f"unknown dtype {tensor.dtype!r}") from exc
    dtype = wire_dtype(dtype)
    shape = tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise WireError(f"negative dimension in shape {shape}")
    count = 1
    for dim in shape:
        count *= dim
        if count > MAX_ELEMENTS:
            raise WireError(f"shape {shape} is too large")
    if len(tensor.data) != count * dtype.itemsize:
        raise WireError(
            f"tensor of dtype {dtype} and shape {shape} needs {count * dtype.itemsize} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def encode_int_ids(ids: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(ids, dtype=INT_IDS_DTYPE).tobytes()


def decode_int_ids(data: bytes) -> np.ndarray:
    if len(data) % 8:
        raise WireError(f"int_ids holds {len(data)} bytes, not a multiple of 8")
    return np.frombuffer(data, dtype=INT_IDS_DTYPE)


@dataclass(slots=True)
class DecodedBatch:
    """A `ParamBatch` as numpy: int ids, str ids, and values (None for ids only), one row
    per id in that order (ints, then strs). What a shard's store takes and gives."""

    int_ids: np.ndarray
    str_ids: list[str]
    values: np.ndarray | None

    def __len__(self) -> int:
        return len(self.int_ids) + len(self.str_ids)

    def ids(self) -> list[Id]:
        return [*self.int_ids.tolist(), *self.str_ids]


def split_ids(ids: Sequence[Id]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Int ids, str ids, and the permutation that puts `ids` in ints-then-strs order."""
    str_ids = [i for i in ids if isinstance(i, str)]
    if not str_ids:
        return np.asarray(ids, dtype=INT_IDS_DTYPE), [], np.arange(len(ids))
    int_ids = np.array([i for i in ids if not isinstance(i, str)], dtype=INT_IDS_DTYPE)
    is_str = np.fromiter([isinstance(i, str) for i in ids], bool, len(ids))
    return int_ids, str_ids, np.concatenate([np.flatnonzero(~is_str), np.flatnonzero(is_str)])


def encode_batch(batch: DecodedBatch) -> tensor_pb2.ParamBatch:
    """The one place a `ParamBatch` is built: ints packed, strs repeated, values if any."""
    int_ids = encode_int_ids(batch.int_ids)
    if batch.values is None:
        return tensor_pb2.ParamBatch(int_ids=int_ids, str_ids=batch.str_ids)
    return tensor_pb2.ParamBatch(int_ids=int_ids, str_ids=batch.str_ids, values=encode_tensor(batch.values))


def decode_batch(batch: tensor_pb2.ParamBatch, *, with_values: bool) -> DecodedBatch:
    int_ids = decode_int_ids(batch.int_ids)
    str_ids = list(batch.str_ids)
    values = None
    if with_values:
        if not batch.HasField("values"):
            raise WireError("batch carries ids but no values")
        values = decode_tensor(batch.values)
        rows = len(int_ids) + len(str_ids)
        if values.ndim == 0 or values.shape[0] != rows:
            raise WireError(f"batch has {rows} ids but values of shape {values.shape}")
    return DecodedBatch(int_ids, str_ids, values)


def encode_keys(ids: Sequence[Id]) -> tensor_pb2.ParamBatch:
    """Ids only (a pull request): as `split_ids` splits them, without the permutation."""
    str_ids = [i for i in ids if isinstance(i, str)]
    int_ids = [i for i in ids if not isinstance(i, str)] if str_ids else ids
    return encode_batch(DecodedBatch(np.asarray(int_ids, dtype=INT_IDS_DTYPE), str_ids, None))


def encode_id_array(ids: np.ndarray, values: np.ndarray | None = None) -> tensor_pb2.ParamBatch:
    """One batch of an id array: int64 ids, or an object array of str ids; with one
    row of `values` per id, or ids only (a pull request)."""
    if ids.dtype == object:
        return encode_batch(DecodedBatch(np.empty(0, dtype=INT_IDS_DTYPE), ids.tolist(), values))
    return encode_batch(DecodedBatch(ids, [], values))


def encode_rows(ids: Sequence[Id], values: np.ndarray) -> tensor_pb2.ParamBatch:
    """Ids with one row of `values` each; reorders rows to ints-then-strs."""
    int_ids, str_ids, order = split_ids(ids)
    return encode_batch(DecodedBatch(int_ids, str_ids, np.asarray(values)[order] if str_ids else values))


def as_value_array(value: Any) -> np.ndarray:
    """A parameter value (ndarray, numpy scalar, Python number) as a numeric array."""
    array = np.asarray(value)
    wire_dtype(array.dtype)
    return array


def _one_type(values: Sequence[Any]) -> bool:
    """Whether every value has the type (and, for arrays, the dtype) of the first."""
    if not values:
        return True
    first = values[0]
    kind = type(first)
    if kind is np.ndarray:
        return all(type(v) is np.ndarray and v.dtype == first.dtype for v in values)
    return all(type(v) is kind for v in values)


def group_values(ids: Sequence[Id], values: Sequence[Any]) -> list[tuple[list[Id], np.ndarray]]:
    """Group (id, value) pairs by dtype and shape, each group stacked into one array.

    The common case, every value of one type and shape, is one `np.asarray`
    call. Values of several types are grouped instead, so that each keeps its
    own dtype: stacked together, an int would become a float because another id
    of the batch got one, and the shard folds each delta by its dtype. The
    shard applies a request's batches in order, so the groups keep every id's
    deltas in the order they were pushed.
    """
    try:
        if _one_type(values):
            stacked = np.asarray(values)
            if stacked.dtype.kind in ALLOWED_KINDS and stacked.shape[:1] == (len(ids),):
                return [(list(ids), stacked)]
    except ValueError:  # ragged: values of different shapes
        pass
    arrays = [as_value_array(value) for value in values]
    groups: dict[tuple[str, tuple[int, ...]], tuple[list[Id], list[np.ndarray]]] = {}
    for param_id, array in zip(ids, arrays, strict=True):
        group = groups.setdefault((array.dtype.str, array.shape), ([], []))
        group[0].append(param_id)
        group[1].append(array)
    if sum(len(set(group_ids)) for group_ids, _ in groups.values()) == len(set(ids)):
        return [(group_ids, np.stack(group_arrays)) for group_ids, group_arrays in groups.values()]
    # An id with deltas of two signatures: its deltas must still be applied in the
    # order they were pushed (`replace` keeps the last one), so cut the batch into
    # consecutive runs of one signature instead of grouping across the batch.
    runs: list[tuple[list[Id], list[np.ndarray]]] = []
    last: tuple[str, tuple[int, ...]] | None = None
    for param_id, array in zip(ids, arrays, strict=True):
        signature = (array.dtype.str, array.shape)
        if signature != last:
            runs.append(([], []))
            last = signature
        runs[-1][0].append(param_id)
        runs[-1][1].append(array)
    return [(run_ids, np.stack(run_arrays)) for run_ids, run_arrays in runs]


def encode_values(ids: Sequence[Id], values: Sequence[Any]) -> list[tensor_pb2.ParamBatch]:
    return [encode_rows(group_ids, array) for group_ids, array in group_values(ids, values)]


def row_values(values: np.ndarray) -> list[Any]:
    """Rows of a decoded batch as the user sees them: writable arrays, or Python scalars."""
    if values.ndim == 1:
        return values.tolist()
    return list(np.array(values))  # one copy for the batch makes every row writable


def decode_rows(batches: Sequence[tensor_pb2.ParamBatch]) -> tuple[list[Id], list[Any]]:
    """Ids and user-facing values of every batch, in batch order."""
    ids: list[Id] = []
    values: list[Any] = []
    for batch in batches:
        decoded = decode_batch(batch, with_values=True)
        ids.extend(decoded.ids())
        assert decoded.values is not None
        values.extend(row_values(decoded.values))
    return ids, values
