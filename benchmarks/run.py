"""`make bench`: every benchmark in one run, printed and written to benchmarks/RESULTS.md.

Each row is measured in the same run as its baseline and the ratio printed
beside it, so the machine's noise hits both sides alike.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_logic, bench_memory, bench_mf, bench_raw
from benchmarks.common import format_table, machine_facts

SECTIONS = [
    ("a. Raw shard path: SDK batch pull/push against an in-process numpy table", bench_raw),
    ("b. WorkerLogic path: pull -> on_pull_recv -> push round trips", bench_logic),
    ("c. Online matrix factorization, 100,000 ratings, rank 16", bench_mf),
    ("d. Shard memory holding 1,000,000 parameters of 16 float32", bench_memory),
]


def main() -> None:
    started = time.time()
    parts = [
        "# Benchmark results",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make bench`.",
        "",
    ]
    parts += machine_facts()
    for title, module in SECTIONS:
        print(f"\n## {title}", flush=True)
        table = format_table(module.HEADERS, module.run())
        print(table, flush=True)
        doc = (module.__doc__ or "").strip()
        parts += ["", f"## {title}", "", doc, "", table]
    parts += ["", f"Total time: {time.time() - started:.0f} s."]
    out = Path(__file__).resolve().parent / "RESULTS.md"
    out.write_text("\n".join(parts) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
