"""A file or stdin as a source: this worker's share of its lines (psclient/inputs.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from psclient.inputs import InputSpec, read_share
from psworker.sources.base import Chunk, Source, SourceContext, SourceError

# Records per chunk the reader hands to the worker's input queue.
FILE_CHUNK = 256


class FileSource(Source):
    """Lines are positions, in every run the same: a restarted worker reads on after its checkpoint."""

    position_name = "line"

    def __init__(self, path: str, context: SourceContext):
        self.path = path
        self.context = context

    def describe(self) -> str:
        return "stdin" if self.path == "-" else self.path

    def open(self) -> None:
        if self.path != "-" and not Path(self.path).is_file():
            raise SourceError(f"--input {self.path}: no such file")

    def read(self) -> Iterator[Chunk]:
        context = self.context
        spec = InputSpec(self.path, context.fmt, context.partition_key, context.skip_header)
        chunk: Chunk = []
        try:
            for item in read_share(spec, context.worker_index, context.num_workers):
                chunk.append(item)
                if len(chunk) >= FILE_CHUNK:
                    yield chunk
                    chunk = []
        except (OSError, UnicodeDecodeError) as exc:
            if chunk:
                yield chunk
            raise SourceError(f"cannot read {self.describe()}: {exc}") from exc
        if chunk:
            yield chunk
