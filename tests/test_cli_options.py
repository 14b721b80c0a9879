"""The options the command lines share behave the same in every command (psclient/cli/options.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import TESTS_DIR, Processes, StartShards, child_env, reap, terminate

from psclient.cli.main import main as psclient_main
from psserver.__main__ import main as psserver_main
from psworker.__main__ import main as psworker_main

SHARED_FLAGS = [
    "--logic", "--init", "--update", "--pull-limit", "--batch-max-keys", "--batch-linger-ms", "--on-error",
    "--input", "--format", "--partition-key", "--skip-header", "--host", "--port", "--log-level", "--log-format",
    "--metrics-port", "--connect-timeout", "--tls-cert", "--tls-key", "--tls-ca", "--auth-token-file", "--consistency",
]  # fmt: skip
# Said differently on purpose: a worker without --input serves the Feed RPC; a worker waits for shards.
HELP_SAYS_WHAT_THE_COMMAND_DOES = {"--input", "--connect-timeout"}
# The same flag for another thing: a shard's --logic is its ServerLogic (STREAMPS_SERVER_LOGIC), not the WorkerLogic.
OTHER_MEANING = {("psserver", "--logic")}


def commands() -> dict[str, click.Command]:
    assert isinstance(psclient_main, click.Group)
    subcommands = {f"psclient {name}": command for name, command in psclient_main.commands.items()}
    return {"psserver": psserver_main, "psworker": psworker_main, **subcommands}


def option(command: click.Command, flag: str) -> click.Option | None:
    return next((p for p in command.params if isinstance(p, click.Option) and flag in p.opts), None)


@pytest.mark.parametrize("flag", SHARED_FLAGS)
def test_a_shared_flag_reads_the_same_variable_with_the_same_type_default_and_help(flag: str) -> None:
    declared = {
        name: found
        for name, command in commands().items()
        if (found := option(command, flag)) is not None and (name, flag) not in OTHER_MEANING
    }

    assert len(declared) >= 2, f"{flag} is in one command only: {list(declared)}"
    for name, found in declared.items():
        assert found.envvar == "STREAMPS_" + flag[2:].upper().replace("-", "_"), name
        assert found.show_envvar, name
        assert found.help, f"{name} {flag} has no help"
    kinds = {
        name: (json.dumps(found.type.to_info_dict(), sort_keys=True), found.default, found.is_flag)
        for name, found in declared.items()
    }
    assert len(set(kinds.values())) == 1, kinds
    if flag not in HELP_SAYS_WHAT_THE_COMMAND_DOES:
        helps = {name: found.help for name, found in declared.items()}
        assert len(set(helps.values())) == 1, helps


@pytest.mark.parametrize(
    ("program", "argv"),
    [
        ("psserver", ["--shard", "0", "--num-shards", "1"]),
        ("psworker", ["--logic", "logics:WordCount", "--servers", "127.0.0.1:1", "--worker-index", "0",
                      "--num-workers", "1"]),
        ("psclient", ["snapshot", "--servers", "127.0.0.1:1"]),
        ("psclient", ["health", "--address", "127.0.0.1:1"]),
    ],
)  # fmt: skip
def test_every_command_names_itself_when_a_security_file_is_missing(program: str, argv: list[str]) -> None:
    missing = TESTS_DIR / "no-such-ca.pem"

    run = subprocess.run([sys.executable, "-m", program, *argv, "--tls-ca", str(missing)],
                         capture_output=True, text=True, env=child_env(), cwd=TESTS_DIR, timeout=60)  # fmt: skip

    assert run.returncode == 2, run.stderr
    assert run.stderr == f"{program}: error: cannot read --tls-ca {missing}: No such file or directory\n"
    assert run.stdout == ""


@pytest.mark.timeout(120)
def test_shard_and_worker_take_log_level_and_format_from_the_environment(
    tmp_path: Path, procs: Processes, start_shards: StartShards
) -> None:
    servers = start_shards(1)
    data = tmp_path / "words.txt"
    data.write_text("a b\nb\n", encoding="utf-8")
    logging_env = child_env(STREAMPS_LOG_LEVEL="info", STREAMPS_LOG_FORMAT="json")
    shard = subprocess.Popen(
        [sys.executable, "-m", "psserver", "--shard", "0", "--num-shards", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=logging_env, cwd=TESTS_DIR,
    )  # fmt: skip
    try:
        assert shard.stdout is not None and shard.stdout.readline().startswith("listening on ")
        worker = subprocess.run(
            [sys.executable, "-m", "psworker", "--logic", "logics:WordCount", "--servers", servers[0],
             "--worker-index", "0", "--num-workers", "1", "--input", str(data), "--format", "lines"],
            capture_output=True, text=True, env=logging_env, cwd=TESTS_DIR, timeout=60,
        )  # fmt: skip
    finally:
        terminate(shard)
        shard_stderr = shard.communicate(timeout=30)[1]
        reap(shard)

    assert worker.returncode == 0, worker.stderr
    for speaker, stderr, says in [("shard 0", shard_stderr, "serving shard 0/1"),
                                  ("worker 0", worker.stderr, "finished: 2 records")]:  # fmt: skip
        entries = [json.loads(line) for line in stderr.splitlines()]
        assert entries and {entry["service"] for entry in entries} == {speaker}
        assert {entry["level"] for entry in entries} >= {"INFO"}
        assert any(entry["message"].startswith(says) for entry in entries), entries
