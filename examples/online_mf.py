"""Online matrix factorization: SGD on a rating stream, one pass, prequential.

The model predicts a rating as `mean + user_vector . item_vector`:

- item vectors are parameters on the shards (int id = item id, init
  `normal:RANK,std=0.1,seed=...`, update `add`), shared by every worker;
- user vectors stay in the worker that owns the user: records are partitioned
  by user, so each user's vector lives in exactly one process and never travels;
- `mean` is the running mean of the ratings this worker has seen.

For each rating `(user, item, stars)` the worker first outputs
`(prediction, stars)`, made before the rating is learned from (prequential
evaluation: every prediction is on unseen data), and then takes one SGD step
with L2 regularization on both vectors. The item's change is pushed as a delta.

Pulls are asynchronous. `on_recv` pulls the item and parks the rating; ratings
for an item that is already being pulled join the same wait (ParkByItem, and
the SGD step, are shared with the biased examples: examples/mf.py).
`on_pull_recv` then works through all ratings parked on that item, against a
local copy of the item vector, and pushes the summed change once.

Run the demo (synthetic stream, 2 shards, 2 workers, progress on stderr):

    python examples/online_mf.py --demo

or train on a csv file of user,item,rating lines:

    python examples/online_mf.py --input ratings.csv

As a worker plugin, start the shards with a matching init, e.g.
`psserver --init normal:10,std=0.1,seed=1 --update add ...`, and the workers with
`psworker --logic examples.online_mf:OnlineMF --format csv --partition-key 0 ...`.
The plugin reads its hyperparameters from the environment when set:
STREAMPS_MF_RANK, STREAMPS_MF_LR, STREAMPS_MF_REG, STREAMPS_MF_INIT_STD, STREAMPS_MF_SEED.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import operator
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.mf import MAX_STARS, MIN_STARS, PRIOR_MEAN, FactorModel, Hyper, ParkByItem, sgd_step
from examples.references import running_means
from examples.synthetic_ratings import ITEMS, TRUE_RANK, USERS, synthetic_ratings
from psclient import Left, Right, transform
from psworker import ParameterServerClient

Rating = tuple[Any, int, float]  # (user, item, stars)
Prediction = tuple[float, float]  # (predicted stars, actual stars)
Client = ParameterServerClient[np.ndarray, Prediction]

TAIL_FRACTION = 0.1
PLOT_WINDOWS = 50  # --plot: the stream is cut into this many windows
# About 10 s on 2 cores; long enough for one pass of SGD to get near the noise floor.
DEMO_RATINGS = 1_000_000


def item_init_spec(rank: int, init_std: float, seed: int) -> str:
    """The shards' init for item vectors that matches an OnlineMF with these settings."""
    return f"normal:{rank},std={init_std},seed={seed}"


def _id_key(user: Any) -> int:
    """A non-negative int from a user id, stable across processes (str ids go through crc32)."""
    if isinstance(user, str):
        return zlib.crc32(user.encode("utf-8"))
    return int(user) & 0xFFFF_FFFF_FFFF_FFFF


class OnlineMF(ParkByItem, FactorModel):
    """SGD matrix factorization; user vectors local, item vectors on the shards.

    Arguments (rank, lr, reg, init_std, seed) left as None come from
    STREAMPS_MF_<NAME> environment variables, or else from DEFAULTS.
    """

    DEFAULTS = Hyper(rank=10, lr=0.05, reg=0.02, init_std=0.1, seed=1)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seen = 0
        self.total = 0.0

    def user_vector(self, user: Any) -> np.ndarray:
        """The user's vector, created on first sight from (seed, user) alone."""
        vector = self.users.get(user)
        if vector is None:
            rng = np.random.default_rng([self.seed, _id_key(user)])
            vector = self.users[user] = rng.normal(0.0, self.init_std, self.rank).astype(np.float32)
        return vector

    def on_pull_recv(self, param_id: Any, param_value: np.ndarray, ps: Client) -> None:
        if param_value.shape != (self.rank,):
            raise ValueError(
                f"item {param_id} has shape {param_value.shape}, expected ({self.rank},): start the shards "
                f"with --init {item_init_spec(self.rank, self.init_std, self.seed)}"
            )
        item_vector = param_value  # the worker's own writable copy: learn into it, push the difference
        before = item_vector.copy()
        lr, reg = self.lr, self.reg
        for user, stars in self.waiting.pop(param_id):
            user_vector = self.user_vector(user)
            mean = self.total / self.seen if self.seen else PRIOR_MEAN
            raw = mean + float(user_vector @ item_vector)
            ps.output((min(max(raw, MIN_STARS), MAX_STARS), stars))
            sgd_step(user_vector, item_vector, stars - raw, lr, reg)
            self.seen += 1
            self.total += stars
        ps.push(param_id, item_vector - before)


# -- the driver ------------------------------------------------------------------


def read_ratings(path: str) -> Iterator[Rating]:
    """(user, item, stars) from csv lines `user,item,rating`; a non-numeric first line is a header."""
    with Path(path).open(encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row:
                continue
            try:
                user, item, stars = row
                yield (int(user) if user.lstrip("-").isdigit() else user, int(item), float(stars))
            except ValueError:
                if number == 1:
                    continue
                raise SystemExit(f"{path} line {number}: expected user,item,rating, got {row}") from None


def rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    return math.sqrt(float(np.mean((predicted - actual) ** 2))) if len(actual) else float("nan")


def run(args: argparse.Namespace) -> None:
    if args.input:
        total = sum(1 for _ in read_ratings(args.input))
        ratings: Any = read_ratings(args.input)
        source = args.input
    else:
        total = args.ratings
        ratings = synthetic_ratings(total, seed=args.seed)
        source = (
            f"a synthetic stream (seed {args.seed}): {total:,} ratings, {USERS} users x {ITEMS} items, "
            f"rank {TRUE_RANK} plus noise"
        )
    print(f"online matrix factorization on {source}")
    print(f"{args.workers} workers x {args.shards} shards; rank {args.rank}, lr {args.lr}, reg {args.reg}", flush=True)
    logic = functools.partial(
        OnlineMF, rank=args.rank, lr=args.lr, reg=args.reg, init_std=args.init_std, seed=args.seed
    )
    stream = transform(
        ratings,
        logic,
        item_init_spec(args.rank, args.init_std, args.seed),
        "add",
        worker_parallelism=args.workers,
        ps_parallelism=args.shards,
        partition_by=operator.itemgetter(0),
    )

    predicted = np.empty(total)
    actual = np.empty(total)
    count = params = 0
    started = time.monotonic()
    progress = _progress(total, args.progress)
    for item in stream:
        match item:
            case Left((prediction, stars)):
                if count == len(actual):  # more outputs than counted ratings: grow
                    predicted, actual = np.resize(predicted, 2 * count + 1), np.resize(actual, 2 * count + 1)
                predicted[count], actual[count] = prediction, stars
                count += 1
                if progress is not None and count % 1000 == 0:
                    progress.update(1000)
            case Right(_):
                params += 1
    if progress is not None:
        progress.update(count % 1000)
        progress.close()
    elapsed = time.monotonic() - started
    predicted, actual = predicted[:count], actual[:count]

    tail = max(1, round(TAIL_FRACTION * count)) if count else 0
    predicted_tail, actual_tail = predicted[count - tail :], actual[count - tail :]
    mean = float(actual.mean()) if count else float("nan")
    print(f"{count:,} predictions in {elapsed:.1f} s ({count / max(elapsed, 1e-9):,.0f} ratings/s)")
    print(f"RMSE of the last 10% of predictions ({tail:,} ratings): {rmse(predicted_tail, actual_tail):.4f}")
    print(
        f"baseline, the running mean of the ratings before each one, on the same ratings: "
        f"{rmse(running_means(actual)[count - tail :], actual_tail):.4f}"
    )
    print(
        f"baseline, the global mean {mean:.3f} of the whole stream (seen the future), on the same ratings: "
        f"{rmse(np.full(tail, mean), actual_tail):.4f}"
    )
    print(f"parameters returned (Right items): {params:,}")
    if args.plot:
        plot_curve(args.plot, predicted, actual, source if args.input else f"synthetic stream, seed {args.seed}", args)
        print(f"learning curve written to {args.plot}")


def windowed_rmse(predicted: np.ndarray, actual: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """RMSE of consecutive windows of `window` predictions: (ratings seen at each window's end, RMSE)."""
    windows = len(actual) // window
    if windows == 0:
        return np.array([len(actual)]), np.array([rmse(predicted, actual)])
    squared = ((predicted[: windows * window] - actual[: windows * window]) ** 2).reshape(windows, window)
    return np.arange(1, windows + 1) * window, np.sqrt(squared.mean(axis=1))


def plot_curve(path: str, predicted: np.ndarray, actual: np.ndarray, source: str, args: argparse.Namespace) -> None:
    """Save the prequential RMSE over the stream, windowed, next to the running-mean and global-mean baselines."""
    from examples.plotting import save_curve

    window = max(1, len(actual) // PLOT_WINDOWS)
    xs, ours = windowed_rmse(predicted, actual, window)
    mean = float(actual.mean()) if len(actual) else float("nan")
    _, baseline = windowed_rmse(np.full(len(actual), mean), actual, window)
    _, running = windowed_rmse(running_means(actual), actual, window)
    save_curve(
        path,
        xs,
        {
            "online MF (predicted before learning)": ours,
            "running mean of the ratings before each one (baseline)": running,
            f"global mean {mean:.2f}, seen the whole stream (baseline)": baseline,
        },
        f"Online MF, prequential RMSE per window of {window:,} ratings\n"
        f"{source}; {args.workers} workers x {args.shards} shards, rank {args.rank}, lr {args.lr}",
        "ratings seen",
        "RMSE",
    )


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=" ratings", unit_scale=True, file=sys.stderr, mininterval=0.5, smoothing=0.1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Online matrix factorization on streamps: prequential RMSE on a rating stream."
    )
    parser.add_argument(
        "--demo", action="store_true", help="the `make demo` run: synthetic stream, 2 workers x 2 shards"
    )
    parser.add_argument("--input", help="csv file of user,item,rating lines (default: the synthetic stream)")
    parser.add_argument("--ratings", type=int, default=DEMO_RATINGS, help="length of the synthetic stream")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rank", type=int, default=OnlineMF.DEFAULTS.rank)
    parser.add_argument(
        "--lr",
        type=float,
        default=OnlineMF.DEFAULTS.lr,
        help="SGD step; on short streams (~100k ratings) 0.15 learns faster",
    )
    parser.add_argument("--reg", type=float, default=OnlineMF.DEFAULTS.reg)
    parser.add_argument("--init-std", type=float, default=OnlineMF.DEFAULTS.init_std)
    parser.add_argument(
        "--seed", type=int, default=OnlineMF.DEFAULTS.seed, help="seeds the synthetic stream and the model"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument(
        "--plot", metavar="PATH", help="write a PNG of the prequential RMSE over the stream (needs the plot extra)"
    )
    args = parser.parse_args(argv)
    if args.demo and args.input:
        parser.error("--demo runs on the synthetic stream; drop --input")
    if args.plot:  # fail before training, not after
        from examples.plotting import PlottingUnavailable, pyplot

        try:
            pyplot()
        except PlottingUnavailable as exc:
            parser.error(str(exc))
    run(args)


if __name__ == "__main__":
    main()
