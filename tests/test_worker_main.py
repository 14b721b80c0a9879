"""psworker's main: the Feed path binds its port before it waits for shards."""

from __future__ import annotations

import socket

import pytest
from conftest import Processes, run_psworker


@pytest.mark.timeout(120)
def test_a_feed_worker_whose_port_is_taken_exits_2_at_once_without_waiting_for_shards(procs: Processes) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The shard address refuses connections: a worker would wait the whole connect timeout for it.
        code, stdout, stderr = run_psworker(
            procs, "--logic", "logics:WordCount", "--worker-index", "0", "--num-workers", "1",
            "--port", str(port), "--connect-timeout", "30",
        )  # fmt: skip

    assert code == 2, stderr
    assert stdout == []
    # gRPC's own log may say it first; ours is the last line.
    assert stderr[-1].startswith(f"psworker: error: cannot listen on 127.0.0.1:{port}"), stderr
