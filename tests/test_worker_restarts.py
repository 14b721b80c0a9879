"""Restartable workers: `psworker --checkpoint-dir` checkpoints its input position and its
logic's state at quiescent points; killed with SIGKILL and started again with the same job
id and index, it resumes from the checkpoint, and the shards apply the pushes of the
records it replays once (by input position). With durable shards, any process of a job may
be killed, any number of times, and the final model is the fault-free one, exactly.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Processes, error_line, run_psworker, text_file
from logics import Exactness
from test_shard_restarts import expected_model, port_of, start_shard

from psclient import Cluster
from psclient.children import worker_argv
from psclient.wire.partition import shard_of
from psclient.wire.proto import worker_pb2
from psworker.checkpoints import checkpoint_path, read_checkpoint
from psworker.origins import OriginTracker
from psworker.runtime import WorkerRuntime

WORKERS = 3
SHARDS = 2
JOB = "job11"
RECORDS = 50_000


def windows_model(records: range) -> dict[Any, int]:
    return dict(Counter(r % 100 for r in records))


def pull_chain_model(records: range) -> dict[Any, int]:
    model: Counter[Any] = Counter()
    for r in records:
        model[r % 100] += 1
        model[f"s{r % 100 % 10}"] += 1
    return dict(model)


class Job:
    """A file job of restartable workers on durable shards, whose processes a test kills
    and starts again as a supervisor would: the same command line, the same port."""

    def __init__(self, procs: Processes, tmp_path: Path, logic: str, records: int, *, every: int = 500):
        self.procs = procs
        self.logic = logic
        self.every = every
        self.input = text_file(tmp_path / "records.jsonl", (str(r) for r in range(records)))
        self.checkpoints = tmp_path / "checkpoints"
        self.tmp_path = tmp_path
        self.shard_dirs = [tmp_path / f"shard-{index}" for index in range(SHARDS)]
        for directory in self.shard_dirs:
            directory.mkdir()
        self.shards = [start_shard(procs, index, "--data-dir", str(self.shard_dirs[index])) for index in range(SHARDS)]
        self.servers = [shard.address for shard in self.shards]
        self.workers = [self._start_worker(index) for index in range(WORKERS)]
        self.restarts: Counter[str] = Counter()

    def worker_argv(self, index: int) -> list[str]:
        return worker_argv(
            self.logic, self.servers, index, WORKERS,
            "--input", str(self.input), "--output", str(self.tmp_path / f"out-{index}.jsonl"),
            "--job-id", JOB, "--checkpoint-dir", str(self.checkpoints), "--checkpoint-every", str(self.every),
            "--shard-timeout", "60", log_level="INFO",
        )  # fmt: skip

    def _start_worker(self, index: int) -> subprocess.Popen[str]:
        process, _ = self.procs.popen(self.worker_argv(index), stdout=subprocess.DEVNULL)
        return process

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker `index` (unless it has exited) and start it again."""
        if self.workers[index].poll() is None:
            os.kill(self.workers[index].pid, signal.SIGKILL)
        self.workers[index].wait(timeout=10)
        self.workers[index] = self._start_worker(index)
        self.restarts[f"worker {index}"] += 1

    def kill_shard(self, index: int) -> None:
        os.kill(self.shards[index].process.pid, signal.SIGKILL)
        self.shards[index].process.wait(timeout=10)
        self.shards[index] = start_shard(
            self.procs, index, "--data-dir", str(self.shard_dirs[index]), port=port_of(self.shards[index])
        )
        self.restarts[f"shard {index}"] += 1

    def running_workers(self) -> list[int]:
        return [index for index, worker in enumerate(self.workers) if worker.poll() is None]

    def wait(self, timeout: float = 120) -> None:
        for index, worker in enumerate(self.workers):
            assert worker.wait(timeout=timeout) == 0, self.stderr(index)

    def stderr(self, index: int) -> str:
        """The last run of worker `index`'s log."""
        paths = sorted(self.tmp_path.glob("child-*.stderr"), key=lambda p: int(p.stem.split("-")[1]))
        logs = [p.read_text(encoding="utf-8") for p in paths if f"worker {index}:" in p.read_text(encoding="utf-8")]
        return logs[-1] if logs else ""

    def model(self) -> dict[Any, Any]:
        with Cluster(self.servers) as cluster:
            return dict(cluster.snapshot())

    def output_records(self) -> set[int]:
        import json

        seen: set[int] = set()
        for index in range(WORKERS):
            for line in (self.tmp_path / f"out-{index}.jsonl").read_text(encoding="utf-8").splitlines():
                out = json.loads(line)
                seen.update(out if isinstance(out, list) else [out])
        return seen


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def has_checkpoint(job: Job, index: int) -> bool:
    return checkpoint_path(job.checkpoints, index).exists()


# -- without a failure ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("logic", "model"),
    [("logics:Exactness", expected_model), ("logics:Windows", windows_model), ("logics:PullChain", pull_chain_model)],
)
def test_a_restartable_job_without_a_failure_gives_the_exact_model(
    tmp_path: Path, procs: Processes, logic: str, model: Callable[[range], dict[Any, int]]
) -> None:
    job = Job(procs, tmp_path, logic, 5_000, every=300)
    job.wait()
    assert job.model() == model(range(5_000))
    for index in range(WORKERS):
        assert has_checkpoint(job, index)


def test_a_finished_worker_started_again_does_nothing_more(tmp_path: Path, procs: Processes) -> None:
    job = Job(procs, tmp_path, "logics:Windows", 2_000)
    job.wait()
    outputs = (tmp_path / "out-0.jsonl").read_text(encoding="utf-8")
    job.kill_worker(0)  # it has exited: this starts it again
    job.wait()
    assert job.model() == windows_model(range(2_000))
    assert (tmp_path / "out-0.jsonl").read_text(encoding="utf-8") == outputs
    assert "it had finished" in job.stderr(0)


# -- kill -9 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logic", "model"),
    [
        ("logics:PacedWindows", windows_model),
        ("logics:PacedPullChain", pull_chain_model),
    ],
)
def test_a_worker_killed_mid_job_and_restarted_leaves_the_model_exact(
    tmp_path: Path, procs: Processes, logic: str, model: Callable[[range], dict[Any, int]]
) -> None:
    job = Job(procs, tmp_path, logic, RECORDS, every=1_000)
    wait_for(lambda: has_checkpoint(job, 1))
    time.sleep(0.3)  # past the checkpoint: records it must replay
    job.kill_worker(1)
    job.wait()
    assert job.model() == model(range(RECORDS))
    resumed = re.search(r"worker 1: resuming from its checkpoint after line (\d+)", job.stderr(1))
    assert resumed is not None and int(resumed.group(1)) > 0, job.stderr(1)
    assert job.output_records() >= set(range(RECORDS)) if logic.endswith("Windows") else True


def test_a_shard_killed_mid_job_and_restarted_leaves_the_model_exact(tmp_path: Path, procs: Processes) -> None:
    job = Job(procs, tmp_path, "logics:PacedWindows", RECORDS, every=1_000)
    wait_for(lambda: has_checkpoint(job, 0))
    job.kill_shard(0)
    job.wait()
    assert job.model() == windows_model(range(RECORDS))


@pytest.mark.parametrize("seed", [int(s) for s in os.environ.get("CHAOS_SEEDS", "11,12").split(",")])
def test_chaos_ten_kills_of_random_processes_leave_the_model_exact(tmp_path: Path, procs: Processes, seed: int) -> None:
    """Every 0.5-2 s a random process of the job (a running worker or a shard) is killed
    with SIGKILL and started again, ten times; the model is then the fault-free one."""
    rng = random.Random(seed)
    job = Job(procs, tmp_path, "logics:PacedWindows", RECORDS, every=1_000)
    for _ in range(10):
        time.sleep(rng.uniform(0.5, 2.0))
        victims = [("worker", index) for index in job.running_workers()] + [("shard", 0), ("shard", 1)]
        kind, index = rng.choice(victims)
        (job.kill_worker if kind == "worker" else job.kill_shard)(index)
    job.wait(timeout=180)
    assert job.model() == windows_model(range(RECORDS)), dict(job.restarts)
    assert sum(job.restarts.values()) == 10
    assert any(name.startswith("worker") for name in job.restarts), dict(job.restarts)


def test_sigterm_checkpoints_a_restartable_worker_without_ending_its_input(tmp_path: Path, procs: Processes) -> None:
    """A graceful stop is not the end of the input: on_input_end waits for the run that ends it."""
    records = 20_000
    job = Job(procs, tmp_path, "logics:PacedCountingInputEnd", records, every=1_000)
    wait_for(lambda: has_checkpoint(job, 0))
    job.workers[0].send_signal(signal.SIGTERM)
    assert job.workers[0].wait(timeout=20) == 0, job.stderr(0)
    stopped = re.search(r"stopped on SIGTERM: .*; checkpointed after line (\d+)", job.stderr(0))
    assert stopped is not None, job.stderr(0)
    checkpoint = read_checkpoint(job.checkpoints, 0, worker_id=f"{JOB}-w0", num_workers=WORKERS, num_shards=SHARDS)
    assert checkpoint is not None and not checkpoint.finished
    assert checkpoint.position == int(stopped.group(1)) < records
    job.kill_worker(0)  # it has exited: this starts it again
    job.wait()
    assert job.model() == {
        "sum": sum(range(records)),
        **{f"count-{index}": len(range(index, records, WORKERS)) for index in range(WORKERS)},
        "after-end": WORKERS,
    }


# -- what a restart refuses -----------------------------------------------------------


ONE_WORKER = ("--logic", "logics:Exactness", "--worker-index", "0", "--num-workers", "1")


def test_checkpoint_dir_needs_a_job_id_and_an_input_file_or_feed(tmp_path: Path, procs: Processes) -> None:
    records = text_file(tmp_path / "in.jsonl", ["1"])
    checkpoints = ("--checkpoint-dir", str(tmp_path / "c"))
    code, _, stderr = run_psworker(procs, *ONE_WORKER, "--input", str(records), *checkpoints)
    assert (code, error_line(stderr)) == (
        2,
        "psworker: error: --checkpoint-dir needs --job-id: a restarted worker resumes under the same id",
    )
    code, _, stderr = run_psworker(procs, *ONE_WORKER, "--job-id", "j", "--input", "-", *checkpoints)
    assert (code, error_line(stderr)) == (
        2,
        "psworker: error: --checkpoint-dir needs an --input file or Feed, not stdin: a restarted worker reads on "
        "from its checkpoint",
    )


def test_a_checkpoint_of_another_layout_or_a_damaged_one_is_refused_in_one_line(
    tmp_path: Path, procs: Processes, start_shards: Any
) -> None:
    (shard,) = start_shards(1)
    records = text_file(tmp_path / "in.jsonl", (str(r) for r in range(50)))
    checkpoints = tmp_path / "c"
    args = [
        *ONE_WORKER, "--input", str(records), "--job-id", "j", "--checkpoint-dir", str(checkpoints),
        "--output", os.devnull,
    ]  # fmt: skip
    code, _, stderr = run_psworker(procs, *args, servers=shard)
    assert code == 0, stderr
    code, _, stderr = run_psworker(procs, *args, "--num-workers", "2", servers=shard)
    assert code == 2
    assert error_line(stderr) == (
        f"psworker: error: worker 0: checkpoint {checkpoints}/worker-0.ckpt belongs to worker j-w0 of 1 workers "
        "and 1 shards, not to worker j-w0 of 2 workers and 1 shards; use the job's own --job-id and layout, "
        "or another --checkpoint-dir"
    )
    path = checkpoints / "worker-0.ckpt"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    code, _, stderr = run_psworker(procs, *args, servers=shard)
    damaged = f"psworker: error: worker 0: checkpoint {path} is damaged (bad magic or checksum)"
    assert (code, error_line(stderr)) == (2, damaged)


def test_a_state_that_is_not_plain_data_fails_the_worker_in_one_line(
    tmp_path: Path, procs: Processes, start_shards: Any
) -> None:
    (shard,) = start_shards(1)
    records = text_file(tmp_path / "in.jsonl", (str(r) for r in range(50)))
    code, _, stderr = run_psworker(
        procs, *ONE_WORKER, "--logic", "logics:UnplainState", "--input", str(records), "--job-id", "j",
        "--checkpoint-dir", str(tmp_path / "c"), "--checkpoint-every", "10", "--output", os.devnull, servers=shard,
    )  # fmt: skip
    assert code == 1
    not_plain = "psworker: error: worker 0: cannot checkpoint: the logic's state() is not plain data: "
    assert error_line(stderr).startswith(not_plain)


# -- fed through Feed -------------------------------------------------------------------


def test_a_feed_mode_worker_reports_where_its_input_stands_across_a_restart(
    tmp_path: Path, procs: Processes, start_shards: Any
) -> None:
    """Fed records are numbered from 1 in the worker's stream; Status says which position the
    next record fed gets and where its last checkpoint stands, and a worker killed and started
    again expects the records after that checkpoint again."""
    (shard,) = start_shards(1)
    argv = worker_argv(
        "logics:Exactness", [shard], 0, 1, "--port", "0", "--job-id", JOB,
        "--checkpoint-dir", str(tmp_path / "c"), "--checkpoint-every", "10",
    )  # fmt: skip
    worker = procs.start_server(argv)
    with Cluster([shard], [worker.address]) as cluster:
        (status,) = cluster.status()
        assert isinstance(status, worker_pb2.StatusResponse)
        assert (status.next_position, status.checkpoint_position) == (1, 0)
        assert cluster.feed(range(25), end_of_input=False) == 25

        def stands() -> tuple[int, int]:
            (status,) = cluster.status()
            assert isinstance(status, worker_pb2.StatusResponse)
            return status.next_position, status.checkpoint_position

        wait_for(lambda: stands() == (26, 20))
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait(timeout=10)
    argv[argv.index("--port") + 1] = worker.address.rsplit(":", 1)[1]
    restarted = procs.start_server(argv)
    with Cluster([shard], [restarted.address]) as cluster:
        (status,) = cluster.status()
        assert isinstance(status, worker_pb2.StatusResponse)
        assert (status.next_position, status.checkpoint_position, status.records) == (21, 20, 20)
        assert cluster.feed(range(20, 25)) == 5
        # Those of the records its checkpoint covers (kept in it: nobody had read them), then the replayed ones.
        assert list(cluster.outputs()) == [[0, r] for r in range(25)]
        assert dict(cluster.snapshot()) == expected_model(range(25))


# -- parts: the same in every run, and never skipped ------------------------------------


class PartsSeen:
    """A ShardBuffers stand-in that records the parts a tracker releases."""

    num_shards = 3

    def __init__(self) -> None:
        self.parts: list[tuple[int, int, int, int]] = []

    def add_part(self, shard: int, origin: Any, batches: list[Any], keys: int) -> None:
        self.parts.append((shard, origin.position, origin.part, keys))


def test_a_records_parts_do_not_depend_on_which_shard_answers_first() -> None:
    """Record 5 pulls x (shard 0) and y (shard 1); x's answer pushes x and pulls z, y's
    answer pushes w (shard 0). Whichever answer comes first, shard 0 gets the same parts,
    so a replay skips exactly what the first run applied."""
    by_shard = {s: [i for i in range(100) if shard_of(i, 3) == s] for s in range(3)}
    x, y, z, w = by_shard[0][0], by_shard[1][0], by_shard[2][0], by_shard[0][1]

    def parts(answer_order: list[int]) -> list[tuple[int, int, int, int]]:
        seen = PartsSeen()
        tracker = OriginTracker(seen)  # type: ignore[arg-type]
        tracker.enter(5, first=True)  # on_recv: push 1 to w, pull x and y
        tracker.hold(w, 1)
        tracker.pulled(x)
        tracker.pulled(y)
        tracker.leave(5)
        for answered in answer_order:
            tracker.enter(5)
            if answered == x:
                tracker.hold(x, 1)
                tracker.pulled(z)
            else:
                tracker.hold(w, 1)
            tracker.leave(5, 1)
        tracker.enter(5)  # z's answer
        tracker.leave(5, 1)
        return seen.parts

    assert parts([x, y]) == parts([y, x]) == [(0, 5, 0, 1), (0, 5, 1, 2)]


class PushThree(Exactness):
    def on_recv(self, data: Any, ps: Any) -> None:
        for param_id in range(3):
            ps.push(param_id, 1)


def test_a_part_that_overflows_the_buffer_is_applied_not_skipped(tmp_path: Path, start_shards: Any) -> None:
    """A record's part set off a flush of the buffer before it: that flush must not tell
    the shard the record had finished, or the part, sent after, is skipped."""
    (shard,) = start_shards(1)
    runtime = WorkerRuntime(
        PushThree(), [shard], 0, 1, emit=lambda out: None, job_id="j", checkpoint_dir=tmp_path, max_batch=4
    )
    runtime.feed(list(range(200)))
    runtime.end_input()
    runtime.run()
    with Cluster([shard]) as cluster:
        assert dict(cluster.snapshot()) == {0: 200, 1: 200, 2: 200}


@pytest.mark.parametrize("restarted_with_output", [False, True])
def test_outputs_nobody_read_before_a_checkpoint_survive_a_kill_of_a_feed_mode_worker(
    tmp_path: Path, procs: Processes, start_shards: Any, restarted_with_output: bool
) -> None:
    """The records a checkpoint covers are never processed again, so the outputs of them that
    no Outputs reader took are in the checkpoint, and the restarted worker delivers them first
    (to its --output file, if it was started again with one)."""
    (shard,) = start_shards(1)
    argv = worker_argv(
        "logics:Exactness", [shard], 0, 1, "--port", "0", "--job-id", JOB,
        "--checkpoint-dir", str(tmp_path / "c"), "--checkpoint-every", "100",
    )  # fmt: skip
    worker = procs.start_server(argv)
    with Cluster([shard], [worker.address]) as cluster:
        assert cluster.feed(range(2_550), end_of_input=False) == 2_550  # no reader attached meanwhile

        def status() -> worker_pb2.StatusResponse:
            (status,) = cluster.status()
            assert isinstance(status, worker_pb2.StatusResponse)
            return status

        wait_for(lambda: (status().next_position, status().checkpoint_position) == (2_551, 2_500))
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait(timeout=10)
    argv[argv.index("--port") + 1] = worker.address.rsplit(":", 1)[1]
    out = tmp_path / "out.jsonl"
    restarted = procs.start_server([*argv, "--output", str(out)] if restarted_with_output else argv)
    with Cluster([shard], [restarted.address]) as cluster:
        (status,) = cluster.status()
        assert isinstance(status, worker_pb2.StatusResponse)
        assert status.next_position == 2_501
        assert cluster.feed(range(status.next_position - 1, 3_000)) == 500
        if restarted_with_output:
            assert restarted.process.wait(timeout=60) == 0
            outputs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        else:
            outputs = list(cluster.outputs())
        assert Counter(r for _, r in outputs).keys() == set(range(3_000))  # every record's, at least once
        assert outputs == [[0, r] for r in range(3_000)]  # here, exactly once and in order
        assert dict(cluster.snapshot()) == expected_model(range(3_000))
