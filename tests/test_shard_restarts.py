"""Workers ride out shard restarts: a broken stream is opened again and every unanswered
message goes again as it was (pushes with their own seqs, which the shard's watermark makes
safe); a shard away longer than --shard-timeout fails the worker with one line naming it.

Shards here keep no state across a restart (no --data-dir), so the tests that check the
model exactly stop a shard (SIGSTOP) rather than kill it, or kill one that has received
nothing yet; the last test, for shards with --data-dir, runs once psserver has that flag.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Processes, Service, child_env, psserver_argv, text_file
from logics import Exactness

from psclient import Cluster, LocalCluster
from psclient.children import worker_argv
from psclient.errors import ShardError
from psclient.wire.partition import shard_of
from psclient.wire.proto import shard_pb2
from psworker.batching import ShardBuffers
from psworker.runtime import WorkerRuntime

WORKERS = 3
SHARDS = 2
JOB = "job7"


def expected_model(records: range) -> dict[Any, int]:
    """What logics:Exactness makes of `records`."""
    model: Counter[Any] = Counter()
    for r in records:
        model[r % 500 - 250] += r % 7 + 1
        model[f"s{r % 300}"] += 2
    return dict(model)


def start_shard(procs: Processes, shard: int, *extra: str, port: int = 0, num_shards: int = SHARDS) -> Service:
    argv = psserver_argv(shard, num_shards, "const:0", "add")
    argv[argv.index("--port") + 1] = str(port)
    return procs.start_server([*argv, *extra])


def port_of(service: Service) -> int:
    return int(service.address.rsplit(":", 1)[1])


def start_workers(procs: Processes, servers: list[str], *extra: str, logic: str = "logics:Exactness") -> list[Service]:
    """Feed-mode workers of job JOB, logging at INFO (where a reconnect is reported)."""
    return [
        procs.start_server(
            worker_argv(logic, servers, index, WORKERS, "--port", "0", "--job-id", JOB, *extra, log_level="INFO")
        )
        for index in range(WORKERS)
    ]


def run_job(servers: list[str], workers: list[Service], records: Iterator[int]) -> tuple[list[Any], dict[Any, Any]]:
    """Feed `records`, read every output, then read the model on a new client (a shard may
    have been restarted under the old one). Feeding does not wait for the shards, which
    may be stopped."""
    with Cluster([], [worker.address for worker in workers]) as cluster:
        feeder = threading.Thread(target=cluster.feed, args=(records,), daemon=True)
        feeder.start()
        outputs = list(cluster.outputs())
        feeder.join(timeout=60)
    with Cluster(servers) as cluster:
        return outputs, dict(cluster.snapshot())


def records_doing(total: int, at: int, action: Callable[[], None]) -> Iterator[int]:
    for record in range(total):
        if record == at:
            action()
        yield record


def stderr_lines(service: Service) -> list[str]:
    return service.stderr_path.read_text(encoding="utf-8").splitlines()


def reconnect_lines(worker: Service, address: str) -> list[re.Match[str]]:
    pattern = (
        rf"\S+ \S+ INFO worker \d: reconnected to shard 1 at {re.escape(address)} after [\d.]+ s; "
        r"resending (\d+) push batches and (\d+) pull requests"
    )
    return [match for line in stderr_lines(worker) if (match := re.fullmatch(pattern, line))]


def shard_info(address: str) -> shard_pb2.InfoResponse:
    with Cluster([address]) as cluster:
        (info,) = cluster.info()
    assert isinstance(info, shard_pb2.InfoResponse), info
    return info


# -- what a shard owes is kept, and goes again as it was -------------------------------


def buffers(sent: list[tuple[int, shard_pb2.ExchangeRequest]]) -> ShardBuffers:
    return ShardBuffers(
        2, "job-w0", lambda shard, request: sent.append((shard, request)), max_batch=100, min_batch=1, linger_s=1.0
    )


def ack(seq: int, *, duplicate: bool = False, pull: int | None = None) -> shard_pb2.ExchangeResponse:
    answer = shard_pb2.PullResponse(request_id=pull) if pull is not None else None
    return shard_pb2.ExchangeResponse(ack=shard_pb2.PushAck(seq=seq, duplicate=duplicate), pull=answer)


def test_unanswered_messages_are_kept_whole_with_their_seqs_until_answered() -> None:
    sent: list[tuple[int, shard_pb2.ExchangeRequest]] = []
    shard_buffers = buffers(sent)
    for step in range(3):  # ids 0, 2, 4 are shard 0's; 1 and 3 shard 1's
        shard_buffers.push(0, step)
        shard_buffers.push(1, step)
        if step == 1:
            shard_buffers.pull(2)
        shard_buffers.flush_all()

    kept = shard_buffers.unanswered(0)
    assert [request.push.seq for request in kept] == [1, 2, 3]
    assert [request.push.worker_id for request in kept] == ["job-w0"] * 3
    assert [request.HasField("pull") for request in kept] == [False, True, False]
    assert kept == [request for shard, request in sent if shard == 0]  # the very messages sent
    assert [request.push.seq for request in shard_buffers.unanswered(1)] == [1, 2, 3]
    assert shard_buffers.unacked == 6
    assert shard_buffers.silent_since[0] is not None

    shard_buffers.received(0, ack(1))
    shard_buffers.received(0, ack(2, duplicate=True, pull=kept[1].pull.request_id))  # a resend the shard had applied

    assert [request.push.seq for request in shard_buffers.unanswered(0)] == [3]
    assert (shard_buffers.unacked, shard_buffers.unacked_by_shard) == (4, [1, 3])
    shard_buffers.received(0, ack(3))
    assert shard_buffers.unanswered(0) == [] and shard_buffers.silent_since[0] is None
    # Resending does not renumber: the next message is seq 4.
    shard_buffers.push(0, 1)
    shard_buffers.flush_all()
    assert [request.push.seq for request in shard_buffers.unanswered(0)] == [4]


def test_an_answer_that_does_not_match_the_oldest_message_is_refused() -> None:
    shard_buffers = buffers([])
    shard_buffers.push(0, 1)
    shard_buffers.flush_all()
    shard_buffers.push(0, 1)
    shard_buffers.flush_all()

    with pytest.raises(ShardError, match="it acknowledged push seq 2 where seq 1 was due"):
        shard_buffers.received(0, ack(2))
    with pytest.raises(ShardError, match="it answered a message that was never sent"):
        shard_buffers.received(1, ack(1))
    assert [request.push.seq for request in shard_buffers.unanswered(0)] == [1, 2]


# -- the worker id -----------------------------------------------------------------------


def test_worker_id_is_the_job_id_and_the_index() -> None:
    def runtime(**kwargs: Any) -> WorkerRuntime:
        return WorkerRuntime(Exactness(), ["127.0.0.1:1"], 2, 3, emit=print, **kwargs)

    assert runtime(job_id="job7").worker_id == "job7-w2"
    first, second = runtime(), runtime()
    assert re.fullmatch(r"[0-9a-f]{12}-w2", first.worker_id), first.worker_id
    assert first.worker_id != second.worker_id, "two jobs sharing shards must not share worker ids"


@pytest.mark.timeout(120)
def test_psworker_pushes_as_job_id_and_index(tmp_path: Path, procs: Processes) -> None:
    shard, data = start_shard(procs, 0, num_shards=1), text_file(tmp_path / "records.jsonl", map(str, range(100)))
    argv = worker_argv("logics:Exactness", [shard.address], 1, 2, "--input", str(data), "--job-id", "nightly-3")
    process, stderr_path = procs.popen(argv, stdout=subprocess.DEVNULL)

    assert process.wait(timeout=60) == 0, stderr_path.read_text(encoding="utf-8")
    assert dict(shard_info(shard.address).watermarks).keys() == {"nightly-3-w1"}


@pytest.mark.timeout(120)
def test_psworker_refuses_a_worker_id_a_shard_already_has_pushes_of(tmp_path: Path, procs: Processes) -> None:
    shard, data = start_shard(procs, 0, num_shards=1), text_file(tmp_path / "records.jsonl", map(str, range(100)))
    argv = worker_argv("logics:Exactness", [shard.address], 0, 1, "--input", str(data), "--job-id", "nightly-3")
    first, _ = procs.popen(argv, stdout=subprocess.DEVNULL)
    assert first.wait(timeout=60) == 0
    seq = shard_info(shard.address).watermarks["nightly-3-w0"]

    second, stderr_path = procs.popen(argv, stdout=subprocess.DEVNULL)

    assert second.wait(timeout=60) == 1
    assert stderr_path.read_text(encoding="utf-8").splitlines() == [
        f"psworker: error: worker 0: shard 0 at {shard.address} already holds pushes of worker nightly-3-w0 "
        f"(up to seq {seq}); a new run of a worker needs a --job-id of its own"
    ]
    assert shard_info(shard.address).watermarks["nightly-3-w0"] == seq


@pytest.mark.timeout(120)
def test_psworker_refuses_a_job_id_that_cannot_name_a_worker(procs: Processes) -> None:
    argv = worker_argv("logics:Exactness", ["127.0.0.1:1"], 0, 1, "--port", "0", "--job-id", "a b")
    process, stderr_path = procs.popen(argv, stdout=subprocess.DEVNULL)

    assert process.wait(timeout=60) == 2
    assert stderr_path.read_text(encoding="utf-8").splitlines()[-1] == (
        "Error: Invalid value for '--job-id' (env var: 'STREAMPS_JOB_ID'): "
        "'a b': 1 to 64 letters, digits, '.', '_' or '-', first a letter or digit"
    )


@pytest.mark.timeout(180)
def test_a_local_cluster_gives_all_its_workers_one_job_id() -> None:
    with LocalCluster("logics:Exactness", "const:0", "add", num_workers=2, num_shards=1) as cluster:
        with Cluster(cluster.servers, cluster.workers) as client:
            list(client.stream(range(100)))
        watermarks = dict(shard_info(cluster.servers[0]).watermarks)

    assert watermarks.keys() == {f"{cluster.job_id}-w0", f"{cluster.job_id}-w1"}


# -- a shard that stalls or restarts -------------------------------------------------------


@pytest.mark.timeout(240)
def test_a_shard_stopped_for_seconds_mid_job_leaves_the_model_exact(procs: Processes) -> None:
    shards = [start_shard(procs, index) for index in range(SHARDS)]
    servers = [shard.address for shard in shards]
    workers = start_workers(procs, servers, "--shard-timeout", "60")
    stalled = shards[1].process

    def stop_for_3_s() -> None:
        stalled.send_signal(signal.SIGSTOP)
        threading.Timer(3.0, stalled.send_signal, args=(signal.SIGCONT,)).start()

    try:
        outputs, model = run_job(servers, workers, records_doing(60_000, 20_000, stop_for_3_s))
    finally:
        stalled.send_signal(signal.SIGCONT)

    assert len(outputs) == 60_000
    assert model == expected_model(range(60_000))
    for worker in workers:
        assert worker.process.wait(timeout=30) == 0, stderr_lines(worker)


@pytest.mark.timeout(240)
def test_a_shard_killed_before_it_read_a_request_and_restarted_gets_every_push_once(procs: Processes) -> None:
    """Shard 1 is stopped before the job starts, so every message to it stays unanswered;
    killed and started again on its port, it must get them all, with their first seqs."""
    shards = [start_shard(procs, index) for index in range(SHARDS)]
    servers = [shard.address for shard in shards]
    workers = start_workers(procs, servers, "--shard-timeout", "60")
    shards[1].process.send_signal(signal.SIGSTOP)

    def restart_shard_1() -> None:
        time.sleep(1.0)  # the workers send on meanwhile
        shards[1].process.kill()
        shards[1].process.wait(timeout=10)
        shards[1] = start_shard(procs, 1, port=port_of(shards[1]))

    outputs, model = run_job(servers, workers, records_doing(30_000, 15_000, restart_shard_1))

    assert len(outputs) == 30_000
    assert model == expected_model(range(30_000))
    info = shard_info(servers[1])
    assert dict(info.watermarks).keys() == {f"{JOB}-w{index}" for index in range(WORKERS)}
    # Every seq from 1 applied once: as many batches as the watermarks add up to.
    assert info.push_requests == sum(info.watermarks.values())
    for worker in workers:
        assert worker.process.wait(timeout=30) == 0, stderr_lines(worker)
        (line,) = reconnect_lines(worker, servers[1])
        assert int(line.group(1)) > 0, line.group(0)


@pytest.mark.timeout(240)
def test_a_shard_killed_mid_job_and_restarted_gets_the_rest_of_the_job(procs: Processes) -> None:
    """The restarted shard (without --data-dir) lost what it had; the workers carry on, and
    what it gets from then on is applied once (each seq from the resent ones up)."""
    shards = [start_shard(procs, index) for index in range(SHARDS)]
    servers = [shard.address for shard in shards]
    workers = start_workers(procs, servers, "--shard-timeout", "60")

    def kill_and_restart_shard_1() -> None:
        shards[1].process.kill()
        shards[1].process.wait(timeout=10)
        shards[1] = start_shard(procs, 1, port=port_of(shards[1]))

    outputs, model = run_job(servers, workers, records_doing(60_000, 20_000, kill_and_restart_shard_1))

    assert len(outputs) == 60_000
    expected = expected_model(range(60_000))
    assert {key: value for key, value in model.items() if shard_of(key, SHARDS) == 0} == {
        key: value for key, value in expected.items() if shard_of(key, SHARDS) == 0
    }
    restarted = {key: value for key, value in model.items() if shard_of(key, SHARDS) == 1}
    assert restarted.keys() == {key for key in expected if shard_of(key, SHARDS) == 1}
    # Lost: what it had applied before; never applied twice: anything since.
    assert all(value <= expected[key] for key, value in restarted.items())
    info = shard_info(servers[1])
    assert dict(info.watermarks).keys() <= {f"{JOB}-w{index}" for index in range(WORKERS)}
    for worker in workers:
        assert worker.process.wait(timeout=30) == 0, stderr_lines(worker)
        assert len(reconnect_lines(worker, servers[1])) == 1, stderr_lines(worker)


# -- a connection that drops while the shard lives: resent pushes are not applied twice ------


class CuttableProxy:
    """A TCP proxy to `upstream`: `hold()` stops passing what the shard sends back (its acks
    and answers pile up here while it goes on applying pushes), `cut()` drops every
    connection through it and lets the next ones flow."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.flowing = threading.Event()
        self.flowing.set()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.upstream)
            except OSError:
                return
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, back: bool) -> None:
        try:
            while data := source.recv(65_536):
                if back:
                    self.flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def hold(self) -> None:
        self.flowing.clear()

    def cut(self) -> None:
        with self.lock:
            ends, self.sockets = self.sockets, []
        for end in ends:
            with contextlib.suppress(OSError):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
                end.shutdown(socket.SHUT_RDWR)
        for end in ends:
            end.close()
        self.flowing.set()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def records_cutting(total: int, proxy: CuttableProxy, at: tuple[int, ...]) -> Iterator[int]:
    """Records; at each of `at`, the shard's answers are held for a second, then the connection
    cut, and the workers get a moment to reconnect before the next."""
    for record in range(total):
        if record in at:
            proxy.hold()
            time.sleep(1.0)
            proxy.cut()
            time.sleep(1.0)
        yield record


def resent(workers: list[Service], address: str, what: int) -> int:
    """Push batches (`what` 1) or pull requests (2) the workers sent again after reconnecting."""
    return sum(int(line.group(what)) for worker in workers for line in reconnect_lines(worker, address))


@pytest.mark.timeout(240)
def test_pushes_resent_over_a_new_connection_are_applied_once(procs: Processes) -> None:
    shards = [start_shard(procs, index) for index in range(SHARDS)]
    proxy = CuttableProxy(shards[1].address)
    servers = [shards[0].address, proxy.address]
    workers = start_workers(procs, servers, "--shard-timeout", "60")

    try:
        outputs, model = run_job(servers, workers, records_cutting(60_000, proxy, (15_000, 35_000)))
    finally:
        proxy.close()

    assert len(outputs) == 60_000
    assert model == expected_model(range(60_000))
    for worker in workers:
        assert worker.process.wait(timeout=30) == 0, stderr_lines(worker)
    # The shard had applied what it was sent while its acks were held: all of it came again.
    assert resent(workers, proxy.address, 1) > 0


@pytest.mark.timeout(240)
def test_pulls_reissued_over_a_new_connection_still_read_their_own_writes(procs: Processes) -> None:
    shards = [start_shard(procs, index) for index in range(SHARDS)]
    proxy = CuttableProxy(shards[1].address)
    servers = [shards[0].address, proxy.address]
    workers = start_workers(procs, servers, "--shard-timeout", "60", logic="logics:ReadYourWrites")

    try:
        outputs, model = run_job(servers, workers, records_cutting(30_000, proxy, (10_000, 20_000)))
    finally:
        proxy.close()

    assert len(outputs) == 30_000
    assert sum(model.values()) == 30_000
    assert Counter(param_id for param_id, _, _ in outputs) == model
    stale = [(param_id, value, pushed) for param_id, value, pushed in outputs if value < pushed]
    assert stale == [], "a pull did not see a push the same worker made before it"
    assert all(value <= model[param_id] for param_id, value, _ in outputs)
    for worker in workers:
        assert worker.process.wait(timeout=30) == 0, stderr_lines(worker)
    assert resent(workers, proxy.address, 2) > 0


# -- a shard that stays away -----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_shard_down_longer_than_the_shard_timeout_fails_the_worker_naming_it(procs: Processes) -> None:
    shard = start_shard(procs, 0, num_shards=1)
    (worker,) = [
        procs.start_server(
            worker_argv("logics:Exactness", [shard.address], 0, 1, "--port", "0", "--shard-timeout", "3")
        )
    ]
    with Cluster([shard.address], [worker.address]) as cluster:
        cluster.feed(range(100), end_of_input=False)

    shard.process.kill()
    killed = time.monotonic()
    code = worker.process.wait(timeout=30)
    elapsed = time.monotonic() - killed

    assert code == 1
    assert stderr_lines(worker)[-1] == (
        f"psworker: error: worker 0: shard 0 at {shard.address} unreachable for 3 s (last error: connection refused)"
    )
    assert 3.0 <= elapsed < 3.0 + 5.0, elapsed


@pytest.mark.timeout(120)
def test_a_shard_stopped_longer_than_the_shard_timeout_fails_the_worker_naming_it(procs: Processes) -> None:
    shard = start_shard(procs, 0, num_shards=1)
    worker = procs.start_server(
        worker_argv("logics:Exactness", [shard.address], 0, 1, "--port", "0", "--shard-timeout", "3")
    )
    shard.process.send_signal(signal.SIGSTOP)
    try:
        with Cluster([], [worker.address]) as cluster:
            cluster.feed(range(100), end_of_input=False)
        fed = time.monotonic()
        code = worker.process.wait(timeout=30)
        elapsed = time.monotonic() - fed
    finally:
        shard.process.send_signal(signal.SIGCONT)

    assert code == 1
    assert stderr_lines(worker)[-1] == (
        f"psworker: error: worker 0: shard 0 at {shard.address} unreachable for 3 s (last error: no answer)"
    )
    assert elapsed < 3.0 + 5.0, elapsed


@pytest.mark.timeout(120)
def test_a_shard_that_comes_back_with_another_layout_fails_the_worker_at_once(procs: Processes) -> None:
    shards = [start_shard(procs, index) for index in range(SHARDS)]
    servers = [shard.address for shard in shards]
    worker = procs.start_server(worker_argv("logics:Exactness", servers, 0, 1, "--port", "0", "--shard-timeout", "60"))
    with Cluster(servers, [worker.address]) as cluster:
        cluster.feed(range(100), end_of_input=False)

    shards[1].process.kill()
    shards[1].process.wait(timeout=10)
    start_shard(procs, 1, port=port_of(shards[1]), num_shards=3)
    code = worker.process.wait(timeout=30)  # not the 60 s of --shard-timeout

    assert code == 1
    assert stderr_lines(worker)[-1] == (
        f"psworker: error: worker 0: --servers lists 2 addresses but the shard at {servers[1]} says it is shard 1 of 3"
    )


# -- with durable shards ----------------------------------------------------------------------


def psserver_has_data_dir() -> bool:
    argv = [sys.executable, "-m", "psserver", "--help"]
    run = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=60, check=False)
    return "--data-dir" in run.stdout


@pytest.mark.timeout(300)
@pytest.mark.skipif(not psserver_has_data_dir(), reason="psserver has no --data-dir (durable shards) yet")
def test_a_durable_shard_killed_mid_job_and_restarted_leaves_the_model_exact(tmp_path: Path, procs: Processes) -> None:
    dirs = [tmp_path / f"shard-{index}" for index in range(SHARDS)]
    for directory in dirs:
        directory.mkdir()
    shards = [start_shard(procs, index, "--data-dir", str(dirs[index])) for index in range(SHARDS)]
    servers = [shard.address for shard in shards]
    workers = start_workers(procs, servers, "--shard-timeout", "60")

    def kill_and_restart_shard_1() -> None:
        os.kill(shards[1].process.pid, signal.SIGKILL)
        shards[1].process.wait(timeout=10)
        shards[1] = start_shard(procs, 1, "--data-dir", str(dirs[1]), port=port_of(shards[1]))

    outputs, model = run_job(servers, workers, records_doing(50_000, 20_000, kill_and_restart_shard_1))

    assert len(outputs) == 50_000
    assert model == expected_model(range(50_000))
    for worker in workers:
        assert worker.process.wait(timeout=30) == 0, stderr_lines(worker)
        assert len(reconnect_lines(worker, servers[1])) == 1, stderr_lines(worker)
