"""Semantics of DESIGN.md section 4 on real processes: read-your-writes, flow control,
termination, partitioning, user callables, and no child process left behind."""

from __future__ import annotations

import queue
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest
from conftest import StartShards
from logics import Exactness, FailOnX, InputEnd, KeyedEcho, PullChain, ReadYourWrites

import psclient.local
from psclient import JobFailed, Left, LocalCluster, Right, StreampsError, transform
from psclient.rpc.shard_group import ShardGroup
from psclient.wire.codec import decode_rows, encode_keys, encode_values
from psclient.wire.proto import shard_pb2, shard_pb2_grpc
from psworker import WorkerLogic, with_pull_limit

# -- read-your-writes -----------------------------------------------------------


@pytest.mark.timeout(120)
def test_pull_after_push_in_a_worker_sees_the_push() -> None:
    records = range(2_000)

    items = list(transform(records, ReadYourWrites(), "const:0", "add", 2, 2))

    outputs = [item.value for item in items if isinstance(item, Left)]
    model = dict(item.value for item in items if isinstance(item, Right))
    assert len(outputs) == len(records)
    assert sum(model.values()) == len(records)
    assert Counter(param_id for param_id, _, _ in outputs) == model
    stale = [(param_id, value, pushed) for param_id, value, pushed in outputs if value < pushed]
    assert stale == [], "a pull did not see a push the same worker made before it"
    assert all(value <= model[param_id] for param_id, value, _ in outputs)


@pytest.mark.timeout(120)
def test_shard_group_push_then_pull_sees_each_push(start_shards: StartShards) -> None:
    servers = start_shards(2, init="zeros:2")
    ids = [4, -3, "alpha", "beta"]

    seen = []
    with ShardGroup(servers) as group:
        for step in range(1, 51):
            group.push(ids, [np.array([1.0, step], dtype=np.float32)] * len(ids))
            seen.append(group.pull(ids))

    for step, values in enumerate(seen, start=1):
        for value in values:
            np.testing.assert_array_equal(value, np.array([step, step * (step + 1) / 2], dtype=np.float32))


@pytest.mark.timeout(120)
def test_pull_sent_before_its_push_on_the_other_stream_waits_for_it(
    shard_stub: Callable[..., shard_pb2_grpc.ParameterShardStub],
) -> None:
    stub = shard_stub(init="zeros:2")
    pulls: queue.Queue[Any] = queue.Queue()
    pushes: queue.Queue[Any] = queue.Queue()
    pull_call = stub.Pull(iter(pulls.get, None), timeout=60)
    push_call = stub.Push(iter(pushes.get, None), timeout=60)
    try:
        pulls.put(shard_pb2.PullRequest(request_id=1, keys=encode_keys([7]), worker_id="ryw", after_seq=1))
        pushes.put(
            shard_pb2.PushRequest(
                worker_id="ryw", seq=1, batches=encode_values([7], [np.array([2.5, -1.0], dtype=np.float32)])
            )
        )
        answer = next(pull_call)
        ack = next(push_call)
    finally:
        pulls.put(None)
        pushes.put(None)

    ids, values = decode_rows(answer.batches)
    assert ids == [7]
    np.testing.assert_array_equal(values[0], np.array([2.5, -1.0], dtype=np.float32))
    assert (ack.seq, ack.duplicate) == (1, False)


def _exchange(worker_id: str, seq: int, push: dict[Any, Any], request_id: int, pull: list[Any]) -> Any:
    return shard_pb2.ExchangeRequest(
        push=shard_pb2.PushRequest(worker_id=worker_id, seq=seq, batches=encode_values(list(push), list(push.values())))
        if push
        else None,
        pull=shard_pb2.PullRequest(request_id=request_id, keys=encode_keys(pull)) if pull else None,
    )


@pytest.mark.timeout(120)
def test_exchange_applies_each_push_before_the_pull_it_carries_and_answers_in_order(
    shard_stub: Callable[..., shard_pb2_grpc.ParameterShardStub],
) -> None:
    stub = shard_stub(init="zeros:2")
    one = np.array([1.0, 2.0], dtype=np.float32)
    requests = [
        _exchange("w", 1, {3: one, "a": one}, 1, [3, "a", 4]),
        _exchange("w", 2, {3: one}, 0, []),  # push only
        _exchange("w", 0, {}, 2, [3]),  # pull only
        _exchange("w", 2, {3: one}, 3, [3]),  # a repeated seq: acknowledged, not applied
    ]

    responses = list(stub.Exchange(iter(requests), timeout=60))

    assert [(r.HasField("ack"), r.HasField("pull")) for r in responses] == [
        (True, True),
        (True, False),
        (False, True),
        (True, True),
    ]
    assert [(r.ack.seq, r.ack.duplicate) for r in responses if r.HasField("ack")] == [(1, False), (2, False), (2, True)]
    assert [r.pull.request_id for r in responses if r.HasField("pull")] == [1, 2, 3]
    pulled = [dict(zip(*decode_rows(r.pull.batches), strict=True)) for r in responses if r.HasField("pull")]
    np.testing.assert_array_equal(pulled[0][3], one)
    np.testing.assert_array_equal(pulled[0]["a"], one)
    np.testing.assert_array_equal(pulled[0][4], np.zeros(2, dtype=np.float32))
    np.testing.assert_array_equal(pulled[1][3], 2 * one)
    np.testing.assert_array_equal(pulled[2][3], 2 * one)


@pytest.mark.timeout(120)
def test_exchange_refuses_a_malformed_push_and_keeps_the_values(
    shard_stub: Callable[..., shard_pb2_grpc.ParameterShardStub],
) -> None:
    stub = shard_stub(init="zeros:2")
    bad = _exchange("w", 1, {5: np.array([1.0, 2.0, 3.0], dtype=np.float32)}, 1, [5])

    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Exchange(iter([bad]), timeout=60))

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (answer,) = list(stub.Pull(iter([shard_pb2.PullRequest(request_id=1, keys=encode_keys([5]))]), timeout=60))
    np.testing.assert_array_equal(decode_rows(answer.batches)[1][0], np.zeros(2, dtype=np.float32))


# -- flow control and termination ------------------------------------------------


@pytest.mark.timeout(120)
def test_pull_limit_one_with_pulls_inside_on_pull_recv_finishes_exactly() -> None:
    records = range(10_000)
    logic = with_pull_limit(PullChain(), 1)

    items = list(transform(records, logic, "const:0", "add", 2, 2))

    outputs = [item.value for item in items if isinstance(item, Left)]
    model = dict(item.value for item in items if isinstance(item, Right))
    assert Counter(outputs) == {f"s{j}": 1_000 for j in range(10)}
    assert model == {**{i: 100 for i in range(100)}, **{f"s{j}": 1_000 for j in range(10)}}


def test_with_pull_limit_rejects_a_bound_below_one() -> None:
    with pytest.raises(ValueError, match="pull limit"):
        with_pull_limit(PullChain(), 0)


@pytest.mark.timeout(120)
def test_finite_input_ends_the_job_and_on_input_end_effects_are_in_the_model() -> None:
    records = range(1, 1_001)

    items = list(transform(records, InputEnd(), "const:0", "add", 2, 2))

    outputs = [item.value for item in items if isinstance(item, Left)]
    model = dict(item.value for item in items if isinstance(item, Right))
    assert model == {"sum": 500_500, "count-0": 500, "count-1": 500, "after-end": 2}
    assert sorted(worker for _, worker, _ in outputs) == [0, 1]
    own_sums = {0: sum(range(1, 1_001, 2)), 1: sum(range(2, 1_001, 2))}
    for tag, worker, value in outputs:
        assert tag == "final"
        assert own_sums[worker] <= value <= 500_500


@pytest.mark.timeout(120)
def test_empty_input_finishes_with_nothing() -> None:
    items = list(transform([], Exactness(), "const:0", "add", 2, 2))

    assert items == []


# -- user callables ---------------------------------------------------------------


class PushModTen(WorkerLogic):
    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push(data % 10, data)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("never pulls")


@pytest.mark.timeout(120)
def test_lambdas_and_closures_for_init_update_and_logic() -> None:
    base = 1_000
    records = range(200)
    expected = {i: base + i + 2 * sum(r for r in records if r % 10 == i) for i in range(10)}

    items = list(transform(records, lambda: PushModTen(), lambda i: base + i, lambda old, delta: old + 2 * delta, 2, 2))

    assert all(isinstance(item, Right) for item in items)
    assert dict(item.value for item in items) == expected


class PullTypes(WorkerLogic):
    """Pulls each record's id; outputs what arrived: [id, kind, writable, value + 1]."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.pull(data)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        if isinstance(param_value, np.ndarray):
            param_value += 1  # raises if the runtime handed out a read-only view
            ps.output([param_id, "ndarray", param_value.dtype.str, param_value])
        else:
            ps.output([param_id, type(param_value).__name__, "", param_value + 1])


def mixed_init(param_id: Any) -> Any:
    if param_id == "f":
        return 1.5
    if param_id == "i":
        return 7
    return np.arange(3, dtype=np.float64) * param_id


@pytest.mark.timeout(120)
def test_pulled_values_are_python_scalars_or_writable_arrays() -> None:
    items = list(transform(["f", "i", 2], PullTypes(), mixed_init, "add", 1, 2))

    outputs = {out[0]: out[1:] for out in (item.value for item in items if isinstance(item, Left))}
    model = dict(item.value for item in items if isinstance(item, Right))
    assert outputs["f"] == ["float", "", 2.5]
    assert outputs["i"] == ["int", "", 8]
    assert outputs[2][:2] == ["ndarray", "<f8"]
    np.testing.assert_array_equal(outputs[2][2], [1.0, 3.0, 5.0])
    assert set(model) == {"f", "i", 2}
    assert (type(model["f"]), model["f"]) == (float, 1.5)
    assert (type(model["i"]), model["i"]) == (int, 7)
    np.testing.assert_array_equal(model[2], [0.0, 2.0, 4.0])


# -- partitioning -----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_partition_by_sends_equal_keys_to_the_same_worker() -> None:
    records = [(f"k{i % 12}", i) for i in range(240)]

    items = list(transform(records, KeyedEcho(), "const:0", "add", 3, 1, partition_by=lambda r: r[0]))

    workers_of: dict[str, set[int]] = defaultdict(set)
    for key, worker in (item.value for item in items):
        workers_of[key].add(worker)
    assert sorted(workers_of) == sorted({key for key, _ in records})
    assert all(len(workers) == 1 for workers in workers_of.values()), workers_of
    assert Counter(key for key, _ in (item.value for item in items)) == {f"k{j}": 20 for j in range(12)}
    assert len(set().union(*workers_of.values())) > 1, "every key went to one worker"


# -- no child process left behind ----------------------------------------------------


class RecordingChild(psclient.local.ChildProcess):
    started: ClassVar[list[Any]] = []

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        RecordingChild.started.append(self.process)


@pytest.fixture
def recorded_children(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    RecordingChild.started = []
    monkeypatch.setattr(psclient.local, "ChildProcess", RecordingChild)
    return RecordingChild.started


@pytest.mark.timeout(120)
def test_no_child_process_remains_after_transform_returns(recorded_children: list[Any]) -> None:
    items = list(transform(range(100), Exactness(), "const:0", "add", 2, 3))

    assert len(items) == 100 + 100 + 100
    assert len(recorded_children) == 5
    assert [process.poll() is not None for process in recorded_children] == [True] * 5


@pytest.mark.timeout(120)
def test_no_child_process_remains_after_the_stream_is_closed_early(recorded_children: list[Any]) -> None:
    stream = transform(range(10_000), Exactness(), "const:0", "add", 2, 2)

    first = next(stream)
    stream.close()

    assert isinstance(first, Left)
    assert len(recorded_children) == 4
    assert [process.poll() is not None for process in recorded_children] == [True] * 4


@pytest.mark.timeout(120)
def test_no_child_process_remains_after_a_job_fails(recorded_children: list[Any]) -> None:
    with pytest.raises(JobFailed):
        list(transform(["a", "x", "b"], FailOnX(), "const:0", "add", 1, 1))

    assert len(recorded_children) == 2
    assert [process.poll() is not None for process in recorded_children] == [True] * 2


@pytest.mark.timeout(120)
def test_local_cluster_stop_ends_every_child() -> None:
    cluster = LocalCluster("logics:Exactness", "const:0", "add", num_workers=2, num_shards=2)

    with cluster:
        processes = [child.process for child in cluster.children]
        running = [process.poll() is None for process in processes]
        addresses = (list(cluster.servers), list(cluster.workers))

    assert running == [True] * 4
    assert all(address.startswith("127.0.0.1:") for address in addresses[0] + addresses[1])
    assert [process.poll() is not None for process in processes] == [True] * 4
    assert cluster.children == []


@pytest.mark.timeout(120)
def test_local_cluster_that_fails_to_start_leaves_no_child(recorded_children: list[Any]) -> None:
    cluster = LocalCluster("nosuch:Thing", "const:0", "add", num_workers=1, num_shards=1)

    with pytest.raises(StreampsError, match="no module named 'nosuch'"):
        cluster.start()

    assert len(recorded_children) == 2
    assert [process.poll() is not None for process in recorded_children] == [True] * 2
