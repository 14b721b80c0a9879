"""The shard's parameter store: vectorized updates, duplicate ids in a batch, all-or-nothing pushes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from psclient import WireError
from psclient.specs import UserFunctionError, make_init, make_update
from psserver.index import IntIndex
from psserver.store import ParameterStore


def store(init: Any = "zeros:2", update: Any = "add") -> ParameterStore:
    return ParameterStore(make_init(init), make_update(update))


def values(s: ParameterStore, ids: list[Any]) -> dict[Any, Any]:
    """{id: value} of a pull, as plain Python lists or numbers."""
    return {i: v.tolist() for ids_, rows in s.pull(ids) for i, v in zip(ids_, rows, strict=True)}


def dtypes(s: ParameterStore, ids: list[Any]) -> dict[Any, str]:
    """{id: dtype string} of a pull."""
    return {i: rows.dtype.str for ids_, rows in s.pull(ids) for i in ids_}


def f32(*rows: list[float]) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        ("add", {1: [6.0, -6.0], 2: [10.0, 10.0]}),
        ("replace", {1: [3.0, -3.0], 2: [10.0, 10.0]}),
        ("max", {1: [3.0, 0.0], 2: [10.0, 10.0]}),
        ("min", {1: [0.0, -3.0], 2: [0.0, 0.0]}),
    ],
)
def test_builtin_updates_fold_every_duplicate_id_of_a_batch(update: str, expected: dict[int, list[float]]) -> None:
    s = store("zeros:2", update)

    s.push([([1, 2, 1, 1], f32([1, -1], [10, 10], [2, -2], [3, -3]))])

    assert values(s, [1, 2]) == expected


@pytest.mark.parametrize(("update", "expected"), [("add", 16), ("replace", 4), ("max", 10), ("min", 1)])
def test_scalar_parameters_with_duplicates(update: str, expected: int) -> None:
    s = store("const:10", update)

    s.push([(["a", "a", "a"], np.array([1, 1, 4]))])

    assert values(s, ["a"]) == {"a": expected}


def test_push_to_absent_id_stores_update_of_init_and_delta() -> None:
    s = store("const:10", "min")

    s.push([([5, 6], np.array([3, 30]))])

    assert values(s, [5, 6]) == {5: 3, 6: 10}


def test_user_update_is_applied_in_batch_order_per_id() -> None:
    s = store("const:0", lambda old, delta: old * 10 + delta)

    s.push([([7, 8, 7, 7], np.array([1, 5, 2, 3]))])

    assert values(s, [7, 8]) == {7: 123, 8: 5}


def test_pull_creates_from_init_and_answers_duplicates() -> None:
    s = store("const:2.5", "add")

    groups = s.pull(["x", 1, "x"])

    assert [(ids, rows.tolist()) for ids, rows in groups] == [(["x", 1, "x"], [2.5, 2.5, 2.5])]
    assert len(s) == 2


def test_table_grows_past_its_first_capacity() -> None:
    s = store("zeros:3", "add")
    ids = list(range(-2_500, 2_500))

    s.push([(ids, np.repeat(np.arange(5_000, dtype=np.float32)[:, None], 3, axis=1))])
    s.push([(ids[::2], np.ones((2_500, 3), dtype=np.float32))])

    got = values(s, ids)
    assert len(s) == 5_000
    assert got == {i: [float(n + (n % 2 == 0))] * 3 for n, i in enumerate(ids)}


@pytest.mark.parametrize(
    ("deltas", "message"),
    [
        (np.array([[1.0, 2.0, 3.0]], dtype=np.float32), "shape"),
        (np.array([1.0], dtype=np.float32), "shape"),
    ],
)
def test_mismatched_push_raises_and_changes_nothing(deltas: np.ndarray, message: str) -> None:
    s = store("zeros:2", "add")
    s.push([([1], f32([1, 2]))])

    with pytest.raises(WireError, match=message):
        s.push([([2], f32([5, 5])), ([1], deltas)])

    assert len(s) == 1
    assert values(s, [1]) == {1: [1.0, 2.0]}


def test_float_delta_into_int_parameter_makes_it_a_float_and_leaves_the_others_int() -> None:
    s = store("const:3", "add")
    s.pull([1, 2, 3, "a"])

    s.push([([1, "a"], np.array([0.5, 0.25]))])
    s.push([([3, 1, 4], np.array([1, 1, 1]))])

    assert dtypes(s, [1, 2, 3, 4, "a"]) == {1: "<f8", 2: "<i8", 3: "<i8", 4: "<i8", "a": "<f8"}
    assert values(s, [1, 2, 3, 4, "a"]) == {1: 4.5, 2: 3, 3: 4, 4: 4, "a": 3.25}


def test_int_delta_into_float_parameter_is_accepted() -> None:
    s = store("zeros:2", "add")

    s.push([([1], np.array([[1, 2]], dtype=np.int64))])

    assert values(s, [1]) == {1: [1.0, 2.0]}


def test_failing_user_update_leaves_the_store_unchanged() -> None:
    def update(old: int, delta: int) -> int:
        if delta < 0:
            raise ValueError("negative delta")
        return old + delta

    s = store("const:0", update)
    s.push([([1, 2], np.array([5, 6]))])

    with pytest.raises(UserFunctionError, match=r"update raised ValueError\('negative delta'\) for id 1$"):
        s.push([([1, 2, 1], np.array([1, 1, -1]))])

    assert values(s, [1, 2]) == {1: 5, 2: 6}


def test_parameters_of_several_shapes_live_side_by_side() -> None:
    def init(param_id: Any) -> Any:
        return np.zeros(2, dtype=np.float64) if isinstance(param_id, int) else 0.0

    s = store(init, "add")

    s.push([([1, 2], np.array([[1.0, 2.0], [3.0, 4.0]]))])
    s.push([(["a", "b", "a"], np.array([1.0, 2.0, 3.0]))])

    assert values(s, [1, "a", 2, "b"]) == {1: [1.0, 2.0], 2: [3.0, 4.0], "a": 4.0, "b": 2.0}
    with pytest.raises(WireError, match="shape"):
        s.push([([1, "a"], np.array([[1.0, 1.0], [1.0, 1.0]]))])
    assert values(s, [1, "a"]) == {1: [1.0, 2.0], "a": 4.0}


def test_chunks_hold_every_parameter_exactly_once() -> None:
    def init(param_id: Any) -> Any:
        return np.zeros(2, dtype=np.float32) if isinstance(param_id, int) else 0

    s = store(init, "add")
    s.pull([*range(250), *(f"s{i}" for i in range(130))])

    seen = [param_id for chunk in s.chunks(100) for ids, _ in chunk for param_id in ids]
    sizes = [sum(len(ids) for ids, _ in chunk) for chunk in s.chunks(100)]

    assert sorted(seen, key=str) == sorted([*range(250), *(f"s{i}" for i in range(130))], key=str)
    assert len(seen) == len(set(seen)) == 380
    assert max(sizes) <= 100


def test_the_table_is_sized_by_bytes_not_rows() -> None:
    big, small = store("zeros:6553600", "add"), store("zeros:4", "add")

    big.pull([1])
    big.push([([2, 1], np.ones((2, 6_553_600), dtype=np.float32))])
    small.pull([1])

    assert values(big, [1])[1] == [1.0] * 6_553_600
    assert len(big) == 2
    assert big.nbytes() < 3 * 6_553_600 * 4 + IntIndex().nbytes()  # 2 rows and at most one spare
    assert small.nbytes() == 1024 * 4 * 4 + IntIndex().nbytes()


# -- numpy's rules: a parameter is the fold of its deltas into its init -------------

DELTA_DTYPES = ["?", "i1", "u1", "i8", "f4", "f8", "c16"]
FOLDS = {"add": np.add, "max": np.maximum, "min": np.minimum, "replace": lambda old, delta: delta}


def fold(update: str, old: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """`old += delta` where numpy allows it (a cast within the kind), else numpy's promotion."""
    new = np.asarray(FOLDS[update](old, delta))
    return new.astype(old.dtype) if np.can_cast(delta.dtype, old.dtype, "same_kind") else new


def scalar_or_pair(param_id: Any) -> Any:
    """Int ids get a float32 pair, str ids the int 0: two signatures in one store."""
    return np.zeros(2, dtype=np.float32) if isinstance(param_id, int) else 0


def zip_rows(ids: list[Any], rows: np.ndarray) -> Any:
    return zip(ids, rows, strict=True)


def exact(value: Any) -> tuple[str, tuple[int, ...], bytes]:
    array = np.asarray(value)
    return array.dtype.str, array.shape, array.tobytes()


@pytest.mark.parametrize("update", list(FOLDS))
@pytest.mark.parametrize("init", ["const:0", "zeros:2", scalar_or_pair])
def test_every_parameter_is_the_numpy_fold_of_its_deltas_in_arrival_order(init: Any, update: str) -> None:
    rng = np.random.default_rng(sum(map(ord, f"{init}{update}")))
    s, init_fn = store(init, update), make_init(init)
    ids = [0, 1, -2, 3, 10**12, 77, "a", "b", "c", "d"]
    shape_of = {i: np.asarray(init_fn.batch([i])[0]).shape for i in ids}
    expected: dict[Any, Any] = {}

    for step in range(60):
        request = []
        for _ in range(int(rng.integers(1, 3))):  # a request may carry several batches
            shape = shape_of[ids[int(rng.integers(len(ids)))]]
            same = [i for i in ids if shape_of[i] == shape]
            batch = [same[int(k)] for k in rng.integers(len(same), size=int(rng.integers(1, 8)))]
            deltas = rng.integers(-3, 4, size=(len(batch), *shape)).astype(rng.choice(DELTA_DTYPES))
            request.append((batch, deltas))
            for param_id, delta in zip(batch, deltas, strict=True):
                old = expected.get(param_id, np.asarray(init_fn.batch([param_id])[0]))
                expected[param_id] = fold(update, np.asarray(old), delta)
        s.push(request)
        if step % 7 == 0:
            s.pull([ids[int(k)] for k in rng.integers(len(ids), size=4)])

    pulled = {i: exact(v) for group_ids, rows in s.pull(ids) for i, v in zip(group_ids, rows, strict=True)}
    snapshot = [(i, exact(v)) for chunk in s.chunks(3) for ids_, rows in chunk for i, v in zip_rows(ids_, rows)]
    want = {i: exact(expected.get(i, init_fn.batch([i])[0])) for i in ids}
    assert pulled == want
    assert sorted(snapshot, key=str) == sorted(want.items(), key=str)


def test_a_user_update_decides_the_dtype_python_style() -> None:
    s = store(lambda param_id: 0, lambda old, delta: old + delta)

    s.push([([1, 2, 1], np.array([0.5, 2.0, 0.25]))])
    s.push([([3], np.array([4]))])

    assert values(s, [1, 2, 3, 4]) == {1: 0.75, 2: 2.0, 3: 4, 4: 0}
    assert dtypes(s, [1, 2, 3, 4]) == {1: "<f8", 2: "<f8", 3: "<i8", 4: "<i8"}


def test_a_user_update_decides_the_shape() -> None:
    s = store("const:0", lambda old, delta: np.append(old, delta))

    s.push([([1, "x", 1], np.array([5, 6, 7]))])
    s.push([([2, "x"], np.array([8, 9]))])

    assert values(s, [1, 2, "x", 3]) == {1: [0, 5, 7], 2: [0, 8], "x": [0, 6, 9], 3: 0}


def test_a_snapshot_holds_each_parameter_once_while_parameters_move() -> None:
    s = store("const:0", "add")
    s.pull([*range(10), "a", "b"])

    chunks = s.chunks(4)
    first = next(chunks)
    s.push([([0, 5, 9, "b", 11], np.array([0.5, 0.5, 0.5, 0.5, 0.5]))])  # they move to a float table
    seen = [(i, v.tolist()) for chunk in [first, *chunks] for ids, rows in chunk for i, v in zip_rows(ids, rows)]

    assert sorted(seen, key=str) == sorted(
        [(0, 0), *[(i, 0.5 if i in (5, 9) else 0) for i in range(1, 10)], ("a", 0), ("b", 0.5)], key=str
    )


def test_a_table_every_parameter_left_gives_its_memory_back() -> None:
    s = store("zeros:1000", "add")
    s.pull(list(range(100)))
    before = s.nbytes()

    s.push([(list(range(100)), np.ones((100, 1000), dtype=np.complex64))])  # a wider kind: all move

    assert dtypes(s, [0, 99]) == {0: "<c8", 99: "<c8"}
    assert s.nbytes() < before + 100 * 1000 * 8


@pytest.mark.parametrize("update", ["add", "replace", lambda old, delta: old + delta])
def test_an_empty_push_to_an_empty_store_changes_nothing(update: Any) -> None:
    s = store("zeros:2", update)

    s.push([([], np.empty((0, 2), dtype=np.float32))])

    assert len(s) == 0
    assert s.pull([]) == []


def test_a_float32_model_stays_float32_whatever_precision_its_deltas_come_in() -> None:
    s = store("zeros:2", "add")

    s.push([([1], np.array([[0.5, 0.25]]))])  # float64, as Python floats arrive
    s.push([([1], np.array([[1, 2]]))])  # int64
    s.push([([2], np.array([[True, False]]))])

    assert dtypes(s, [1, 2]) == {1: "<f4", 2: "<f4"}
    assert values(s, [1, 2]) == {1: [1.5, 2.25], 2: [1.0, 0.0]}


@pytest.mark.parametrize("update", ["add", "max", "min"])
@pytest.mark.parametrize("shape", [(), (3,)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_large_batches_with_repeated_ids_fold_bit_for_bit_in_arrival_order(
    update: str, shape: tuple[int, ...], dtype: type
) -> None:
    # Batches above the size where the fold sorts its rows, ids repeated up to
    # dozens of times, deltas whose float sums depend on the order they are added in.
    rng = np.random.default_rng(len(shape) * 10 + len(update))
    s = store(lambda param_id: np.zeros(shape, dtype), update)
    expected: dict[int, np.ndarray] = {}
    for size in (40, 1024, 5000):
        ids = rng.integers(0, 200, size)
        deltas = (rng.normal(size=(size, *shape)) * 1000).astype(dtype)
        if dtype is not np.int64:
            deltas[::3] *= np.asarray(1e-7, dtype)  # tiny next to the others: order shows in the low bits
        for param_id, delta in zip(ids.tolist(), deltas, strict=True):
            old = expected.get(param_id, np.zeros(shape, dtype))
            expected[param_id] = np.asarray(FOLDS[update](old, delta)).astype(dtype)
        s.push([(ids.tolist(), deltas)])
    pulled = {i: exact(v) for ids_, rows in s.pull(sorted(expected)) for i, v in zip(ids_, rows, strict=True)}
    assert pulled == {i: exact(v) for i, v in expected.items()}
