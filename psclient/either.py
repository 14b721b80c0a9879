"""`Left` and `Right`: the two kinds of item in a job's result stream.

A job yields `Left(output)` for every worker output, while they arrive, and then
`Right((id, value))` for every parameter of the final model. Both are frozen
dataclasses, so `match` works on them:

    match item:
        case Left(out): ...
        case Right((param_id, value)): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

L = TypeVar("L")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Left(Generic[L]):
    """A worker output."""

    value: L


@dataclass(frozen=True, slots=True)
class Right(Generic[R]):
    """A parameter of the final model: `Right((id, value))`."""

    value: R


Either = Left[L] | Right[R]
