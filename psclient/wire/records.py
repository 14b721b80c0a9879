"""Records and outputs on the wire: msgpack bytes, never pickle.

Plain data round-trips unchanged: None, bool, int, float, str, bytes, lists and
dicts, plus tuples and numpy arrays, which msgpack extension types keep apart
from lists (so `(user, item, rating)` arrives as a tuple, an array as an array).
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from psclient.errors import WireError

_EXT_TUPLE = 1
_EXT_NDARRAY = 2


def _default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return msgpack.ExtType(_EXT_TUPLE, _packer().pack(list(obj)))
    if isinstance(obj, np.ndarray):
        array = np.ascontiguousarray(obj)
        if array.dtype.kind not in "biufc":
            raise TypeError(f"cannot send an array of dtype {array.dtype}")
        header = _packer().pack([array.dtype.str, list(array.shape)])
        return msgpack.ExtType(_EXT_NDARRAY, header + array.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__}: use plain data, tuples or numpy arrays")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_TUPLE:
        return tuple(unpack(data))
    if code == _EXT_NDARRAY:
        unpacker = msgpack.Unpacker(raw=False, ext_hook=_ext_hook, strict_map_key=False)
        unpacker.feed(data)
        dtype, shape = unpacker.unpack()
        body = data[unpacker.tell() :]
        return np.frombuffer(body, dtype=np.dtype(dtype)).reshape(shape).copy()
    return msgpack.ExtType(code, data)


def _packer() -> msgpack.Packer:
    # strict_types: tuples reach `_default` instead of being packed as lists.
    return msgpack.Packer(default=_default, use_bin_type=True, strict_types=True)


_PACKER = _packer()


def pack(obj: Any) -> bytes:
    try:
        return _PACKER.pack(obj)
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
