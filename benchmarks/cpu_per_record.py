"""CPU per record of each process of a job: where a job's time goes, machine noise aside.

Wall-clock rates on a shared 2-core machine swing with whatever else runs;
the CPU seconds each process spends on a job swing much less. This runs one
job on a LocalCluster and prints, per record of the whole stream, the CPU
of the driver (this process), of each shard and of each worker, read with
psutil from just before the first record to the end of the job (start-up
not counted).

    python -m benchmarks.cpu_per_record mf 256            # per-key MF, pull limit 256, 2 x 2
    python -m benchmarks.cpu_per_record windows 256 --workers 1
    python -m benchmarks.cpu_per_record sparse 256 --py-spy /tmp/profile

Jobs: `mf` (StreamMF under a pull limit), `windows` (WindowMF), both on
MovieLens 100K three times over (300,000 ratings); `sparse` (bench_sparse's
windowed logistic regression, 240,000 records). With --py-spy PREFIX, py-spy
records the GIL holder of worker 0, shard 0 and the driver to
PREFIX.{worker,shard,driver}.txt (raw format).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psclient.cluster import Cluster
from psclient.either import Left
from psclient.local import LocalCluster
from psclient.plugins import ship


def _job(name: str, window: int) -> tuple[list[Any], Any, str, Any]:
    """(records, logic, init spec, partition key) of a named job."""
    if name == "sparse":
        from benchmarks.bench_sparse import WindowedSparseLR, make_records

        return make_records() * 4, WindowedSparseLR(window), "const:0.0", None
    from benchmarks.mf_common import INIT_SPEC, movielens_by_time, stream_mf
    from benchmarks.streamps_mf import WindowMF

    logic = stream_mf(window) if name == "mf" else WindowMF(window)
    return movielens_by_time().records() * 3, logic, INIT_SPEC, lambda record: record[0]


def _cpu(pid: int) -> float:
    import psutil  # the bench extra (`make bench` installs it)

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=["mf", "windows", "sparse"])
    parser.add_argument("window", type=int, help="pull limit (mf) or records per window")
    parser.add_argument("--workers", type=int, default=2, help="workers, and as many shards")
    parser.add_argument("--py-spy", metavar="PREFIX", help="profile worker 0, shard 0 and the driver")
    args = parser.parse_args(argv)

    records, logic, init, partition_by = _job(args.job, args.window)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(ship(logic, Path(tmp), "logic"), init, "add", args.workers, args.workers)
        with cluster, Cluster(cluster.servers, cluster.workers) as client:
            spies = _start_py_spy(args.py_spy, cluster) if args.py_spy else []
            before = {child.name: _cpu(child.process.pid) for child in cluster.children}
            driver_before = time.process_time()
            started = time.perf_counter()
            finished = None
            for item in client.stream(records, partition_by=partition_by):
                if not isinstance(item, Left) and finished is None:
                    finished = time.perf_counter()
            elapsed = (finished or time.perf_counter()) - started
            driver = time.process_time() - driver_before
            used = {child.name: _cpu(child.process.pid) - before[child.name] for child in cluster.children}
            for spy in spies:
                spy.send_signal(2)  # SIGINT: py-spy writes its file
                spy.wait()
    count = len(records)
    print(f"{args.job}, W={args.window}, {args.workers} x {args.workers}: {count / elapsed:,.0f} records/s")
    print(f"{'process':<10} {'CPU s':>7} {'us per record':>14}")
    print(f"{'driver':<10} {driver:7.2f} {1e6 * driver / count:14.1f}")
    for name, seconds in used.items():
        print(f"{name:<10} {seconds:7.2f} {1e6 * seconds / count:14.1f}")
    total = driver + sum(used.values())
    print(f"{'all':<10} {total:7.2f} {1e6 * total / count:14.1f}")


def _start_py_spy(prefix: str, cluster: LocalCluster) -> list[subprocess.Popen[bytes]]:
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    pids = {"worker": cluster.children[cluster.num_shards].process.pid, "shard": cluster.children[0].process.pid}
    pids["driver"] = os.getpid()
    record = [py_spy, "record", "--nonblocking", "-r", "200", "-f", "raw", "--gil"]
    spies = [
        subprocess.Popen(
            [*record, "-o", f"{prefix}.{name}.txt", "--pid", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    time.sleep(1.0)  # let py-spy attach before the clock starts
    return spies


if __name__ == "__main__":
    main()
