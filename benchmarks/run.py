"""`make bench`: every benchmark in one run, printed and written to benchmarks/RESULTS.md.

Each row is measured in the same run as its baseline and the ratio printed
beside it, so the machine's noise hits both sides alike. A section module has
`HEADERS` and `run()` (its table rows), and may have `targets()`, read after
`run()`: (what, measured, goal, met) for the performance targets it measures,
gathered into one table at the top of RESULTS.md.

Sections of the previous RESULTS.md whose heading starts with "## Profile" are
written by hand (py-spy summaries): they are carried over as they are.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (
    bench_batching,
    bench_default_path,
    bench_durability,
    bench_logic,
    bench_memory,
    bench_mf,
    bench_raw,
    bench_recovery,
    bench_restarts,
    bench_sparse,
)
from benchmarks.common import format_table, machine_facts

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
KEPT_HEADING = "## Profile"


def sections() -> list[tuple[str, ModuleType]]:
    return [
        ("a. Raw shard path: SDK batch pull/push against an in-process numpy table", bench_raw),
        ("b. WorkerLogic path: pull -> on_pull_recv -> push round trips", bench_logic),
        ("c. Online matrix factorization on MovieLens 100K: streamps, a numpy loop, Ray, Redis", bench_mf),
        ("d. Sparse logistic regression, 50 hashed features a record, through push_many", bench_sparse),
        ("e. Shard memory holding 1,000,000 parameters of 16 float32", bench_memory),
        ("f. Durable shards: push throughput without --data-dir, with --no-durable, with --durable", bench_durability),
        ("g. Durable shards: recovery of 1,000,000 parameters after SIGKILL", bench_recovery),
        ("h. Restartable jobs: durable shards and worker checkpoints against a plain job, MF 2x2", bench_restarts),
        ("i. Batching knobs: the per-key MF job at several --batch-max-keys and --batch-linger-ms", bench_batching),
        ("j. The default path before and after consistency, server logic and the batching knobs", bench_default_path),
    ]


def kept_sections(text: str) -> list[str]:
    """The hand-written "## Profile..." sections of a previous RESULTS.md, each up to the next "## "."""
    kept: list[str] = []
    keeping = False
    for line in text.splitlines():
        if line.startswith("## ") or line.startswith("Total time:"):
            keeping = line.startswith(KEPT_HEADING)
            if keeping and kept and kept[-1] != "":
                kept.append("")
        if keeping:
            kept.append(line)
    while kept and kept[-1] == "":
        kept.pop()
    return ["", *kept] if kept else []


def main() -> None:
    started = time.time()
    previous = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else ""
    load_before = os.getloadavg()
    done: list[tuple[str, ModuleType, str]] = []
    for title, module in sections():
        print(f"\n## {title}", flush=True)
        table = format_table(module.HEADERS, module.run())
        print(table, flush=True)
        done.append((title, module, table))
    targets = [row for _, module, _ in done if hasattr(module, "targets") for row in module.targets()]
    target_table = format_table(
        ["target", "measured", "goal", "met"],
        [[what, got, goal, "-" if met is None else ("yes" if met else "NO")] for what, got, goal, met in targets],
    )
    print(f"\n## Targets\n{target_table}", flush=True)
    load_after = os.getloadavg()

    parts = [
        "# Benchmark results",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make bench`.",
        "",
        *machine_facts(),
        f"- Load average (1 min) at the start and the end: {load_before[0]:.2f}, {load_after[0]:.2f}. Other"
        " processes may share the machine: ratios are measured in one run, so noise hits both sides of each.",
        "",
        "## Targets",
        "",
        target_table,
    ]
    for title, module, table in done:
        doc = (module.__doc__ or "").strip()
        parts += ["", f"## {title}", "", doc, "", table]
    parts += kept_sections(previous)
    parts += ["", f"Total time: {time.time() - started:.0f} s."]
    RESULTS.write_text("\n".join(parts) + "\n", encoding="utf-8")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
