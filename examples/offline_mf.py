"""Offline biased matrix factorization: several epochs over a split of the ratings.

The biased model of examples/mf.py (items on the shards as [vector, bias],
users in their worker, records partitioned by user). A record is `(user, item,
stars)` or `(user, item, stars, held_out)`; a true `held_out` marks a test
rating, kept for evaluation and never trained on (a csv/tsv file with a 0/1
fourth column carries the split; `split_records` makes one).

The input pass is epoch 1: each rating is learned as its item's pull comes back
(ratings for an item already on its way wait for the same answer), and kept.
`on_input_end` starts epoch 2 by pulling every item of the worker's training
share again, in a fresh random order; `on_pull_recv` trains on all of the
worker's ratings of that item, users in a fresh random order, and pushes the
item's change. At most `window` (32) items are out at a time, so that an item
is pulled shortly before it is trained and carries the other workers' recent
pushes: with all 1,682 pulled at once, every worker trains a whole epoch on the
values of its start, and the test RMSE ends about 0.005 worse. When no pull is
left unanswered the epoch is over; the worker evaluates on its held-out ratings
(one more round of pulls, of the test items) and starts the next epoch. It
outputs

    ("train", worker, epoch, sum of squared errors, ratings)   # errors made while training
    ("test", worker, epoch, sum of squared errors, ratings)    # held-out ratings, after the epoch

which `run_offline` adds up over the workers into RMSEs (predictions clipped to 1..5).

With `negatives=K > 0` the ratings are implicit feedback: every rating is a
positive (label 1), and each positive brings K items the user has not rated,
sampled afresh every epoch, as negatives (label 0). The evaluation is then a
sampled AUC: for each held-out rating, one unrated item is drawn once, and the
pair counts as ranked right when the rated item scores higher; it outputs
`("auc", worker, epoch, pairs ranked right, pairs)`.

Run on MovieLens 100K by examples/movielens_mf.py. As a worker plugin:
`--logic examples.offline_mf:OfflineMF`, hyperparameters from STREAMPS_MF_RANK,
_LR, _REG, _INIT_STD, _SEED, _EPOCHS, _MEAN, _NEGATIVES, _WINDOW.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from examples.mf import (
    MAX_STARS,
    MIN_STARS,
    BiasedMF,
    Client,
    Hyper,
    biased_init_spec,
    item_values,
    predict,
    rmse,
    transform_by_user,
)
from examples.settings import env
from psclient import Left, Right

Record = tuple[Any, ...]  # (user, item, stars) or (user, item, stars, held_out)

# Implicit feedback (negatives > 0) wants a larger step and a smaller L2: sampled
# AUC about 0.91 after 6 epochs with 4 negatives (items ranked by popularity: 0.85).
IMPLICIT_LR = 0.05
IMPLICIT_REG = 0.02
# Unanswered pulls per worker (0: the runtime's default bound).
DEFAULT_PULL_LIMIT = 0
# Items pulled at a time in epochs 2.. (0: all of them at once).
DEFAULT_WINDOW = 32


@dataclass
class _Round:
    """One round of pulls (an epoch's training, or an evaluation): what each item is pulled for."""

    kind: str  # "train", "eval" or "done"
    blocks: dict[Any, list[Any]] = field(default_factory=dict)
    unanswered: int = 0  # items not answered yet, pulled or still to pull
    to_pull: deque[Any] = field(default_factory=deque)  # items of a windowed round not pulled yet
    total: float = 0.0
    count: int = 0


class OfflineMF(BiasedMF):
    """Several epochs over the worker's share, the first one during the input pass.

    `eval_every_epoch` evaluates after every epoch (a learning curve) rather than
    after the last one only. `negatives` > 0 switches to implicit feedback.
    `window` bounds the items a training round has pulled and not yet trained
    on (0: pull them all at once). `emit_users` outputs the trained users at the
    end, as `("user", worker, user, [vector, bias])`.
    """

    def __init__(
        self,
        *args: Any,
        epochs: int | None = None,
        negatives: int | None = None,
        eval_every_epoch: bool = True,
        window: int | None = None,
        emit_users: bool = False,
        **kwargs: Any,
    ):
        """`args`, `kwargs`: BiasedMF's (rank, lr, reg, init_std, seed, mean)."""
        super().__init__(*args, **kwargs)
        self.window = window if window is not None else env("MF", "WINDOW", int, DEFAULT_WINDOW)
        self.epochs = epochs if epochs is not None else env("MF", "EPOCHS", int, self.DEFAULTS.epochs)
        self.negatives = negatives if negatives is not None else env("MF", "NEGATIVES", int, 0)
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
            ps.push(param_id, (item_values(item) - item_values(before)).astype(np.float32))
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
        # One clock per epoch: under bsp or ssp:S (run_offline's `consistency`) the shards hold
        # this epoch's pulls while another worker is more than S epochs behind.
        ps.advance_clock()
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


def split_records(train: Sequence[Record], test: Sequence[Record]) -> list[Record]:
    """The stream of an offline job: training ratings flagged 0, then test ratings flagged 1."""
    return [(u, i, r, 0) for u, i, r, *_ in train] + [(u, i, r, 1) for u, i, r, *_ in test]


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
    consistency: str = "async",
) -> Curve:
    """Train OfflineMF with `transform`; return its per-epoch errors and the trained model."""
    mean = 1.0 / (1 + negatives) if negatives else sum(r[2] for r in train) / len(train)
    logic = OfflineMF(
        **hyper.__dict__, mean=mean, negatives=negatives, eval_every_epoch=eval_every_epoch, window=window,
        emit_users=emit_users,
    )  # fmt: skip
    sums: dict[tuple[str, int], list[float]] = {}
    curve = Curve()
    started = time.monotonic()
    init = biased_init_spec(hyper.rank, hyper.init_std, hyper.seed)
    stream = transform_by_user(split_records(train, test), logic, init, workers, shards, pull_limit, consistency)
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
