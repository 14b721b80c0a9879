"""The default path before and after consistency, server logic and the batching knobs.

Those features add branches to the shard and the worker that an async job
without a server logic should never pay for. This section runs the same two
default-path jobs on this tree and on a checkout of BASELINE_REV, the last
commit before any of them, in alternation (5 rounds, medians), each in a child
process whose PYTHONPATH names the tree measured (benchmarks/default_path_job.py):

- raw pull+push: a blocking pull then push of 1,024 keys x 16 float32 against
  1 shard, through the SDK, as the target row of section a;
- MF per key: StreamMF under a pull limit of 256 over the first 30,000 ratings
  of MovieLens 100K in timestamp order, 2 workers x 2 shards, routed by user,
  default batching, as the default row of section i; start-up excluded.

The checkout is a detached `git worktree` in a temporary directory, removed
afterwards; without the repository's history the rows say so.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.mf_common import DATA_DIR, movielens_by_time

ROOT = Path(__file__).resolve().parent.parent
JOB = Path(__file__).resolve().parent / "default_path_job.py"
# The last commit before batching knobs, server logic and BSP/SSP consistency.
BASELINE_REV = "2254a8b"
ROUNDS = 5
JOBS = [("raw", "raw pull+push, 1,024 keys x 16 float32, 1 shard", "keys/s"),
        ("mf", "MF per key 2x2, W=256, 30,000 ratings", "ratings/s")]  # fmt: skip
GOAL = 0.95  # within the noise of a shared 2-core machine
_ratios: dict[str, float] = {}


def _measure(tree: Path, job: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, str(JOB), job, str(DATA_DIR)], env=env, cwd=tree, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{job} job on {tree} failed: {tail}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["rate"])


def _baseline_tree(directory: Path) -> Path | None:
    """A checkout of BASELINE_REV in `directory`, or None without the history."""
    tree = directory / "baseline"
    added = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), BASELINE_REV],
        capture_output=True,
        text=True,
        check=False,
    )
    return tree if added.returncode == 0 else None


def run() -> list[list[str]]:
    movielens_by_time()  # fetch the data once, outside the measurements
    with tempfile.TemporaryDirectory() as tmp:
        baseline = _baseline_tree(Path(tmp))
        if baseline is None:
            return [
                [label, "-", "-", unit, f"not measured: no git history with {BASELINE_REV}"] for _, label, unit in JOBS
            ]
        try:
            rows = []
            for job, label, unit in JOBS:
                ours: list[float] = []
                before: list[float] = []
                for _ in range(ROUNDS):  # alternating: the machine's noise hits both trees alike
                    before.append(_measure(baseline, job))
                    ours.append(_measure(ROOT, job))
                ratio = statistics.median(ours) / statistics.median(before)
                _ratios[label] = ratio
                rows.append([label, f"{statistics.median(before):,.0f}", f"{statistics.median(ours):,.0f}", unit,
                             f"{ratio:.2f}x"])  # fmt: skip
            return rows
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False)


def targets() -> list[tuple[str, str, str, bool | None]]:
    rows: list[tuple[str, str, str, bool | None]] = []
    for _, label, _ in JOBS:
        ratio = _ratios.get(label)
        what = f"default path, {label}: this tree / {BASELINE_REV}"
        rows.append((what, "not measured" if ratio is None else f"{ratio:.2f}x", f">= {GOAL}x",
                     None if ratio is None else ratio >= GOAL))  # fmt: skip
    return rows


HEADERS = ["job (async, no server logic)", f"{BASELINE_REV}", "this tree", "unit", "this tree / before"]

if __name__ == "__main__":
    from benchmarks.common import format_table

    started = time.time()
    print(format_table(HEADERS, run()))
    print(f"\n{time.time() - started:.0f} s")
