"""Passive-aggressive classification (Crammer et al. 2006) on sparse features.

A SparseLinearLearner (examples/sparse_linear.py: records, pulls, passes,
bounded lead, averaging) whose update is the PA step. With `y` in {-1, +1},
the margin loss `l = max(0, 1 - y w.x)` and `s = ||x||^2`:

    PA      tau = l / s
    PA-I    tau = min(C, l / s)
    PA-II   tau = l / (s + 1 / (2 C))

and the deltas `tau * y * x`. The intercept (INTERCEPT_ID, a feature whose
value is always 1) gets the same step but is left out of `||x||^2`, as in
scikit-learn's SGDClassifier. Multiclass models are one-vs-rest by default,
each label its own binary PA, all labels in one vector per feature;
`multiclass="crammer"` is the paper's single-vector multiclass update instead
(the right label's vector moves towards x, the highest-scoring wrong one away,
tau computed with `2 ||x||^2`).

The script trains PA, PA-I and PA-II side by side on scikit-learn's
breast_cancer and digits and river's phishing data, on 2 workers x 2 shards,
next to SGDClassifier with the PA learning rates on the same split and passes
(results: examples/RESULTS.md):

    python examples/passive_aggressive.py [--dataset all] [--variant all] [--plot curve.png]

As a worker plugin (jsonl records `[features, label]`):

    psclient run --logic examples.passive_aggressive:PassiveAggressive --init const:0.0 --update add ...

with hyperparameters from the environment: STREAMPS_PA_VARIANT (PA, PA-I,
PA-II), STREAMPS_PA_C, STREAMPS_PA_CLASSES (comma-separated labels; default
0,1; more than two needs `--init zeros:K`), STREAMPS_PA_EPOCHS,
STREAMPS_PA_MULTICLASS (ovr, crammer), STREAMPS_PA_WINDOW, STREAMPS_PA_AVERAGE,
STREAMPS_PA_MAX_LEAD, STREAMPS_PA_SHUFFLE. The file `--model` writes holds the
learner's accumulators and clocks too: examples.linear_model.split_model and
averaged_model separate them.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.datasets import Dataset
from examples.linear_driver import add_run_arguments, compare_on_datasets
from examples.references import sklearn_accuracy, sklearn_pa
from examples.sparse_linear import SparseLinearLearner

VARIANTS = ("PA", "PA-I", "PA-II")
# Small enough that PA-I and PA-II differ from PA (the setting of examples/RESULTS.md).
DEFAULT_C = 0.01


def canonical_variant(name: str) -> str:
    """'PA', 'PA-I' or 'PA-II' from any common spelling (pa1, PA-1, pa-ii, ...)."""
    key = name.strip().upper().replace("_", "-").replace(" ", "")
    aliases = {"PA": "PA", "PA0": "PA", "PA-I": "PA-I", "PA1": "PA-I", "PA-1": "PA-I", "PAI": "PA-I"}
    aliases |= {"PA-II": "PA-II", "PA2": "PA-II", "PA-2": "PA-II", "PAII": "PA-II"}
    if key not in aliases:
        raise ValueError(f"unknown PA variant {name!r}: use one of {', '.join(VARIANTS)}")
    return aliases[key]


def pa_tau(variant: str, loss: Any, sqnorm: float, C: float = DEFAULT_C) -> Any:
    """The PA step size for a margin loss (a float, or an array of losses) and ||x||^2.

    PA: l / s; PA-I: min(C, l / s); PA-II: l / (s + 1 / (2 C)). With s = 0 the
    step of PA and PA-I is 0 (x carries no information; scikit-learn skips such
    a record too).
    """
    loss = np.asarray(loss, dtype=np.float64)
    if variant == "PA-II":
        tau = loss / (sqnorm + 0.5 / C)
    elif sqnorm == 0.0:
        tau = np.zeros_like(loss)
    elif variant == "PA":
        tau = loss / sqnorm
    elif variant == "PA-I":
        tau = np.minimum(C, loss / sqnorm)
    else:
        raise ValueError(f"unknown PA variant {variant!r}")
    return float(tau) if tau.ndim == 0 else tau


class PassiveAggressive(SparseLinearLearner):
    """PA, PA-I or PA-II classification; binary, or multiclass (one-vs-rest or Crammer's).

    Arguments left as None come from STREAMPS_PA_<NAME> environment variables,
    or else from the defaults, the settings of examples/RESULTS.md: PA-I, C=0.01,
    classes 0 and 1, 5 passes, averaged, max_lead 1.
    """

    ENV_PREFIX = "PA"

    def __init__(
        self,
        variant: str | None = None,
        C: float | None = None,
        classes: Sequence[Any] | None = None,
        *,
        multiclass: str | None = None,
        **options: Any,
    ):
        """`options`: SparseLinearLearner's (epochs, window, average, max_lead, fit_intercept, predictions)."""
        super().__init__(classes, **options)
        self.variant = canonical_variant(variant if variant is not None else self.setting("VARIANT", str, "PA-I"))
        self.C = C if C is not None else self.setting("C", float, DEFAULT_C)
        if self.variant == "PA":
            self.C = math.inf
        elif not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C}")
        self.multiclass_rule = multiclass if multiclass is not None else self.setting("MULTICLASS", str, "ovr")
        if self.multiclass_rule not in ("ovr", "crammer"):
            raise ValueError(f"multiclass must be 'ovr' or 'crammer', got {self.multiclass_rule!r}")

    def update(self, x: np.ndarray, weights: np.ndarray, scores: Any, label: Any) -> np.ndarray | None:
        features = x[:-1] if self.fit_intercept else x
        sqnorm = float(features @ features)
        if not self.multiclass:
            y = self.sign(label)
            loss = max(0.0, 1.0 - y * scores)
            tau = pa_tau(self.variant, loss, sqnorm, self.C) if loss > 0.0 else 0.0
            return x * (tau * y) if tau != 0.0 else None
        k = self.index(label)
        if self.multiclass_rule == "ovr":
            signs = np.full(len(self.classes), -1.0)
            signs[k] = 1.0
            losses = np.maximum(0.0, 1.0 - signs * scores)
            if not losses.any():
                return None
            step = pa_tau(self.variant, losses, sqnorm, self.C) * signs
            return np.outer(x, step) if step.any() else None
        rivals = np.array(scores, dtype=np.float64)
        rivals[k] = -np.inf
        r = int(np.argmax(rivals))
        loss = max(0.0, 1.0 - (scores[k] - scores[r]))
        tau = pa_tau(self.variant, loss, 2.0 * sqnorm, self.C) if loss > 0.0 else 0.0
        if tau == 0.0:
            return None
        step = np.zeros(len(self.classes))
        step[k], step[r] = tau, -tau
        return np.outer(x, step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Passive-aggressive classification on streamps, next to scikit-learn's SGDClassifier."
    )
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--C", type=float, default=DEFAULT_C, help="aggressiveness of PA-I and PA-II")
    parser.add_argument("--multiclass", choices=["ovr", "crammer"], default="ovr")
    args = add_run_arguments(parser).parse_args(argv)
    variants = VARIANTS if args.variant == "all" else (args.variant,)

    def factories(data: Dataset) -> dict[str, Callable[[], SparseLinearLearner]]:
        return {
            variant: functools.partial(
                PassiveAggressive,
                variant,
                args.C,
                data.classes,
                epochs=args.epochs,
                multiclass=args.multiclass,
                window=args.window,
                max_lead=args.max_lead,
                shuffle=args.shuffle,
                average=True,
            )
            for variant in variants
        }

    def reference(variant: str, data: Dataset, average: bool) -> float:
        return sklearn_accuracy(sklearn_pa(variant, args.C, args.epochs, average, args.shuffle), data)

    compare_on_datasets(
        args,
        f"passive-aggressive, {args.epochs} passes, C={args.C}, multiclass {args.multiclass}, "
        f"{args.workers} workers x {args.shards} shards, the variants side by side in one job per data set.\n"
        f"Test accuracy next to SGDClassifier(loss='hinge', penalty=None, learning_rate='pa1' (PA: eta0=1e300, "
        f"PA-I: eta0=C) or 'pa2' (PA-II), shuffle={args.shuffle is not None}, random_state={args.shuffle}, "
        f"tol=None, max_iter=passes[, average=True]) on the same "
        f"split; 1st pass: prequential accuracy.",
        factories,
        reference,
        plot_title=f"passive-aggressive, C={args.C}",
    )
    if args.multiclass == "crammer":
        print("note: for digits, sklearn is one-vs-rest and ours Crammer's multiclass rule")


if __name__ == "__main__":
    main()
