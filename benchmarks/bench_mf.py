"""Online biased matrix factorization: streamps side by side with a numpy loop, Ray and Redis.

The job (benchmarks/mf_common.py): MovieLens 100K (100,000 ratings, 943 users,
1,682 items) in timestamp order, one pass, rank 16, learning rate 0.02, L2
0.02, item parameters of 17 float32 ([vector, bias], init normal std 0.1),
users kept by the worker that owns them (records partitioned by user). Every
implementation runs the same per-rating SGD step and reports ratings per
second and the prequential RMSE over all 100,000 predictions (each made
before its rating is learned from).

W is the staleness bound, the same for every row that has one: a peer worker
drives its ratings in windows of W (one batched pull per shard, the step on
local copies, one batched push that is not waited on, at most one window's
push in flight, all pushes awaited at the end). streamps runs two logics:
"streamps, per key" is `with_pull_limit(StreamMF(), W)`, the job written the
natural way (a pull per rating's item, a push per answer), where the limit
bounds the items in flight: a rating for an item already on its way waits
with it, so it may hold more than W ratings in flight, the more so the longer
a pull takes; "streamps, windows" is `WindowMF(W)`, the peers' algorithm on
the batch API (`pull_many` of a window's items, `on_pull_recv_many`,
`push_many`; benchmarks/streamps_mf.py). The loop has no staleness.

Every row is the median of 3 runs (ratings/s and RMSE each), measured in
rounds that run every row once, so that the machine's noise hits all of them
alike. The ratio columns divide a row's ratings/s by the loop's and by those
of the Ray and Redis rows at the same W.

Start-up is excluded for every implementation: streamps' shard and worker
processes, Ray's runtime and actors, redis-server and the Redis worker
processes are all up before the clock starts. The clock covers handing the
ratings to the workers, the job, and the wait for every push to be applied;
it stops before any final model is read.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import streamps_mf
from benchmarks.mf_common import WINDOWS, Ratings, movielens_by_time
from benchmarks.peers import loop, ray_ps, redis_ps

HEADLINE_WINDOW = 256
REPEATS = 3
# streamps at pull limit 1 answers every pull before the next record, so it must
# reproduce the loop's errors; this many ratings keep that check short.
CHECK_RATINGS = 5_000
RMSE_TOLERANCE = 0.005

LOOP = "single-process numpy loop"
STREAMPS_2X2 = "streamps, per key"
STREAMPS_1X1 = "streamps 1x1, per key"
WINDOWS_2X2 = "streamps, windows"
WINDOWS_1X1 = "streamps 1x1, windows"
RAY = "Ray actors"
REDIS = "Redis + Lua"
SHAPES = {
    LOOP: "1 process",
    STREAMPS_2X2: "2 x 2",
    STREAMPS_1X1: "1 x 1",
    WINDOWS_2X2: "2 x 2",
    WINDOWS_1X1: "1 x 1",
    RAY: "2 x 2",
    REDIS: "2 x 1 server",
}

Result = tuple[float, float]  # (ratings per second, prequential RMSE)


class Measurements:
    """Runs per (implementation, W), or why an implementation could not run."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, int | None], list[Result]] = {}
        self.skipped: dict[str, str] = {}
        # streamps 1x1 at pull limit 1 and the loop: RMSE on the first CHECK_RATINGS ratings
        self.check: tuple[float, float] | None = None

    def measure(self, name: str, window: int | None, job: Callable[[], Result]) -> None:
        if name in self.skipped:
            return
        result = job()
        self.runs.setdefault((name, window), []).append(result)
        print(f"  {name}, W={window}: {result[0]:,.0f} ratings/s, RMSE {result[1]:.4f}", file=sys.stderr, flush=True)

    def median(self, name: str, window: int | None) -> Result | None:
        runs = self.runs.get((name, window))
        if not runs:
            return None
        return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _ray_round(measured: Measurements, data: Ratings, windows: tuple[int, ...]) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        measured.skipped[RAY] = "ray is not installed (pip install -e '.[bench]')"
        return
    with ray_ps.cluster(num_workers=2, num_shards=2) as ray_cluster:
        for window in windows:
            measured.measure(RAY, window, lambda w=window: ray_cluster.run(data, w))  # type: ignore[misc]


def _redis_round(measured: Measurements, data: Ratings, windows: tuple[int, ...]) -> None:
    reason = redis_ps.available()
    if reason:
        measured.skipped[REDIS] = reason
        return
    with redis_ps.server() as redis_server:
        for window in windows:
            measured.measure(REDIS, window, lambda w=window: redis_server.run(data, w, num_workers=2))  # type: ignore[misc]


def measure_all(data: Ratings) -> Measurements:
    measured = Measurements()
    for _ in range(REPEATS):
        # Each implementation's runs in a row, so that no runtime idles in the background of another's run.
        measured.measure(LOOP, None, lambda: loop.run(data))
        for window in WINDOWS:
            measured.measure(STREAMPS_2X2, window, lambda w=window: streamps_mf.run(data, 2, 2, w))  # type: ignore[misc]
            measured.measure(
                WINDOWS_2X2,
                window,
                lambda w=window: streamps_mf.run(data, 2, 2, w, batched=True),  # type: ignore[misc]
            )
        measured.measure(STREAMPS_1X1, HEADLINE_WINDOW, lambda: streamps_mf.run(data, 1, 1, HEADLINE_WINDOW))
        measured.measure(
            WINDOWS_1X1, HEADLINE_WINDOW, lambda: streamps_mf.run(data, 1, 1, HEADLINE_WINDOW, batched=True)
        )
        _redis_round(measured, data, WINDOWS)
        _ray_round(measured, data, WINDOWS)
    return measured


def _ratio(ours: Result | None, base: Result | None) -> str:
    return f"{ours[0] / base[0]:.2f}x" if ours and base else "-"


def table(measured: Measurements) -> list[list[str]]:
    base = measured.median(LOOP, None)
    order: list[tuple[str, int | None]] = [(LOOP, None)]
    for w in WINDOWS:
        order += [(STREAMPS_2X2, w), (WINDOWS_2X2, w), (RAY, w), (REDIS, w)]
    order += [(STREAMPS_1X1, HEADLINE_WINDOW), (WINDOWS_1X1, HEADLINE_WINDOW)]
    rows = []
    for name, window in order:
        shown_window = "none" if window is None else f"{window:,}"
        runs = len(measured.runs.get((name, window), []))
        result = measured.median(name, window)
        if result is None:
            why = measured.skipped.get(name, "not run")
            rows.append([name, shown_window, SHAPES[name], "skipped: " + why, "", "", "", "", ""])
            continue
        ray, redis = (None, None) if window is None else (measured.median(RAY, window), measured.median(REDIS, window))
        rows.append(
            [
                name,
                shown_window,
                SHAPES[name],
                f"{result[0]:,.0f}",
                f"{result[1]:.4f}",
                _ratio(result, base) if name != LOOP else "1.00x",
                _ratio(result, ray),
                _ratio(result, redis),
                f"median of {runs}" if runs > 1 else "1",
            ]
        )
    return rows


HEADERS = [
    "implementation",
    "W",
    "workers x shards",
    "ratings/s",
    "prequential RMSE",
    "/ loop",
    "/ Ray",
    "/ Redis",
    "runs",
]
_last = Measurements()


def run() -> list[list[str]]:
    global _last
    data = movielens_by_time()
    measured = measure_all(data)
    head = data.head(CHECK_RATINGS)
    measured.check = (streamps_mf.run(head, 1, 1, 1)[1], loop.run(head)[1])
    _last = measured
    return table(measured)


def targets() -> list[tuple[str, str, str, bool | None]]:
    """(what, measured, target, met) for the issue's targets this section measures; after run()."""
    measured, w = _last, HEADLINE_WINDOW
    base, ray, redis = measured.median(LOOP, None), measured.median(RAY, w), measured.median(REDIS, w)
    rows: list[tuple[str, str, str, bool | None]] = []
    for label, two, one in (("per key", STREAMPS_2X2, STREAMPS_1X1), ("windows", WINDOWS_2X2, WINDOWS_1X1)):
        ours, single = measured.median(two, w), measured.median(one, w)
        prefix = f"MF 2x2, {label}, W={w}"
        for what, other, goal in (
            (f"{prefix}: ratings/s / Ray 2x2 at W={w}", ray, 1.25),
            (f"{prefix}: ratings/s / Redis 2 workers at W={w}", redis, 1.25),
            (f"{prefix}: ratings/s / single-process loop", base, 0.6),
        ):
            if ours and other:
                ratio = ours[0] / other[0]
                rows.append((what, f"{ratio:.2f}x", f">= {goal}x", ratio >= goal))
            else:
                rows.append((what, "not measured", f">= {goal}x", None))
        if ours and base:
            gap = ours[1] - base[1]
            met = abs(gap) <= RMSE_TOLERANCE
            rows.append((f"{prefix}: RMSE - loop's RMSE", f"{gap:+.4f}", f"<= {RMSE_TOLERANCE}", met))
        if ours and single:
            scale = ours[0] / single[0]
            rows.append((f"MF scaling, {label}: 2x2 / 1x1 at W={w}", f"{scale:.2f}x", ">= 1.0x", scale >= 1.0))
    if measured.check:
        check, gap = measured.check, measured.check[0] - measured.check[1]
        rows.append(
            (
                f"job check: streamps 1x1 at pull limit 1 vs loop, RMSE of the first {CHECK_RATINGS:,} ratings",
                f"{check[0]:.4f} vs {check[1]:.4f} ({gap:+.6f})",
                f"within {RMSE_TOLERANCE}",
                abs(gap) <= RMSE_TOLERANCE,
            )
        )
    return rows


if __name__ == "__main__":
    from benchmarks.common import format_table

    print(format_table(HEADERS, run()))
    print(format_table(["target", "measured", "goal", "met"], [[a, b, c, str(d)] for a, b, c, d in targets()]))
