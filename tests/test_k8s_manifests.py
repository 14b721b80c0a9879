"""deploy/k8s: every manifest is valid (strict schemas of Kubernetes 1.28 and the newest the validator knows), and
the cluster it describes starts in any order: names published before readiness, pods that wait for health, Jobs
that retry, restricted Pod Security, bounded resources, and a model that outlives the driver's pod."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import StartShards, child_env

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
OLDEST = "1.28.0"  # the oldest version README promises
NEWEST = kubernetes_validate.latest_version()
RESTRICTED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _resources() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [doc for _, doc in _resources() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return doc


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for _, doc in _resources():
        if doc["kind"] in ("StatefulSet", "Job", "Deployment"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.mark.parametrize("version", sorted({OLDEST, NEWEST}))
def test_every_manifest_is_valid_in_strict_mode(version: str) -> None:
    checked = []
    for path, doc in _resources():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} against {version}: {exc.message}")
        checked.append(doc["kind"])

    assert sorted(checked) == ["ConfigMap", "Job", "Job", "PersistentVolumeClaim", "Service", "Service", "StatefulSet"]


def test_strict_validation_rejects_a_misspelled_field() -> None:
    service = copy.deepcopy(_one("Service", "shards"))
    service["spec"]["publishNotReadyAdresses"] = service["spec"].pop("publishNotReadyAddresses")

    with pytest.raises(kubernetes_validate.ValidationError, match="publishNotReadyAdresses"):
        kubernetes_validate.validate(service, OLDEST, strict=True)


def test_headless_services_publish_names_before_readiness() -> None:
    services = [doc for _, doc in _resources() if doc["kind"] == "Service"]

    assert {s["metadata"]["name"] for s in services} == {"shards", "workers"}
    for service in services:
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True, service["metadata"]["name"]


def test_jobs_retry_a_failed_pod() -> None:
    for name in ("worker", "feed"):
        assert _one("Job", name)["spec"]["backoffLimit"] >= 3, name


def test_every_pod_meets_the_restricted_pod_security_standard_with_bounded_resources() -> None:
    pods = dict(_pod_specs())

    assert set(pods) == {"StatefulSet/shard", "Job/worker", "Job/feed"}
    for where, pod in pods.items():
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in _containers(pod):
            what = f"{where} container {container['name']}"
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            }, what
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) == {"cpu", "memory"}, f"{what}: {bound}"


def _shard_arguments(tmp_path: Path, hostname: str) -> list[str]:
    """The arguments the shard container's own command passes to psserver (a fake that shows them)."""
    (container,) = _one("StatefulSet", "shard")["spec"]["template"]["spec"]["containers"]
    fake = tmp_path / "psserver"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "HOSTNAME": hostname}
    run = subprocess.run(container["command"], capture_output=True, text=True, env=env, timeout=30)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_shard_index_comes_from_the_hostname_not_a_label_of_newer_kubernetes(tmp_path: Path) -> None:
    arguments = _shard_arguments(tmp_path, "shard-12")

    assert arguments[arguments.index("--shard") + 1] == "12"
    assert "pod-index" not in "".join(path.read_text() for path in K8S.glob("*.yaml"))


def test_each_shard_keeps_its_data_dir_on_a_volume_claimed_for_it(tmp_path: Path) -> None:
    statefulset = _one("StatefulSet", "shard")
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    arguments = _shard_arguments(tmp_path, "shard-0")
    data_dir = arguments[arguments.index("--data-dir") + 1]

    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"].rstrip("/") == data_dir.rstrip("/")]
    (claim,) = [t for t in statefulset["spec"]["volumeClaimTemplates"] if t["metadata"]["name"] == mount["name"]]
    assert not [v for v in pod.get("volumes", []) if v["name"] == mount["name"]], "the claim, not a pod volume"
    assert not mount.get("readOnly", False)
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"], "the volume is writable"
    # SIGTERM drains and snapshots before the shard exits: more than the default 30 s for a large model.
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert container["startupProbe"]["grpc"]["port"] == 7000, "recovery is not cut short by liveness"


def _init_script(job: str) -> list[str]:
    (init,) = _one("Job", job)["spec"]["template"]["spec"]["initContainers"]
    return list(init["command"])


def test_pods_wait_for_the_health_of_everything_they_connect_to() -> None:
    worker_init = " ".join(_init_script("worker"))
    feed_init = " ".join(_init_script("feed"))

    assert "psclient health" in worker_init and "$STREAMPS_SERVERS" in worker_init
    assert "psclient health" in feed_init
    assert "$STREAMPS_SERVERS" in feed_init and "$STREAMPS_WORKERS_ADDRESSES" in feed_init


def _run_init(command: list[str], servers: str, workers: str = "") -> subprocess.CompletedProcess[str]:
    env = child_env(STREAMPS_SERVERS=servers, STREAMPS_WORKERS_ADDRESSES=workers)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # psclient, as in the image
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_init_container_passes_once_every_server_answers(start_shards: StartShards) -> None:
    shards = start_shards(2)
    workers = start_shards(1)  # any streamps server answers the same health check

    run = _run_init(_init_script("feed"), ",".join(shards), ",".join(workers))

    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [f"{address}: SERVING" for address in [*shards, *workers]]


def test_init_container_keeps_waiting_for_a_name_not_yet_published_then_gives_up(start_shards: StartShards) -> None:
    (shard,) = start_shards(1)
    # The same script with a 4-second bound instead of 300.
    command = [re.sub(r"\btimeout 300\b", "timeout 4", part) for part in _init_script("worker")]

    run = _run_init(command, f"{shard},shard-9.shards.invalid:7000")

    assert run.returncode == 1
    assert run.stdout == f"{shard}: SERVING\n"
    assert run.stderr.count("psclient: shard-9.shards.invalid:7000: UNAVAILABLE") >= 2, run.stderr


def test_the_driver_writes_the_model_to_a_persistent_volume_claim() -> None:
    pod = _one("Job", "feed")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    script = " ".join(container["command"])
    outputs = re.findall(r"psclient (?:snapshot|feed)\b[^&]*--output (\S+)", script)
    claims = {doc["metadata"]["name"] for _, doc in _resources() if doc["kind"] == "PersistentVolumeClaim"}

    assert len(outputs) == 2
    for output in outputs:
        (mount,) = [m for m in container["volumeMounts"] if output.startswith(m["mountPath"].rstrip("/") + "/")]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] in claims, output
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"], "the claim is writable"
