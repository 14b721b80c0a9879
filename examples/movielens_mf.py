"""Biased matrix factorization on MovieLens 100K: online (one pass) and offline (epochs).

The model (examples/mf.py) predicts a rating as `mean + user_bias + item_bias +
user_vector . item_vector` and learns by SGD with L2 (`reg`) on vectors and
biases. Items live on the shards, users in the worker that owns them (records
partitioned by user). `--mode offline` trains OfflineMF (examples/offline_mf.py)
for several epochs on an 80/20 split and prints the test RMSE per epoch next to
a plain single-process numpy loop of the same SGD (`reference_offline` in
examples/references.py); `--mode online` makes one prequential pass of
OnlineBiasedMF (examples/online_biased_mf.py) over all ratings.

    python examples/movielens_mf.py --mode offline [--epochs 10] [--plot curve.png]
    python examples/movielens_mf.py --mode online [--plot curve.png]
    python examples/movielens_mf.py --mode offline --negatives 4      # implicit feedback, AUC
    python examples/movielens_mf.py --split time     # train on the oldest 80%, test on the newest

Offline it prints the baselines of the split too (the training mean, and mean
plus item biases, the one to beat when most test users are new, as on the time
split); online, the running mean of the ratings before each one and the mean of
the whole stream.

MovieLens 100K is fetched once into data/ (examples/datasets.py); 2 workers x 2
shards. As a worker plugin, write the split as a tsv file and run it with
`psclient run`:

    python examples/movielens_mf.py --export data/ml100k_split.tsv
    STREAMPS_MF_MEAN=3.529 psclient run --logic examples.offline_mf:OfflineMF \\
        --input data/ml100k_split.tsv --format tsv --partition-key 0 \\
        --init normal:51,std=0.1,seed=1 --update add --workers 2 --shards 2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.datasets import movielens_100k, split_80_20, split_by_time
from examples.mf import Hyper
from examples.offline_mf import (
    DEFAULT_PULL_LIMIT,
    DEFAULT_WINDOW,
    IMPLICIT_LR,
    IMPLICIT_REG,
    Record,
    run_offline,
    split_records,
)
from examples.online_biased_mf import run_online
from examples.plotting import check_plotting, plot_offline, plot_online
from examples.references import item_bias_rmse, mean_rmse, popularity_auc, reference_offline, unseen_users

DEFAULTS = Hyper()
DEFAULT_SPLIT_SEED = 0
SPLITS = ("random", "time")
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def load_split(
    seed: int = DEFAULT_SPLIT_SEED, data_dir: Path = DATA_DIR, split: str = "random"
) -> tuple[list[Record], list[Record]]:
    """MovieLens 100K as (train, test) ratings (user, item, stars), 80/20: at random, fixed by `seed`,
    or by time (`split="time"`: the oldest 80% to train on, each part in time order)."""
    ratings = movielens_100k(data_dir)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    train, test = split_80_20(ratings, seed) if split == "random" else split_by_time(ratings)
    return [(u, i, r) for u, i, r, _ in train], [(u, i, r) for u, i, r, _ in test]


def describe_split(args: argparse.Namespace) -> str:
    return f"{args.split} 80/20 split ({f'seed {args.split_seed}' if args.split == 'random' else 'oldest first'})"


def export_split(path: Path, train: Sequence[Record], test: Sequence[Record]) -> None:
    """The split as tsv lines `user item stars held_out` (held_out 0 or 1), for `psclient run`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for u, i, r, flag in split_records(train, test):
            handle.write(f"{u}\t{i}\t{r}\t{flag}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Biased matrix factorization on MovieLens 100K with streamps.")
    parser.add_argument("--mode", choices=["offline", "online"], default="offline")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--rank", type=int, default=DEFAULTS.rank)
    parser.add_argument("--lr", type=float, help=f"SGD step (default {DEFAULTS.lr}; {IMPLICIT_LR} with --negatives)")
    parser.add_argument("--reg", type=float, help=f"L2 (default {DEFAULTS.reg}; {IMPLICIT_REG} with --negatives)")
    parser.add_argument("--init-std", type=float, default=DEFAULTS.init_std)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seeds the model")
    parser.add_argument("--split", choices=SPLITS, default="random", help="80/20 at random, or by time")
    parser.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED, help="seeds the random split")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--pull-limit", type=int, default=DEFAULT_PULL_LIMIT, help="0: no limit")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="offline: items pulled at a time")
    parser.add_argument("--consistency", default="async", help="offline: async, bsp or ssp:S, with one clock per epoch")
    parser.add_argument("--negatives", type=int, default=0, help="offline: implicit feedback, K negatives each")
    parser.add_argument("--no-reference", dest="reference", action="store_false", help="skip the numpy reference")
    parser.add_argument("--plot", metavar="PATH", help="write a learning-curve PNG (needs matplotlib)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where MovieLens 100K is cached")
    parser.add_argument("--export", type=Path, metavar="TSV", help="write the split as tsv for `psclient run`; exit")
    args = parser.parse_args(argv)
    check_plotting(args.plot)
    lr = args.lr if args.lr is not None else IMPLICIT_LR if args.negatives else DEFAULTS.lr
    reg = args.reg if args.reg is not None else IMPLICIT_REG if args.negatives else DEFAULTS.reg
    hyper = Hyper(args.rank, lr, reg, args.init_std, args.seed, args.epochs)
    train, test = load_split(args.split_seed, args.data_dir, args.split)
    if args.export:
        export_split(args.export, train, test)
        mean = sum(r[2] for r in train) / len(train)
        print(f"wrote {len(train):,} training and {len(test):,} test ratings to {args.export}; mean {mean:.4f}")
        return
    setup = f"{args.workers} workers x {args.shards} shards"
    print(f"MovieLens 100K, {describe_split(args)}: {len(train):,} train, {len(test):,} test ratings")
    print(f"{setup}; rank {hyper.rank}, lr {hyper.lr}, reg {hyper.reg}, init std {hyper.init_std}", flush=True)

    if args.mode == "online":
        stream = list(train) + list(test)  # one pass over all ratings, in the split's order
        result = run_online(stream, hyper, workers=args.workers, shards=args.shards)
        print(f"online, one pass over {len(result.actual):,} ratings in {result.seconds:.1f} s")
        print(f"prequential RMSE: {result.rmse:.4f}")
        print(f"baseline, the running mean of the ratings before each one: {result.running_mean_rmse:.4f}")
        print(f"baseline, the global mean of the whole stream (seen the future): {result.baseline_rmse:.4f}")
        if args.plot:
            plot_online(args.plot, result)
            print(f"wrote {args.plot}")
        return

    curve = run_offline(
        train, test, hyper, workers=args.workers, shards=args.shards, pull_limit=args.pull_limit or None,
        negatives=args.negatives, window=args.window, consistency=args.consistency,
    )  # fmt: skip
    measure = "AUC (sampled)" if args.negatives else "RMSE"
    done = f"offline ({args.consistency}), {hyper.epochs} epochs in {curve.seconds:.1f} s"
    print(f"{done}; {len(curve.items):,} item parameters")
    reference = reference_offline(train, test, hyper) if args.reference and not args.negatives else None
    if args.negatives:
        print(f"baseline, items ranked by popularity: test AUC (sampled) {popularity_auc(train, test):.4f}")
    else:
        print(
            f"baselines: test RMSE {mean_rmse(train, test):.4f} predicting the training mean, "
            f"{item_bias_rmse(train, test):.4f} with item biases too; "
            f"{unseen_users(train, test):,} of {len(test):,} test ratings are by users with no training rating"
        )
    for epoch, value in enumerate(curve.test, start=1):
        ref = f"   numpy reference {reference.test[epoch - 1]:.4f}" if reference else ""
        print(f"epoch {epoch:2d}: test {measure} {value:.4f}{ref}")
    print(f"test {measure}: streamps {curve.test[-1]:.4f}", end="")
    print(f", numpy reference {reference.test[-1]:.4f} ({reference.seconds:.1f} s)" if reference else "")
    if args.plot:
        plot_offline(args.plot, curve, reference, setup, f"{args.split} 80/20 split")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
