"""Which shard owns a parameter id, and which worker takes a record.

The rule is part of the wire contract and the same in every process:

- an int id (signed 64-bit) lives on shard ``id % num_shards`` (the
  non-negative modulo, as Python's ``%`` computes it);
- a str id lives on shard ``crc32(id.encode("utf-8")) % num_shards``.

CRC-32 (zlib) is stable across processes, machines and Python versions, unlike
the salted built-in ``hash``. The slicer that splits a batch across shards lives
here too, so there is exactly one place that knows the rule.
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Hashable, Sequence

import msgpack
import numpy as np

Id = int | str

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def check_id(param_id: object) -> Id:
    """Return `param_id` as an int or str id, or raise TypeError/ValueError."""
    if isinstance(param_id, str):
        return param_id
    if isinstance(param_id, bool) or not hasattr(param_id, "__index__"):
        raise TypeError(f"parameter ids are int or str, not {type(param_id).__name__}")
    value = operator.index(param_id)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"int parameter id {value} does not fit in signed 64 bits")
    return value


def shard_of(param_id: Id, num_shards: int) -> int:
    """The shard that owns `param_id` (which must already be a checked id)."""
    if isinstance(param_id, str):
        return zlib.crc32(param_id.encode("utf-8")) % num_shards
    return param_id % num_shards


def shards_of_ints(ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Vectorized `shard_of` for an int64 array."""
    return np.mod(ids, num_shards)


def split_int_ids(ids: np.ndarray, num_shards: int) -> list[tuple[int, np.ndarray]]:
    """(shard, positions in `ids`) of every shard owning some of an int64 array, in shard order."""
    owners = shards_of_ints(ids, num_shards)
    split = [(shard, np.flatnonzero(owners == shard)) for shard in range(num_shards)]
    return [(shard, positions) for shard, positions in split if len(positions)]


def split_by_shard(ids: Sequence[Id], num_shards: int) -> list[list[int]]:
    """Positions of `ids` grouped by owning shard, order kept within a shard."""
    positions: list[list[int]] = [[] for _ in range(num_shards)]
    for position, param_id in enumerate(ids):
        positions[shard_of(param_id, num_shards)].append(position)
    return positions


def key_bucket(key: Hashable, buckets: int) -> int:
    """A stable bucket for a record key (used for `partition_by` and `--partition-key`).

    Ints and strs follow the parameter rule; any other key is hashed through its
    msgpack bytes, which are the same in every process.
    """
    if isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
        return shard_of(key, buckets)
    try:
        packed = msgpack.packb(key, use_bin_type=True)
    except TypeError as exc:
        raise TypeError(f"partition key {key!r} is not an int, str or plain data") from exc
    return zlib.crc32(packed) % buckets
