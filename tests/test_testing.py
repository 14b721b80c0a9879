"""psworker.testing: the in-process client gives exact values; check_logic names the failed check."""

from __future__ import annotations

import random
import threading
from typing import Any

import numpy as np
import pytest
from clock_logics import Epochs

from psclient.errors import WireError
from psclient.specs import UserFunctionError
from psworker import WorkerLogic, with_pull_limit
from psworker.checks import InvalidDelta
from psworker.testing import InProcessClient, LogicCheckFailed, check_logic


class Additive(WorkerLogic):
    """Records are (id, amount): push it, pull the id back, output (id, value)."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push(data[0], data[1])
        ps.pull(data[0])

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        ps.output((param_id, param_value))


class Tally(WorkerLogic):  # README's example
    def __init__(self) -> None:
        self.keys: set[Any] = set()

    def on_recv(self, data: Any, ps: Any) -> None:
        key, amount = data
        ps.push(key, amount)
        self.keys.add(key)

    def on_input_end(self, ps: Any) -> None:
        for key in sorted(self.keys, key=str):
            ps.pull(key)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        ps.output(f"worker {ps.worker_index}: {param_id} = {param_value}")


class Forever(Additive):
    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        ps.pull(param_id)


class Unseeded(Additive):
    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        ps.push(param_id, random.random())


class HoldsALock(Additive):
    def __init__(self) -> None:
        self.lock = threading.Lock()


class Many(WorkerLogic):
    def on_recv(self, data: Any, ps: Any) -> None:
        ids = np.asarray(data, dtype=np.int64)
        ps.push_many(ids, np.ones((len(ids), 2), dtype=np.float32))
        ps.pull_many(ids)

    def on_pull_recv_many(self, ids: Any, values: np.ndarray, ps: Any) -> None:
        ps.output((ids.tolist(), values.tolist(), values.dtype.str))

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("answers go to on_pull_recv_many")


RECORDS = [("apples", 3), ("pears", 1), ("apples", 2), (7, 10), ("pears", 4), (7, -1)]


def test_additive_logic_exact_values() -> None:
    outputs, model = InProcessClient("const:0", "add").run(Additive(), [(1, 2), (1, 3), ("a", 0.5), (1, -1)])
    assert outputs == [(1, 2), (1, 5), ("a", 0.5), (1, 4)]
    assert model == {1: 4, "a": 0.5}
    assert type(model[1]) is int


def test_readme_tally() -> None:
    outputs, model = InProcessClient(lambda _id: 0, lambda old, delta: old + delta).run(Tally(), RECORDS)
    assert outputs == ["worker 0: 7 = 9", "worker 0: apples = 5", "worker 0: pears = 5"]
    assert model == {"apples": 5, "pears": 5, 7: 9}


def test_pulls_are_answered_after_the_callback_and_in_order() -> None:
    client = InProcessClient("const:0")
    logic = Additive()
    logic.on_recv((3, 1), client)
    assert client.outputs == [] and client.pending == [3]
    assert client.drain(logic) == 1
    assert client.outputs == [(3, 1)]


def test_batch_calls_vector_init_and_pull_limit() -> None:
    client = InProcessClient("zeros:2", "add")
    outputs, model = client.run(with_pull_limit(Many(), 2), [[5, 6, 7]])
    assert outputs == [([5, 6], [[1.0, 1.0], [1.0, 1.0]], "<f4"), ([7], [[1.0, 1.0]], "<f4")]
    assert sorted(model) == [5, 6, 7] and model[5].dtype == np.float32


def test_same_delta_checks_as_the_runtime() -> None:
    client = InProcessClient()
    with pytest.raises(InvalidDelta, match="to id 1: a delta must be finite"):
        client.push(1, float("nan"))
    with pytest.raises(InvalidDelta, match=r"row 1 of 2\) to id 8"):
        client.push_many([7, 8], np.array([1.0, np.inf]))
    assert client.model == {}


def test_check_logic_passes_on_a_good_logic() -> None:
    check_logic(Additive(), [(1, 2), ("a", 1)])
    check_logic(Tally, RECORDS, param_init=lambda _id: 0, param_update=lambda old, delta: old + delta)


def test_check_logic_a_logic_that_never_ends() -> None:
    message = (
        r"^check_logic: Forever is not ending on a finite input: "
        r"Forever still pulls after 1000 answered pulls \(pending: \[1\]\): it does not end$"
    )
    with pytest.raises(LogicCheckFailed, match=message):
        check_logic(Forever(), [(1, 2)], max_answers=1000)


def test_check_logic_a_logic_that_is_not_deterministic() -> None:
    with pytest.raises(LogicCheckFailed, match=r"^check_logic: Unseeded is not deterministic: two runs give "
                       r"different models \(ids \[1\]\)$"):  # fmt: skip
        check_logic(Unseeded(), [(1, 2)], param_init="const:0.0")


def test_check_logic_a_logic_that_cannot_be_pickled() -> None:
    with pytest.raises(LogicCheckFailed, match=r"^check_logic: HoldsALock is not serializable: the cloudpickle "
                       r"round trip raised TypeError\(\"cannot pickle '_thread.lock' object\"\)$"):  # fmt: skip
        check_logic(HoldsALock(), [(1, 2)])


def test_check_logic_a_logic_that_outputs_on_an_empty_input() -> None:
    class Hello(Additive):
        def on_input_end(self, ps: Any) -> None:
            ps.output("hello")

    with pytest.raises(LogicCheckFailed, match=r"is not fine with an empty input: .*\['hello'\]$"):
        check_logic(Hello(), [(1, 2)])
    check_logic(Hello(), [(1, 2)], summary=lambda out: out == "hello")


def test_check_logic_a_logic_that_raises_or_pushes_nan() -> None:
    with pytest.raises(LogicCheckFailed, match=r"^check_logic: Additive is not ending on a finite input: it raised "
                       r"InvalidDelta\('push of nan \(float\) to id 1: a delta must be finite"):  # fmt: skip
        check_logic(Additive(), [(1, float("nan"))])


def test_one_by_one_answers_each_id_when_its_turn_comes() -> None:
    class PullTwicePushOnFirst(WorkerLogic):
        def on_recv(self, data: Any, ps: Any) -> None:
            ps.pull_many([1, 1])

        def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
            ps.output(param_value)
            ps.push(param_id, 1)

        def on_pull_recv_many(self, ids: Any, values: np.ndarray, ps: Any) -> None:
            ps.output(values.tolist())

    batched, _ = InProcessClient().run(PullTwicePushOnFirst(), [None])
    sequential, model = InProcessClient(one_by_one=True).run(PullTwicePushOnFirst(), [None])
    assert batched == [[0, 0]]
    assert sequential == [0, 1] and model == {1: 2}


# -- the store is a shard's: what a shard refuses, the client refuses ------------------


def test_a_scalar_delta_into_a_vector_parameter_is_refused_as_by_a_shard() -> None:
    client = InProcessClient("zeros:2", "add")
    with pytest.raises(WireError, match=r"^delta shape \(\) does not match parameter shape \(2,\)$"):
        client.push(1, 1.0)
    np.testing.assert_array_equal(client.value(1), np.zeros(2, dtype=np.float32))


def test_a_user_update_that_returns_no_number_is_refused_as_by_a_shard() -> None:
    def to_text(old: Any, delta: Any) -> Any:
        return f"{old}+{delta}"

    client = InProcessClient("const:0", to_text)
    with pytest.raises(UserFunctionError, match=r"returned str of dtype <U3 for id 'a', not a number$"):
        client.push("a", 1)
    assert client.model == {}  # the shard is left untouched


def test_pull_answers_come_in_one_call_per_dtype_as_from_the_runtime() -> None:
    class PushesThenPulls(WorkerLogic):
        def on_recv(self, data: Any, ps: Any) -> None:
            ps.push(1, 2)  # stays int
            ps.push(2, 0.5)  # an int parameter given a float delta becomes a float
            ps.push("s", 3)
            ps.pull_many([1, 2, 3, "s"])

        def on_pull_recv_many(self, ids: Any, values: np.ndarray, ps: Any) -> None:
            ps.output((ids if isinstance(ids, list) else ids.tolist(), values.tolist(), values.dtype.str))

    outputs, model = InProcessClient().run(PushesThenPulls(), [None])
    assert outputs == [([1, 3], [2, 0], "<i8"), (["s"], [3], "<i8"), ([2], [0.5], "<f8")]
    assert model == {1: 2, 2: 0.5, "s": 3, 3: 0}
    assert list(model) == [1, 2, "s", 3]  # in order of creation


def test_setting_a_parameter_in_the_model_view() -> None:
    client = InProcessClient("zeros:2", "add")
    client.model["w"] = np.array([1.0, 2.0], dtype=np.float32)
    client.push("w", np.array([0.5, 0.5], dtype=np.float32))
    np.testing.assert_array_equal(client.model["w"], [1.5, 2.5])
    assert "w" in client.model and 1 not in client.model


def test_the_in_process_client_counts_clock_advances() -> None:
    client = InProcessClient("const:0")
    _, model = client.run(Epochs(), [{"w": 0, "e": epoch, "k": 1} for epoch in range(3)])
    assert client.clock == 2  # epochs 1 and 2 each advanced it once
    assert model == {1: 3.0}
