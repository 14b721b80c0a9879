"""Hostile input at every RPC of a running shard and worker: errors, never damage, never a crash.

Hypothesis throws random and truncated bytes, unknown dtypes, huge declared
shapes, NaN and Inf values, ids of another shard and oversized batches. Each
request must get an error status, the services must keep serving, and the
stored parameters must stay exactly as they were.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import Processes, psserver_argv
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psclient import connect
from psclient.children import worker_argv
from psclient.wire.proto import shard_pb2, shard_pb2_grpc, tensor_pb2, worker_pb2, worker_pb2_grpc

REJECTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.INTERNAL,  # a request that does not even parse as the message
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # beyond the message size limit
}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Target:
    def __init__(self, shards: list[str], worker: str):
        self.shards, self.worker = shards, worker
        self.shard_channel = grpc.insecure_channel(shards[0], options=[("grpc.max_send_message_length", 1 << 28)])
        self.worker_channel = grpc.insecure_channel(worker)
        self.shard = shard_pb2_grpc.ParameterShardStub(self.shard_channel)
        self.worker_stub = worker_pb2_grpc.WorkerStub(self.worker_channel)
        self.reference: dict[Any, list[float]] = {}

    def model(self) -> dict[Any, list[float]]:
        with connect(self.shards) as cluster:
            return {param_id: np.asarray(value).tolist() for param_id, value in cluster.snapshot()}

    def raw_stream(self, method: str, payloads: list[bytes]) -> grpc.RpcError:
        call = self.shard_channel.stream_stream(
            f"/streamps.v1.ParameterShard/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as failure:
            list(call(iter(payloads), timeout=30))
        return failure.value


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    procs = Processes(Path(tmp_path_factory.mktemp("fuzz")))
    try:
        shards = [procs.start_server(psserver_argv(i, 2, "zeros:2", "add")).address for i in range(2)]
        argv = worker_argv("logics:Exactness", shards, 0, 1, "--port", "0", log_level="CRITICAL")
        worker = procs.start_server(argv).address
        fuzz = Target(shards, worker)
        with connect(shards) as cluster:
            cluster.push([0, 2, 4, "a"], [np.array([1.0, -1.0], dtype=np.float32)] * 4)
        fuzz.reference = fuzz.model()
        yield fuzz
        assert fuzz.model() == fuzz.reference, "hostile input changed stored parameters"
        status = fuzz.worker_stub.Status(worker_pb2.StatusRequest(), timeout=10)
        assert status.state == worker_pb2.StatusResponse.RUNNING
    finally:
        procs.stop_all()


_SEQS = itertools.count(10_000)


def push_request(batch: tensor_pb2.ParamBatch) -> shard_pb2.PushRequest:
    # A fresh seq each time: one push wrongly applied must not make the shard ack
    # every later one as a duplicate (unchecked), which would hide which one it was.
    return shard_pb2.PushRequest(worker_id="fuzzer", seq=next(_SEQS), batches=[batch])


@given(payload=st.binary(min_size=1, max_size=256))
@FUZZ
def test_random_bytes_on_pull_push_and_exchange(target: Target, payload: bytes) -> None:
    for method in ("Pull", "Push", "Exchange"):
        try:
            call = target.shard_channel.stream_stream(
                f"/streamps.v1.ParameterShard/{method}",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            list(call(iter([payload]), timeout=30))
        except grpc.RpcError as exc:
            assert exc.code() in REJECTED, exc
    assert target.shard.Info(shard_pb2.InfoRequest(), timeout=10).shard == 0


NUMERIC = ("<f4", "<f8", "<i8", "<f2")


@given(
    dtype=st.sampled_from(["<f4", "<f8", "<i8", "|O", "<U4", "V8", "", "nonsense", "<M8[s]", "<f2"]),
    shape=st.lists(st.integers(min_value=-3, max_value=2**40), min_size=0, max_size=3),
    data=st.binary(max_size=64),
    ids=st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=0, max_size=4),
)
@FUZZ
def test_malformed_tensors_are_rejected_and_change_nothing(
    target: Target, dtype: str, shape: list[int], data: bytes, ids: list[int]
) -> None:
    batch = tensor_pb2.ParamBatch(
        int_ids=np.asarray(ids, dtype="<i8").tobytes(), values=tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)
    )
    well_formed = (
        dtype in NUMERIC
        and ids
        and all(i % 2 == 0 for i in ids)
        and shape == [len(ids), 2]
        and len(data) == len(ids) * 2 * np.dtype(dtype).itemsize
    )
    if well_formed:
        return  # a valid push would rightly change the model
    # No ids and no values: nothing to apply, so an ack is as right as a refusal.
    empty = not ids and not data and bool(shape) and shape[0] == 0 and min(shape) >= 0 and dtype in NUMERIC
    try:
        list(target.shard.Push(iter([push_request(batch)]), timeout=30))
        if not empty:
            pytest.fail("a malformed push was acknowledged")
    except grpc.RpcError as exc:
        assert exc.code() in REJECTED, exc


@given(
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    where=st.integers(min_value=0, max_value=3),
)
@FUZZ
def test_nan_and_inf_deltas_are_rejected(target: Target, bad: float, where: int) -> None:
    values = np.ones((2, 2), dtype=np.float32)
    values.flat[where] = bad
    batch = tensor_pb2.ParamBatch(
        int_ids=np.asarray([0, 2], dtype="<i8").tobytes(),
        values=tensor_pb2.Tensor(dtype="<f4", shape=[2, 2], data=values.tobytes()),
    )

    with pytest.raises(grpc.RpcError) as failure:
        list(target.shard.Push(iter([push_request(batch)]), timeout=30))

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN or Inf" in (failure.value.details() or "")


@given(odd=st.integers(min_value=-(2**62), max_value=2**62 - 1).map(lambda i: 2 * i + 1))
@FUZZ
def test_ids_of_another_shard_are_rejected(target: Target, odd: int) -> None:
    keys = tensor_pb2.ParamBatch(int_ids=np.asarray([odd], dtype="<i8").tobytes())

    with pytest.raises(grpc.RpcError) as failure:
        list(target.shard.Pull(iter([shard_pb2.PullRequest(request_id=1, keys=keys)]), timeout=30))

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_oversized_batch_is_rejected(target: Target) -> None:
    ids = np.arange(0, 2 * ((1 << 20) + 2), 2, dtype="<i8")  # just over the ids-per-batch limit
    keys = tensor_pb2.ParamBatch(int_ids=ids.tobytes())

    with pytest.raises(grpc.RpcError) as failure:
        list(target.shard.Pull(iter([shard_pb2.PullRequest(request_id=1, keys=keys)]), timeout=60))

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the limit" in (failure.value.details() or "")


@given(records=st.lists(st.binary(min_size=1, max_size=32), min_size=1, max_size=4))
@FUZZ
def test_worker_feed_rejects_undecodable_records_and_keeps_serving(target: Target, records: list[bytes]) -> None:
    from psclient.wire.records import unpack

    def decodes(data: bytes) -> bool:
        try:
            unpack(data)
            return True
        except ValueError:
            return False

    if all(decodes(r) for r in records):
        return  # valid msgpack would be real records for the logic
    with pytest.raises(grpc.RpcError) as failure:
        target.worker_stub.Feed(iter([worker_pb2.FeedRequest(records=records)]), timeout=30)

    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert target.worker_stub.Status(worker_pb2.StatusRequest(), timeout=10).state == worker_pb2.StatusResponse.RUNNING


@given(payload=st.binary(min_size=1, max_size=128))
@FUZZ
def test_random_bytes_on_every_worker_rpc(target: Target, payload: bytes) -> None:
    with contextlib.suppress(DecodeError):
        if worker_pb2.FeedRequest.FromString(payload).end_of_input:
            return  # a well-formed request to end the input, which would end the worker for good
    for method, kind in (("Feed", "stream_unary"), ("Outputs", "unary_stream"), ("Status", "unary_unary")):
        call = getattr(target.worker_channel, kind)(
            f"/streamps.v1.Worker/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        try:
            if kind == "stream_unary":
                call(iter([payload]), timeout=5)
            elif kind == "unary_stream":
                next(iter(call(payload, timeout=0.5)), None)
            else:
                call(payload, timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() in REJECTED | {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ALREADY_EXISTS}, exc
    assert target.worker_stub.Status(worker_pb2.StatusRequest(), timeout=10).state == worker_pb2.StatusResponse.RUNNING
