"""Records and outputs on the wire: msgpack bytes, never pickle.

Plain data round-trips unchanged: None, bool, int, float, str, bytes, lists and
dicts, plus tuples and numpy arrays, which msgpack extension types keep apart
from lists (so `(user, item, rating)` arrives as a tuple, an array as an array).
"""

from __future__ import annotations

import functools
import struct
import threading
from typing import Any

import msgpack
import numpy as np

from psclient.errors import WireError

_EXT_TUPLE = 1
_EXT_NDARRAY = 2
# An array's ext body: the dtype string's length (one byte) and the string
# ("<f8"), the number of axes (one byte), each axis as a little-endian int64,
# then the raw bytes in C order. A fixed header, so reading it needs no parser.
_AXIS = struct.Struct("<q")


def _default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return msgpack.ExtType(_EXT_TUPLE, _pack_plain(list(obj)))
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufc":
            raise TypeError(f"cannot send an array of dtype {obj.dtype}")
        # tobytes() is C order for any layout (ascontiguousarray would turn a
        # zero-dimensional array into a one-dimensional one).
        return msgpack.ExtType(_EXT_NDARRAY, _array_header(obj.dtype, obj.shape) + obj.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__}: use plain data, tuples or numpy arrays")


@functools.lru_cache(maxsize=256)
def _array_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    name = dtype.str.encode("ascii")
    return b"".join([bytes((len(name),)), name, bytes((len(shape),)), *(_AXIS.pack(n) for n in shape)])


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_TUPLE:
        return tuple(unpack(data))
    if code == _EXT_NDARRAY:
        return _decode_array(data)
    return msgpack.ExtType(code, data)


def _decode_array(data: bytes) -> np.ndarray:
    size = data[0]
    dtype = _dtype(data[1 : 1 + size])
    ndim = data[1 + size]
    start = 2 + size + 8 * ndim
    flat = np.frombuffer(data, dtype=dtype, offset=start)
    # A copy: frombuffer over the message's bytes would be read-only.
    if ndim == 1:
        if len(flat) != _AXIS.unpack_from(data, 2 + size)[0]:
            raise ValueError("an array's length disagrees with its bytes")
        return flat.copy()
    return flat.reshape(struct.unpack_from(f"<{ndim}q", data, 2 + size)).copy()


@functools.lru_cache(maxsize=64)
def _dtype(name: bytes) -> np.dtype:
    dtype = np.dtype(name.decode("ascii"))
    if dtype.kind not in "biufc":
        raise ValueError(f"an array of dtype {dtype} is not plain data")
    return dtype


_idle = threading.local()


def _pack_plain(obj: Any) -> bytes:
    # Packers are reused: one made per call allocates a large buffer, which
    # costs ~10 us once `_default` nests a second one. A packer is not
    # reentrant (`_default` packs a tuple's items while the outer pack is
    # under way) nor shared between threads, so each nesting depth of each
    # thread takes an idle one and gives it back.
    try:
        idle: list[msgpack.Packer] = _idle.packers
    except AttributeError:
        idle = _idle.packers = []
    # strict_types: tuples reach `_default` instead of being packed as lists.
    packer = idle.pop() if idle else msgpack.Packer(default=_default, use_bin_type=True, strict_types=True)
    try:
        return packer.pack(obj)
    finally:
        idle.append(packer)


def pack(obj: Any) -> bytes:
    try:
        return _pack_plain(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"cannot encode {type(obj).__name__} value: {exc}") from exc


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad bytes
        raise WireError(f"malformed record bytes: {exc}") from exc


def to_json_compatible(obj: Any) -> Any:
    """Outputs and model values as JSON: tuples become lists, arrays nested lists."""
    if isinstance(obj, np.ndarray | np.generic):
        return obj.tolist()
    if isinstance(obj, tuple | list):
        return [to_json_compatible(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_json_compatible(v) for k, v in obj.items()}
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    return obj
