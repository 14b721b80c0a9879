"""The batch calls on the worker handle: `ps.pull_many`, `ps.push_many` and `on_pull_recv_many`."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pytest
from conftest import StartShards

from psclient import JobFailed, Left, LocalCluster, Right, connect, transform
from psworker import WorkerLogic, with_pull_limit
from psworker.checks import id_groups
from psworker.runtime import WorkerRuntime

IDS_PER_RECORD = 40
DIM = 3


def record_ids(record: int) -> np.ndarray:
    """40 int ids, some negative, spread over both shards; neighbouring records share most."""
    return np.arange(record % 25 - 30, record % 25 - 30 + IDS_PER_RECORD, dtype=np.int64)


def record_deltas(record: int) -> np.ndarray:
    """Small integers as float64 rows: any order of additions gives exactly the same sums."""
    rows = np.arange(IDS_PER_RECORD, dtype=np.float64)[:, None] + np.arange(DIM)
    return (rows + record % 7) * (1 if record % 2 else -1)


def str_ids(record: int) -> list[str]:
    return [f"s{(record + k) % 11}" for k in range(3)]


class AddMany(WorkerLogic):
    """Pushes record_deltas to record_ids, and 1.5 times a row of ones to three str ids."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push_many(record_ids(data), record_deltas(data))
        ps.push_many(str_ids(data), np.full((3, DIM), 1.5))

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("AddMany never pulls")


@pytest.mark.timeout(180)
def test_push_many_from_two_workers_on_two_shards_gives_the_exact_sums() -> None:
    records = list(range(300))
    expected: dict[Any, np.ndarray] = defaultdict(lambda: np.zeros(DIM))
    for record in records:
        for param_id, delta in zip(record_ids(record).tolist(), record_deltas(record), strict=True):
            expected[param_id] = expected[param_id] + delta
        for param_id in str_ids(record):
            expected[param_id] = expected[param_id] + 1.5

    items = list(transform(records, AddMany(), f"zeros:{DIM}", "add", 2, 2))

    model = {item.value[0]: item.value[1] for item in items if isinstance(item, Right)}
    assert sorted(model, key=str) == sorted(expected, key=str)
    for param_id, value in model.items():
        assert value.dtype == np.float32 and value.shape == (DIM,)  # zeros:DIM is float32; deltas keep it
        assert np.array_equal(value, expected[param_id]), param_id


class PushThenPullMany(WorkerLogic):
    """Record k pushes 1 to ten of this worker's own ids, then pulls them back in one call.

    Outputs (id, value, pushes this worker made to it before the pull) per answer:
    read-your-writes says value >= that count.
    """

    def open(self) -> None:
        self.pushed: Counter[int] = Counter()
        self.expected: dict[int, list[int]] = defaultdict(list)
        self.calls = 0

    def on_recv(self, data: Any, ps: Any) -> None:
        ids = ps.worker_index * 1_000 + (np.arange(10, dtype=np.int64) + data) % 17
        ps.push_many(ids, np.ones(len(ids), dtype=np.int64))
        for param_id in ids.tolist():
            self.pushed[param_id] += 1
            self.expected[param_id].append(self.pushed[param_id])
        ps.pull_many(ids)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("answers go to on_pull_recv_many")

    def on_pull_recv_many(self, ids: Any, values: Any, ps: Any) -> None:
        assert isinstance(ids, np.ndarray) and ids.dtype == np.int64
        assert isinstance(values, np.ndarray) and values.shape == ids.shape
        for param_id, value in zip(ids.tolist(), values.tolist(), strict=True):
            ps.output([param_id, value, self.expected[param_id].pop(0)])


@pytest.mark.timeout(180)
def test_pull_many_after_push_many_reads_the_workers_own_writes() -> None:
    records = list(range(400))

    items = list(transform(records, PushThenPullMany(), "const:0", "add", 2, 2))

    answers = [item.value for item in items if isinstance(item, Left)]
    assert len(answers) == 10 * len(records)
    behind = [answer for answer in answers if answer[1] < answer[2]]
    assert not behind, f"answers missing the worker's own earlier pushes: {behind[:5]}"
    model = dict(item.value for item in items if isinstance(item, Right))
    assert sum(model.values()) == 10 * len(records)
    assert max(value for _, value, _ in answers) <= max(model.values())


class PerIdAnswers(WorkerLogic):
    """pull_many of int and str ids, and a single pull; answers through the default
    on_pull_recv_many, which calls this on_pull_recv once per id."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.pull_many(np.array([data, data + 1000], dtype=np.int64))
        ps.pull_many([f"k{data}", f"k{data + 1000}"])
        ps.pull(-data - 1)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        ps.output([param_id, type(param_id).__name__, param_value, type(param_value).__name__])


def init_by_id(param_id: Any) -> float:
    return float(param_id) if isinstance(param_id, int) else float(len(param_id))


@pytest.mark.timeout(180)
def test_without_on_pull_recv_many_answers_reach_on_pull_recv_one_id_at_a_time() -> None:
    records = list(range(50))

    items = list(transform(records, PerIdAnswers(), init_by_id, "add", 2, 2))

    outputs = sorted((item.value for item in items if isinstance(item, Left)), key=str)
    expected = [[r, "int", float(r), "float"] for r in records]
    expected += [[r + 1000, "int", float(r + 1000), "float"] for r in records]
    expected += [[-r - 1, "int", float(-r - 1), "float"] for r in records]
    expected += [[f"k{r}", "str", float(len(f"k{r}")), "float"] for r in records]
    expected += [[f"k{r + 1000}", "str", float(len(f"k{r + 1000}")), "float"] for r in records]
    assert outputs == sorted(expected, key=str)


class MixedCalls(WorkerLogic):
    """Single pulls next to pull_many of ints and strs, with vector values; every answer
    goes to on_pull_recv_many, which outputs what it got and mutates the values."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.pull(data)
        ps.pull_many(np.arange(100, 110, dtype=np.int64) + data)
        ps.pull_many([f"m{data}", data + 5_000])  # a mixed sequence: an int chunk and a str chunk
        ps.pull(f"one{data}")

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("answers go to on_pull_recv_many")

    def on_pull_recv_many(self, ids: Any, values: Any, ps: Any) -> None:
        values += 1  # writable
        kind = "ints" if isinstance(ids, np.ndarray) and ids.dtype == np.int64 else "strs"
        if kind == "strs":
            assert isinstance(ids, list) and all(isinstance(i, str) for i in ids)
        assert values.shape == (len(ids), 2) and values.dtype == np.float32
        ps.output([kind, list(ids) if kind == "strs" else ids.tolist(), values[:, 0].tolist()])


@pytest.mark.timeout(180)
def test_single_pulls_and_pull_many_mix_and_answers_come_as_arrays() -> None:
    records = list(range(30))

    items = list(transform(records, MixedCalls(), "zeros:2", "add", 2, 2))

    outputs = [item.value for item in items if isinstance(item, Left)]
    answered: Counter[Any] = Counter()
    for kind, ids, firsts in outputs:
        assert all(isinstance(i, int) for i in ids) if kind == "ints" else all(isinstance(i, str) for i in ids)
        assert firsts == [1.0] * len(ids)
        answered.update(ids)
    expected: Counter[Any] = Counter()
    for r in records:
        expected.update([r, *range(100 + r, 110 + r), f"m{r}", r + 5_000, f"one{r}"])
    assert answered == expected
    assert len(outputs) < sum(expected.values()), "answers came one id per call"


class ManyPulls(WorkerLogic):
    """One record pulls `count` ids at once; each answer pushes 1 to its id."""

    def __init__(self, count: int, batched: bool):
        self.count = count
        self.batched = batched

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.pull_many(np.arange(self.count, dtype=np.int64) * 3 + data)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        ps.push(param_id, 1)

    def on_pull_recv_many(self, ids: Any, values: Any, ps: Any) -> None:
        if not self.batched:
            super().on_pull_recv_many(ids, values, ps)
            return
        ps.push_many(ids, np.ones(len(ids), dtype=np.int64))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("limit", "count", "batched"), [(1, 3_000, True), (1, 3_000, False), (64, 10_000, True)])
def test_pull_many_beyond_the_pull_limit_queues_and_ends(
    start_shards: StartShards, limit: int, count: int, batched: bool
) -> None:
    servers = start_shards(2, init="const:0")
    runtime = WorkerRuntime(with_pull_limit(ManyPulls(count, batched), limit), servers, 0, 1, emit=lambda _: None)
    runtime.connect()

    def feed() -> None:
        runtime.feed([0, 1])
        runtime.end_input()

    threading.Thread(target=feed, daemon=True).start()
    runtime.run()
    with connect(servers) as cluster:
        model = dict(cluster.snapshot())

    assert runtime.pulls == 2 * count
    assert model == {i * 3 + r: 1 for i in range(count) for r in (0, 1)}
    counters = runtime.counters()
    assert (counters["pulls_in_flight"], counters["pulls_queued"], counters["pushes_unacked"]) == (0, 0, 0)


class BadDeltas(WorkerLogic):
    """Record "ok" pushes 1.0 to ids 0..2; the others push a bad delta array after a good push."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ids = np.arange(3, dtype=np.int64)
        ps.push("seen", 1)
        deltas = {
            "ok": np.ones(3),
            "length": np.ones(2),
            "text": np.array(["a", "b", "c"]),
            "nan": np.array([1.0, np.nan, 1.0]),
        }[data]
        ps.push_many(ids, deltas)
        ps.output(data)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("never pulls")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("record", "message"),
    [
        ("length", "push_many of deltas of shape (2,) to 3 ids: the deltas need one row per id"),
        (
            "text",
            "push_many of array(['a', 'b', 'c'], dtype='<U1') (ndarray of dtype <U1) to 3 ids: "
            "the deltas must be a numeric numpy array",
        ),
        ("nan", "push_many of np.float64(nan) (row 1 of 3) to id 1: a delta must be finite (NaN and Inf are refused)"),
    ],
)
def test_a_bad_delta_array_fails_the_job_naming_worker_callback_and_record(record: str, message: str) -> None:
    with pytest.raises(JobFailed) as info:
        list(transform(["ok", record, "ok"], BadDeltas(), "const:0", "add", 1, 1))

    assert str(info.value) == f"worker 0 failed in on_recv: {message} (record 2: {record!r})"


@pytest.mark.timeout(120)
def test_with_on_error_skip_a_bad_delta_array_skips_its_record_only() -> None:
    records = ["ok", "length", "ok", "text", "nan", "ok"]
    cluster = LocalCluster("test_batch_api:BadDeltas", "const:0", "add", num_workers=1, num_shards=2, on_error="skip")

    with cluster, connect(cluster.servers, cluster.workers) as client:
        items = list(client.stream(records))

    outputs = [item.value for item in items if isinstance(item, Left)]
    model = dict(item.value for item in items if isinstance(item, Right))
    assert outputs == ["ok", "ok", "ok"]
    assert model == {"seen": 6, 0: 3.0, 1: 3.0, 2: 3.0}


def test_ids_of_a_batch_call_become_int_and_str_chunks() -> None:
    ints = np.array([5, -3], dtype=np.int32)
    mixed = [7, "a", np.int64(-2), "b"]

    [(int_chunk, all_rows)] = id_groups(ints)
    [(str_chunk, _)] = id_groups(["x", "y"])
    (mixed_ints, int_rows), (mixed_strs, str_rows) = id_groups(mixed)

    assert int_chunk.dtype == np.int64 and int_chunk.tolist() == [5, -3] and all_rows is None
    assert str_chunk.tolist() == ["x", "y"]
    assert mixed_ints.tolist() == [7, -2] and int_rows.tolist() == [0, 2]  # type: ignore[union-attr]
    assert mixed_strs.tolist() == ["a", "b"] and str_rows.tolist() == [1, 3]  # type: ignore[union-attr]
    assert id_groups(np.array([], dtype=np.int64)) == [] and id_groups([]) == []
    with pytest.raises(TypeError, match="parameter ids are int or str, not float64"):
        id_groups(np.array([1.5]))
    with pytest.raises(TypeError, match="parameter ids are int or str, not bool"):
        id_groups([1, True])
    with pytest.raises(ValueError, match="does not fit in signed 64 bits"):
        id_groups(np.array([2**63], dtype=np.uint64))


class Interleaved(WorkerLogic):
    """Single pushes and push_many to one id, alternating: with `replace`, the last one made wins."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push(7, float(data * 10 + 1))
        ps.push_many(np.array([7, 8], dtype=np.int64), np.array([data * 10 + 2, data], dtype=np.float64))
        ps.push(7, float(data * 10 + 3))
        ps.push_many([7], [float(data * 10 + 4)])

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("never pulls")


@pytest.mark.timeout(120)
def test_single_pushes_and_push_many_reach_the_shard_in_the_order_they_were_made() -> None:
    items = list(transform(range(100), Interleaved(), "const:0.0", "replace", 1, 1))

    assert dict(item.value for item in items if isinstance(item, Right)) == {7: 994.0, 8: 99.0}


class StrPullsAtALimit(WorkerLogic):
    """Each record pulls five str ids in one call; answers come back one slot at a time."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.pull_many([f"k{data}-{j}" for j in range(5)])

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        ps.output(param_id)


@pytest.mark.timeout(120)
def test_queued_str_ids_of_pull_many_are_released_one_slot_at_a_time() -> None:
    items = list(transform(range(3), lambda: with_pull_limit(StrPullsAtALimit(), 2), "const:0", "add"))

    assert sorted(item.value for item in items if isinstance(item, Left)) == sorted(
        f"k{r}-{j}" for r in range(3) for j in range(5)
    )


class MixedNumbers(WorkerLogic):
    """Pushes an int, a float, then an int to one id: `replace` must keep the last."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push("last", 1)
        ps.push("last", 0.5)
        ps.push("last", 2)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("never pulls")


@pytest.mark.timeout(120)
def test_int_and_float_pushes_to_one_id_are_applied_in_the_order_made() -> None:
    items = list(transform([0], MixedNumbers, "const:0", "replace"))

    assert [item.value for item in items if isinstance(item, Right)] == [("last", 2)]
