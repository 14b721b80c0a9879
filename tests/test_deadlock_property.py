"""No job deadlocks: generated jobs, each ending in time with exactly the model and outputs it must.

Hypothesis draws a job: 1-4 shards, 1-4 workers, a pull limit from 1 to
unlimited, batches down to one key and lingers down to none, a logic that
pulls from on_recv, pulls again from on_pull_recv (a chain of pulls) and from
on_input_end, through the per-key or the batch API, gRPC message-size limits
and HTTP/2 flow-control windows of a few KiB, a slow reader of the outputs,
and a consistency model (async, bsp, ssp:S) or, under async, a server logic
that answers pulls late (on the next push, or from a timer on the shard's
loop). Every job runs on a real cluster in this process (tests/inprocess.py:
the shard servicers and worker runtimes over loopback gRPC), fed and read
through the Worker service as `transform` does.

Each job must end within JOB_TIMEOUT_S. A job that does not is a failure,
reported with its parameters and every thread's stack: never retried. Its
final model must equal the one computed here with numpy from the generated
records, its outputs must be exactly those the records imply, every pull
answer must hold the worker's own earlier pushes (read-your-writes), and
under bsp/ssp no answer may be more than S clocks ahead of the slowest worker.

Refused by design, so never generated: a server logic under bsp or ssp
(psserver --logic with --consistency other than async: the logic answers
pulls itself, so the shard cannot hold them back by clock).

CI runs CI_JOBS jobs with a fixed derandomized sequence; PROPERTY_JOBS=N
(e.g. 2000, the nightly size) runs N others, from PROPERTY_SEED (default 1).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, seed, settings
from hypothesis import strategies as st
from inprocess import GrpcLimits, InProcessCluster, grpc_limits

from psclient import Left
from psclient.cluster import Cluster
from psclient.errors import JobFailed
from psclient.rpc.serving import open_channel
from psclient.wire.proto import shard_pb2, worker_pb2, worker_pb2_grpc
from psclient.wire.records import unpack
from psserver import ServerHandle, ServerLogic
from psworker import WorkerLogic

CI_JOBS = 200
NIGHTLY_JOBS = int(os.environ.get("PROPERTY_JOBS", "0"))
# Generous: a job here takes well under a second; only a hang comes near it.
JOB_TIMEOUT_S = 60.0

Id = int | str


def param_id(slot: int) -> Id:
    """Even slots are int ids, odd ones str ids: both kinds go through every path."""
    return slot if slot % 2 == 0 else f"k{slot}"


def next_slot(slot: int, keys: int) -> int:
    """The slot a chained pull goes to after `slot`."""
    return (slot * 7 + 3) % keys


@dataclass(frozen=True)
class Behaviour:
    """What the generated worker logic does (the same in every worker)."""

    keys: int
    pull_on_recv: bool  # each record pulls its key
    chain: int  # each answer pulls again from on_pull_recv, this many times per chain
    end_pulls: tuple[int, ...]  # slots each worker pulls from on_input_end
    advance_at_end: bool  # on_input_end advances the clock before it pulls


class ChainLogic(WorkerLogic):
    """Records are (epoch, slot, delta): advance the clock to the epoch, push delta to the
    slot's id, output ("rec", slot, delta) and (with pull_on_recv) pull it. Each answer
    pushes 1 to its id, outputs ("ans", tag, slot, depth) and, while depth < chain, pulls
    the next slot; on_input_end starts a chain at each of end_pulls. An answer that does
    not hold this worker's own pushes made before its pull outputs ("stale", ...)."""

    def __init__(self, behaviour: Behaviour):
        self.b = behaviour

    def open(self) -> None:
        self.epoch = 0
        self.pending: dict[Id, deque[tuple[str, int, int, int]]] = defaultdict(deque)
        self.own: Counter[Id] = Counter()  # this worker's pushes per id, summed

    def on_recv(self, data: Any, ps: Any) -> None:
        epoch, slot, delta = data
        while self.epoch < epoch:
            ps.advance_clock()
            self.epoch += 1
        self._push(ps, param_id(slot), delta)
        ps.output(("rec", slot, delta))
        if self.b.pull_on_recv:
            self._pull(ps, "rec", slot, 0)

    def on_input_end(self, ps: Any) -> None:
        if self.b.advance_at_end:
            ps.advance_clock()
        for slot in self.b.end_pulls:
            self._pull(ps, "end", slot, 0)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        tag, slot, depth, floor = self.pending[param_id].popleft()
        if int(param_value) < floor:
            ps.output(("stale", param_id, int(param_value), floor))
        self._push(ps, param_id, 1)
        ps.output(("ans", tag, slot, depth))
        if depth < self.b.chain:
            self._pull(ps, tag, next_slot(slot, self.b.keys), depth + 1)

    def _push(self, ps: Any, pid: Id, delta: int) -> None:
        self.own[pid] += delta
        ps.push(pid, delta)

    def _pull(self, ps: Any, tag: str, slot: int, depth: int) -> None:
        pid = param_id(slot)
        self.pending[pid].append((tag, slot, depth, self.own[pid]))
        ps.pull(pid)


class ChainLogicMany(ChainLogic):
    """ChainLogic through the batch API: pull_many and push_many, answers in on_pull_recv_many."""

    def _push(self, ps: Any, pid: Id, delta: int) -> None:
        self.own[pid] += delta
        ids = np.array([pid], dtype=object if isinstance(pid, str) else np.int64)
        ps.push_many(ids, np.array([delta], dtype=np.int64))

    def _pull(self, ps: Any, tag: str, slot: int, depth: int) -> None:
        pid = param_id(slot)
        self.pending[pid].append((tag, slot, depth, self.own[pid]))
        ps.pull_many(np.array([pid], dtype=object if isinstance(pid, str) else np.int64))

    def on_pull_recv_many(self, ids: Any, values: Any, ps: Any) -> None:
        for pid, value in zip(list(ids), values, strict=True):
            self.on_pull_recv(pid if isinstance(pid, str) else int(pid), value, ps)


class LateAnswers(ServerLogic[Any, Any]):
    """Sums deltas per id; answers a pull at once ("now"), on the next push to this shard
    with a timer as the fallback ("next_push"), or from a timer only ("timer"). Timers run
    on the shard's event loop, where the callbacks run. Outputs every (id, sum) at close."""

    def __init__(self, mode: str, delay_s: float):
        self.mode, self.delay_s = mode, delay_s

    def open(self, ps: ServerHandle[Any, Any]) -> None:
        self.values: dict[Id, int] = {}
        self.deferred: list[tuple[Id, int]] = []

    def on_pull_recv(self, param_id: Id, worker_index: int, ps: ServerHandle[Any, Any]) -> None:
        if self.mode == "now":
            ps.answer_pull(param_id, self.values.get(param_id, 0), worker_index)
            return
        loop = asyncio.get_running_loop()
        if self.mode == "next_push":
            self.deferred.append((param_id, worker_index))
            loop.call_later(self.delay_s, self._answer_deferred, ps)
        else:
            loop.call_later(self.delay_s, self._answer, param_id, worker_index, ps)

    def on_push_recv(self, param_id: Id, delta: Any, ps: ServerHandle[Any, Any]) -> None:
        self.values[param_id] = self.values.get(param_id, 0) + int(delta)
        self._answer_deferred(ps)

    def _answer(self, param_id: Id, worker_index: int, ps: ServerHandle[Any, Any]) -> None:
        ps.answer_pull(param_id, self.values.get(param_id, 0), worker_index)

    def _answer_deferred(self, ps: ServerHandle[Any, Any]) -> None:
        deferred, self.deferred = self.deferred, []
        for param_id, worker_index in deferred:
            self._answer(param_id, worker_index, ps)

    def close(self, ps: ServerHandle[Any, Any]) -> None:
        for param_id, value in self.values.items():
            ps.output((param_id, value))


@dataclass(frozen=True)
class Job:
    count: int  # records, made from records_seed (so a failing job's parameters fit a line)
    epochs: int
    records_seed: int
    behaviour: Behaviour
    batch_api: bool
    num_shards: int
    num_workers: int
    consistency: str
    server_logic: tuple[str, float] | None  # (mode, delay_s) of LateAnswers
    pull_limit: int | None
    max_batch: int
    linger_ms: float
    limits: GrpcLimits
    slow_reader_s: float  # the outputs reader sleeps this long after each message
    records: tuple[tuple[int, int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """The records, (epoch, slot, delta) each."""
        rng = np.random.default_rng(self.records_seed)
        records = zip(
            np.sort(rng.integers(0, self.epochs, self.count)).tolist(),  # each worker meets its epochs in order
            rng.integers(0, self.behaviour.keys, self.count).tolist(),
            rng.integers(1, 6, self.count).tolist(),
            strict=True,
        )
        object.__setattr__(self, "records", tuple(records))


@st.composite
def jobs(draw: st.DrawFn) -> Job:
    # Hypothesis favours the first choice of a list and the low end of a range: here that
    # is the harder job (more workers, epochs and shards, a pull limit of 1, one key per
    # batch, tight gRPC limits), so that the 200 jobs of CI are mostly hard ones.
    keys = draw(st.integers(1, 40))
    epochs = 5 - draw(st.integers(0, 4))
    # The records come from a seeded generator: hypothesis draws (and shrinks) their
    # number and the seed, not each one, so jobs of hundreds of records are typical.
    count = draw(st.integers(0, 400))
    records_seed = draw(st.integers(0, 2**32 - 1))
    behaviour = Behaviour(
        keys=keys,
        pull_on_recv=draw(st.booleans()),
        chain=draw(st.integers(0, 3)),
        end_pulls=tuple(draw(st.lists(st.integers(0, keys - 1), max_size=4))),
        advance_at_end=draw(st.booleans()),
    )
    # Server logics run under async only (see the module doc): one choice of the two, so
    # that each model and each way of answering comes up about as often.
    model = draw(st.sampled_from(["bsp", "logic:next_push", "ssp:1", "logic:timer", "ssp:2", "logic:now", "async"]))
    consistency, server_logic = model, None
    if model.startswith("logic:"):
        consistency, server_logic = "async", (model[len("logic:") :], draw(st.sampled_from([0.002, 0.02, 0.0])))
    return Job(
        count=count,
        epochs=epochs,
        records_seed=records_seed,
        behaviour=behaviour,
        batch_api=draw(st.booleans()),
        num_shards=4 - draw(st.integers(0, 3)),
        num_workers=4 - draw(st.integers(0, 3)),
        consistency=consistency,
        server_logic=server_logic,
        pull_limit=draw(st.sampled_from([1, 2, 3, 8, None])),
        max_batch=draw(st.sampled_from([1, 2, 3, 4096])),
        linger_ms=draw(st.sampled_from([0.0, 0.5, 2.0, 20.0])),
        limits=GrpcLimits(
            max_message_bytes=draw(st.sampled_from([32 * 1024, None])),
            window_bytes=draw(st.sampled_from([1024, 16 * 1024, None])),
        ),
        slow_reader_s=draw(st.sampled_from([0.002, 0.0, 0.01])),
    )


# -- what a job must give, computed from its records alone ------------------------------


def chain_slots(start: int, behaviour: Behaviour) -> list[int]:
    """The slots one chain of pulls visits, from `start`."""
    slots = [start]
    while len(slots) <= behaviour.chain:
        slots.append(next_slot(slots[-1], behaviour.keys))
    return slots


def expected(job: Job) -> tuple[dict[Id, int], Counter[Any]]:
    """The final model (id -> value) and the multiset of outputs."""
    b = job.behaviour
    model = np.zeros(b.keys, dtype=np.int64)
    outputs: Counter[Any] = Counter()
    if job.records:
        _, slots, deltas = (np.array(column, dtype=np.int64) for column in zip(*job.records, strict=True))
        np.add.at(model, slots, deltas)
    touched = np.zeros(b.keys, dtype=bool)
    touched[[slot for _, slot, _ in job.records]] = True
    chains = [("rec", slot) for _, slot, _ in job.records] if b.pull_on_recv else []
    chains += [("end", slot) for slot in b.end_pulls] * job.num_workers  # every worker's input ends
    for _, slot, delta in job.records:
        outputs[("rec", slot, delta)] += 1
    for tag, start in chains:
        visited = chain_slots(start, b)
        np.add.at(model, visited, 1)  # each answer pushes 1 to its id
        touched[visited] = True
        for depth, slot in enumerate(visited):
            outputs[("ans", tag, slot, depth)] += 1
    return {param_id(int(slot)): int(model[slot]) for slot in np.flatnonzero(touched)}, outputs


# -- running a job --------------------------------------------------------------------


def cluster_of(job: Job) -> InProcessCluster:
    logic_class = ChainLogicMany if job.batch_api else ChainLogic
    server_logic = None
    if job.server_logic is not None:
        mode, delay = job.server_logic
        server_logic = lambda: LateAnswers(mode, delay)  # noqa: E731
    return InProcessCluster(
        lambda: logic_class(job.behaviour),
        job.num_workers,
        job.num_shards,
        server_logic=server_logic,
        consistency=job.consistency,
        pull_limit=job.pull_limit,
        max_batch=job.max_batch,
        linger_s=job.linger_ms / 1000,
    )


def read_slowly(address: str, pause_s: float, into: list[Any]) -> None:
    """A worker's outputs, read from its Outputs stream with a pause after each message."""
    with open_channel(address) as channel:
        for chunk in worker_pb2_grpc.WorkerStub(channel).Outputs(worker_pb2.OutputsRequest()):
            into.extend(unpack(data) for data in chunk.outputs)
            time.sleep(pause_s)


def run(job: Job, cluster: InProcessCluster) -> tuple[list[Any], list[Any], list[Any]]:
    """Run the job: its outputs (Left), its Right values, and every shard's Info."""
    records = list(job.records)
    with Cluster(cluster.servers, cluster.worker_addresses) as client:
        if not job.slow_reader_s:
            lefts, rights = [], []
            for item in client.stream(records, server_logic=job.server_logic is not None):
                (lefts if isinstance(item, Left) else rights).append(item.value)
            return lefts, rights, client.info()
        # The client's stream reads each worker's outputs as they come: read them here
        # instead, slowly, so the Outputs streams back up into the workers.
        failures: list[BaseException] = []
        lefts = []

        def guarded(target: Any, *args: Any) -> None:
            try:
                target(*args)
            except BaseException as exc:
                failures.append(exc)

        client.check_shards()
        threads = [threading.Thread(target=guarded, args=(client.feed, records), name="feeder", daemon=True)]
        per_worker: list[list[Any]] = [[] for _ in cluster.workers]
        for address, into in zip(cluster.worker_addresses, per_worker, strict=True):
            threads.append(
                threading.Thread(target=guarded, args=(read_slowly, address, job.slow_reader_s, into), daemon=True)
            )
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        for outputs in per_worker:
            lefts.extend(outputs)
        rights = list(client.logic_outputs() if job.server_logic is not None else client.snapshot())
        return lefts, rights, client.info()


def thread_stacks() -> str:
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "\n".join(
        f"--- thread {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame)[-8:])}"
        for ident, frame in sys._current_frames().items()
    )


def run_within_bound(job: Job) -> tuple[list[Any], list[Any], list[Any], InProcessCluster]:
    """Start the cluster and run the job on a thread; a job past JOB_TIMEOUT_S fails the test."""
    result: list[Any] = []
    failure: list[BaseException] = []
    cluster = cluster_of(job)

    def body() -> None:
        try:
            cluster.start()
            result.extend(run(job, cluster))
        except BaseException as exc:
            failure.append(exc)

    runner = threading.Thread(target=body, name="job", daemon=True)
    runner.start()
    runner.join(JOB_TIMEOUT_S)
    if runner.is_alive():
        stacks = thread_stacks()
        errors = [w.runtime.error for w in cluster.workers if w.runtime.error]
        threading.Thread(target=cluster.stop, name="stop-hung-job", daemon=True).start()
        pytest.fail(f"job did not end within {JOB_TIMEOUT_S:g} s (a hang): {job}\nworker errors: {errors}\n{stacks}")
    if failure:
        cluster.stop()
        raise AssertionError(f"job failed: {job}: {type(failure[0]).__name__}: {failure[0]}") from failure[0]
    return result[0], result[1], result[2], cluster


def check_job(job: Job) -> None:
    with grpc_limits(job.limits):
        lefts, rights, infos, cluster = run_within_bound(job)
        cluster.stop()
    leftover = cluster.leftovers()
    assert not leftover, f"threads or sockets left open after the job: {leftover}"
    model, outputs = expected(job)
    got_model = {pid: int(value) for pid, value in rights}
    assert got_model == model, f"model of {job}"
    stale = [out for out in lefts if out[0] == "stale"]
    assert not stale, f"answers without the worker's own earlier pushes in {job}: {stale}"
    assert Counter(tuple(out) for out in lefts) == outputs, f"outputs of {job}"
    assert all(isinstance(info, shard_pb2.InfoResponse) for info in infos), infos
    # What the generated jobs exercised (--hypothesis-show-statistics).
    event(f"consistency {job.consistency}, server logic {job.server_logic and job.server_logic[0]}")
    if sum(info.held_pulls for info in infos):
        event("a shard held pulls back (bsp/ssp)")
    if job.pull_limit == 1 and (job.behaviour.chain or job.behaviour.end_pulls):
        event("pull limit 1 with pulls from callbacks")
    if job.consistency != "async":
        staleness = 0 if job.consistency == "bsp" else int(job.consistency.split(":")[1])
        gaps = [gap for info in infos for gap in info.clock_gaps]
        assert max(gaps, default=0) <= staleness, f"clock gaps {gaps} in {job}"


PROPERTY = settings(
    deadline=None,
    database=None,
    # A failure is shown as drawn: shrinking a hang would wait out JOB_TIMEOUT_S per attempt.
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


@pytest.mark.timeout(CI_JOBS * JOB_TIMEOUT_S)
@settings(PROPERTY, max_examples=CI_JOBS, derandomize=True)
@given(job=jobs())
def test_every_generated_job_ends_with_exact_results(job: Job) -> None:
    check_job(job)


@pytest.mark.nightly
@pytest.mark.skipif(not NIGHTLY_JOBS, reason="the nightly size runs with PROPERTY_JOBS=N (e.g. 2000)")
@pytest.mark.timeout(max(NIGHTLY_JOBS, 1) * JOB_TIMEOUT_S)
@seed(int(os.environ.get("PROPERTY_SEED", "1")))
@settings(PROPERTY, max_examples=max(NIGHTLY_JOBS, 1))
@given(job=jobs())
def test_every_generated_job_ends_with_exact_results_nightly(job: Job) -> None:
    check_job(job)


# -- regressions the property test found ------------------------------------------------


class Lines(WorkerLogic):
    """Pushes 1 to "lines" per record."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.push("lines", 1)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("Lines never pulls")


@pytest.mark.timeout(120)
def test_a_feed_message_over_the_size_limit_fails_the_job_instead_of_hanging() -> None:
    # 20 records of 600 bytes go in one Feed message, over a 4 KiB limit: the Feed call fails,
    # and worker 0 never learns that its input ended. The stream waited for its outputs for good.
    records = ["x" * 600] * 20
    failure: list[BaseException] = []
    with grpc_limits(GrpcLimits(max_message_bytes=4096)), InProcessCluster(Lines, 1, 1) as cluster:

        def job() -> None:
            try:
                with Cluster(cluster.servers, cluster.worker_addresses) as client:
                    list(client.stream(records))
            except BaseException as exc:
                failure.append(exc)

        runner = threading.Thread(target=job, daemon=True)
        runner.start()
        runner.join(30)
        assert not runner.is_alive(), "the job hangs after its Feed call failed"
    assert len(failure) == 1 and isinstance(failure[0], JobFailed), failure
    assert re.fullmatch(
        r"feeding worker 0 failed: RESOURCE_EXHAUSTED: CLIENT: Sent message larger than max \(\d+ vs\. 4096\)",
        str(failure[0]),
    ), failure


class Echo(WorkerLogic):
    """Outputs each record as it is."""

    def on_recv(self, data: Any, ps: Any) -> None:
        ps.output(data)

    def on_pull_recv(self, param_id: Any, param_value: Any, ps: Any) -> None:
        raise AssertionError("Echo never pulls")


# Records and outputs of 100 KiB, 60 of them: each fits in a 4 MiB message, all of them do not.
BIG = 100 * 1024
BIG_COUNT = 60
SMALL_LIMIT = GrpcLimits(max_message_bytes=4 * 1024 * 1024)


@pytest.mark.timeout(120)
def test_records_that_each_fit_in_a_message_are_fed_in_several() -> None:
    records = [f"{i:04d}" + "x" * BIG for i in range(BIG_COUNT)]
    with (
        grpc_limits(SMALL_LIMIT),
        InProcessCluster(Echo, 1, 1) as cluster,
        Cluster(cluster.servers, cluster.worker_addresses) as client,
    ):
        outputs = [item.value for item in client.stream(records) if isinstance(item, Left)]
    assert outputs == records


@pytest.mark.timeout(120)
def test_outputs_that_each_fit_in_a_message_are_read_in_several() -> None:
    records = [f"{i:04d}" + "x" * BIG for i in range(BIG_COUNT)]
    with grpc_limits(SMALL_LIMIT), InProcessCluster(Echo, 1, 1) as cluster:
        (worker,) = cluster.workers
        for record in records:  # one Feed message each, and the outputs wait for a reader
            worker.runtime.feed([record])
        worker.runtime.end_input()
        assert worker.done.wait(30)
        with Cluster(cluster.servers, cluster.worker_addresses) as client:
            outputs = list(client.outputs())
    assert outputs == records
