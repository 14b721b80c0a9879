"""Service processes started as children: their command lines, and watching one from its start to its end.

The command lines are those a deployment runs (`python -m psserver ...`,
`python -m psworker ...`), each on a free loopback port; a child announces
its address on its first stdout line, passes its log through, and says how
it ended (a signal, an exit code with its last error line).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading

from psclient.errors import StreampsError

# Each child imports grpc and numpy before it listens; on a busy 2-core machine
# that can take several seconds.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
LISTENING = "listening on "


def child_env() -> dict[str, str]:
    """The environment of a child service: this one, with this process's import path."""
    env = dict(os.environ)
    # Children resolve `module:attr` plugins the way this process does.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def shard_argv(
    shard: int,
    num_shards: int,
    init_spec: str,
    update_spec: str,
    log_level: str = "WARNING",
    *extra: str,
    port: int = 0,
) -> list[str]:
    """The command line of one shard on a free loopback port (or `port`, for a restart), as a
    deployment would run it; `extra` adds flags (`--data-dir DIR`, `--load FILE`)."""
    return [
        sys.executable, "-m", "psserver", "--shard", str(shard), "--num-shards", str(num_shards), "--port", str(port),
        "--init", init_spec, "--update", update_spec, "--log-level", log_level, *extra,
    ]  # fmt: skip


def worker_argv(
    logic: str, servers: list[str], index: int, num_workers: int, *extra: str, log_level: str = "WARNING"
) -> list[str]:
    """The command line of one worker of `num_workers`, as a deployment would run it; `extra`
    adds flags (`--port 0` for a Feed-mode worker, `--input PATH` for a file)."""
    return [
        sys.executable, "-m", "psworker", "--logic", logic, "--servers", ",".join(servers),
        "--worker-index", str(index), "--num-workers", str(num_workers), "--log-level", log_level, *extra,
    ]  # fmt: skip


class ChildProcess:
    """A service process whose first stdout line announces its address."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, start_new_session=True
        )
        self.stderr_tail: list[str] = []
        self._terminated = False
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        self._stderr_pump = threading.Thread(target=self._pump_stderr, daemon=True)
        self._stderr_pump.start()

    def _pump_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        # Pass the child's log through, and keep its end for error messages.
        assert self.process.stderr is not None
        for line in self.process.stderr:
            sys.stderr.write(line)
            self.stderr_tail = [*self.stderr_tail[-19:], line.rstrip("\n")]

    def address(self, timeout: float) -> str:
        try:
            while (line := self._lines.get(timeout=timeout)) is not None:
                if line.startswith(LISTENING):
                    return line[len(LISTENING) :].strip()
        except queue.Empty:
            raise StreampsError(f"{self.name} did not start within {timeout:g} s") from None
        self.process.wait(timeout=STOP_TIMEOUT_S)
        reason = self._last_error_line()
        if reason is None or self.process.returncode < 0:
            reason = self.exit_reason()
        raise StreampsError(f"{self.name} failed to start: {reason}")

    def _last_error_line(self) -> str | None:
        """The last line of the child's stderr that speaks of an error, else its last line."""
        self._stderr_pump.join(timeout=1.0)  # the child is gone; let its last lines arrive
        errors = [line for line in self.stderr_tail if "error" in line.lower()] or self.stderr_tail[-1:]
        return errors[-1] if errors else None

    def exit_reason(self) -> str | None:
        """How the child ended, if it has ended and was not stopped by us; else None."""
        code = self.process.poll()
        if code is None or self._terminated:
            return None
        who = f"{self.name} (pid {self.process.pid})"
        if code < 0:
            try:
                name = f" ({signal.Signals(-code).name})"
            except ValueError:
                name = ""
            # The kernel's out-of-memory killer sends SIGKILL too.
            return f"{who} was killed by signal {-code}{name}"
        line = self._last_error_line()
        return f"{who} exited with code {code}" + (f": {line}" if line else "")

    def terminate(self) -> None:
        """Send SIGTERM once; a second one would only interrupt the graceful stop."""
        if not self._terminated and self.process.poll() is None:
            self._terminated = True
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, for a child whose job has failed already: its exit is no news."""
        if self.process.poll() is None:
            self._terminated = True
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    def stop(self) -> None:
        self.terminate()
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
