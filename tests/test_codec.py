"""The wire codec: numpy <-> bytes round trips, and decoding that rejects what a peer could forge."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from psclient import WireError
from psclient.wire.codec import (
    DecodedBatch,
    decode_batch,
    decode_int_ids,
    decode_rows,
    decode_tensor,
    encode_batch,
    encode_id_array,
    encode_int_ids,
    encode_keys,
    encode_rows,
    encode_tensor,
    encode_values,
    split_ids,
)
from psclient.wire.proto import tensor_pb2

DTYPES = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"]
SHAPES = [(0,), (1,), (5,), (2, 3), (0, 4), (2, 1, 3)]  # 0-d: its own test below


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    values = (np.arange(int(np.prod(shape))) * 7 - 3).reshape(shape)
    if np.dtype(dtype).kind == "c":
        return (values + 1j * values[::-1] if values.ndim else values + 2j).astype(dtype)
    if np.dtype(dtype).kind == "u":
        return np.abs(values).astype(dtype)
    return values.astype(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_round_trip_keeps_dtype_shape_and_values(dtype: str, shape: tuple[int, ...]) -> None:
    array = sample(dtype, shape)

    back = decode_tensor(tensor_pb2.Tensor.FromString(encode_tensor(array).SerializeToString()))

    assert back.dtype == array.dtype
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("dtype", [">i4", ">f8", ">c8", ">u2"])
def test_big_endian_arrays_travel_as_little_endian_with_equal_values(dtype: str) -> None:
    array = np.array([[1, -2, 3], [4, 5, -6]]).astype(np.dtype(dtype).newbyteorder("<")).astype(dtype)

    message = encode_tensor(array)
    back = decode_tensor(message)

    assert message.dtype == np.dtype(dtype).newbyteorder("<").str
    assert back.dtype == np.dtype(dtype).newbyteorder("<")
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize(
    "value", [np.float64(2.5), np.array(-3, dtype=np.int8), np.array(True)], ids=["f8", "i1", "bool"]
)
def test_zero_dimensional_value_round_trips_as_a_scalar(value: np.ndarray) -> None:
    message = encode_tensor(value)

    back = decode_tensor(message)

    assert (message.dtype, list(message.shape), len(message.data)) == (value.dtype.str, [], value.dtype.itemsize)
    assert back.shape == ()
    assert back.dtype == value.dtype
    assert back.item() == value.item()


def test_non_contiguous_array_is_sent_in_logical_order() -> None:
    array = np.arange(12, dtype=np.int16).reshape(3, 4).T[::2]

    back = decode_tensor(encode_tensor(array))

    np.testing.assert_array_equal(back, array)
    assert back.shape == (2, 3)


def test_encode_rejects_non_numeric_arrays() -> None:
    with pytest.raises(WireError, match="not numeric"):
        encode_tensor(np.array(["a", "b"]))
    with pytest.raises(WireError, match="not numeric"):
        encode_tensor(np.array([object()]))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (tensor_pb2.Tensor(dtype="<f4", shape=[2], data=b"\0" * 7), "needs 8 bytes, got 7"),
        (tensor_pb2.Tensor(dtype="<f4", shape=[2], data=b"\0" * 9), "needs 8 bytes, got 9"),
        (tensor_pb2.Tensor(dtype="<f4", shape=[], data=b""), "needs 4 bytes, got 0"),
        (tensor_pb2.Tensor(dtype="<q9", shape=[1], data=b"\0" * 8), "unknown dtype"),
        (tensor_pb2.Tensor(dtype="nonsense", shape=[1], data=b"\0"), "unknown dtype"),
        (tensor_pb2.Tensor(dtype="|O", shape=[1], data=b"\0" * 8), "not numeric"),
        (tensor_pb2.Tensor(dtype="<U1", shape=[1], data=b"\0" * 4), "not numeric"),
        (tensor_pb2.Tensor(dtype="<M8[s]", shape=[1], data=b"\0" * 8), "not numeric"),
        (tensor_pb2.Tensor(dtype="|V8", shape=[1], data=b"\0" * 8), "not numeric"),
        (tensor_pb2.Tensor(dtype="<f4", shape=[2, -1], data=b""), "negative dimension"),
        (tensor_pb2.Tensor(dtype="<f4", shape=[1 << 20, 1 << 20], data=b""), "too large"),
    ],
)
def test_decode_rejects_forged_tensors(tensor: tensor_pb2.Tensor, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_tensor(tensor)


def test_int_ids_round_trip_including_the_int64_range() -> None:
    ids = [0, -1, 1, 2**63 - 1, -(2**63), 123_456_789_012]

    back = decode_int_ids(encode_int_ids(ids))

    assert back.tolist() == ids
    assert encode_int_ids([1]) == b"\1" + b"\0" * 7  # little-endian on every machine


def test_decode_rejects_truncated_int_ids() -> None:
    with pytest.raises(WireError, match="not a multiple of 8"):
        decode_int_ids(encode_int_ids([1, 2])[:-1])


def test_keys_of_mixed_ids_keep_ints_then_strs() -> None:
    batch = decode_batch(encode_keys([3, "b", -4, "a"]), with_values=False)

    assert batch.ids() == [3, -4, "b", "a"]
    assert batch.values is None


def test_rows_of_mixed_ids_stay_with_their_ids() -> None:
    ids = ["s", 5, "t", -6]
    values = np.array([[1, 1], [2, 2], [3, 3], [4, 4]], dtype=np.int32)

    decoded = decode_batch(encode_rows(ids, values), with_values=True)

    assert decoded.ids() == [5, -6, "s", "t"]
    assert decoded.values is not None
    assert decoded.values.tolist() == [[2, 2], [4, 4], [1, 1], [3, 3]]


def test_split_ids_gives_ints_strs_and_the_order_that_sorts_them_so() -> None:
    int_ids, str_ids, order = split_ids(["s", 5, "t", -6])
    assert int_ids.dtype == np.dtype("<i8") and int_ids.tolist() == [5, -6]
    assert str_ids == ["s", "t"] and order.tolist() == [1, 3, 0, 2]
    int_ids, str_ids, order = split_ids([7, 8])
    assert int_ids.tolist() == [7, 8] and str_ids == [] and order.tolist() == [0, 1]


def test_one_batch_type_on_both_sides_of_the_wire() -> None:
    """What a store gives (ids, values) is what decode_batch gives back from encode_batch."""
    values = np.array([[1.5, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)
    batch = DecodedBatch(np.array([3, -4], dtype=np.int64), ["a"], values)
    decoded = decode_batch(encode_batch(batch), with_values=True)
    assert decoded.ids() == [3, -4, "a"] and len(decoded) == 3
    assert decoded.values is not None and decoded.values.dtype == np.float32
    np.testing.assert_array_equal(decoded.values, values)

    keys = decode_batch(encode_batch(DecodedBatch(np.array([9], dtype=np.int64), ["b"], None)), with_values=False)
    assert keys.ids() == [9, "b"] and keys.values is None
    # The array forms of the runtime's batch calls build the same messages.
    assert encode_id_array(np.array([3, -4]), values[:2]) == encode_batch(DecodedBatch(batch.int_ids, [], values[:2]))
    assert encode_id_array(np.array(["a", "b"], dtype=object)) == encode_keys(["a", "b"])


def test_values_of_several_dtypes_and_shapes_round_trip() -> None:
    ids = [1, "v", 2, "w", 3]
    values = [1.5, np.array([1, 2, 3], dtype=np.int8), 7, np.zeros((2, 2), dtype=np.float32), 2.5]

    batches = encode_values(ids, values)
    got_ids, got_values = decode_rows(batches)

    assert len(batches) == 4  # float64, int8[3], int64, float32[2x2]
    back = dict(zip(got_ids, got_values, strict=True))
    assert back.keys() == set(ids)
    assert (back[1], back[3]) == (1.5, 2.5)
    assert back[2] == 7
    assert type(back[2]) is int
    assert back["v"].dtype == np.int8
    np.testing.assert_array_equal(back["v"], [1, 2, 3])
    np.testing.assert_array_equal(back["w"], np.zeros((2, 2)))


@pytest.mark.parametrize(
    ("values", "dtypes"),
    [
        ([1, 0.5, 2, True], {1: "<i8", 2: "<f8", 3: "<i8", 4: "|b1"}),
        (
            [np.ones(2, dtype=np.int8), np.ones(2), np.ones(2, dtype=np.int8), np.ones(2)],
            {1: "|i1", 2: "<f8", 3: "|i1", 4: "<f8"},
        ),
        ([np.float32(1), 1.0, np.float32(2), 2.0], {1: "<f4", 2: "<f8", 3: "<f4", 4: "<f8"}),
        ([0.5, 1.5, 2.5, 3.5], {1: "<f8", 2: "<f8", 3: "<f8", 4: "<f8"}),
    ],
)
def test_each_value_of_a_batch_keeps_its_own_dtype(values: list[Any], dtypes: dict[int, str]) -> None:
    batches = encode_values([1, 2, 3, 4], values)

    got = {i: decode_tensor(batch.values).dtype.str for batch in batches for i in decode_int_ids(batch.int_ids)}

    assert got == dtypes
    assert len(batches) == len(set(dtypes.values()))


def test_decoded_vector_rows_are_writable_copies() -> None:
    batches = encode_values([1, 2], [np.array([1.0, 2.0]), np.array([3.0, 4.0])])

    _, values = decode_rows(batches)
    values[0] += 10

    np.testing.assert_array_equal(values[0], [11.0, 12.0])
    np.testing.assert_array_equal(values[1], [3.0, 4.0])


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (tensor_pb2.ParamBatch(int_ids=encode_int_ids([1, 2])), "no values"),
        (
            tensor_pb2.ParamBatch(int_ids=encode_int_ids([1, 2]), values=encode_tensor(np.zeros((3, 2)))),
            "2 ids but values of shape",
        ),
        (
            tensor_pb2.ParamBatch(str_ids=["a"], values=tensor_pb2.Tensor(dtype="<f4", shape=[], data=b"\0" * 4)),
            "1 ids but values of shape",
        ),
    ],
)
def test_decode_batch_rejects_values_that_do_not_match_the_ids(batch: tensor_pb2.ParamBatch, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_batch(batch, with_values=True)


def test_deltas_of_one_id_in_two_dtypes_keep_the_order_they_were_pushed() -> None:
    ids, values = [1, 1, 2, 1], [1, 0.5, 7, 2]

    batches = encode_values(ids, values)

    applied = [
        (i, v.item())
        for batch in batches
        for i, v in zip(decode_int_ids(batch.int_ids), decode_tensor(batch.values), strict=True)
    ]
    assert [v for i, v in applied if i == 1] == [1, 0.5, 2]  # `replace` must end at 2, as pushed
    assert sorted(applied) == sorted(zip(ids, values, strict=True))
