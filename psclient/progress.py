"""The live progress bar of a local job (`transform`, `psclient run`): outputs, records fed."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

# How often the bar is redrawn at most; more often only costs the job time.
REFRESH_S = 0.5


class JobProgress:
    """Counts records fed and outputs received, and shows them on stderr.

    `enabled=None` shows the bar only when stderr is a terminal, so logs and
    pipes stay free of it. Records are counted on the feeding thread, outputs on
    the reading one; tqdm serializes its own redraws.
    """

    def __init__(self, enabled: bool | None = None):
        from tqdm import tqdm  # here, so that importing psclient stays light

        self.records = 0
        shown = sys.stderr.isatty() if enabled is None else enabled
        self._bar = tqdm(
            desc="outputs", unit="", unit_scale=True, file=sys.stderr, mininterval=REFRESH_S, disable=not shown
        )
        self._shown_records_at = time.monotonic()

    def count(self, records: Iterable[T]) -> Iterator[T]:
        """`records`, counted as they are taken (as they are, when no bar is shown)."""
        if self._bar.disable:
            return iter(records)
        return self._counted(records)

    def _counted(self, records: Iterable[T]) -> Iterator[T]:
        for record in records:
            self.records += 1
            # A job whose outputs come late still shows its input moving.
            now = time.monotonic()
            if now - self._shown_records_at >= REFRESH_S:
                self._shown_records_at = now
                self._bar.set_postfix(records=f"{self.records:,}")
            yield record

    def output(self) -> None:
        self._bar.update()

    def close(self) -> None:
        self._bar.set_postfix(records=f"{self.records:,}", refresh=False)
        self._bar.close()
