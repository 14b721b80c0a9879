"""deploy/: every command, flag and STREAMPS_ variable used there exists in the CLIs, every shell script parses,
the image and compose file are built as documented, and the compose deployment runs end to end where a Docker
engine and the base image are here (the `docker` marker; skipped with the reason otherwise)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from conftest import StartShards, child_env

from psclient.__main__ import main as psclient_main
from psserver.__main__ import main as psserver_main
from psworker.__main__ import main as psworker_main

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
REDIS_COMPOSE_FILE = DEPLOY / "docker-compose.redis.yml"
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
    for path in [COMPOSE_FILE, REDIS_COMPOSE_FILE, *sorted((DEPLOY / "k8s").glob("*.yaml"))]:
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


def _command_lists(doc: Any) -> list[list[str]]:
    """Every command of a compose service or container, and every compose health check."""
    return [
        value
        for node in _walk(doc)
        for key in ("command", "test")
        if isinstance(value := node.get(key), list) and all(isinstance(v, str) for v in value)
    ]


def test_every_command_and_flag_in_deploy_exists() -> None:
    used = []
    for path, doc in _documents():
        for line in (" ".join(command) for command in _command_lists(doc)):
            for program, rest in re.findall(r"\b(psserver|psworker|psclient)\b([^&;|]*)", line):
                words = rest.split()
                commands = _commands(program)
                if program == "psclient":
                    assert words and words[0] in COMMANDS["psclient"].commands, f"{path}: psclient {rest!r}"  # type: ignore[attr-defined]
                    commands = [COMMANDS["psclient"].commands[words[0]]]  # type: ignore[attr-defined]
                for flag in (w.split("=")[0] for w in words if w.startswith("--")):
                    assert any(flag in _flags(c) for c in commands), f"{path}: {program} has no {flag}"
                    used.append((program, flag))
    assert ("psclient", "--address") in used, "the health checks and init containers call psclient health"
    assert ("psserver", "--shard") in used


def test_every_streamps_variable_in_deploy_is_read_by_a_cli() -> None:
    known = _envvars("psserver") | _envvars("psworker") | _envvars("psclient")
    seen = set()
    for path, doc in _documents():
        for node in _walk(doc):
            for key in list(node):
                if isinstance(key, str) and key.startswith("STREAMPS_"):
                    seen.add(key)
                    assert key in known, f"{path}: no CLI reads {key}"
            if isinstance(node.get("name"), str) and node["name"].startswith("STREAMPS_"):
                seen.add(node["name"])
                assert node["name"] in known, f"{path}: no CLI reads {node['name']}"
        for command in _command_lists(doc):
            for name in re.findall(r"\$\{?(STREAMPS_\w+)", " ".join(command)):
                seen.add(name)
                assert name in known, f"{path}: a script reads {name}, which no CLI reads"
    assert {"STREAMPS_SHARD", "STREAMPS_SERVERS", "STREAMPS_LOGIC", "STREAMPS_WORKERS_ADDRESSES"} <= seen


def _shell_scripts() -> Iterator[tuple[Path, str]]:
    for path, doc in _documents():
        for command in _command_lists(doc):
            if command[:2] == ["sh", "-c"]:
                # compose writes a literal $ as $$; Kubernetes leaves $ alone unless it is $(VAR).
                yield path, command[2].replace("$$", "$") if path.name.startswith("docker-compose") else command[2]


def test_every_shell_script_in_deploy_parses() -> None:
    scripts = list(_shell_scripts())

    for path, script in scripts:
        check = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"{path}: {check.stderr.strip()}\n{script}"
    assert len(scripts) >= 5


def test_dockerfile_installs_dependencies_before_the_code_as_a_non_root_user() -> None:
    text = (DEPLOY / "Dockerfile").read_text()

    assert re.search(r"^FROM python:3\.11-slim AS streamps$", text, re.M)
    # The last stage is what a plain `docker build` makes: streamps itself, not its Redis variant.
    assert text.rstrip().splitlines()[-1] == "FROM streamps"
    assert re.search(r"^USER streamps$", text, re.M)
    # A code change must not reinstall numpy and grpcio: dependencies get their own layer first.
    assert text.index("pip install -r") < text.index("COPY psclient") < text.index("pip install --no-deps .")
    for arg in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT"):
        assert re.search(rf"^ARG {arg}=", text, re.M), arg


def test_build_context_holds_only_what_the_image_copies() -> None:
    copied = {line.split()[1].rstrip("/") for line in (DEPLOY / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ")}  # fmt: skip
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]

    assert patterns[0] == "*", "everything is left out unless named"
    assert {p.lstrip("!").rstrip("/") for p in patterns if p.startswith("!")} == copied
    assert "deploy/out/" in (ROOT / ".gitignore").read_text().splitlines()


def _seconds(duration: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", duration))


def test_compose_builds_one_image_and_waits_patiently_for_health() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    builders = [name for name, service in services.items() if "build" in service]

    assert builders == ["shard-0"], "one service builds streamps:local"
    assert not services["shard-0"].get("depends_on"), "the builder comes first"
    assert {service["image"] for service in services.values()} == {"streamps:local"}
    for name, service in services.items():
        if name != "job":
            health = service["healthcheck"]
            assert health["test"][1:3] == ["psclient", "health"], name
            # A Python start takes seconds on a loaded host: a probe must not be cut at 5 s.
            assert _seconds(health["timeout"]) >= 20, name
            assert _seconds(health["start_period"]) >= 60, name
    assert services["job"]["volumes"] == ["./out:/out"]


def test_each_compose_shard_keeps_its_data_dir_in_a_named_volume_of_its_own() -> None:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    services = document["services"]
    shards = sorted(name for name, service in services.items() if service["command"] == ["psserver"])
    volumes = []

    assert shards == ["shard-0", "shard-1"]
    for name in shards:
        data_dir = services[name]["environment"]["STREAMPS_DATA_DIR"]
        (volume,) = [v.split(":")[0] for v in services[name]["volumes"] if v.split(":")[1] == data_dir]
        assert volume in document["volumes"], f"{name}: {volume} is a named volume, not a host path"
        assert _seconds(services[name]["stop_grace_period"]) >= 30, name
        volumes.append(volume)
    assert len(set(volumes)) == len(shards), "one volume per shard (a data dir holds one shard)"


HEAVY = (
    "psclient.cluster",
    "psclient.jobs",
    "psclient.local",
    "psclient.rpc.connection",
    "psclient.rpc.layout",
    "psclient.rpc.shard_group",
    "psclient.wire.proto.shard_pb2",
    "tqdm",
)


def test_psclient_health_answers_without_loading_the_cluster_code(start_shards: StartShards) -> None:
    (address,) = start_shards(1)
    probe = (
        "import atexit, sys\n"
        f"atexit.register(lambda: print('loaded:', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr))\n"
        "from psclient.__main__ import main\n"
        "main()\n"
    )

    run = subprocess.run([sys.executable, "-c", probe, "health", "--address", address],
                         capture_output=True, text=True, env=child_env(), timeout=60)  # fmt: skip

    assert run.returncode == 0, run.stderr
    assert run.stdout == f"{address}: SERVING\n"
    assert run.stderr == "loaded: []\n"


# ---- the real deployment, on a Docker engine -------------------------------------------------------------


def _base_image() -> str:
    match = re.search(r"^FROM (\S+)(?: AS \S+)?$", (DEPLOY / "Dockerfile").read_text(), re.M)  # the first stage's
    assert match
    return match.group(1)


def _compose_command() -> list[str] | None:
    """`docker compose` (v2) or, as Debian ships compose v1, `docker-compose`: whichever answers."""
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]) is None:
            continue
        try:
            probe = subprocess.run([*candidate, "version"], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            continue
        if probe.returncode == 0:
            return candidate
    return None


def _docker_skip_reason() -> str | None:
    if shutil.which("docker") is None:
        return "the docker client is not installed"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer (docker info timed out)"
    if info.returncode != 0:
        return "no Docker engine is running here (docker info failed)"
    if _compose_command() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    base = _base_image()
    inspect = subprocess.run(["docker", "image", "inspect", base], capture_output=True, text=True, timeout=60)
    if inspect.returncode != 0:
        return f"the base image {base} is not here (no registry? deploy/make-base-image.sh makes a stand-in)"
    return None


def _container_state(compose: list[str], service: str, template: str) -> str:
    ids = subprocess.run([*compose, "ps", "-q", service], capture_output=True, text=True, timeout=60).stdout.split()
    assert len(ids) == 1, f"{service}: containers {ids}"
    state = subprocess.run(["docker", "inspect", "-f", template, ids[0]], capture_output=True, text=True, timeout=60)
    return state.stdout.strip()


@dataclass
class ComposeRun:
    compose: list[str]
    out: Path
    owner: int
    log: str


@contextlib.contextmanager
def _compose_job(compose_file: Path, project: str) -> Iterator[ComposeRun]:
    """`up` the compose file's job as README says (make deploy/out first), and `down -v` after.
    Run as root (CI), deploy/out belongs to another uid, as on a developer's machine, where it
    is rarely the image's 10001."""
    reason = _docker_skip_reason()
    if reason:
        pytest.skip(reason)
    compose = [*(_compose_command() or []), "-f", str(compose_file), "-p", project]
    out = DEPLOY / "out"
    owner = os.getuid() if os.getuid() != 0 else 4242
    try:
        subprocess.run([*compose, "down", "-v"], capture_output=True, timeout=300)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        os.chown(out, owner, owner)
        run = subprocess.run([*compose, "up", "--build", "--exit-code-from", "job", "job"],
                             capture_output=True, text=True, timeout=1200)  # fmt: skip
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-6000:]
        yield ComposeRun(compose, out, owner, log)
    finally:
        subprocess.run([*compose, "down", "-v"], capture_output=True, timeout=300)
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.docker
@pytest.mark.timeout(1500)
def test_compose_job_runs_end_to_end_and_leaves_its_files_to_the_owner_of_deploy_out() -> None:
    with _compose_job(COMPOSE_FILE, "streamps-test") as run:
        compose, out, owner, log = run.compose, run.out, run.owner, run.log
        assert "psclient: fed 20000 records, 20000 outputs" in log
        params = re.search(r"psclient: (\d+) parameters", log)
        assert params, log[-3000:]
        predictions = (out / "predictions.jsonl").read_text().splitlines()
        model = [json.loads(line) for line in (out / "model.jsonl").read_text().splitlines()]
        assert len(predictions) == 20000
        assert len(model) == int(params.group(1)) > 1000
        assert all(set(row) == {"id", "value"} and len(row["value"]) == 10 for row in model)
        for name in ("predictions.jsonl", "model.jsonl"):
            assert (out / name).stat().st_uid == owner, name
        for shard in ("shard-0", "shard-1"):
            assert _container_state(compose, shard, "{{.State.Health.Status}}") == "healthy", shard
        for worker in ("worker-0", "worker-1"):
            # Healthy before the job could start (depends_on), done once their input ended.
            assert _container_state(compose, worker, "{{.State.Status}} {{.State.ExitCode}}") == "exited 0", worker

        # SIGTERM: the shard snapshots into its named volume, so a restart replays no log.
        stop = subprocess.run([*compose, "stop", "shard-0"], capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert _container_state(compose, "shard-0", "{{.State.Status}} {{.State.ExitCode}}") == "exited 0"
        logs = subprocess.run([*compose, "logs", "--no-color", "shard-0"], capture_output=True, text=True, timeout=60)
        stopped = r"stopped on SIGTERM; ended \d+ open streams; (snapshot of \d+ parameters|nothing logged)"
        assert re.search(stopped, logs.stdout), logs.stdout[-3000:]
        files = subprocess.run(
            ["docker", "run", "--rm", "-v", "streamps-test_shard-0-data:/data", "streamps:local", "ls", "/data"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert {"shard.json", "snapshot.bin"} <= set(files.stdout.split()), files.stdout + files.stderr


@pytest.mark.docker
@pytest.mark.timeout(1500)
def test_redis_fed_compose_trains_from_the_stream_snapshots_while_it_trains_and_writes_the_model() -> None:
    with _compose_job(REDIS_COMPOSE_FILE, "streamps-redis-test") as run:
        compose, out, owner = run.compose, run.out, run.owner
        published = subprocess.run([*compose, "logs", "--no-color", "publish"], capture_output=True, text=True,
                                   timeout=60)  # fmt: skip
        assert "psclient: published 20000 records to redis stream ratings at redis:6379" in published.stdout, (
            published.stdout[-3000:]
        )
        predictions = [
            json.loads(line)
            for index in (0, 1)
            for line in (out / f"predictions-{index}.jsonl").read_text().splitlines()
        ]
        assert len(predictions) == 20000  # every rating of the stream, once (each worker keeps its users')
        model = [json.loads(line) for line in (out / "model.jsonl").read_text().splitlines()]
        assert len(model) > 1000 and all(len(row["value"]) == 10 for row in model)
        for name in ("predictions-0.jsonl", "predictions-1.jsonl", "model.jsonl"):
            assert (out / name).stat().st_uid == owner, name
        # The shards took model snapshots while the workers trained, in their data volumes.
        files = subprocess.run(
            ["docker", "run", "--rm", "-v", "streamps-redis-test_shard-0-data:/data", "streamps:local",
             "ls", "/data/models"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert any(name.startswith("model-0-") for name in files.stdout.split()), files.stdout + files.stderr
