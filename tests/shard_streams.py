"""Driving psserver processes over raw Exchange streams, for the durability tests.

The tests pick the worker_id and every seq themselves, as a restarted worker
resends them. Deltas are random float32: any push applied twice, lost, or
reordered changes the model's bits.
"""

from __future__ import annotations

import queue
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from conftest import START_TIMEOUT_S, Processes, Service

from psclient.children import shard_argv
from psclient.wire.codec import decode_batch, encode_id_array
from psclient.wire.partition import shards_of_ints
from psclient.wire.proto import shard_pb2, shard_pb2_grpc
from psserver.wal import segment_numbers, segment_path

DIM = 4
IDS = 400
WORKER = "worker-a"


def batches(count: int, seed: int = 7, size: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` push batches of random ids (repeats included) and float32 deltas."""
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, IDS, size).astype(np.int64), rng.standard_normal((size, DIM)).astype(np.float32))
        for _ in range(count)
    ]


def expected_model(pushes: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The model of a fault-free run: every push folded in once, in order (as ufunc.at does)."""
    model = np.zeros((IDS, DIM), dtype=np.float32)
    for ids, deltas in pushes:
        np.add.at(model, ids, deltas)
    return model


class Stream:
    """One Exchange stream to a shard; `send` does not wait, `ack` reads the next answer."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self.channel).result(timeout=START_TIMEOUT_S)
        self.stub = shard_pb2_grpc.ParameterShardStub(self.channel)
        self._requests: queue.Queue[shard_pb2.ExchangeRequest | None] = queue.Queue()
        self._answers = self.stub.Exchange(self._iterate(), timeout=60)

    def _iterate(self) -> Iterator[shard_pb2.ExchangeRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def send(self, seq: int, ids: np.ndarray, deltas: np.ndarray) -> None:
        self.send_push(shard_pb2.PushRequest(worker_id=WORKER, seq=seq, batches=[encode_id_array(ids, deltas)]))

    def send_push(self, push: shard_pb2.PushRequest) -> None:
        self._requests.put(shard_pb2.ExchangeRequest(push=push))

    def send_request(self, request: shard_pb2.ExchangeRequest) -> None:
        self._requests.put(request)

    def answer(self) -> shard_pb2.ExchangeResponse:
        return next(self._answers)

    def ack(self) -> shard_pb2.PushAck:
        return next(self._answers).ack

    def push(self, seq: int, ids: np.ndarray, deltas: np.ndarray) -> shard_pb2.PushAck:
        self.send(seq, ids, deltas)
        return self.ack()

    def pull(self, ids: np.ndarray) -> np.ndarray:
        pull = shard_pb2.PullRequest(request_id=1, keys=encode_id_array(ids))
        self._requests.put(shard_pb2.ExchangeRequest(pull=pull))
        (batch,) = next(self._answers).pull.batches
        values = decode_batch(batch, with_values=True).values
        assert values is not None
        return values

    def watermarks(self) -> dict[str, int]:
        return dict(self.info().watermarks)

    def info(self) -> shard_pb2.InfoResponse:
        return self.stub.Info(shard_pb2.InfoRequest(), timeout=10)

    def close(self) -> None:
        self._requests.put(None)
        self._answers.cancel()
        self.channel.close()


def start_shard(procs: Processes, shard: int, num_shards: int, data_dir: Path, *extra: str) -> Service:
    argv = shard_argv(shard, num_shards, f"zeros:{DIM}", "add", "INFO", "--data-dir", str(data_dir), *extra)
    return procs.start_server(argv)


def kill(service: Service) -> None:
    service.process.send_signal(signal.SIGKILL)
    service.process.wait(timeout=10)


def split(ids: np.ndarray, deltas: np.ndarray, num_shards: int) -> list[tuple[np.ndarray, np.ndarray]]:
    owners = shards_of_ints(ids, num_shards)
    return [(ids[owners == shard], deltas[owners == shard]) for shard in range(num_shards)]


def model_of(streams: list[Stream]) -> np.ndarray:
    ids = np.arange(IDS, dtype=np.int64)
    model = np.zeros((IDS, DIM), dtype=np.float32)
    for shard, (mine, _) in enumerate(split(ids, np.zeros((IDS, DIM), np.float32), len(streams))):
        model[mine] = streams[shard].pull(mine)
    return model


def wal_warnings(service: Service) -> list[str]:
    return [line for line in service.stderr_path.read_text().splitlines() if " WARNING " in line and "WAL" in line]


def pushed_and_killed(procs: Processes, data_dir: Path, count: int) -> Path:
    """A shard that acked `count` pushes and was killed; its one WAL segment."""
    shard = start_shard(procs, 0, 1, data_dir)
    stream = Stream(shard.address)
    for seq, (ids, deltas) in enumerate(batches(count), 1):
        assert stream.push(seq, ids, deltas).seq == seq
    stream.close()
    kill(shard)
    (number,) = segment_numbers(data_dir)
    return segment_path(data_dir, number)


def restarted(procs: Processes, streams: list[Stream], data_dir: Path, *extra: str) -> tuple[Service, Stream]:
    """The shard of `data_dir` started again, and a stream to it (closed with `streams`)."""
    shard = start_shard(procs, 0, 1, data_dir, *extra)
    stream = Stream(shard.address)
    streams.append(stream)
    return shard, stream
