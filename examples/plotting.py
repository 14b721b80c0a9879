"""Learning curves as PNG files, with matplotlib (the optional `plot` extra).

    from examples.plotting import save_curve
    save_curve("curve.png", xs, {"streamps": ys, "reference": ref}, "RMSE", "ratings seen", "RMSE")

matplotlib is imported only when a curve is drawn, with the non-interactive Agg
backend, so the examples run without it unless asked for a plot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
