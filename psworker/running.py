"""How a worker process runs on its input, once `psworker` (__main__.py) has set it up:
a source that a pump reads (`run_on_source`), or the Feed RPC, whose calls push into
the worker's FeedSource (`serve_feed`); and its graceful stop on a signal."""

from __future__ import annotations

import logging
import signal
import threading
import time

from psclient.cli.options import fail
from psclient.cli.process import StopSignal, announce
from psclient.errors import JobFailed, ShardError
from psworker.runtime import WorkerRuntime
from psworker.service import OutputBuffer, build_worker_server
from psworker.sources import Source
from psworker.sources.feed import FeedSource
from psworker.sources.pump import Pump

log = logging.getLogger("streamps")

STOP_GRACE_S = 5.0
# After a failure, how long a worker serving Outputs waits for a reader to take
# its outputs and error. A reader that is attached gets them at once; without
# one, the error is in this process's log and exit code, and a worker that
# waited longer would only hold its port and memory for a reader that most
# likely is gone (its client saw the job fail elsewhere).
UNREAD_FAILURE_GRACE_S = 3.0


def _stop_input(runtime: WorkerRuntime, stop: StopSignal, *, drop_queued: bool = False) -> None:
    """A graceful stop: no more input; the logic finishes the records it has (its
    pulls answered, its pushes acked) and ends as at the end of its input, or for a
    restartable worker, checkpoints without calling on_input_end."""
    name = signal.Signals(stop.signum).name if stop.signum is not None else "request"
    reason = f"worker {runtime.worker_index} is stopping ({name}): it takes no more input"
    # A restartable worker's input has not ended: it checkpoints, and a restart reads on.
    runtime.stopped = True
    runtime.inputs.stop(reason, drop_queued=drop_queued)
    log.info("%s; a second signal stops it at once", reason)


def _stopped_again(runtime: WorkerRuntime, stop: StopSignal) -> bool:
    """A second signal during a graceful stop (a shard that does not answer, a callback
    that does not return): fail the job now, losing what was not yet acked."""
    if stop.count < 2:
        return False
    if not runtime.error:
        name = signal.Signals(stop.signum).name if stop.signum is not None else "signal"
        runtime.fail(f"worker {runtime.worker_index}: stopped by a second {name} before it finished what it took")
    return True


def _serve_until_read(
    stop: StopSignal, done: threading.Event, runtime: WorkerRuntime, outputs: OutputBuffer, *, to_file: bool
) -> None:
    """Return once the logic is done and its outputs reached a file or an Outputs
    reader, or the job failed and no reader was attached for UNREAD_FAILURE_GRACE_S.
    A signal stops the input; then outputs wait only for a reader that is attached,
    and for STOP_GRACE_S at most."""
    unread_since: float | None = None
    stopped_at: float | None = None
    while True:
        if stop.is_set() and stopped_at is None:
            stopped_at = time.monotonic()
            _stop_input(runtime, stop)
        if _stopped_again(runtime, stop):
            return
        if done.is_set():
            if to_file or outputs.delivered.is_set():
                return
            if stopped_at is not None and (
                not outputs.subscription.locked() or time.monotonic() - stopped_at >= STOP_GRACE_S
            ):
                return
            if runtime.error:
                if outputs.subscription.locked():
                    unread_since = None
                elif unread_since is None:
                    unread_since = time.monotonic()
                elif time.monotonic() - unread_since >= UNREAD_FAILURE_GRACE_S:
                    log.warning("the job failed and no client reads its outputs: stopping")
                    return
        time.sleep(StopSignal.POLL_S)


def _connect(runtime: WorkerRuntime) -> None:
    try:
        runtime.connect()
    except ShardError as exc:
        fail(f"worker {runtime.worker_index}: {exc}", 1)


def run_on_source(runtime: WorkerRuntime, source: Source) -> StopSignal:
    """Read the source on a thread, run the logic to the end, then acknowledge what it finished."""
    _connect(runtime)
    stop = StopSignal()
    failure: list[JobFailed] = []

    def run_logic() -> None:
        try:
            runtime.run()  # closes the shard streams however it ends
        except JobFailed as exc:
            failure.append(exc)

    pump = Pump(source, runtime, stopping=lambda: stop.is_set() or bool(runtime.error))
    log.info("reading %s", source.describe())
    pump.start()
    # The logic on a thread, so that this one sees a signal at once (it is delivered
    # to the main thread, which a blocking wait would hold).
    logic = threading.Thread(target=run_logic, name="logic", daemon=True)
    logic.start()
    stopping = False
    while logic.is_alive():
        if stop.is_set() and not stopping:
            stopping = True
            # The reader's next chunk is refused, so it stops reading; what it read
            # ahead is dropped, so the stop takes one chunk's time, not 64.
            _stop_input(runtime, stop, drop_queued=True)
        if _stopped_again(runtime, stop):
            fail(runtime.error or "stopped", 1)
        logic.join(StopSignal.POLL_S)
    pump.finish(STOP_GRACE_S)
    if failure:
        fail(str(failure[0]), 1)
    return stop


def serve_feed(runtime: WorkerRuntime, outputs: OutputBuffer, host: str, port: int, *, to_file: bool) -> StopSignal:
    """The Feed path: serve Feed, Outputs and Status until the outputs are read, or
    after a signal, until the logic finished what it was fed."""
    source = FeedSource(runtime)
    try:
        # Bound before connecting, so that a port in use fails at once rather than
        # after waiting for the shards; it serves nothing until the shards check out.
        bound = build_worker_server(runtime, outputs, host, port, source)
    except OSError as exc:
        fail(str(exc), 2)
    source.address = bound.address
    source.open()
    _connect(runtime)
    stop = StopSignal()
    done = threading.Event()

    def run_logic() -> None:
        try:
            runtime.run()
        except JobFailed:
            pass  # runtime.error holds it, for the Outputs reader and the exit below
        finally:
            outputs.close()
            done.set()

    bound.server.start()
    try:
        bound.set_serving(True)
        announce(bound)
        log.info("reading %s", source.describe())
        threading.Thread(target=run_logic, name="logic", daemon=True).start()
        _serve_until_read(stop, done, runtime, outputs, to_file=to_file)
    finally:
        bound.set_serving(False)
        bound.server.stop(STOP_GRACE_S).wait()
        source.close()
    if runtime.error:
        fail(runtime.error, 1)
    return stop
