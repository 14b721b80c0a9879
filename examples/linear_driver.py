"""Training and scoring the sparse linear examples (PassiveAggressive, LogisticRegression).

`train_distributed` runs one or more learners side by side on a local cluster
(2 workers x 2 shards by default) and scores each final model on the test
split; `train_in_process` runs the same logic in this process with no
asynchrony at all (InProcessPS), which is what scikit-learn's updates are.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from examples.datasets import DATASETS, Dataset, load_dataset
from examples.linear_model import Id, Prediction, Record, averaged_model, param_init_for, split_model
from examples.plotting import check_plotting, plot_learning_curves
from examples.side_by_side import SideBySide, split_namespaced_id
from examples.sparse_linear import DEFAULT_EPOCHS, DEFAULT_MAX_LEAD, SparseLinearLearner
from psclient import Left, Right, transform
from psworker import WorkerLogic
from psworker.testing import InProcessClient


class InProcessPS(InProcessClient):
    """Runs a WorkerLogic in this process against a dict, one callback at a time (add updates).

    Pulls are answered after the callback that issued them returns, in order,
    one id at a time (`on_pull_recv`, each value read when its turn comes):
    with `window=1` a SparseLinearLearner then makes exactly the sequential
    updates of a single-threaded library. For checks and reference curves.
    """

    def __init__(self, init: Callable[[Id], Any] | str, *, worker_index: int = 0, num_workers: int = 1):
        super().__init__(init, "add", worker_index=worker_index, num_workers=num_workers, one_by_one=True)

    @property
    def values(self) -> dict[Id, Any]:
        return self.model

    def answer_round(self, logic: WorkerLogic) -> int:
        """Answer the pulls pending now (not those their answers cause); return how many."""
        return sum(self.answer_one(logic) for _ in range(self.queued_calls))


@dataclass
class Run:
    """What training one model gave: its outputs in arrival order, its final and averaged models
    (weights only: feature id -> value, and INTERCEPT_ID), their test accuracies, and apart the
    learner's own parameters (`internals`: averaging accumulators and clocks)."""

    label: str
    outputs: list[Prediction]
    model: dict[Id, Any]
    averaged: dict[Id, Any] | None  # None unless the learner averages
    internals: dict[Id, Any]
    test_accuracy: float
    averaged_accuracy: float  # nan unless the learner averages
    seconds: float

    def correct(self) -> np.ndarray:
        return np.array([label == predicted for _, label, predicted in self.outputs], dtype=bool)

    def prequential_accuracy(self) -> float:
        """Accuracy of the first-pass predictions, each made before learning its record."""
        first = [label == predicted for epoch, label, predicted in self.outputs if epoch == 1]
        return float(np.mean(first)) if first else float("nan")


def accuracy_on(logic: SparseLinearLearner, model: dict[Id, Any], records: Sequence[Record]) -> float:
    hits = sum(logic.predict(model, features) == label for features, label in records)
    return hits / len(records) if records else float("nan")


def evaluate(
    label: str,
    logic: SparseLinearLearner,
    outputs: list[Prediction],
    params: dict[Id, Any],
    data: Dataset,
    seconds: float,
) -> Run:
    """Test accuracy of the final model and, if the learner averages, of the averaged one."""
    weights, internals = split_model(params)
    averaged = averaged_model(params, len(data.train) * logic.epochs) if logic.average else None
    accuracy = accuracy_on(logic, weights, data.test)
    averaged_accuracy = accuracy_on(logic, averaged, data.test) if averaged is not None else float("nan")
    return Run(label, outputs, weights, averaged, internals, accuracy, averaged_accuracy, seconds)


def train_distributed(
    factories: dict[str, Callable[[], SparseLinearLearner]],
    data: Dataset,
    workers: int = 2,
    shards: int = 2,
) -> dict[str, Run]:
    """Train every model on the training split in one job (2 workers x 2 shards by default), side by
    side; evaluate each final model on the test split in this process."""
    labels = list(factories)
    models = len(labels)
    started = time.monotonic()
    outputs: list[list[Prediction]] = [[] for _ in labels]
    params: list[dict[Id, Any]] = [{} for _ in labels]
    logic: Any = factories[labels[0]] if models == 1 else SideBySide([factories[label]() for label in labels])
    stream = transform(
        data.train,
        logic,
        param_init_for(data.classes),
        "add",
        worker_parallelism=workers,
        ps_parallelism=shards,
    )
    for item in stream:
        match item:
            case Left(output):
                if models == 1:
                    outputs[0].append(output)
                else:
                    outputs[output[0]].append(output[1])
            case Right((param_id, value)):
                model, original = (0, param_id) if models == 1 else split_namespaced_id(param_id, models)
                params[model][original] = value
    seconds = time.monotonic() - started
    return {
        label: evaluate(label, factories[label](), outputs[m], params[m], data, seconds)
        for m, label in enumerate(labels)
    }


def train_in_process(label: str, factory: Callable[[], SparseLinearLearner], data: Dataset) -> Run:
    """The same logic in this process, sequentially (InProcessPS): no asynchrony at all."""
    logic = factory()
    started = time.monotonic()
    outputs, model = InProcessPS(param_init_for(data.classes)).run(logic, data.train)
    return evaluate(label, logic, outputs, model, data, time.monotonic() - started)


def report_header(title: str) -> None:
    print(title)
    print(
        f"{'data set':<14}{'model':<7}{'final: ours':>12}{'sklearn':>9}{'diff':>8}"
        f"{'averaged: ours':>16}{'sklearn':>9}{'diff':>8}{'1st pass':>10}"
    )


def report_row(name: str, run: Run, reference: float, reference_averaged: float) -> None:
    print(
        f"{name:<14}{run.label:<7}{run.test_accuracy:>12.3f}{reference:>9.3f}{run.test_accuracy - reference:>+8.3f}"
        f"{run.averaged_accuracy:>16.3f}{reference_averaged:>9.3f}{run.averaged_accuracy - reference_averaged:>+8.3f}"
        f"{run.prequential_accuracy():>10.3f}",
        flush=True,
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every sparse linear example takes: data, passes, asynchrony, cluster, plot."""
    parser.add_argument("--dataset", choices=[*DATASETS, "all"], default="all")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="passes over the training data")
    parser.add_argument("--window", type=int, default=1, help="records in flight per worker")
    parser.add_argument(
        "--shuffle", type=int, metavar="SEED", help="each pass after the first in a fresh order (sklearn: each pass)"
    )
    parser.add_argument(
        "--max-lead",
        type=int,
        default=DEFAULT_MAX_LEAD,
        help="records a worker may be ahead of the slowest one (-1: unbounded)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--plot", metavar="PATH", help="write a learning-curve PNG (needs matplotlib)")
    return parser


def compare_on_datasets(
    args: argparse.Namespace,
    title: str,
    factories: Callable[[Dataset], dict[str, Callable[[], SparseLinearLearner]]],
    reference: Callable[[str, Dataset, bool], float],
    *,
    plot_title: str,
    note: Callable[[Dataset], str] = lambda _data: "",
) -> None:
    """Train the models of `factories` side by side on each data set of `args.dataset`, print each
    one's test accuracy next to `reference(model label, data, averaged)`, and plot if asked."""
    check_plotting(args.plot)
    report_header(title)
    panels: dict[str, list[tuple[Run, Run, float]]] = {}
    sizes: dict[str, int] = {}
    for name in DATASETS if args.dataset == "all" else (args.dataset,):
        data = load_dataset(name)
        sizes[name] = len(data.train)
        made = factories(data)
        runs = train_distributed(made, data, args.workers, args.shards)
        for label, run in runs.items():
            final = reference(label, data, False)
            report_row(name, run, final, reference(label, data, True))
            if args.plot:
                panels.setdefault(name, []).append((run, train_in_process(label, made[label], data), final))
        print(f"{'':<14}({next(iter(runs.values())).seconds:.1f} s for the job{note(data)})", flush=True)
    if args.plot:
        plot_learning_curves(args.plot, plot_title, panels, sizes)
        print(f"learning curves written to {args.plot}")
