"""The shard's parameter store: vectorized updates, duplicate ids in a batch, all-or-nothing pushes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from psclient import WireError
from psserver.specs import UserFunctionError, make_init, make_update
from psserver.store import ParameterStore


def store(init: Any = "zeros:2", update: Any = "add") -> ParameterStore:
    return ParameterStore(make_init(init), make_update(update))


def values(s: ParameterStore, ids: list[Any]) -> dict[Any, Any]:
    """{id: value} of a pull, as plain Python lists or numbers."""
    return {i: v.tolist() for ids_, rows in s.pull(ids) for i, v in zip(ids_, rows, strict=True)}


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
        (np.array([[1 + 1j, 0j]]), "dtype complex128"),
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


def test_float_delta_into_int_parameter_is_rejected() -> None:
    s = store("const:3", "add")

    with pytest.raises(WireError, match="float64"):
        s.push([([1], np.array([0.5]))])

    assert values(s, [1]) == {1: 3}


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
    assert big.nbytes() < 3 * 6_553_600 * 4 + big._int_rows.nbytes()  # 2 rows and at most one spare
    assert small.nbytes() == 1024 * 4 * 4 + small._int_rows.nbytes()
