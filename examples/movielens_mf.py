"""Biased matrix factorization on MovieLens 100K: online (one pass) and offline (epochs).

The model predicts a rating as `mean + user_bias + item_bias + user_vector . item_vector`
and learns by SGD with L2 regularization (`reg`) on vectors and biases, the
update of Funk's SVD as Surprise implements it:

    err = stars - prediction
    user_bias += lr * (err - reg * user_bias);  item_bias += lr * (err - reg * item_bias)
    user_vector, item_vector += lr * (err * item_vector - reg * user_vector),
                                lr * (err * user_vector - reg * item_vector)   (both from the old values)

Where the parameters live:

- each item is one parameter on the shards, a float32 vector of RANK+1 values:
  the item vector, then the item bias (int id = item id; init
  `normal:RANK+1,std=...,seed=...`, update `add`, pushes are deltas);
- users stay in the worker that owns them: records are partitioned by user, so
  a user's vector and bias live in exactly one process and never travel;
- `mean` is given by the driver (the mean of the training ratings) or, when not
  given, the running mean of the ratings the worker has trained on.

A record is `(user, item, stars)` or `(user, item, stars, held_out)`; a true
`held_out` marks a test rating, which OfflineMF keeps for evaluation and never
trains on (a csv/tsv file with a 0/1 fourth column carries the split).

`OnlineMF` makes one pass: for every rating it outputs `(prediction, stars)`
before it learns from it (prequential evaluation), like examples/online_mf.py.

`OfflineMF` trains for several epochs. The input pass is epoch 1: each rating
is learned as its item's pull comes back (ratings for an item already on its
way wait for the same answer), and kept. `on_input_end` starts epoch 2 by
pulling every item of the worker's training share again, in a fresh random
order; `on_pull_recv` trains on all of the worker's ratings of that item, users
in a fresh random order, and pushes the item's change. At most `window` (32)
items are out at a time, so that an item is pulled shortly before it is trained
and carries the other workers' recent pushes: with all 1,682 pulled at once,
every worker trains a whole epoch on the values of its start, and the test
RMSE ends about 0.005 worse. The logic counts its unanswered pulls: when none
is left, the epoch is over; it then evaluates on its held-out ratings (one more
round of pulls, of the test items) and starts the next epoch, until the last.
It outputs

    ("train", worker, epoch, sum of squared errors, ratings)   # errors made while training
    ("test", worker, epoch, sum of squared errors, ratings)    # held-out ratings, after the epoch

and the driver adds them up over the workers into RMSEs. Predictions are
clipped to 1..5 for evaluation.

With `negatives=K > 0` the ratings are implicit feedback: every rating is a
positive (label 1), and each positive brings K items the user has not rated,
sampled afresh every epoch, as negatives (label 0). The evaluation is then a
sampled AUC: for each held-out rating, one unrated item is drawn once, and the
pair counts as ranked right when the rated item scores higher; it outputs
`("auc", worker, epoch, pairs ranked right, pairs)`.

Run it (MovieLens 100K is fetched once into data/; 2 workers x 2 shards):

    python examples/movielens_mf.py --mode offline [--epochs 10] [--plot curve.png]
    python examples/movielens_mf.py --mode online [--plot curve.png]
    python examples/movielens_mf.py --mode offline --negatives 4      # implicit feedback, AUC

The offline run prints the test RMSE per epoch next to a plain single-process
numpy loop of the same SGD (same split, hyperparameters, epochs and order
scheme): `reference_offline` below.

As a worker plugin, write the split as a tsv file and run it with `psclient run`:

    python examples/movielens_mf.py --export data/ml100k_split.tsv
    STREAMPS_MF_MEAN=3.529 psclient run --logic examples.movielens_mf:OfflineMF \\
        --input data/ml100k_split.tsv --format tsv --partition-key 0 \\
        --init normal:51,std=0.1,seed=1 --update add --workers 2 --shards 2

The plugin reads its hyperparameters from the environment when set:
STREAMPS_MF_RANK, _LR, _REG, _INIT_STD, _SEED, _EPOCHS, _MEAN, _NEGATIVES, _WINDOW.
"""

from __future__ import annotations

import argparse
import math
import operator
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.datasets import movielens_100k, split_80_20
from psclient import Left, Right, transform
from psworker import ParameterServerClient, WorkerLogic, with_pull_limit

Record = tuple[Any, ...]  # (user, item, stars) or (user, item, stars, held_out)
Client = ParameterServerClient[np.ndarray, Any]

# Tuned on the seeded 80/20 split of MovieLens 100K: test RMSE about 0.91 after
# 10 epochs. A larger step than Surprise's default (0.005) needs a larger L2
# (0.02 there) to stay stable; it converges in half the epochs.
DEFAULT_RANK = 50
DEFAULT_LR = 0.03
DEFAULT_REG = 0.1
DEFAULT_INIT_STD = 0.1
DEFAULT_EPOCHS = 10
# Implicit feedback (negatives > 0) wants a larger step and a smaller L2: sampled
# AUC about 0.91 after 6 epochs with 4 negatives (items ranked by popularity: 0.85).
IMPLICIT_LR = 0.05
IMPLICIT_REG = 0.02
DEFAULT_SEED = 1
DEFAULT_SPLIT_SEED = 0
# Unanswered pulls per worker (0: the runtime's default bound).
DEFAULT_PULL_LIMIT = 0
# Items pulled at a time in epochs 2.. (0: all of them at once).
DEFAULT_WINDOW = 32
MIN_STARS, MAX_STARS = 1.0, 5.0
PRIOR_MEAN = 3.0  # the mean a worker assumes before it has seen a rating
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def _env(name: str, cast: Callable[[str], Any], default: Any) -> Any:
    text = os.environ.get(f"STREAMPS_MF_{name}")
    return default if text is None or text == "" else cast(text)


def item_init_spec(rank: int, init_std: float, seed: int) -> str:
    """The shards' init for the item parameters (vector, then bias) of a model of this rank."""
    return f"normal:{rank + 1},std={init_std},seed={seed}"


# -- the SGD step, shared by the workers and the numpy reference -------------------
#
# A user is held as [vector, bias, 1] and an item as [vector, 1, bias] (float64),
# so that one dot product gives `vector . vector + user_bias + item_bias`, and one
# scaled add updates vector and bias together; the two constant 1s are put back
# after each step.


def user_row(rank: int, init_std: float, seed: int, user: int) -> np.ndarray:
    """A new user's [vector, bias, 1]: the vector from (seed, user) alone, the bias 0."""
    row = np.empty(rank + 2)
    row[:rank] = np.random.default_rng([seed, int(user) & 0xFFFF_FFFF]).normal(0.0, init_std, rank)
    row[rank:] = (0.0, 1.0)
    return row


def item_row(value: np.ndarray) -> np.ndarray:
    """An item parameter [vector, bias] as the working row [vector, 1, bias]."""
    rank = len(value) - 1
    row = np.empty(rank + 2)
    row[:rank] = value[:rank]
    row[rank:] = (1.0, value[rank])
    return row


def item_value(row: np.ndarray) -> np.ndarray:
    """The inverse of `item_row`: [vector, bias]."""
    return np.delete(row, -2)


def sgd_step(user: np.ndarray, item: np.ndarray, label: float, mean: float, lr: float, reg: float) -> float:
    """One SGD step on one rating, in place; returns the error made before the step."""
    err = label - mean - float(user @ item)
    scale, decay = lr * err, 1.0 - lr * reg
    user_step = scale * item
    item *= decay
    item += scale * user
    user *= decay
    user += user_step
    user[-1] = 1.0
    item[-2] = 1.0
    return err


def predict(users: np.ndarray, item: np.ndarray, mean: float) -> np.ndarray:
    """Ratings of one item by rows of users, unclipped."""
    return mean + users @ item


# -- the worker logics -------------------------------------------------------------


class _BiasedMF(WorkerLogic[Record, np.ndarray, Any]):
    """What both modes share: hyperparameters, the local users, training one item's ratings."""

    def __init__(
        self,
        rank: int | None = None,
        lr: float | None = None,
        reg: float | None = None,
        init_std: float | None = None,
        seed: int | None = None,
        mean: float | None = None,
    ):
        self.rank = rank if rank is not None else _env("RANK", int, DEFAULT_RANK)
        self.lr = lr if lr is not None else _env("LR", float, DEFAULT_LR)
        self.reg = reg if reg is not None else _env("REG", float, DEFAULT_REG)
        self.init_std = init_std if init_std is not None else _env("INIT_STD", float, DEFAULT_INIT_STD)
        self.seed = seed if seed is not None else _env("SEED", int, DEFAULT_SEED)
        self.fixed_mean = mean if mean is not None else _env("MEAN", float, None)
        self.users: dict[Any, np.ndarray] = {}
        self.label_sum = 0.0
        self.label_count = 0

    @property
    def mean(self) -> float:
        if self.fixed_mean is not None:
            return self.fixed_mean
        return self.label_sum / self.label_count if self.label_count else PRIOR_MEAN

    def user(self, user: Any) -> np.ndarray:
        row = self.users.get(user)
        if row is None:
            row = self.users[user] = user_row(self.rank, self.init_std, self.seed, user)
        return row

    def item(self, param_id: Any, value: np.ndarray) -> np.ndarray:
        if np.shape(value) != (self.rank + 1,):
            raise ValueError(
                f"item {param_id} has shape {np.shape(value)}, expected ({self.rank + 1},): start the shards "
                f"with --init {item_init_spec(self.rank, self.init_std, self.seed)}"
            )
        return item_row(value)

    def train(self, item: np.ndarray, ratings: Iterable[tuple[Any, float]]) -> float:
        """SGD over (user, label) ratings of one item; returns the sum of squared errors."""
        squared = 0.0
        lr, reg = self.lr, self.reg
        for user, label in ratings:
            err = sgd_step(self.user(user), item, label, self.mean, lr, reg)
            squared += err * err
        return squared


class OnlineMF(_BiasedMF):
    """One pass, prequential: outputs (prediction, stars) for each rating before learning from it.

    Ratings for an item whose pull is on its way wait for it and are learned
    together, against one copy of the item; its change is pushed once.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.waiting: dict[Any, list[tuple[Any, float]]] = {}

    def on_recv(self, data: Record, ps: Client) -> None:
        user, item, stars = data[0], data[1], float(data[2])
        parked = self.waiting.get(item)
        if parked is None:
            self.waiting[item] = [(user, stars)]
            ps.pull(item)
        else:
            parked.append((user, stars))

    def on_pull_recv(self, param_id: Any, param_value: np.ndarray, ps: Client) -> None:
        item = self.item(param_id, param_value)
        before = item.copy()
        lr, reg = self.lr, self.reg
        for user, stars in self.waiting.pop(param_id):
            row = self.user(user)
            mean = self.mean
            ps.output((min(max(float(predict(row, item, mean)), MIN_STARS), MAX_STARS), stars))
            sgd_step(row, item, stars, mean, lr, reg)
            self.label_sum += stars
            self.label_count += 1
        ps.push(param_id, (item_value(item) - item_value(before)).astype(np.float32))


@dataclass
class _Round:
    """One round of pulls (an epoch's training, or an evaluation): what each item is pulled for."""

    kind: str  # "train", "eval" or "done"
    blocks: dict[Any, list[Any]] = field(default_factory=dict)
    unanswered: int = 0  # items not answered yet, pulled or still to pull
    to_pull: deque[Any] = field(default_factory=deque)  # items of a windowed round not pulled yet
    total: float = 0.0
    count: int = 0


class OfflineMF(_BiasedMF):
    """Several epochs over the worker's share, the first one during the input pass.

    `eval_every_epoch` evaluates after every epoch (a learning curve) rather than
    after the last one only. `negatives` > 0 switches to implicit feedback.
    `window` bounds the items a training round has pulled and not yet trained
    on (0: pull them all at once). `emit_users` outputs the trained users at the
    end, as `("user", worker, user, [vector, bias])`.
    """

    def __init__(
        self,
        rank: int | None = None,
        lr: float | None = None,
        reg: float | None = None,
        init_std: float | None = None,
        seed: int | None = None,
        mean: float | None = None,
        epochs: int | None = None,
        negatives: int | None = None,
        eval_every_epoch: bool = True,
        window: int | None = None,
        emit_users: bool = False,
    ):
        super().__init__(rank, lr, reg, init_std, seed, mean)
        self.window = window if window is not None else _env("WINDOW", int, DEFAULT_WINDOW)
        self.epochs = epochs if epochs is not None else _env("EPOCHS", int, DEFAULT_EPOCHS)
        self.negatives = negatives if negatives is not None else _env("NEGATIVES", int, 0)
        if self.epochs < 1 or self.negatives < 0:
            raise ValueError(f"need epochs >= 1 and negatives >= 0, got {self.epochs} and {self.negatives}")
        self.eval_every_epoch = eval_every_epoch
        self.emit_users = emit_users
        self.train_share: dict[Any, list[tuple[Any, float]]] = {}  # item -> (user, label)
        self.test_share: dict[Any, list[tuple[Any, float]]] = {}  # item -> (user, stars)
        self.rated: dict[Any, set[Any]] = {}  # user -> items (implicit mode: not negatives)
        self.catalog: list[Any] = []  # items seen, to sample negatives from
        self.epoch = 1
        self.input_ended = False
        self.round = _Round("train")
        self.rng: np.random.Generator | None = None
        self.eval_pairs: list[tuple[Any, Any, Any]] | None = None  # implicit: (user, rated, unrated)
        self.pair_scores = np.zeros((0, 2))  # implicit: scores of each pair's rated and unrated item

    # -- the input pass: epoch 1 ---------------------------------------------------

    def on_recv(self, data: Record, ps: Client) -> None:
        user, item, stars = data[0], data[1], float(data[2])
        held_out = len(data) > 3 and bool(data[3])
        if self.negatives:
            self._note_rated(user, item)
        if held_out:
            self.test_share.setdefault(item, []).append((user, stars))
            return
        label = 1.0 if self.negatives else stars
        self.train_share.setdefault(item, []).append((user, label))
        self._train_later(item, user, label, ps)
        for negative in self._sample_negatives(user, ps):
            self._train_later(negative, user, 0.0, ps)

    def _train_later(self, item: Any, user: Any, label: float, ps: Client) -> None:
        block = self.round.blocks.get(item)
        if block is None:
            self.round.blocks[item] = [(user, label)]
            self.round.unanswered += 1
            ps.pull(item)
        else:
            block.append((user, label))

    def _note_rated(self, user: Any, item: Any) -> None:
        rated = self.rated.setdefault(user, set())
        rated.add(item)
        if item not in self.train_share and item not in self.test_share:
            self.catalog.append(item)

    def _random(self, ps: Client) -> np.random.Generator:
        if self.rng is None:
            self.rng = np.random.default_rng([self.seed, ps.worker_index])
        return self.rng

    def _sample_negatives(self, user: Any, ps: Client) -> list[Any]:
        """Up to `negatives` items the user has not rated (as far as this worker knows)."""
        if not self.negatives or not self.catalog:
            return []
        rated, catalog, rng = self.rated.get(user, set()), self.catalog, self._random(ps)
        picks = [catalog[k] for k in rng.integers(len(catalog), size=2 * self.negatives)]
        return [item for item in picks if item not in rated][: self.negatives]

    def on_input_end(self, ps: Client) -> None:
        self.input_ended = True
        if self.round.unanswered == 0:
            self._next_round(ps)

    # -- the rounds of pulls -----------------------------------------------------------

    def on_pull_recv(self, param_id: Any, param_value: np.ndarray, ps: Client) -> None:
        current = self.round
        item = self.item(param_id, param_value)
        if current.kind == "train":
            ratings = current.blocks.pop(param_id)
            before = item.copy()
            current.total += self.train(item, ratings)
            current.count += len(ratings)
            if self.fixed_mean is None:
                self.label_sum += sum(label for _, label in ratings)
                self.label_count += len(ratings)
            ps.push(param_id, (item_value(item) - item_value(before)).astype(np.float32))
        else:
            self._evaluate(item, current.blocks.pop(param_id), current)
        current.unanswered -= 1
        if current.to_pull:
            ps.pull(current.to_pull.popleft())
        if current.unanswered == 0 and self.input_ended:
            self._next_round(ps)

    def _evaluate(self, item: np.ndarray, block: list[Any], current: _Round) -> None:
        users = np.stack([self.user(user) for user, _ in block])
        scores = predict(users, item, self.mean)
        if self.negatives:  # block: (user, (pair index, rated?)); scores kept until the round ends
            for (_, (pair, rated)), score in zip(block, scores, strict=True):
                self.pair_scores[pair][0 if rated else 1] = score
        else:
            stars = np.array([stars for _, stars in block])
            current.total += float(np.sum((np.clip(scores, MIN_STARS, MAX_STARS) - stars) ** 2))
            current.count += len(block)

    def _next_round(self, ps: Client) -> None:
        """The round just finished: report it and start the next one (skipping empty rounds)."""
        while True:
            finished = self.round
            if finished.kind == "train":
                if finished.count:
                    ps.output(("train", ps.worker_index, self.epoch, finished.total, finished.count))
                evaluate = self.eval_every_epoch or self.epoch == self.epochs
                self.round = self._eval_round(ps) if evaluate else self._train_round(ps)
            else:
                self._report_eval(finished, ps)
                self.round = self._train_round(ps)
            if self.round.kind == "done":
                if self.emit_users:
                    for user, row in self.users.items():
                        ps.output(("user", ps.worker_index, user, row[:-1].astype(np.float32)))
                return
            if self.round.unanswered:
                return

    def _train_round(self, ps: Client) -> _Round:
        if self.epoch == self.epochs:
            return _Round("done")
        self.epoch += 1
        rng = self._random(ps)
        blocks: dict[Any, list[Any]] = {item: list(ratings) for item, ratings in self.train_share.items()}
        if self.negatives:
            for ratings in self.train_share.values():
                for user, _ in ratings:
                    for negative in self._sample_negatives(user, ps):
                        blocks.setdefault(negative, []).append((user, 0.0))
        order = list(blocks)
        rng.shuffle(order)
        for block in blocks.values():  # positives and negatives mixed, users in a fresh order
            rng.shuffle(block)
        return self._pull_all(_Round("train"), {item: blocks[item] for item in order}, ps, self.window)

    def _eval_round(self, ps: Client) -> _Round:
        blocks: dict[Any, list[Any]] = {}
        if not self.negatives:
            blocks = {item: list(ratings) for item, ratings in self.test_share.items()}
        else:
            if self.eval_pairs is None:
                self.eval_pairs = self._draw_eval_pairs(ps)
            self.pair_scores = np.zeros((len(self.eval_pairs), 2))
            for pair, (user, rated, unrated) in enumerate(self.eval_pairs):
                blocks.setdefault(rated, []).append((user, (pair, True)))
                blocks.setdefault(unrated, []).append((user, (pair, False)))
        return self._pull_all(_Round("eval"), blocks, ps)

    def _draw_eval_pairs(self, ps: Client) -> list[tuple[Any, Any, Any]]:
        pairs = []
        for item, ratings in self.test_share.items():
            for user, _ in ratings:
                unrated = self._sample_negatives(user, ps)
                if unrated:
                    pairs.append((user, item, unrated[0]))
        return pairs

    def _pull_all(self, new: _Round, blocks: dict[Any, list[Any]], ps: Client, window: int = 0) -> _Round:
        """Pull every item of `blocks`; with a window, at most that many at a time."""
        new.blocks = blocks
        new.unanswered = len(blocks)
        new.to_pull = deque(blocks)
        for _ in range(min(window, len(blocks)) if window else len(blocks)):
            ps.pull(new.to_pull.popleft())
        return new

    def _report_eval(self, finished: _Round, ps: Client) -> None:
        if self.negatives:
            if len(self.pair_scores):
                rated, unrated = self.pair_scores[:, 0], self.pair_scores[:, 1]
                right = float(np.sum(rated > unrated) + 0.5 * np.sum(rated == unrated))
                ps.output(("auc", ps.worker_index, self.epoch, right, len(self.pair_scores)))
        elif finished.count:
            ps.output(("test", ps.worker_index, self.epoch, finished.total, finished.count))


# -- the driver --------------------------------------------------------------------


def rmse(squared_sum: float, count: int) -> float:
    return math.sqrt(squared_sum / count) if count else float("nan")


def load_split(seed: int = DEFAULT_SPLIT_SEED, data_dir: Path = DATA_DIR) -> tuple[list[Record], list[Record]]:
    """MovieLens 100K as (train, test), 80/20, fixed by `seed`."""
    return split_80_20(movielens_100k(data_dir), seed)


def split_records(train: Sequence[Record], test: Sequence[Record]) -> list[Record]:
    """The stream of an offline job: training ratings flagged 0, then test ratings flagged 1."""
    return [(u, i, r, 0) for u, i, r, *_ in train] + [(u, i, r, 1) for u, i, r, *_ in test]


@dataclass
class Hyper:
    rank: int = DEFAULT_RANK
    lr: float = DEFAULT_LR
    reg: float = DEFAULT_REG
    init_std: float = DEFAULT_INIT_STD
    seed: int = DEFAULT_SEED
    epochs: int = DEFAULT_EPOCHS


@dataclass
class Curve:
    """Per-epoch results of an offline run, summed over the workers."""

    train_rmse: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)  # RMSE, or AUC with negatives
    seconds: float = 0.0
    items: dict[Any, np.ndarray] = field(default_factory=dict)  # the trained model: item -> [vector, bias]
    users: dict[Any, np.ndarray] = field(default_factory=dict)  # user -> [vector, bias], when asked for


def run_offline(
    train: Sequence[Record],
    test: Sequence[Record],
    hyper: Hyper,
    *,
    workers: int = 2,
    shards: int = 2,
    pull_limit: int | None = DEFAULT_PULL_LIMIT,
    negatives: int = 0,
    eval_every_epoch: bool = True,
    window: int = DEFAULT_WINDOW,
    emit_users: bool = False,
) -> Curve:
    """Train OfflineMF with `transform`; return its per-epoch errors and the trained model."""
    mean = 1.0 / (1 + negatives) if negatives else sum(r[2] for r in train) / len(train)
    logic: WorkerLogic = OfflineMF(
        **hyper.__dict__, mean=mean, negatives=negatives, eval_every_epoch=eval_every_epoch, window=window,
        emit_users=emit_users,
    )  # fmt: skip
    if pull_limit:
        logic = with_pull_limit(logic, pull_limit)
    sums: dict[tuple[str, int], list[float]] = {}
    curve = Curve()
    started = time.monotonic()
    stream = transform(
        split_records(train, test),
        logic,
        item_init_spec(hyper.rank, hyper.init_std, hyper.seed),
        "add",
        workers,
        shards,
        partition_by=operator.itemgetter(0),
    )
    for out in stream:
        match out:
            case Left(("user", _worker, user, row)):
                curve.users[user] = row
            case Left((kind, _worker, epoch, total, count)):
                acc = sums.setdefault((kind, epoch), [0.0, 0])
                acc[0] += total
                acc[1] += count
            case Right((item, value)):
                curve.items[item] = value
    curve.seconds = time.monotonic() - started
    test_kind = "auc" if negatives else "test"
    for (kind, _epoch), (total, count) in sorted(sums.items(), key=lambda kv: kv[0][1]):
        if kind == "train":
            curve.train_rmse.append(rmse(total, int(count)))
        elif kind == test_kind:
            curve.test.append(total / count if negatives else rmse(total, int(count)))
    return curve


def reference_offline(train: Sequence[Record], test: Sequence[Record], hyper: Hyper, seed: int = 0) -> Curve:
    """The same SGD in one process with numpy: epoch 1 in stream order, then item by item.

    Same step (`sgd_step`), hyperparameters, user init and evaluation as OfflineMF;
    item parameters drawn from N(0, init_std) by numpy rather than by the shards' init.
    """
    rank = hyper.rank
    mean = sum(r[2] for r in train) / len(train)
    rng = np.random.default_rng(seed)
    started = time.monotonic()
    items: dict[Any, np.ndarray] = {}
    users: dict[Any, np.ndarray] = {}

    def item(i: Any) -> np.ndarray:
        if i not in items:
            items[i] = item_row(rng.normal(0.0, hyper.init_std, rank + 1))
        return items[i]

    def user(u: Any) -> np.ndarray:
        if u not in users:
            users[u] = user_row(rank, hyper.init_std, hyper.seed, u)
        return users[u]

    by_item: dict[Any, list[tuple[Any, float]]] = {}
    test_by_item: dict[Any, list[tuple[Any, float]]] = {}
    for u, i, r, *_ in train:
        by_item.setdefault(i, []).append((u, r))
    for u, i, r, *_ in test:
        test_by_item.setdefault(i, []).append((u, r))
    curve = Curve()
    for epoch in range(1, hyper.epochs + 1):
        squared = 0.0
        if epoch == 1:
            steps: Iterable[tuple[Any, Any, float]] = ((i, u, r) for u, i, r, *_ in train)
        else:
            order = list(by_item)
            rng.shuffle(order)
            for block in by_item.values():
                rng.shuffle(block)
            steps = ((i, u, r) for i in order for u, r in by_item[i])
        for i, u, r in steps:
            err = sgd_step(user(u), item(i), r, mean, hyper.lr, hyper.reg)
            squared += err * err
        curve.train_rmse.append(rmse(squared, len(train)))
        squared = 0.0
        for i, block in test_by_item.items():
            scores = predict(np.stack([user(u) for u, _ in block]), item(i), mean)
            stars = np.array([r for _, r in block])
            squared += float(np.sum((np.clip(scores, MIN_STARS, MAX_STARS) - stars) ** 2))
        curve.test.append(rmse(squared, len(test)))
    curve.seconds = time.monotonic() - started
    return curve


def popularity_auc(train: Sequence[Record], test: Sequence[Record], seed: int = 0) -> float:
    """The baseline of implicit feedback: score an item by its training ratings; sampled AUC on `test`."""
    counts: dict[Any, int] = {}
    rated: dict[Any, set[Any]] = {}
    for u, i, *_ in [*train, *test]:
        rated.setdefault(u, set()).add(i)
    for _, i, *_ in train:
        counts[i] = counts.get(i, 0) + 1
    catalog = sorted({i for _, i, *_ in [*train, *test]})
    rng = np.random.default_rng(seed)
    right = pairs = 0.0
    for u, i, *_ in test:
        while (j := catalog[rng.integers(len(catalog))]) in rated[u]:
            pass
        score_i, score_j = counts.get(i, 0), counts.get(j, 0)
        right += 1.0 if score_i > score_j else 0.5 if score_i == score_j else 0.0
        pairs += 1
    return right / pairs


@dataclass
class OnlineResult:
    predicted: np.ndarray
    actual: np.ndarray
    seconds: float

    @property
    def rmse(self) -> float:
        return math.sqrt(float(np.mean((self.predicted - self.actual) ** 2)))

    @property
    def baseline_rmse(self) -> float:
        """Predicting the mean of all the stream's ratings (a baseline that has seen the future)."""
        return float(np.std(self.actual))


def run_online(
    ratings: Sequence[Record], hyper: Hyper, *, workers: int = 2, shards: int = 2, pull_limit: int | None = None
) -> OnlineResult:
    """One prequential pass of OnlineMF over `ratings` with `transform`."""
    logic: WorkerLogic = OnlineMF(hyper.rank, hyper.lr, hyper.reg, hyper.init_std, hyper.seed)
    if pull_limit:
        logic = with_pull_limit(logic, pull_limit)
    predicted, actual = [], []
    started = time.monotonic()
    stream = transform(
        ratings,
        logic,
        item_init_spec(hyper.rank, hyper.init_std, hyper.seed),
        "add",
        workers,
        shards,
        partition_by=operator.itemgetter(0),
    )
    for out in stream:
        if isinstance(out, Left):
            predicted.append(out.value[0])
            actual.append(out.value[1])
    return OnlineResult(np.array(predicted), np.array(actual), time.monotonic() - started)


def plot_offline(path: str, ours: Curve, reference: Curve | None, label: str) -> None:
    """Test RMSE (or AUC) per epoch, next to the numpy reference when there is one."""
    from examples.plotting import save_curve

    lines = {f"streamps, {label}": ours.test}
    xs = {f"streamps, {label}": list(range(1, len(ours.test) + 1))}
    if reference is not None:
        lines["single-process numpy, same SGD"] = reference.test
        xs["single-process numpy, same SGD"] = list(range(1, len(reference.test) + 1))
    save_curve(
        path, xs, lines, "Biased MF on MovieLens 100K, 80/20 split", "epoch",
        "test RMSE" if reference is not None else "test AUC (sampled)",
        hlines={"Surprise SVD, published (0.934)": 0.934} if reference is not None else None,
    )  # fmt: skip


def plot_online(path: str, result: OnlineResult, window: int = 5000) -> None:
    """Prequential RMSE over the stream: over a sliding window, and over everything so far."""
    from examples.plotting import save_curve

    squared = (result.predicted - result.actual) ** 2
    seen = np.arange(1, len(squared) + 1)
    recent = np.sqrt(np.convolve(squared, np.ones(window) / window, mode="valid"))
    so_far = np.sqrt(np.cumsum(squared) / seen)
    lines = {f"last {window:,} ratings": recent, "all ratings so far": so_far[window - 1 :]}
    save_curve(
        path, seen[window - 1 :], lines, "Online biased MF on MovieLens 100K, one pass", "ratings seen",
        "prequential RMSE", hlines={"global mean (seen the whole stream)": result.baseline_rmse},
    )  # fmt: skip


def export_split(path: Path, train: Sequence[Record], test: Sequence[Record]) -> None:
    """The split as tsv lines `user item stars held_out` (held_out 0 or 1), for `psclient run`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for u, i, r, flag in split_records(train, test):
            handle.write(f"{u}\t{i}\t{r}\t{flag}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Biased matrix factorization on MovieLens 100K with streamps.")
    parser.add_argument("--mode", choices=["offline", "online"], default="offline")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK)
    parser.add_argument("--lr", type=float, help=f"SGD step (default {DEFAULT_LR}; {IMPLICIT_LR} with --negatives)")
    parser.add_argument("--reg", type=float, help=f"L2 (default {DEFAULT_REG}; {IMPLICIT_REG} with --negatives)")
    parser.add_argument("--init-std", type=float, default=DEFAULT_INIT_STD)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seeds the model")
    parser.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED, help="seeds the 80/20 split")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--pull-limit", type=int, default=DEFAULT_PULL_LIMIT, help="0: no limit")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="offline: items pulled at a time")
    parser.add_argument("--negatives", type=int, default=0, help="offline: implicit feedback, K negatives each")
    parser.add_argument("--no-reference", dest="reference", action="store_false", help="skip the numpy reference")
    parser.add_argument("--plot", metavar="PATH", help="write a learning-curve PNG (needs matplotlib)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where MovieLens 100K is cached")
    parser.add_argument("--export", type=Path, metavar="TSV", help="write the split as tsv for `psclient run`; exit")
    args = parser.parse_args(argv)
    lr = args.lr if args.lr is not None else IMPLICIT_LR if args.negatives else DEFAULT_LR
    reg = args.reg if args.reg is not None else IMPLICIT_REG if args.negatives else DEFAULT_REG
    hyper = Hyper(args.rank, lr, reg, args.init_std, args.seed, args.epochs)
    train, test = load_split(args.split_seed, args.data_dir)
    if args.export:
        export_split(args.export, train, test)
        mean = sum(r[2] for r in train) / len(train)
        print(f"wrote {len(train):,} training and {len(test):,} test ratings to {args.export}; mean {mean:.4f}")
        return
    setup = f"{args.workers} workers x {args.shards} shards"
    print(f"MovieLens 100K, 80/20 split (seed {args.split_seed}): {len(train):,} train, {len(test):,} test ratings")
    print(f"{setup}; rank {hyper.rank}, lr {hyper.lr}, reg {hyper.reg}, init std {hyper.init_std}", flush=True)

    if args.mode == "online":
        stream = list(train) + list(test)  # the split's shuffled order: one pass over all ratings
        result = run_online(stream, hyper, workers=args.workers, shards=args.shards)
        print(f"online, one pass over {len(result.actual):,} ratings in {result.seconds:.1f} s")
        print(f"prequential RMSE: {result.rmse:.4f}")
        print(f"baseline, the global mean of the whole stream: {result.baseline_rmse:.4f}")
        if args.plot:
            plot_online(args.plot, result)
            print(f"wrote {args.plot}")
        return

    curve = run_offline(
        train, test, hyper, workers=args.workers, shards=args.shards, pull_limit=args.pull_limit or None,
        negatives=args.negatives, window=args.window,
    )  # fmt: skip
    measure = "AUC (sampled)" if args.negatives else "RMSE"
    print(f"offline, {hyper.epochs} epochs in {curve.seconds:.1f} s; {len(curve.items):,} item parameters")
    reference = reference_offline(train, test, hyper) if args.reference and not args.negatives else None
    if args.negatives:
        print(f"baseline, items ranked by popularity: test AUC (sampled) {popularity_auc(train, test):.4f}")
    for epoch, value in enumerate(curve.test, start=1):
        ref = f"   numpy reference {reference.test[epoch - 1]:.4f}" if reference else ""
        print(f"epoch {epoch:2d}: test {measure} {value:.4f}{ref}")
    print(f"test {measure}: streamps {curve.test[-1]:.4f}", end="")
    print(f", numpy reference {reference.test[-1]:.4f} ({reference.seconds:.1f} s)" if reference else "")
    if args.plot:
        plot_offline(args.plot, curve, reference, setup)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
