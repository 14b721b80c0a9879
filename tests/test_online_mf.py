"""Online matrix factorization (examples/online_mf.py): its baselines, prequential and not."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `examples` is a directory of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from examples.online_mf import main  # noqa: E402
from examples.references import running_means  # noqa: E402


def test_the_running_mean_predicts_each_rating_from_the_ratings_before_it() -> None:
    np.testing.assert_array_equal(running_means(np.array([4.0, 2.0, 3.0, 5.0])), [3.0, 4.0, 3.0, 3.0])
    np.testing.assert_array_equal(running_means(np.array([4.0, 2.0]), prior=1.0), [1.0, 4.0])
    assert len(running_means(np.array([]))) == 0


@pytest.mark.timeout(120)
def test_the_demo_reports_the_running_mean_beside_the_global_mean(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--ratings", "100000", "--lr", "0.15", "--no-progress"])
    out = capsys.readouterr().out

    figures = [
        re.search(pattern + r": (\d\.\d{4})\n", out)
        for pattern in (
            r"RMSE of the last 10% of predictions \(10,000 ratings\)",
            r"baseline, the running mean of the ratings before each one, on the same ratings",
            r"baseline, the global mean \d\.\d{3} of the whole stream \(seen the future\), on the same ratings",
        )
    ]
    assert all(figures), out
    ours, running, foresight = (float(match.group(1)) for match in figures if match)
    # Late in the stream the running mean is nearly the global mean; the model beats both.
    assert abs(running - foresight) < 0.01
    assert ours < running - 0.05
