"""deploy/: every command, flag and STREAMPS_ variable used there exists in the CLIs; compose runs end to end
when a Docker engine is here."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from psclient.__main__ import main as psclient_main
from psserver.__main__ import main as psserver_main
from psworker.__main__ import main as psworker_main

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMMANDS: dict[str, click.Command] = {"psserver": psserver_main, "psworker": psworker_main, "psclient": psclient_main}


def _commands(name: str) -> list[click.Command]:
    """The command and, for a group, every subcommand."""
    command = COMMANDS[name]
    if isinstance(command, click.Group):
        return list(command.commands.values())
    return [command]


def _flags(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", []) if opt.startswith("--")}


def _envvars(name: str) -> set[str]:
    return {param.envvar for command in _commands(name) for param in command.params if isinstance(param.envvar, str)}


def _documents() -> list[tuple[Path, Any]]:
    docs = []
    for path in [DEPLOY / "docker-compose.yml", *sorted((DEPLOY / "k8s").glob("*.yaml"))]:
        docs.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _command_lines(doc: Any) -> list[str]:
    """Every command of a compose service or container, as one string."""
    lines = []
    for node in _walk(doc):
        for key in ("command", "test"):
            value = node.get(key)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                lines.append(" ".join(value))
    return lines


def test_every_command_and_flag_in_deploy_exists() -> None:
    used = []
    for path, doc in _documents():
        for line in _command_lines(doc):
            for program, rest in re.findall(r"\b(psserver|psworker|psclient)\b([^&;|]*)", line):
                words = rest.split()
                commands = _commands(program)
                if program == "psclient":
                    assert words and words[0] in COMMANDS["psclient"].commands, f"{path}: psclient {rest!r}"  # type: ignore[attr-defined]
                    commands = [COMMANDS["psclient"].commands[words[0]]]  # type: ignore[attr-defined]
                for flag in (w.split("=")[0] for w in words if w.startswith("--")):
                    assert any(flag in _flags(c) for c in commands), f"{path}: {program} has no {flag}"
                    used.append((program, flag))
    assert used, "no streamps command found in deploy/"


def test_every_streamps_variable_in_deploy_is_read_by_a_cli() -> None:
    known = _envvars("psserver") | _envvars("psworker") | _envvars("psclient")
    seen = set()
    for path, doc in _documents():
        for node in _walk(doc):
            for key in list(node):
                if isinstance(key, str) and key.startswith("STREAMPS_"):
                    seen.add(key)
                    assert key in known, f"{path}: no CLI reads {key}"
            if node.get("name", "").startswith("STREAMPS_") if isinstance(node.get("name"), str) else False:
                seen.add(node["name"])
                assert node["name"] in known, f"{path}: no CLI reads {node['name']}"
    assert {"STREAMPS_SHARD", "STREAMPS_SERVERS", "STREAMPS_LOGIC"} <= seen


def test_dockerfile_installs_the_package_as_a_non_root_user() -> None:
    text = (DEPLOY / "Dockerfile").read_text()

    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "pip install ." in text
    assert re.search(r"^USER streamps", text, re.M)


def _docker_engine() -> str | None:
    if shutil.which("docker") is None:
        return "the docker client is not installed"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return "no Docker engine is running here (docker info failed)"
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compose_deployment_end_to_end(tmp_path: Path) -> None:
    reason = _docker_engine()
    if reason:
        pytest.skip(reason)
    compose = ["docker", "compose", "-f", str(DEPLOY / "docker-compose.yml"), "-p", "streamps-smoke"]
    out = DEPLOY / "out"
    try:
        run = subprocess.run([*compose, "up", "--build", "--abort-on-container-exit", "--exit-code-from", "job"],
                             capture_output=True, text=True, timeout=840)  # fmt: skip
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        model = (out / "model.jsonl").read_text().splitlines()
        assert len(model) > 1000
    finally:
        subprocess.run([*compose, "down", "-v"], capture_output=True, timeout=120)
