"""Connecting to a cluster: misplaced shards are refused before anything is written, and
names that do not resolve (yet) are waited for like servers that are still starting.

Every name is under the reserved `.invalid` TLD (RFC 6761): no real resolver answers it
and nothing is sent to any address. The one that resolves later is answered by a DNS
responder on 127.0.0.1 that the channel is pointed at (`dns://127.0.0.1:PORT/NAME:PORT`).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Processes, psserver_argv, text_file

from psclient import ShardError, connect
from psclient.children import worker_argv
from psclient.rpc import serving
from psclient.rpc.shard_group import ShardGroup
from psclient.wire.proto import shard_pb2, shard_pb2_grpc

RUN_TIMEOUT_S = 120


def start(procs: Processes, *layout: tuple[int, int]) -> list[str]:
    """One psserver per (--shard, --num-shards); their addresses in that order."""
    return [procs.start_server(psserver_argv(shard, count, "const:0", "add")).address for shard, count in layout]


def params_held(addresses: list[str]) -> list[int]:
    """How many parameters each shard holds, asked directly (no layout check)."""
    held = []
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            info = shard_pb2_grpc.ParameterShardStub(channel).Info(shard_pb2.InfoRequest(), timeout=30)
            held.append(info.num_params)
    return held


def run(procs: Processes, argv: list[str]) -> tuple[int, str, list[str]]:
    """Run a command to its end; return (exit code, stdout, stderr lines)."""
    process, stderr_path = procs.popen(argv)
    stdout, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    return process.returncode, stdout, stderr_path.read_text(encoding="utf-8").splitlines()


def psworker_argv(servers: list[str], *extra: str) -> list[str]:
    return worker_argv("logics:WordCount", servers, 0, 1, *extra)


def words_file(tmp_path: Path) -> Path:
    return text_file(tmp_path / "words.txt", (f"w{n} w{n + 1} w{n + 2}" for n in range(200)))


# -- shards whose own index or count disagrees with the server list -------------------


@pytest.mark.timeout(180)
def test_psworker_refuses_two_shards_started_as_shard_0_before_any_push(tmp_path: Path, procs: Processes) -> None:
    servers = start(procs, (0, 2), (0, 2))

    code, stdout, stderr = run(procs, psworker_argv(servers, "--input", str(words_file(tmp_path)), "--format", "lines"))

    assert code == 1
    assert stdout == ""
    assert stderr == [
        f"psworker: error: worker 0: --servers: the shards at {servers[0]} and {servers[1]} both say they are "
        "shard 0 of 2 (each shard needs its own --shard)"
    ]
    assert params_held(servers) == [0, 0]


@pytest.mark.timeout(180)
def test_feed_mode_psworker_refuses_a_server_list_shorter_than_num_shards(procs: Processes) -> None:
    servers = start(procs, (0, 2), (1, 2))

    code, stdout, stderr = run(procs, psworker_argv(servers[:1], "--port", "0"))

    assert code == 1
    assert stdout == "", "a misplaced worker must not start serving"
    assert stderr == [
        f"psworker: error: worker 0: --servers lists 1 address but the shard at {servers[0]} says it is shard 0 of 2"
    ]


@pytest.mark.timeout(180)
def test_psclient_snapshot_refuses_shards_listed_out_of_order(procs: Processes) -> None:
    servers = start(procs, (0, 2), (1, 2))
    swapped = [servers[1], servers[0]]

    code, stdout, stderr = run(procs, [sys.executable, "-m", "psclient", "snapshot", "--servers", ",".join(swapped)])

    assert code == 1
    assert stdout == ""
    assert stderr == [f"psclient: error: --servers: the 1st address {servers[1]} is shard 1 of 2, expected shard 0"]


@pytest.mark.timeout(180)
def test_connect_refuses_misplaced_shards_before_the_first_push(procs: Processes) -> None:
    servers = start(procs, (0, 2), (1, 2))

    with pytest.raises(ShardError) as refused, connect([servers[1], servers[0]]) as cluster:
        cluster.push(["a", "b", "c", 1, 2, 3], [1] * 6)

    assert str(refused.value) == f"servers: the 1st address {servers[1]} is shard 1 of 2, expected shard 0"
    assert params_held(servers) == [0, 0]


@pytest.mark.timeout(180)
def test_shard_group_refuses_a_shard_of_a_larger_cluster(procs: Processes) -> None:
    servers = start(procs, (0, 2), (1, 3))

    with pytest.raises(ShardError) as refused:
        ShardGroup(servers)

    assert str(refused.value) == f"servers lists 2 addresses but the shard at {servers[1]} says it is shard 1 of 3"


@pytest.mark.timeout(180)
def test_status_labels_each_shard_by_the_index_it_reports(procs: Processes) -> None:
    servers = start(procs, (0, 2), (1, 2))
    swapped = [servers[1], servers[0]]
    argv = [sys.executable, "-m", "psclient", "status", "--servers", ",".join(swapped), "--json", "--interval", "0.1"]

    code, stdout, stderr = run(procs, argv)

    assert code == 1, stderr
    rows = json.loads(stdout)
    assert [(row["node"], row["address"], row["up"], row["detail"]) for row in rows] == [
        ("shard 1", servers[1], True, f"--servers: the 1st address {servers[1]} is shard 1 of 2, expected shard 0"),
        ("shard 0", servers[0], True, f"--servers: the 2nd address {servers[0]} is shard 0 of 2, expected shard 1"),
    ]


# -- names that do not resolve ------------------------------------------------------


class LoopbackDns:
    """A DNS responder on 127.0.0.1: A records of `published` names are 127.0.0.1, any
    other name is NXDOMAIN (as a Kubernetes pod's name is until the pod is ready)."""

    def __init__(self) -> None:
        self.published: set[str] = set()
        self.queries: list[str] = []
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self._socket.recvfrom(512)
            except TimeoutError:
                continue
            self._socket.sendto(self._answer(query), peer)

    def _answer(self, query: bytes) -> bytes:
        query_id, flags = struct.unpack("!HH", query[:4])
        labels, position = [], 12
        while length := query[position]:
            labels.append(query[position + 1 : position + 1 + length].decode("ascii"))
            position += 1 + length
        (query_type,) = struct.unpack("!H", query[position + 1 : position + 3])
        question = query[12 : position + 5]
        name = ".".join(labels).lower()
        self.queries.append(name)
        known = name in self.published
        answer = b""
        if known and query_type == 1:  # A, TTL 0: never cached
            answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton("127.0.0.1")
        rcode = 0 if known else 3  # NXDOMAIN
        header = struct.pack("!HHHHHH", query_id, 0x8180 | (flags & 0x0100) | rcode, 1, 1 if answer else 0, 0, 0)
        return header + question + answer

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    if os.environ.get("GRPC_DNS_RESOLVER", "ares") != "ares":
        pytest.skip("only gRPC's c-ares resolver takes a DNS server in the target")
    responder = LoopbackDns()
    try:
        yield responder
    finally:
        responder.close()


@pytest.mark.timeout(180)
def test_psworker_connects_once_the_shard_name_starts_to_resolve(
    tmp_path: Path, procs: Processes, dns: LoopbackDns
) -> None:
    servers = start(procs, (0, 1))
    name = "shard-0.streamps.invalid"
    address = f"dns://127.0.0.1:{dns.port}/{name}:{servers[0].rsplit(':', 1)[1]}"
    data = words_file(tmp_path)
    argv = psworker_argv([address], "--input", str(data), "--format", "lines", "--connect-timeout", "90")

    process, stderr_path = procs.popen(argv, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while name not in dns.queries and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(3)  # the pod becomes ready a while after the worker first asked
    asked_before = dns.queries.count(name)
    dns.published.add(name)
    code = process.wait(timeout=RUN_TIMEOUT_S)

    assert asked_before >= 4, "the worker must keep asking while the name does not resolve"
    assert code == 0, stderr_path.read_text(encoding="utf-8")
    with connect(servers) as cluster:
        model = dict(cluster.snapshot())
    words = data.read_text(encoding="utf-8").split()
    assert model == {word: words.count(word) for word in set(words)}


@pytest.mark.timeout(120)
def test_psworker_waits_for_a_name_that_does_not_resolve_then_says_so(procs: Processes) -> None:
    started = time.monotonic()

    code, _, stderr = run(procs, psworker_argv(["shard-0.invalid:7401"], "--port", "0", "--connect-timeout", "3"))

    assert code == 1
    assert stderr == [
        "psworker: error: worker 0: shard 0 at shard-0.invalid:7401: the name shard-0.invalid did not resolve "
        "within 3 s"
    ]
    assert time.monotonic() - started >= 3, "the name must be retried for the whole --connect-timeout"


@pytest.mark.timeout(120)
def test_psclient_feed_takes_a_connect_timeout_and_names_the_unresolved_worker(
    tmp_path: Path, procs: Processes
) -> None:
    argv = [
        sys.executable, "-m", "psclient", "feed", "--workers", "worker-0.invalid:7101", "--input",
        str(words_file(tmp_path)), "--format", "lines", "--connect-timeout", "2",
    ]  # fmt: skip
    started = time.monotonic()

    code, stdout, stderr = run(procs, argv)

    assert code == 1
    assert stdout == ""
    assert stderr == [
        "psclient: error: worker 0 at worker-0.invalid:7101: the name worker-0.invalid did not resolve within 2 s"
    ]
    assert time.monotonic() - started >= 2


@pytest.mark.timeout(120)
def test_connect_waits_for_an_unresolved_shard_name_within_its_connect_timeout() -> None:
    started = time.monotonic()

    with pytest.raises(ShardError) as refused, connect(["shard-1.invalid:7401"], connect_timeout=2) as cluster:
        cluster.pull(["a"])

    assert str(refused.value) == "shard 0 at shard-1.invalid:7401: the name shard-1.invalid did not resolve within 2 s"
    assert "TLS" not in str(refused.value)
    assert time.monotonic() - started >= 2


class _FailedCheck(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    "detail",
    [
        "errors resolving shard-0.invalid:7401: [field:hostname lookup error:address lookup failed]",  # native
        "DNS resolution failed for shard-0.invalid:7401: C-ares status is not ARES_SUCCESS",  # c-ares
    ],
)
def test_a_lookup_still_under_way_at_the_deadline_is_reported_as_the_earlier_attempts_saw_it(
    monkeypatch: pytest.MonkeyPatch, detail: str
) -> None:
    # The last health check ends at the deadline with no news (the resolver is
    # slow under load); the ones before it said the name did not resolve.
    failures = iter(
        [_FailedCheck(grpc.StatusCode.UNAVAILABLE, detail)] * 3
        + [_FailedCheck(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")] * 100
    )

    class Stub:
        def __init__(self, channel: object):
            pass

        def Check(self, request: object, timeout: float) -> None:
            failure = next(failures)
            if failure.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                time.sleep(timeout)
            raise failure

    monkeypatch.setattr(serving.health_pb2_grpc, "HealthStub", Stub)
    with pytest.raises(ShardError) as raised:
        serving.ready_channel("shard-0.invalid:7401", "shard 0 at shard-0.invalid:7401", 0.5)
    assert str(raised.value) == "shard 0 at shard-0.invalid:7401: the name shard-0.invalid did not resolve within 0.5 s"


def test_a_server_that_resets_connections_is_waited_for_as_one_restarting() -> None:
    """A server killed as it accepted resets the connection: a supervisor restarts it, so the
    client waits for it (up to its connect timeout) rather than failing at once."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    stop = threading.Event()

    def reset_every_connection() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            # SO_LINGER 0: close sends a RST, as a killed process's socket does.
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()

    thread = threading.Thread(target=reset_every_connection, daemon=True)
    thread.start()
    try:
        with pytest.raises(ShardError) as raised:
            serving.ready_channel(address, f"shard 0 at {address}", 1.0)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert str(raised.value) == f"shard 0 at {address} is unreachable (no answer after 1 s)"
