"""Bad input never corrupts state: clear errors, unchanged values, services that keep serving."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import Processes, StartShards, error_line, push_once, run_psworker
from logics import FailOnX

from psclient import Cluster, JobFailed, LocalCluster, transform
from psclient.wire.codec import decode_rows, encode_int_ids, encode_keys, encode_values
from psclient.wire.proto import shard_pb2, shard_pb2_grpc, tensor_pb2, worker_pb2

RUN_TIMEOUT_S = 120


def pull(stub: Any, ids: list[Any]) -> dict[Any, Any]:
    """Values of `ids` through one raw Pull stream."""
    (answer,) = list(stub.Pull(iter([shard_pb2.PullRequest(request_id=1, keys=encode_keys(ids))]), timeout=30))
    got_ids, values = decode_rows(answer.batches)
    return dict(zip(got_ids, values, strict=True))


def push_request(seq: int, ids: list[Any], values: list[Any], worker_id: str = "tester") -> shard_pb2.PushRequest:
    return shard_pb2.PushRequest(worker_id=worker_id, seq=seq, batches=encode_values(ids, values))


def rejected(stub: Any, request: shard_pb2.PushRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        push_once(stub, request)
    return info.value


# -- the shard: malformed or mismatched pushes --------------------------------------


@pytest.mark.parametrize(
    ("delta", "reason"),
    [
        (np.array([1.0, 2.0, 3.0], dtype=np.float32), "shape (3,)"),  # 3 values into a 2-vector
        (np.float32(4.0), "shape ()"),  # a scalar into a 2-vector
        (np.array([[1.0, 2.0]], dtype=np.float32), "shape (1, 2)"),
    ],
)
@pytest.mark.timeout(120)
def test_push_of_wrong_shape_is_rejected_and_changes_nothing(shard_stub: Any, delta: Any, reason: str) -> None:
    stub = shard_stub(init="zeros:2", update="add")
    push_once(stub, push_request(1, [0], [np.array([1.0, 2.0], dtype=np.float32)]))

    error = rejected(stub, push_request(2, [0, 1], [delta, delta]))
    after = pull(stub, [0, 1])
    ack = push_once(stub, push_request(2, [0], [np.array([10.0, 20.0], dtype=np.float32)]))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in error.details()
    np.testing.assert_array_equal(after[0], [1.0, 2.0])
    np.testing.assert_array_equal(after[1], [0.0, 0.0])  # created by the pull, untouched by the push
    assert (ack.seq, ack.duplicate) == (2, False), "a rejected seq must not advance the watermark"
    np.testing.assert_array_equal(pull(stub, [0])[0], [11.0, 22.0])


@pytest.mark.timeout(120)
def test_push_of_float_into_int_parameter_makes_it_a_float(shard_stub: Any) -> None:
    stub = shard_stub(init="const:5", update="add")
    push_once(stub, push_request(1, [3, 4], [2, 2]))

    ack = push_once(stub, push_request(2, [3], [0.5]))
    after = pull(stub, [3, 4])

    assert (ack.seq, ack.duplicate) == (2, False)
    assert {i: (type(v), v) for i, v in after.items()} == {3: (float, 7.5), 4: (int, 7)}


@pytest.mark.timeout(120)
def test_one_bad_batch_rejects_the_whole_request(shard_stub: Any) -> None:
    stub = shard_stub(init="zeros:2", update="add")
    good = encode_values([2, "a"], [np.array([1.0, 1.0], dtype=np.float32)] * 2)
    bad = encode_values([4], [np.array([1, 2, 3], dtype=np.float32)])
    request = shard_pb2.PushRequest(worker_id="tester", seq=1, batches=[*good, *bad])

    error = rejected(stub, request)
    values = pull(stub, [2, "a", 4])

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    for param_id in (2, "a", 4):
        np.testing.assert_array_equal(values[param_id], [0.0, 0.0])


def raw_batch(int_ids: bytes, dtype: str, shape: list[int], data: bytes) -> tensor_pb2.ParamBatch:
    return tensor_pb2.ParamBatch(int_ids=int_ids, values=tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data))


ONE_ROW = np.array([[1.0, 2.0]], dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param(raw_batch(encode_int_ids([0]), "<f4", [1, 2], ONE_ROW[:5]), id="truncated-data"),
        pytest.param(raw_batch(encode_int_ids([0]), "<q9", [1, 2], ONE_ROW), id="unknown-dtype"),
        pytest.param(raw_batch(encode_int_ids([0]), "|O", [1, 1], b"\0" * 8), id="object-dtype"),
        pytest.param(raw_batch(encode_int_ids([0]), "<U2", [1], b"\0" * 8), id="unicode-dtype"),
        pytest.param(raw_batch(encode_int_ids([0]), "<f4", [1, -2], b""), id="negative-shape"),
        pytest.param(raw_batch(encode_int_ids([0])[:5], "<f4", [1, 2], ONE_ROW), id="truncated-ids"),
        pytest.param(raw_batch(encode_int_ids([0, 1]), "<f4", [1, 2], ONE_ROW), id="rows-differ-from-ids"),
        pytest.param(raw_batch(encode_int_ids([1]), "<f4", [1, 2], ONE_ROW), id="id-of-another-shard"),
        pytest.param(tensor_pb2.ParamBatch(int_ids=encode_int_ids([0])), id="no-values"),
    ],
)
@pytest.mark.timeout(120)
def test_malformed_push_batch_is_invalid_argument_and_shard_keeps_serving(
    start_shards: StartShards, batch: tensor_pb2.ParamBatch
) -> None:
    servers = start_shards(2, init="zeros:2", update="add")  # id 1 belongs to shard 1
    with grpc.insecure_channel(servers[0]) as channel:
        stub = shard_pb2_grpc.ParameterShardStub(channel)
        push_once(stub, push_request(1, [0], [np.array([3.0, 4.0], dtype=np.float32)]))

        error = rejected(stub, shard_pb2.PushRequest(worker_id="tester", seq=2, batches=[batch]))
        after = pull(stub, [0])

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details()
    np.testing.assert_array_equal(after[0], [3.0, 4.0])


@pytest.mark.timeout(120)
def test_push_without_worker_id_or_seq_is_invalid_argument(shard_stub: Any) -> None:
    stub = shard_stub(init="zeros:2", update="add")
    delta = [np.array([1.0, 1.0], dtype=np.float32)]

    no_worker = rejected(stub, push_request(1, [0], delta, worker_id=""))
    no_seq = rejected(stub, push_request(0, [0], delta))

    assert no_worker.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert no_seq.code() == grpc.StatusCode.INVALID_ARGUMENT
    np.testing.assert_array_equal(pull(stub, [0])[0], [0.0, 0.0])


@pytest.mark.timeout(120)
def test_pull_with_truncated_ids_is_invalid_argument(shard_stub: Any) -> None:
    stub = shard_stub()
    request = shard_pb2.PullRequest(request_id=1, keys=tensor_pb2.ParamBatch(int_ids=b"\1\2\3"))

    with pytest.raises(grpc.RpcError) as info:
        list(stub.Pull(iter([request]), timeout=30))

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert pull(stub, [5]).keys() == {5}


# -- idempotent pushes -----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_same_worker_and_seq_twice_is_applied_once(shard_stub: Any) -> None:
    stub = shard_stub(init="const:0", update="add")

    first = push_once(stub, push_request(1, [9, "z"], [5, 5]))
    again = push_once(stub, push_request(1, [9, "z"], [5, 5]))
    second = push_once(stub, push_request(2, [9], [1]))
    older = push_once(stub, push_request(1, [9], [100]))
    other_worker = push_once(stub, push_request(1, [9], [1_000], worker_id="other"))
    info = stub.Info(shard_pb2.InfoRequest(), timeout=30)

    assert [(a.seq, a.duplicate) for a in (first, again, second, older, other_worker)] == [
        (1, False), (1, True), (2, False), (1, True), (1, False),
    ]  # fmt: skip
    assert pull(stub, [9, "z"]) == {9: 1_006, "z": 5}
    assert dict(info.watermarks) == {"tester": 2, "other": 1}


# -- psworker: logic that cannot be loaded, malformed lines, exceptions in user code ----


@pytest.mark.timeout(120)
def test_unknown_logic_module_exits_2_with_one_line(procs: Processes) -> None:
    code, stdout, stderr = run_psworker(procs, "--logic", "nosuch:Thing", "--worker-index", "0", "--num-workers", "1")

    assert code == 2
    assert stdout == []
    assert stderr == ["psworker: error: logic 'nosuch:Thing': no module named 'nosuch'"]


@pytest.mark.timeout(120)
def test_unknown_logic_attribute_exits_2_with_one_line(procs: Processes) -> None:
    code, _, stderr = run_psworker(procs, "--logic", "logics:NoSuch", "--worker-index", "0", "--num-workers", "1")

    assert code == 2
    assert len(stderr) == 1
    assert stderr[0].startswith("psworker: error: logic 'logics:NoSuch'")
    assert "NoSuch" in stderr[0]


def jsonl_with_bad_line_17(path: Path) -> None:
    lines = [json.dumps({"word": f"w{n}"}) for n in range(1, 31)]
    lines[16] = '{"word": "w17"'  # line 17: no closing brace
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.timeout(120)
def test_malformed_jsonl_line_stops_the_worker_naming_the_line(
    tmp_path: Path, procs: Processes, start_shards: StartShards
) -> None:
    data = tmp_path / "records.jsonl"
    jsonl_with_bad_line_17(data)
    servers = start_shards(1)

    code, stdout, stderr = run_psworker(
        procs, "--logic", "logics:FailOnX", "--worker-index", "0", "--num-workers", "1", "--input", str(data),
        servers=servers[0],
    )  # fmt: skip
    with Cluster(servers) as cluster:
        model = dict(cluster.snapshot())

    assert code == 1
    line = error_line(stderr)
    assert line.startswith(f"psworker: error: worker 0: {data} line 17: malformed JSON"), line
    assert [json.loads(out) for out in stdout] == [f"w{n}" for n in range(1, 17)]
    assert model == {"seen": 16}


@pytest.mark.timeout(120)
def test_psclient_run_names_the_malformed_line(tmp_path: Path, procs: Processes) -> None:
    data = tmp_path / "records.jsonl"
    jsonl_with_bad_line_17(data)
    argv = [
        sys.executable, "-m", "psclient", "run", "--logic", "logics:FailOnX", "--input", str(data),
        "--init", "const:0", "--workers", "1", "--shards", "1", "--output", str(tmp_path / "out.jsonl"),
    ]  # fmt: skip
    process, stderr_path = procs.popen(argv, stdout=subprocess.DEVNULL)

    code = process.wait(timeout=RUN_TIMEOUT_S)

    stderr = stderr_path.read_text(encoding="utf-8").splitlines()
    assert code == 1
    assert stderr[-1].startswith("psclient: error: "), stderr
    assert f"{data} line 17: malformed JSON" in stderr[-1]


@pytest.mark.timeout(120)
def test_exception_in_on_recv_names_worker_callback_and_line(
    tmp_path: Path, procs: Processes, start_shards: StartShards
) -> None:
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"word": w}) + "\n" for w in ["a", "b", "c", "d", "x", "e"]), encoding="utf-8")
    servers = start_shards(1)

    code, stdout, stderr = run_psworker(
        procs, "--logic", "logics:FailOnX", "--worker-index", "0", "--num-workers", "1", "--input", str(data),
        servers=servers[0],
    )  # fmt: skip

    assert code == 1
    assert error_line(stderr) == (
        "psworker: error: worker 0 failed in on_recv: ValueError: bad record x (line 5: {'word': 'x'})"
    )
    assert [json.loads(out) for out in stdout] == ["a", "b", "c", "d"]


@pytest.mark.timeout(120)
def test_exception_in_on_recv_fails_transform_with_one_line() -> None:
    records = ["a", "b", "c", "d", "e", "x", "f", "g"]  # round robin: "x" is worker 1's 3rd record

    with pytest.raises(JobFailed) as info:
        list(transform(records, FailOnX(), "const:0", "add", 2, 1))

    assert str(info.value) == "worker 1 failed in on_recv: ValueError: bad record x (record 3: 'x')"


@pytest.mark.timeout(120)
def test_on_error_skip_in_psworker_logs_and_continues(
    tmp_path: Path, procs: Processes, start_shards: StartShards
) -> None:
    data = tmp_path / "records.jsonl"
    jsonl_with_bad_line_17(data)
    lines = data.read_text(encoding="utf-8").splitlines()
    lines[4] = json.dumps({"word": "x"})  # line 5 raises in on_recv
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    servers = start_shards(1)

    code, stdout, stderr = run_psworker(
        procs, "--logic", "logics:FailOnX", "--worker-index", "0", "--num-workers", "1", "--input", str(data),
        "--on-error", "skip", servers=servers[0],
    )  # fmt: skip
    with Cluster(servers) as cluster:
        model = dict(cluster.snapshot())

    assert code == 0, stderr
    skipped = [line for line in stderr if line.endswith("; skipped")]
    assert len(skipped) == 2, stderr
    assert "failed in on_recv: ValueError: bad record x (line 5" in skipped[0]
    assert "line 17: malformed JSON" in skipped[1]
    assert [json.loads(out) for out in stdout] == [f"w{n}" for n in range(1, 31) if n not in (5, 17)]
    assert model == {"seen": 28}


@pytest.mark.timeout(120)
def test_on_error_skip_counts_failed_records_in_status() -> None:
    records = ["a", "x", "b", "x", "c", "x", "d"]
    cluster = LocalCluster("logics:FailOnX", "const:0", "add", num_workers=1, num_shards=1, on_error="skip")

    with cluster, Cluster(cluster.servers, cluster.workers) as client:
        client.feed(records)
        deadline = time.monotonic() + 60
        while (status := client.status()[0]).state != worker_pb2.StatusResponse.FINISHED:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        outputs = list(client.outputs())
        model = dict(client.snapshot())

    assert (status.records, status.records_failed, status.outputs, status.error) == (7, 3, 4, "")
    assert outputs == ["a", "b", "c", "d"]
    assert model == {"seen": 4}


# -- a records iterator that raises -------------------------------------------------------


def records_then_error() -> Any:
    yield from ["a", "b", "c"]
    raise ValueError("the source broke after 3 records")


@pytest.mark.timeout(120)
def test_records_iterator_error_fails_transform_with_that_error() -> None:
    with pytest.raises(ValueError, match="the source broke after 3 records"):
        list(transform(records_then_error(), FailOnX(), "const:0", "add", 1, 1))


@pytest.mark.timeout(120)
def test_records_iterator_error_is_not_lost_when_the_feeder_thread_is_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    # The feeding thread records its failure a moment after the workers were told
    # that the input ended (a scheduling delay under load): the job must still fail.
    feed = Cluster.feed

    def slow_to_report(self: Cluster, *args: Any, **kwargs: Any) -> int:
        try:
            return feed(self, *args, **kwargs)
        except BaseException:
            time.sleep(1.0)
            raise

    monkeypatch.setattr(Cluster, "feed", slow_to_report)

    with pytest.raises(ValueError, match="the source broke after 3 records"):
        list(transform(records_then_error(), FailOnX(), "const:0", "add", 1, 1))
