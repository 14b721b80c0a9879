"""Learning curves as PNG files, with matplotlib (the optional `plot` extra).

    from examples.plotting import save_curve
    save_curve("curve.png", xs, {"streamps": ys, "reference": ref}, "RMSE", "ratings seen", "RMSE")

matplotlib is imported only when a curve is drawn, with the non-interactive Agg
backend, so the examples run without it unless asked for a plot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

INSTALL_HINT = "pip install -e '.[plot]'"


class PlottingUnavailable(ImportError):
    """matplotlib is not installed; the message says how to install the `plot` extra."""


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend; PlottingUnavailable when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PlottingUnavailable(
            f"plotting needs matplotlib, from the `plot` extra: {INSTALL_HINT} (or pip install matplotlib)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plotting(path: str | None) -> None:
    """Before a long run that ends in a plot: exit with the install hint if matplotlib is missing."""
    if path:
        try:
            pyplot()
        except PlottingUnavailable as exc:
            raise SystemExit(f"--plot {path}: {exc}") from None


def save_curve(
    path: str | Path,
    xs: Sequence[float] | Mapping[str, Sequence[float]],
    ys_by_label: Mapping[str, Sequence[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    logx: bool = False,
    hlines: Mapping[str, float] | None = None,
) -> Path:
    """Draw one line per label of `ys_by_label` against `xs` and save a PNG at `path`.

    `xs` is shared by every line, or a mapping label -> x values when the lines
    differ in length. `hlines` adds dashed horizontal reference lines (label ->
    y). Missing parent directories are created. Returns the path written.
    """
    if not ys_by_label:
        raise ValueError("save_curve needs at least one line")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        for label, ys in ys_by_label.items():
            line_xs = xs[label] if isinstance(xs, Mapping) else xs
            if len(line_xs) != len(ys):
                raise ValueError(f"{label!r}: {len(line_xs)} x values but {len(ys)} y values")
            ax.plot(line_xs, ys, label=label, linewidth=1.5)
        for label, y in (hlines or {}).items():
            ax.axhline(y, linestyle="--", linewidth=1.0, color="gray", label=label)
        if logx:
            ax.set_xscale("log")
        elif _largest(xs) >= 10_000:  # counts of records: 1,000,000 rather than 1e6
            from matplotlib.ticker import FuncFormatter

            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:,.0f}"))
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out


def _largest(xs: Sequence[float] | Mapping[str, Sequence[float]]) -> float:
    columns = list(xs.values()) if isinstance(xs, Mapping) else [xs]
    return max((abs(float(x)) for column in columns for x in column), default=0.0)


# -- learning curves of the sparse linear examples -----------------------------------


def moving_accuracy(correct: np.ndarray, window: int) -> np.ndarray:
    """Accuracy over the last `window` predictions (fewer at the start)."""
    sums = np.cumsum(correct, dtype=np.float64)
    counts = np.minimum(np.arange(1, len(correct) + 1), window)
    shifted = np.concatenate([np.zeros(window), sums])[: len(correct)]
    return (sums - shifted) / counts


def plot_learning_curves(
    path: str, title: str, panels: dict[str, list[tuple[Any, Any, float]]], train_sizes: dict[str, int]
) -> None:
    """One panel per data set: each model's accuracy over a moving window of its predictions,
    all passes in a row, on the cluster (solid) and in one process with no asynchrony (dotted:
    scikit-learn's own updates), with the test accuracies in the legend. matplotlib is imported
    here only: it is the optional `plot` extra. `panels`: data set -> (cluster run, in-process run,
    scikit-learn's test accuracy) per model, the runs as examples.linear_driver.Run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, runs) in zip(axes[0], panels.items(), strict=True):
        window = max(25, train_sizes[name] // 10)
        lowest = 1.0
        for index, (ours, sequential, reference) in enumerate(runs):
            color = colors[index % len(colors)]
            curve, baseline = moving_accuracy(ours.correct(), window), moving_accuracy(sequential.correct(), window)
            ax.plot(curve, color=color, label=f"{ours.label}: test {ours.test_accuracy:.3f} (sklearn {reference:.3f})")
            ax.plot(baseline, color=color, linestyle=":", linewidth=1.2)
            lowest = min(lowest, float(curve[window:].min(initial=1.0)), float(baseline[window:].min(initial=1.0)))
        for boundary in range(train_sizes[name], len(runs[0][0].outputs), train_sizes[name]):
            ax.axvline(boundary, color="0.75", linewidth=0.8)
        ax.plot([], [], color="0.4", linestyle=":", label="dotted: one process (= scikit-learn's updates)")
        ax.set_ylim(max(0.0, math.floor((lowest - 0.05) * 20) / 20), 1.005)
        ax.set_title(f"{name} ({train_sizes[name]} training records)")
        ax.set_xlabel("predictions in arrival order, all passes (grey lines: pass ends)")
        ax.set_ylabel(f"accuracy of the last {window} predictions")
        ax.legend(loc="lower right", fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\nprequential accuracy over the stream: on the cluster (solid), in one process (dotted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- matrix factorization on MovieLens ------------------------------------------------


def plot_offline(path: str, ours: Any, reference: Any, label: str, split: str = "80/20 split") -> None:
    """Test RMSE (or AUC) per epoch, next to the numpy reference when there is one."""
    lines = {f"streamps, {label}": ours.test}
    xs = {f"streamps, {label}": list(range(1, len(ours.test) + 1))}
    if reference is not None:
        lines["single-process numpy, same SGD"] = reference.test
        xs["single-process numpy, same SGD"] = list(range(1, len(reference.test) + 1))
    save_curve(
        path, xs, lines, f"Biased MF on MovieLens 100K, {split}", "epoch",
        "test RMSE" if reference is not None else "test AUC (sampled)",
        hlines={"Surprise SVD, published (0.934)": 0.934} if reference is not None else None,
    )  # fmt: skip


def plot_online(path: str, result: Any, window: int = 5000) -> None:
    """Prequential RMSE over the stream: over a sliding window, and over everything so far."""
    squared = (result.predicted - result.actual) ** 2
    seen = np.arange(1, len(squared) + 1)
    recent = np.sqrt(np.convolve(squared, np.ones(window) / window, mode="valid"))
    so_far = np.sqrt(np.cumsum(squared) / seen)
    lines = {f"last {window:,} ratings": recent, "all ratings so far": so_far[window - 1 :]}
    save_curve(
        path, seen[window - 1 :], lines, "Online biased MF on MovieLens 100K, one pass", "ratings seen",
        "prequential RMSE", hlines={
            "running mean of the ratings before each one": result.running_mean_rmse,
            "global mean (seen the whole stream)": result.baseline_rmse,
        },
    )  # fmt: skip
