"""Server logic answers that cannot reach their pull: a pull sent again on a new stream while
the old one still looks open, and answers with a value that is not a numeric array."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest
from conftest import Processes
from logic_streams import Stream, await_pull_requests, decode_rows_of, logic_outputs, pulled, start_logic_service
from server_logics import AnswersOnPush

from psclient import connect
from psclient.errors import StreampsError
from psclient.specs import UserFunctionError, make_init, make_update
from psclient.wire.codec import decode_rows
from psserver import ServerLogic
from psserver.logic import LogicStore

# A pull that is never answered fails its read after this long, rather than hanging the test.
READ_TIMEOUT_S = 15.0


def failure(stream: Stream) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as ended:
        next(stream.answers())
    return ended.value.code(), ended.value.details()


@pytest.mark.timeout(90)
def test_a_pull_sent_again_on_a_new_stream_takes_the_answer_from_the_stream_it_left(procs: Processes) -> None:
    stub, _ = start_logic_service(procs, "examples.lock_server:LockServer")
    holder, left, again = (Stream(stub, READ_TIMEOUT_S) for _ in range(3))
    holder.send(pull=(1, [7], 0))  # worker 0 takes the lock
    assert pulled(next(holder.answers())) == {7: 0.0}
    left.send(pull=(5, [7], 1))  # worker 1 waits for it on a stream that then goes silent...
    await_pull_requests(stub, 2)
    again.send(pull=(5, [7], 1))  # ... and sends the same pull again on a new one
    await_pull_requests(stub, 3)

    holder.send(push=(1, [7], [4.0]))  # worker 0 pushes it back: the lock goes to worker 1

    assert next(holder.answers()).ack.seq == 1
    answer = next(again.answers())
    assert (answer.pull.request_id, pulled(answer)) == (5, {7: 4.0})
    assert failure(left) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "pull request 5 of worker 1 was sent again on another stream",
    )
    # The logic saw one pull by worker 1, not two: its push frees the lock for worker 0.
    again.send(push=(1, [7], [9.0]), worker_id="job-w1")
    assert next(again.answers()).ack.seq == 1
    holder.send(pull=(2, [7], 0))
    assert pulled(next(holder.answers())) == {7: 9.0}
    holder.send(push=(2, [7], [10.0]))
    assert next(holder.answers()).ack.seq == 2
    for stream in (holder, again):
        stream.close()
    assert logic_outputs(stub) == [(7, 10.0)]


@pytest.mark.timeout(90)
def test_a_pull_sent_again_with_other_ids_is_another_pull(procs: Processes) -> None:
    # A restarted worker counts its requests from 1 again: same request id, not the same pull.
    stub, _ = start_logic_service(procs, "server_logics:AnswersOnPush")
    first, second = Stream(stub, READ_TIMEOUT_S), Stream(stub, READ_TIMEOUT_S)
    first.send(pull=(1, [7], 1))
    await_pull_requests(stub, 1)
    second.send(pull=(1, [8], 1))
    await_pull_requests(stub, 2)

    first.send(push=(1, [7, 8], [3.0, 4.0]))

    answer, ack = next(first.answers()), next(first.answers())
    assert (answer.pull.request_id, pulled(answer), ack.ack.seq) == (1, {7: 3.0}, 1)
    assert pulled(next(second.answers())) == {8: 4.0}
    first.close()
    second.close()


BAD_ANSWERS = [
    (0.0, "got a str of dtype <U4, not a number or numeric array"),
    (1.0, "got a list that is not one array (ragged, or of mixed kinds), not a number or numeric array"),
]


@pytest.mark.parametrize(("delta", "got"), BAD_ANSWERS)
@pytest.mark.timeout(90)
def test_a_bad_answer_fails_the_callback_that_gave_it_and_the_pull_it_was_for(
    delta: float, got: str, procs: Processes
) -> None:
    stub, _ = start_logic_service(procs, "server_logics:AnswersOnPush")
    waiter, pusher = Stream(stub, READ_TIMEOUT_S), Stream(stub, READ_TIMEOUT_S)
    waiter.send(pull=(1, [7], 1))
    await_pull_requests(stub, 1)

    pusher.send(push=(1, [7], [delta]))

    line = f"server logic AnswersOnPush.on_push_recv for id 7 failed: TypeError: answer_pull for id 7 of worker 1 {got}"
    assert failure(pusher) == (grpc.StatusCode.FAILED_PRECONDITION, line)
    assert failure(waiter) == (grpc.StatusCode.FAILED_PRECONDITION, line)


@pytest.mark.timeout(90)
def test_a_bad_answer_the_logic_catches_still_fails_the_pull_it_was_for(procs: Processes) -> None:
    stub, _ = start_logic_service(procs, "server_logics:CatchesBadAnswers")
    waiter, pusher = Stream(stub, READ_TIMEOUT_S), Stream(stub, READ_TIMEOUT_S)
    waiter.send(pull=(1, [7], 1))
    waiter.send(pull=(2, [8], 1))  # behind the failing one: never answered
    await_pull_requests(stub, 2)

    pusher.send(push=(1, [7, 8], [0.0, 5.0]))

    assert next(pusher.answers()).ack.seq == 1
    assert failure(waiter) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "server logic CatchesBadAnswers.on_push_recv for id 7 failed: TypeError: "
        "answer_pull for id 7 of worker 1 got a str of dtype <U4, not a number or numeric array",
    )
    pusher.send(pull=(1, [9], 0))  # the pusher's stream goes on
    pusher.send(push=(2, [9], [2.0]))
    assert [pulled(next(pusher.answers())) for _ in range(2)] == [{9: 2.0}, {}]
    pusher.close()


@pytest.mark.timeout(90)
def test_a_bad_answer_to_the_pull_being_received_fails_its_stream_once(procs: Processes) -> None:
    stub, _ = start_logic_service(procs, "server_logics:CatchesBadAnswers")
    stream = Stream(stub, READ_TIMEOUT_S)
    stream.send(push=(1, [7], [1.5]))
    stream.send(pull=(1, [100, 101], 0))  # the logic is not asked for 101: the pull failed

    assert next(stream.answers()).ack.seq == 1  # the push before it is still acknowledged
    assert failure(stream) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "server logic CatchesBadAnswers.on_pull_recv for id 100 failed: TypeError: "
        "answer_pull for id 100 of worker 0 got a str of dtype <U3, not a number or numeric array",
    )


@pytest.mark.timeout(90)
def test_a_bad_answer_fails_a_pull_of_the_pull_stream(procs: Processes) -> None:
    stub, service = start_logic_service(procs, "server_logics:AnswersOnPush")
    raised: list[BaseException] = []

    def pull() -> None:
        with connect([service.address]) as cluster:
            try:
                cluster.pull([7])
            except StreampsError as exc:
                raised.append(exc)

    puller = threading.Thread(target=pull)
    puller.start()
    await_pull_requests(stub, 1)
    pusher = Stream(stub, READ_TIMEOUT_S)
    pusher.send(push=(1, [7], [0.0]))
    puller.join(timeout=READ_TIMEOUT_S)

    assert not puller.is_alive()
    assert [str(exc).split(": FAILED_PRECONDITION: ", 1)[1] for exc in raised] == [
        "server logic AnswersOnPush.on_push_recv for id 7 failed: TypeError: "
        "answer_pull for id 7 of worker 0 got a str of dtype <U4, not a number or numeric array"
    ]


class AnswersShapesAndLists(ServerLogic):
    """Answers id n with a list of n ones, then changes that list in place."""

    def on_pull_recv(self, param_id: Any, worker_index: int, ps: Any) -> None:
        value = [1.0] * param_id
        ps.answer_pull(param_id, value, worker_index)
        value[0] = -1.0

    def on_push_recv(self, param_id: Any, delta: Any, ps: Any) -> None:
        raise AssertionError("never pushed")


def test_the_ids_of_one_pull_may_have_answers_of_other_shapes_each_as_answered() -> None:
    store = LogicStore(AnswersShapesAndLists(), "shapes", make_init("zeros:2"), make_update("add"), 0, 1)
    answers: list[Any] = []
    store.pull_logic([2, 3], 0, answers.append)

    ((ids, values),) = [decode_rows(batches) for batches in answers]
    assert ids == [2, 3]
    assert [value.tolist() for value in values] == [[1.0, 1.0], [1.0, 1.0, 1.0]]


def test_a_refused_answer_fails_its_pull_with_the_callbacks_line_and_takes_no_other() -> None:
    store = LogicStore(AnswersOnPush(), "bad", make_init("const:0"), make_update("add"), 0, 1)
    got: list[Any] = []
    refused: list[str] = []
    store.pull_logic([7, 8], 1, got.append, refused.append)

    with pytest.raises(UserFunctionError) as raised:
        store.push_rows(decode_rows_of([7], [0.0]))
    with pytest.raises(UserFunctionError) as later:  # the pull failed: no later answer goes to it
        store.push_rows(decode_rows_of([8], [2.0]))

    line = (
        "server logic AnswersOnPush.on_push_recv for id 7 failed: TypeError: "
        "answer_pull for id 7 of worker 1 got a str of dtype <U4, not a number or numeric array"
    )
    assert (str(raised.value), refused, got) == (line, [line], [])
    assert str(later.value) == (
        "server logic AnswersOnPush.on_push_recv for id 8 failed: "
        "ValueError: no pull of id 8 by worker 1 is waiting for an answer"
    )
    assert store.handle.waiting() == 0


@pytest.mark.parametrize(
    ("push", "code", "details"),
    [
        (
            (1, [8], [-1.0]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "server logic FailingLock.on_push_recv for id 8 failed: ValueError: negative value -1.0",
        ),
        ((1, [8], [float("nan")]), grpc.StatusCode.INVALID_ARGUMENT, "batch holds NaN or Inf values"),
    ],
)
@pytest.mark.timeout(90)
def test_a_stream_that_fails_while_its_pull_waits_for_the_logic_ends_at_once(
    push: tuple[int, list[Any], list[Any]], code: grpc.StatusCode, details: str, procs: Processes
) -> None:
    stub, _ = start_logic_service(procs, "server_logics:FailingLock")
    holder, waiter = Stream(stub, READ_TIMEOUT_S), Stream(stub, READ_TIMEOUT_S)
    holder.send(pull=(1, [7], 0))
    assert pulled(next(holder.answers())) == {7: 0.0}
    waiter.send(push=(1, [9], [1.0]), worker_id="job-w1")
    waiter.send(pull=(1, [7], 1))  # waits for the lock worker 0 holds
    await_pull_requests(stub, 2)

    waiter.send(push=(push[0] + 1, push[1], push[2]), worker_id="job-w1")

    assert next(waiter.answers()).ack.seq == 1  # answered before the waiting pull: still sent
    assert failure(waiter) == (code, details)
    holder.close()
