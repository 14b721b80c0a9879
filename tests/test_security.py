"""TLS, mutual TLS and bearer tokens on the shard and worker services, good and bad credentials.

The tests make their own CA, server and client certificates (cryptography).
"""

from __future__ import annotations

import datetime
import ipaddress
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import Processes, psserver_argv
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from psclient import ShardError, connect
from psclient.children import worker_argv
from psclient.rpc.security import Security
from psclient.rpc.serving import open_channel
from psclient.wire.proto import worker_pb2, worker_pb2_grpc

TOKEN = "s3cret-token-for-tests"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _issue(
    directory: Path, name: str, ca_key: ec.EllipticCurvePrivateKey | None, ca_cert: x509.Certificate | None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject if ca_cert else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if ca_cert is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca_key or key, hashes.SHA256())
    _write_key(directory / f"{name}.key", key)
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """ca.pem, server.pem/.key, client.pem/.key (same CA), rogue.pem/.key (another CA), token."""
    ca_key, ca_cert = _issue(tmp_path, "ca", None, None)
    _issue(tmp_path, "server", ca_key, ca_cert)
    _issue(tmp_path, "client", ca_key, ca_cert)
    rogue_ca_key, rogue_ca_cert = _issue(tmp_path, "rogue-ca", None, None)
    _issue(tmp_path, "rogue", rogue_ca_key, rogue_ca_cert)
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "wrong-token").write_text("not-the-token\n")
    return tmp_path


def _server_flags(pki: Path, *, token: bool = True, mutual: bool = True) -> list[str]:
    flags = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    if mutual:
        flags += ["--tls-ca", str(pki / "ca.pem")]
    if token:
        flags += ["--auth-token-file", str(pki / "token")]
    return flags


def _client(pki: Path, cert: str | None = "client", token: str | None = "token") -> Security:
    return Security.from_files(
        str(pki / f"{cert}.pem") if cert else None,
        str(pki / f"{cert}.key") if cert else None,
        str(pki / "ca.pem"),
        str(pki / token) if token else None,
    )


@pytest.mark.timeout(120)
def test_mutual_tls_with_token_serves_the_right_client_and_refuses_the_others(procs: Processes, pki: Path) -> None:
    address = procs.start_server([*psserver_argv(0, 1, "zeros:2", "add"), *_server_flags(pki)]).address

    with connect([address], security=_client(pki)) as cluster:
        cluster.push([1], [np.array([1.0, 2.0], dtype=np.float32)])
        good = cluster.pull([1])
    np.testing.assert_array_equal(good[0], np.array([1.0, 2.0], dtype=np.float32))

    for security, expected in [
        (_client(pki, token=None), "UNAUTHENTICATED"),
        (_client(pki, token="wrong-token"), "UNAUTHENTICATED"),
    ]:
        with pytest.raises(ShardError, match=expected), connect([address], security=security) as cluster:
            cluster.pull([1])
    for security in [_client(pki, cert=None), _client(pki, cert="rogue")]:  # no or foreign client certificate
        started = time.monotonic()
        with pytest.raises(ShardError, match="cannot connect"), connect([address], security=security) as cluster:
            cluster.pull([1])
        assert time.monotonic() - started < 10, "a TLS failure must not wait out the connect timeout"


@pytest.mark.timeout(120)
def test_plaintext_client_against_tls_server_fails_fast_with_a_clear_message(procs: Processes, pki: Path) -> None:
    address = procs.start_server([*psserver_argv(0, 1, "zeros:2", "add"), *_server_flags(pki, token=False)]).address
    started = time.monotonic()

    with pytest.raises(ShardError, match="agree on TLS"), connect([address], security=Security()) as cluster:
        cluster.pull([1])

    assert time.monotonic() - started < 10


@pytest.mark.timeout(120)
def test_token_without_tls_guards_the_shard_but_not_its_health_check(procs: Processes, pki: Path) -> None:
    argv = [*psserver_argv(0, 1, "const:0", "add"), "--auth-token-file", str(pki / "token")]
    address = procs.start_server(argv).address
    plain_with_token = Security.from_files(token_file=str(pki / "token"))

    with connect([address], security=plain_with_token) as cluster:
        cluster.push(["a"], [3])
        assert cluster.pull(["a"]) == [3]
    with pytest.raises(ShardError, match="UNAUTHENTICATED"), connect([address], security=Security()) as cluster:
        cluster.pull(["a"])


@pytest.mark.timeout(120)
def test_worker_service_checks_tls_and_token_too(procs: Processes, pki: Path) -> None:
    shard = procs.start_server([*psserver_argv(0, 1, "const:0", "add"), *_server_flags(pki)]).address
    argv = worker_argv("logics:Exactness", [shard], 0, 1, "--port", "0", *_server_flags(pki))
    worker = procs.start_server(argv).address  # it reached the shard with its own client certificate

    with open_channel(worker, _client(pki)) as channel:
        status = worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=30)
    assert status.state == worker_pb2.StatusResponse.RUNNING
    wrong = _client(pki, token="wrong-token")
    with open_channel(worker, wrong) as channel, pytest.raises(grpc.RpcError) as denied:
        worker_pb2_grpc.WorkerStub(channel).Status(worker_pb2.StatusRequest(), timeout=30)
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_token_file_is_required_to_hold_a_token(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")

    with pytest.raises(ValueError, match="is empty"):
        Security.from_files(token_file=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="go together"):
        Security.from_files(cert=str(tmp_path / "x.pem"))


def test_the_import_path_readme_shows_still_gives_security() -> None:
    from psclient.security import Security as Documented

    assert Documented is Security
