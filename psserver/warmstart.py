"""`psserver --load FILE`: start a shard from a model, as JSON lines `{"id": ..., "value": ...}`.

That is what `psclient snapshot` and `psclient run --model` write, and what
`transform(model=...)` gives each shard. The file may hold the whole model of
any layout: a shard loads the ids it owns under its own --num-shards and skips
the others, so one file serves every shard (and a model moves to another
number of shards). JSON has no dtypes: a value whose shape is that of the
shard's init for its id takes the init's dtype where that is a cast within
the same kind (a float32 model stays float32, exactly); any other value is
stored as numpy reads it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from psclient.errors import StreampsError
from psclient.wire.codec import ALLOWED_KINDS, INT_IDS_DTYPE, DecodedBatch
from psclient.wire.partition import Id, check_id, shard_of
from psserver.store import ParameterStore

log = logging.getLogger("streamps.load")

_GROUP_ROWS = 65_536


class LoadError(StreampsError):
    """A model file the shard cannot load: one line naming the file and line."""


def _entries(path: Path) -> Iterator[tuple[int, Id, Any]]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise LoadError(f"--load {path}: {exc.strerror}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                yield number, check_id(entry["id"]), entry["value"]
            except (ValueError, TypeError, KeyError) as exc:
                raise LoadError(f"--load {path} line {number}: not an {{id, value}} object ({exc})") from None


def _as_array(path: Path, number: int, value: Any) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise LoadError(f"--load {path} line {number}: value is not a number or an array ({exc})") from None
    if array.dtype.kind not in ALLOWED_KINDS:
        raise LoadError(f"--load {path} line {number}: value is not a number or an array of numbers")
    return array


def load_model(path: Path, store: ParameterStore, shard: int, num_shards: int) -> tuple[int, int]:
    """Put the ids of `path` that this shard owns into `store`; return (loaded, skipped)."""
    mine: dict[Id, tuple[int, Any]] = {}  # a repeated id: its last line wins
    skipped = 0
    for number, param_id, value in _entries(path):
        if shard_of(param_id, num_shards) == shard:
            mine[param_id] = (number, value)
        else:
            skipped += 1
    groups: dict[tuple[np.dtype, tuple[int, ...]], list[tuple[Id, np.ndarray]]] = {}
    for param_id, (number, value) in mine.items():
        array = _as_array(path, number, value)
        groups.setdefault((array.dtype, array.shape), []).append((param_id, array))
    for rows in groups.values():
        for start in range(0, len(rows), _GROUP_ROWS):
            _put(store, rows[start : start + _GROUP_ROWS])
    log.info("loaded %d parameters from %s (%d of other shards skipped)", len(mine), path, skipped)
    return len(mine), skipped


def _put(store: ParameterStore, rows: list[tuple[Id, np.ndarray]]) -> None:
    ints = [(i, v) for i, v in rows if not isinstance(i, str)]
    strs = [(i, v) for i, v in rows if isinstance(i, str)]
    ordered = ints + strs
    values = np.stack([value for _, value in ordered])
    # The first id's init stands for the group's (a group shares one loaded dtype and shape).
    first = ordered[0][0]
    probe = [first] if isinstance(first, str) or not store.init.vectorized else np.array([first], INT_IDS_DTYPE)
    init = np.asarray(store.init.batch(probe)[0])
    if init.shape == values.shape[1:] and np.can_cast(values.dtype, init.dtype, "same_kind"):
        values = values.astype(init.dtype)
    int_ids = np.array([i for i, _ in ints], dtype=INT_IDS_DTYPE)
    store.put(DecodedBatch(int_ids, [str(s) for s, _ in strs], values))
