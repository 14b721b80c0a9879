"""psworker.logic.load_logic: the WorkerLogic that --logic names, checked to be one, or one line."""

from __future__ import annotations

import pytest
from conftest import Processes, run_psworker

from psclient.errors import SpecError
from psworker.logic import WorkerLogic, load_logic, with_pull_limit

BROKEN_INIT = "logic 'logics:BrokenInit': BrokenInit() raised ValueError: rank must be positive"


@pytest.mark.parametrize("spec", ["logics:WordCount", "logics:word_count"])
def test_a_subclass_or_a_factory_gives_a_fresh_logic(spec: str) -> None:
    first, second = load_logic(spec), load_logic(spec)

    assert type(first).__name__ == "WordCount"
    assert isinstance(first, WorkerLogic) and first is not second


def test_an_instance_is_taken_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    import logics

    instance = with_pull_limit(logics.WordCount(), 3)
    monkeypatch.setattr(logics, "AN_INSTANCE", instance, raising=False)

    assert load_logic("logics:AN_INSTANCE") is instance


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("logics:defaultdict", "logic 'logics:defaultdict' is not a WorkerLogic subclass"),
        ("logics:ANSWER", "logic 'logics:ANSWER' is not a WorkerLogic, a subclass of it, or a factory of one"),
        ("logics:not_a_logic", "logic 'logics:not_a_logic' is not a WorkerLogic, a subclass of it, or a factory of "
                               "one (calling it returned a value of type dict)"),
        ("logics:BrokenInit", BROKEN_INIT),
        ("logics:NoSuch", "logic 'logics:NoSuch': 'logics' has no attribute 'NoSuch'"),
        ("nosuch:Thing", "logic 'nosuch:Thing': no module named 'nosuch'"),
        ("logics", "logic 'logics' is not of the form module:attr"),
    ],
)  # fmt: skip
def test_anything_else_is_one_line_naming_the_spec(spec: str, message: str) -> None:
    with pytest.raises(SpecError) as refused:
        load_logic(spec)

    assert str(refused.value) == message


@pytest.mark.timeout(120)
def test_a_logic_whose_constructor_raises_exits_2_with_one_line(procs: Processes) -> None:
    code, stdout, stderr = run_psworker(procs, "--logic", "logics:BrokenInit", "--worker-index", "0",
                                        "--num-workers", "1")  # fmt: skip

    assert code == 2
    assert stdout == []
    assert stderr == [
        "psworker: error: logic 'logics:BrokenInit': BrokenInit() raised ValueError: rank must be positive"
    ]
