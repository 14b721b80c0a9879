"""Records and outputs on the wire (psclient.wire.records): what goes in comes out, bad bytes are refused."""

from __future__ import annotations

import threading

import msgpack
import numpy as np
import pytest

from psclient.errors import WireError
from psclient.wire.records import pack, unpack


@pytest.mark.parametrize(
    "array",
    [
        np.arange(5, dtype=np.int64),
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.zeros((2, 0, 3), dtype=np.float64),
        np.array(7, dtype=np.int8),  # zero-dimensional
        np.array([True, False]),
        np.array([1 + 2j, -3j], dtype=np.complex64),
        np.arange(6, dtype=">f8"),  # big-endian stays big-endian
        np.arange(20, dtype=np.uint16)[::3],  # not contiguous
    ],
)
def test_arrays_round_trip_with_dtype_and_shape(array: np.ndarray) -> None:
    back = unpack(pack(array))

    assert isinstance(back, np.ndarray)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert np.array_equal(back, array)
    assert back.flags.writeable


def test_tuples_stay_tuples_and_lists_lists_at_any_depth() -> None:
    record = (1, [2, (3.5, "x", np.arange(3))], {"k": (None, b"raw")}, np.float32(0.25))

    back = unpack(pack(record))

    assert back[:2] == (1, [2, (3.5, "x", back[1][1][2])])
    assert back[1][1][2].tolist() == [0, 1, 2]
    assert back[2] == {"k": (None, b"raw")} and back[3] == 0.25


def test_threads_packing_nested_tuples_at_once_get_their_own_bytes() -> None:
    # Packers are reused per thread and depth: a shared one would mix buffers.
    expected = {n: pack((n, (n, [n] * 3), np.full(4, n))) for n in range(8)}
    mismatches: list[int] = []

    def work(n: int) -> None:
        for _ in range(2_000):
            if pack((n, (n, [n] * 3), np.full(4, n))) != expected[n]:
                mismatches.append(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert mismatches == []


def test_object_arrays_are_refused_on_both_ends() -> None:
    with pytest.raises(WireError, match="dtype object"):
        pack(np.array(["a", None], dtype=object))
    forged = msgpack.packb(msgpack.ExtType(2, b"\x03|O8\x01" + (1).to_bytes(8, "little") + b"\0" * 8))
    with pytest.raises(WireError, match="not plain data"):
        unpack(forged)


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no header at all
        b"\x03<f8\x01" + (4).to_bytes(8, "little") + b"\0" * 8,  # says 4 float64, holds 1
        b"\x03<f8\x02" + (2).to_bytes(8, "little"),  # says 2 axes, gives 1
        b"\x03?zz\x00",  # not a dtype
    ],
)
def test_malformed_array_bytes_raise_wire_error(body: bytes) -> None:
    with pytest.raises(WireError, match="malformed record bytes"):
        unpack(msgpack.packb(msgpack.ExtType(2, body)))
