"""Server logic (psserver --logic, transform(ps_logic=)): late answers in order, dedupe, outputs, errors."""

from __future__ import annotations

import json
import re
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import Processes
from logic_streams import (
    Stream,
    await_pull_requests,
    decode_rows_of,
    logic_outputs,
    pulled,
    start_logic_service,
    start_logic_shard,
)
from server_logics import Counting, FailingClose, FailingPush

from examples.lock_server import LockServer, count
from psclient import Right, connect, transform
from psclient.children import shard_argv
from psclient.errors import StreampsError
from psclient.specs import make_init, make_update
from psclient.wire.codec import decode_rows
from psclient.wire.proto import shard_pb2
from psserver import ServerLogic
from psserver.logic import LogicStore
from psworker import WorkerLogic


@pytest.mark.timeout(120)
def test_a_resent_push_seq_reaches_the_logic_once(procs: Processes) -> None:
    stub = start_logic_shard(procs, "server_logics:Counting")
    stream = Stream(stub)
    answers = stream.answers()
    stream.send(push=(1, [5], [1.0]))
    stream.send(push=(1, [5], [1.0]))  # resent after a broken stream, say
    stream.send(push=(2, [5], [2.0]), pull=(1, [5], 3))
    first, again, third = next(answers), next(answers), next(answers)
    stream.close()

    assert (first.ack.seq, first.ack.duplicate) == (1, False)
    assert (again.ack.seq, again.ack.duplicate) == (1, True)
    assert (third.ack.seq, third.ack.duplicate) == (2, False)
    assert pulled(third) == {5: 3.0}  # the push before it in the message, read-your-writes
    assert logic_outputs(stub) == [("calls", {"open": 1, "on_pull_recv": 1, "on_push_recv": 2}), (5, 3.0)]
    info = stub.Info(shard_pb2.InfoRequest())
    assert (info.logic, dict(info.watermarks)) == ("server_logics:Counting", {"job-w0": 2})


@pytest.mark.timeout(120)
def test_a_push_of_a_record_applied_before_reaches_the_logic_once(procs: Processes) -> None:
    stub = start_logic_shard(procs, "server_logics:Counting")
    stream = Stream(stub)
    answers = stream.answers()
    stream.send(push=(1, [5], [1.0]), origin=1)
    stream.send(push=(1, [5], [1.0]), origin=1)  # a restarted worker replays record 1: seqs start over
    stream.send(push=(2, [5], [2.0]), origin=2)
    acks = [next(answers).ack for _ in range(3)]
    stream.close()

    assert [(ack.seq, ack.duplicate) for ack in acks] == [(1, False), (1, True), (2, False)]
    assert logic_outputs(stub) == [("calls", {"open": 1, "on_pull_recv": 0, "on_push_recv": 2}), (5, 3.0)]


@pytest.mark.timeout(120)
def test_a_late_answer_holds_back_the_answers_behind_it_not_the_pushes(procs: Processes) -> None:
    stub = start_logic_shard(procs, "examples.lock_server:LockServer")
    stream = Stream(stub)
    answers = stream.answers()
    stream.send(pull=(1, [7], 0))  # takes the lock
    stream.send(pull=(2, [7], 1))  # waits for it
    stream.send(push=(1, [7], [5.0]))  # the holder's push frees it: the waiting pull gets 5
    stream.send(pull=(3, [8], 2))
    got = [next(answers) for _ in range(4)]
    stream.close()

    assert [r.pull.request_id for r in got] == [1, 2, 0, 3]
    assert [pulled(r) for r in got] == [{7: 0.0}, {7: 5.0}, {}, {8: 0.0}]
    assert got[2].ack.seq == 1


@pytest.mark.timeout(60)
def test_a_stop_ends_a_stream_whose_pull_the_logic_never_answers(procs: Processes) -> None:
    stub, service = start_logic_service(procs, "examples.lock_server:LockServer")
    holder, waiter = Stream(stub), Stream(stub)
    holder.send(pull=(1, [7], 0))
    assert pulled(next(holder.answers())) == {7: 0.0}
    waiter.send(pull=(1, [7], 1))  # waits for a push that never comes
    await_pull_requests(stub, 2)

    service.process.send_signal(signal.SIGTERM)

    with pytest.raises(grpc.RpcError) as ended:
        next(waiter.answers())
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ended.value.details() == "shard 0 is shutting down"
    assert service.process.wait(timeout=20) == 0


def test_an_answer_skips_a_pull_whose_stream_ended() -> None:
    store = LogicStore(LockServer(), "lock", make_init("const:0"), make_update("add"), 0, 1)
    held: list[Any] = []
    dropped: list[Any] = []
    again: list[Any] = []
    store.pull_logic([7], 0, held.append)  # worker 0 takes the lock
    dead = store.pull_logic([7], 1, dropped.append)
    dead.dropped = True  # as the shard does when its stream ends
    store.pull_logic([7], 1, again.append)  # worker 1 sends it again on a new stream
    assert store.handle.waiting() == 1

    store.push_rows(decode_rows_of([7], [5.0]))  # worker 0 pushes it back: the lock goes to worker 1

    assert [decode_rows(batches) for batches in held + again] == [([7], [0.0]), ([7], [5.0])]
    assert dropped == []
    assert store.handle.waiting() == 0


@pytest.mark.timeout(180)
def test_a_lock_server_loses_no_update_of_many_workers() -> None:
    records = [i % 3 for i in range(300)]

    seen, counts = count(records, workers=4, shards=2)

    expected = Counter(records)
    assert counts == dict(expected)
    # Each increment saw its own value: the n increments of a counter saw 0, 1, ..., n-1.
    for counter, total in expected.items():
        assert sorted(v for c, v in seen if c == counter) == list(range(total))


class PushEach(WorkerLogic):
    """Each record (id, delta) is pushed."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push(data[0], data[1])

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("never pulls")


@pytest.mark.parametrize(
    ("logic", "message"),
    [
        (
            FailingPush,
            "worker 0: shard 0 at 127.0.0.1:PORT failed: FAILED_PRECONDITION: "
            "server logic FailingPush.on_push_recv for id 0 failed: ValueError: negative delta -2.0",
        ),
        (
            FailingClose,
            "server logic outputs of shard 0 at 127.0.0.1:PORT failed: FAILED_PRECONDITION: "
            "server logic FailingClose.close failed: RuntimeError: cannot close",
        ),
    ],
)
@pytest.mark.timeout(120)
def test_a_logic_that_raises_fails_the_job_in_one_line_naming_shard_and_callback(logic: type, message: str) -> None:
    with pytest.raises(StreampsError) as raised:
        list(transform([(0, 1.0), (0, -2.0)], PushEach, "const:0", "add", ps_logic=logic))
    assert re.sub(r":\d+ failed", ":PORT failed", str(raised.value)) == message


@pytest.mark.timeout(60)
def test_a_logic_whose_open_raises_stops_the_shard_in_one_line(procs: Processes) -> None:
    process, stderr_path = procs.popen(
        shard_argv(0, 1, "const:0", "add", "WARNING", "--logic", "server_logics:FailingOpen")
    )
    process.communicate(timeout=60)

    assert process.returncode == 1
    assert stderr_path.read_text(encoding="utf-8").splitlines() == [
        "psserver: error: shard 0: server logic FailingOpen.open failed: OSError: no such table"
    ]


@pytest.mark.timeout(120)
def test_transform_yields_the_logics_outputs_as_rights_from_every_shard() -> None:
    records = [(i, 1.0) for i in range(10)] * 2
    rights = [
        item.value
        for item in transform(records, PushEach, "const:0", "add", 2, 2, ps_logic=Counting())
        if isinstance(item, Right)
    ]

    calls = [value for key, value in rights if key == "calls"]
    assert sorted(c["on_push_recv"] for c in calls) == [10, 10]
    assert {key: value for key, value in rights if key != "calls"} == {i: 2.0 for i in range(10)}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuchmodule:Logic", "psserver: error: server logic 'nosuchmodule:Logic': no module named 'nosuchmodule'"),
        (
            "server_logics:Nope",
            "psserver: error: server logic 'server_logics:Nope': 'server_logics' has no attribute 'Nope'",
        ),
        ("logics:Exactness", "psserver: error: server logic 'logics:Exactness' is not a ServerLogic subclass"),
    ],
)
@pytest.mark.timeout(120)
def test_a_bad_logic_spec_is_one_line_and_exit_2(spec: str, message: str, procs: Processes) -> None:
    process, stderr_path = procs.popen(shard_argv(0, 1, "const:0", "add", "WARNING", "--logic", spec))
    process.communicate(timeout=60)

    assert process.returncode == 2
    assert stderr_path.read_text(encoding="utf-8").splitlines() == [message]


@pytest.mark.timeout(60)
def test_a_logic_cannot_have_a_data_dir(procs: Processes, tmp_path: Any) -> None:
    argv = shard_argv(
        0, 1, "const:0", "add", "WARNING", "--logic", "server_logics:Counting", "--data-dir", str(tmp_path)
    )
    process, stderr_path = procs.popen(argv)
    process.communicate(timeout=60)

    assert process.returncode == 2
    assert stderr_path.read_text(encoding="utf-8").splitlines() == [
        "psserver: error: --logic cannot be used with --data-dir: a server logic keeps its own state, "
        "which the shard does not log or load"
    ]
    with pytest.raises(ValueError, match="ps_logic cannot be combined with durable or data_dir"):
        transform([], PushEach, "const:0", "add", ps_logic=Counting, durable=True)


@pytest.mark.timeout(120)
def test_connect_pulls_and_pushes_through_a_logic_and_streams_its_outputs(procs: Processes) -> None:
    _, service = start_logic_service(procs, "server_logics:Counting")
    with connect([service.address]) as cluster:
        cluster.push([1, 2, 1], [1.0, 2.0, 3.0])
        assert cluster.pull([1, 2, 3]) == [4.0, 2.0, 0.0]
        # No workers: the stream is the logic's outputs, as the shard's Info says it has one.
        items = list(cluster.stream())

    assert items == [
        Right(("calls", {"open": 1, "on_pull_recv": 3, "on_push_recv": 3})),
        Right((1, 4.0)),
        Right((2, 2.0)),
    ]
    with connect([service.address]) as cluster:
        assert list(cluster.snapshot()) == []  # the logic holds the parameters


class AnswersThenChanges(ServerLogic):
    """Answers with its one array, then changes that array in place."""

    def __init__(self) -> None:
        self.array = np.zeros(2)

    def on_pull_recv(self, param_id: Any, worker_index: int, ps: Any) -> None:
        ps.answer_pull(param_id, self.array, worker_index)
        self.array += 1

    def on_push_recv(self, param_id: Any, delta: Any, ps: Any) -> None:
        raise AssertionError("never pushed")


def test_an_answer_is_the_value_when_answered_not_when_the_pull_leaves() -> None:
    store = LogicStore(AnswersThenChanges(), "changes", make_init("zeros:2"), make_update("add"), 0, 1)
    answers: list[Any] = []
    store.pull_logic([1, 2], 0, answers.append)

    ((ids, values),) = [decode_rows(batches) for batches in answers]
    assert ids == [1, 2]
    assert [value.tolist() for value in values] == [[0.0, 0.0], [1.0, 1.0]]


@pytest.mark.timeout(180)
def test_psclient_run_with_a_server_logic_writes_its_outputs_as_the_model(tmp_path: Path, procs: Processes) -> None:
    data = tmp_path / "counters.txt"
    data.write_text("a\nb\na\na\nc\nb\n" * 10, encoding="utf-8")
    model = tmp_path / "model.jsonl"
    argv = [
        sys.executable, "-m", "psclient", "run", "--logic", "examples.lock_server:locked_counter",
        "--ps-logic", "examples.lock_server:LockServer", "--input", str(data), "--format", "lines",
        "--init", "const:0", "--update", "replace", "--workers", "3", "--shards", "2",
        "--output", str(tmp_path / "outputs.jsonl"), "--model", str(model),
    ]  # fmt: skip
    process, stderr_path = procs.popen(argv)
    process.communicate(timeout=120)

    stderr = stderr_path.read_text(encoding="utf-8")
    assert process.returncode == 0, stderr
    assert sorted(json.loads(line) for line in model.read_text(encoding="utf-8").splitlines()) == [
        ["a", 30],
        ["b", 20],
        ["c", 10],
    ]
    assert "60 records, 60 outputs, 3 server logic outputs in" in stderr


@pytest.mark.timeout(120)
def test_the_workers_logic_variable_is_not_the_shards(procs: Processes, monkeypatch: pytest.MonkeyPatch) -> None:
    # A deployment sets STREAMPS_LOGIC for every pod (deploy/k8s/configmap.yaml): shards ignore it.
    monkeypatch.setenv("STREAMPS_LOGIC", "examples.online_mf:OnlineMF")
    plain = procs.start_server(shard_argv(0, 1, "const:0", "add"))
    monkeypatch.setenv("STREAMPS_SERVER_LOGIC", "server_logics:Counting")
    with_logic = procs.start_server(shard_argv(0, 1, "const:0", "add"))

    for service, logic in ((plain, ""), (with_logic, "server_logics:Counting")):
        with connect([service.address]) as cluster:
            assert [info.logic for info in cluster.info()] == [logic]  # type: ignore[union-attr]
