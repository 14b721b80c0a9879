"""Exactness, ps-lite style: many records, many workers, known deltas, exact final model."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from logics import Exactness

from psclient import Left, Right, transform
from psworker import WorkerLogic

WORKERS = 3
SHARDS = 2
RECORDS_PER_WORKER = 20_000


def split_stream(items: list[Any]) -> tuple[list[Any], list[tuple[Any, Any]]]:
    """Outputs and model of a job's stream; asserts every Left comes before every Right."""
    kinds = [type(item) for item in items]
    assert set(kinds) <= {Left, Right}
    first_right = kinds.index(Right) if Right in kinds else len(kinds)
    assert Left not in kinds[first_right:], "a Left arrived after the first Right"
    return [item.value for item in items[:first_right]], [item.value for item in items[first_right:]]


@pytest.mark.timeout(180)
def test_int_and_str_ids_get_exactly_the_pushed_sums() -> None:
    records = range(WORKERS * RECORDS_PER_WORKER)
    expected: dict[Any, int] = Counter()
    for r in records:
        expected[r % 500 - 250] += r % 7 + 1
        expected[f"s{r % 300}"] += 2

    items = list(transform(records, Exactness(), "const:0", "add", WORKERS, SHARDS))

    outputs, model = split_stream(items)
    assert sorted(r for _, r in outputs) == list(records)
    assert Counter(worker for worker, _ in outputs) == {w: RECORDS_PER_WORKER for w in range(WORKERS)}
    ids = [param_id for param_id, _ in model]
    assert len(ids) == len(set(ids)), "an id appears twice in the Right stream"
    assert dict(model) == expected
    assert all(type(value) is int for _, value in model)


class VectorPush(WorkerLogic):
    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push(data % 37, np.array([1.0, data % 5, -2.0], dtype=np.float32))
        ps.output(data)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("never pulls")


@pytest.mark.timeout(120)
def test_vector_parameters_sum_exactly() -> None:
    records = range(3_000)
    expected = {i: np.zeros(3, dtype=np.float32) for i in range(37)}
    for r in records:
        expected[r % 37] += np.array([1.0, r % 5, -2.0], dtype=np.float32)

    items = list(transform(records, VectorPush(), "zeros:3", "add", WORKERS, SHARDS))

    outputs, model = split_stream(items)
    assert sorted(outputs) == list(records)
    assert sorted(param_id for param_id, _ in model) == list(range(37))
    for param_id, value in model:
        assert isinstance(value, np.ndarray)
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, expected[param_id])
