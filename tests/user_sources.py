"""Sources of a user's own, importable as `user_sources:Name` by psworker children
(`psworker --input module:attr`)."""

from __future__ import annotations

from collections.abc import Iterator

from psclient.inputs import MalformedRecord
from psworker.sources import Chunk, Source, SourceContext


class Numbers(Source):
    """Records 1..1000, worker I of W taking those equal to I modulo W; 500 is malformed."""

    def __init__(self, context: SourceContext):
        self.context = context

    def read(self) -> Iterator[Chunk]:
        mine = [n for n in range(1, 1001) if n % self.context.num_workers == self.context.worker_index]
        for start in range(0, len(mine), 100):
            yield [(n, MalformedRecord(f"number {n} is unlucky") if n == 500 else n) for n in mine[start : start + 100]]


class Broken(Source):
    def __init__(self, context: SourceContext):
        pass

    def read(self) -> Iterator[Chunk]:
        yield [(1, 1)]
        raise RuntimeError("the feed went away")


def not_a_source(context: SourceContext) -> int:
    return 5


NOT_CALLABLE = 42
