"""A job's consistency model: `async`, `bsp` or `ssp:S` (psserver/psworker --consistency).

Each worker keeps a logical clock, which its logic advances with
`ps.advance_clock()`. Under SSP with staleness S, a shard holds back the
answer to a pull of a worker whose clock is more than S ahead of the slowest
unfinished worker's, until that one catches up; BSP is S = 0; async never
holds. The staleness is what the shards and workers of a job must agree on.
"""

from __future__ import annotations

from psclient.errors import SpecError


def parse_consistency(spec: str) -> int | None:
    """The staleness bound of a consistency spec: None for async, 0 for bsp, S for ssp:S."""
    if not isinstance(spec, str):
        raise SpecError(f"unknown consistency {spec!r}: use async, bsp or ssp:S with S >= 0")
    text = spec.strip().lower()
    if text == "async":
        return None
    if text == "bsp":
        return 0
    if text.startswith("ssp:"):
        try:
            staleness = int(text[4:])
        except ValueError:
            staleness = -1
        if staleness >= 0:
            return staleness
    raise SpecError(f"unknown consistency {spec!r}: use async, bsp or ssp:S with S >= 0")


def consistency_name(staleness: int | None) -> str:
    """The canonical spec of a staleness bound (what Info reports and workers compare)."""
    if staleness is None:
        return "async"
    return "bsp" if staleness == 0 else f"ssp:{staleness}"
