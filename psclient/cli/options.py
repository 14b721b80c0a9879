"""The click options the command lines share, and how a command line fails.

A flag that several commands take is declared here once, so it reads the same
`STREAMPS_<FLAG>` variable (for containers; `--help` names it), has the same
type, default and help, and fails the same way everywhere. `fail` exits 2 for
what a command refuses before it starts (a flag, a spec, a security file, a
port in use) and 1 when the work itself fails.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NoReturn, TextIO, overload

import click

from psclient.cli.process import LOG_FORMATS
from psclient.consistency import consistency_name, parse_consistency
from psclient.errors import SpecError
from psclient.inputs import FORMATS
from psclient.rpc.security import Security, configure
from psclient.rpc.serving import DEFAULT_BATCH_LINGER_MS, DEFAULT_BATCH_MAX_KEYS, DEFAULT_CONNECT_TIMEOUT_S

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def env(name: str) -> dict[str, Any]:
    """The click.option arguments that read `STREAMPS_<name>` and show it in `--help`."""
    return {"envvar": f"STREAMPS_{name}", "show_envvar": True}


def program() -> str:
    """The command's own name (`psserver`, `psworker`, `psclient`), however it was started:
    `python -m psworker` names itself `psworker`, as the console script does."""
    context = click.get_current_context(silent=True)
    name = context.find_root().command.name if context is not None else None
    return name or Path(sys.argv[0]).name


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `PROGRAM: error: MESSAGE` (one line) on stderr and exit with `code`."""
    click.echo(f"{program()}: error: {message}", err=True)
    sys.exit(code)


def options(*decorators: Decorator) -> Decorator:
    """Apply click options in the order listed, which is the order `--help` shows them."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


def split_addresses(text: str | None) -> list[str]:
    """`H:P,H:P,...` as a list; blanks and empty parts dropped."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@overload
def open_output(stack: ExitStack, path: str, *, append: bool = False) -> TextIO: ...
@overload
def open_output(stack: ExitStack, path: None, *, append: bool = False) -> None: ...
def open_output(stack: ExitStack, path: str | None, *, append: bool = False) -> TextIO | None:
    """Where an --output goes: None for no path, stdout for -, else the file (added to
    with `append`), closed with `stack`."""
    if path is None:
        return None
    if path == "-":
        return sys.stdout
    return stack.enter_context(Path(path).open("a" if append else "w", encoding="utf-8"))


# -- what a job runs ------------------------------------------------------------------

logic_option = click.option(
    "--logic", "logic_spec", required=True, **env("LOGIC"), help="The WorkerLogic, as module:Class."
)

spec_options = options(
    click.option(
        "--init",
        "init_spec",
        default="zeros:1",
        **env("INIT"),
        help="Parameter init: zeros:DIM, normal:DIM[,std=S][,seed=N], "
        "uniform:DIM[,low=A][,high=B][,seed=N], const:V, module:attr.",
    ),
    click.option(
        "--update",
        "update_spec",
        default="add",
        **env("UPDATE"),
        help="Parameter update: add, replace, max, min, module:attr.",
    ),
)

pull_limit_option = click.option(
    "--pull-limit",
    type=click.IntRange(min=1),
    default=None,
    **env("PULL_LIMIT"),
    help="Most unanswered pulls; input pauses at the limit.",
)


def _finite(_context: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    # FloatRange lets nan and inf through: neither is a time to wait.
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number.")
    return value


batch_options = options(
    click.option(
        "--batch-max-keys",
        type=click.IntRange(min=1),
        default=DEFAULT_BATCH_MAX_KEYS,
        **env("BATCH_MAX_KEYS"),
        help="A worker sends a shard its buffered pulls and pushes as one message once they hold this many "
        "keys: fewer means smaller, more frequent messages.",
    ),
    click.option(
        "--batch-linger-ms",
        type=click.FloatRange(min=0),
        default=DEFAULT_BATCH_LINGER_MS,
        callback=_finite,
        **env("BATCH_LINGER_MS"),
        help="Longest a buffered pull or push waits for company before it is sent, also for a shard still "
        "answering earlier messages; 0 sends what a callback buffered as soon as it returns.",
    ),
)


def _consistency(_context: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return consistency_name(parse_consistency(value))
    except SpecError as exc:
        raise click.BadParameter(str(exc)) from None


consistency_option = click.option(
    "--consistency",
    default="async",
    callback=_consistency,
    **env("CONSISTENCY"),
    help="async, bsp or ssp:S: a shard holds back the pull answers of a worker more than S clocks "
    "(ps.advance_clock()) ahead of the slowest unfinished one (bsp: S = 0). Shards and workers must agree.",
)

on_error_option = click.option(
    "--on-error",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    **env("ON_ERROR"),
    help="On a malformed record or an exception in on_recv or on_pull_recv[_many]: stop the job, or log, count, go on.",
)


def input_options(*, required: bool = True, input_help: str = "Records file, or - for stdin.") -> Decorator:
    """--input, --format, --partition-key, --skip-header: what `psclient.inputs.InputSpec` takes."""
    return options(
        click.option("--input", "input_path", required=required, default=None, **env("INPUT"), help=input_help),
        click.option(
            "--format", "fmt", type=click.Choice(FORMATS), default="jsonl", **env("FORMAT"), help="Input format."
        ),
        click.option(
            "--partition-key",
            default=None,
            **env("PARTITION_KEY"),
            help="Take records by this key (a jsonl field or a csv/tsv column index) instead of round robin: "
            "records with equal key go to the same worker.",
        ),
        click.option("--skip-header", is_flag=True, **env("SKIP_HEADER"), help="Ignore the first line of the input."),
    )


# -- servers and processes ------------------------------------------------------------

listen_options = options(
    click.option("--host", default="127.0.0.1", **env("HOST"), help="Address to bind."),
    click.option(
        "--port",
        type=click.IntRange(min=0, max=65535),
        default=0,
        **env("PORT"),
        help="Port to bind; 0 picks a free one.",
    ),
)

process_options = options(
    click.option("--log-level", default="INFO", **env("LOG_LEVEL"), help="Log level: DEBUG, INFO, WARNING, ERROR."),
    click.option(
        "--log-format", type=click.Choice(LOG_FORMATS), default="text", **env("LOG_FORMAT"), help="Log line format."
    ),
    click.option(
        "--metrics-port",
        type=click.IntRange(min=0, max=65535),
        default=None,
        **env("METRICS_PORT"),
        help="Serve Prometheus metrics on this port (0 picks one).",
    ),
)


def connect_timeout_option(peer: str = "server") -> Decorator:
    return click.option(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT_S,
        **env("CONNECT_TIMEOUT"),
        help=f"Seconds to wait for each {peer} that refuses connections or whose name does not resolve yet.",
    )


def security_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --tls-cert/--tls-key/--tls-ca/--auth-token-file to a command, and configure this
    process's `Security` from them before the command runs (exit 2 on an unusable file)."""

    @functools.wraps(command)
    def run(
        *args: Any,
        tls_cert: str | None,
        tls_key: str | None,
        tls_ca: str | None,
        auth_token_file: str | None,
        **kwargs: Any,
    ) -> Any:
        try:
            configure(Security.from_files(tls_cert, tls_key, tls_ca, auth_token_file))
        except SpecError as exc:
            fail(str(exc), 2)
        return command(*args, **kwargs)

    def path_option(flag: str, name: str, text: str) -> Decorator:
        return click.option(flag, type=click.Path(), **env(name), help=text)

    return options(
        path_option("--tls-cert", "TLS_CERT", "PEM certificate: serve TLS, and present it to peers that ask."),
        path_option("--tls-key", "TLS_KEY", "PEM private key of --tls-cert."),
        path_option(
            "--tls-ca",
            "TLS_CA",
            "PEM CA: connect with TLS and verify peers; a server with it also requires client certificates.",
        ),
        path_option(
            "--auth-token-file",
            "AUTH_TOKEN_FILE",
            "File holding the bearer token sent and required on every RPC (health checks stay open).",
        ),
    )(run)
