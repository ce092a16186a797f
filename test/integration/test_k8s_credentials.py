"""The certificate hand-off through the API (fake API server, real `kubernetes` client, real
TLS): the aggregator creates the CA Secret, the CA ConfigMap and the client Secret, reuses
the CA after a restart and beside another replica, rotates it with an overlap; an agent
fetches what it needs and completes mutual TLS with the aggregator."""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from antrea_flow.aggregator.config import load_aggregator_config
from antrea_flow.aggregator.service import Aggregator
from antrea_flow.exporter.agent import _fetch_tls_context
from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.antrea import exporter_templates
from antrea_flow.ipfix.exporting import ExportingProcess
from antrea_flow.k8s.client import api_connection
from antrea_flow.k8s.credentials import (
    CA_CONFIGMAP,
    CA_SECRET,
    CLIENT_SECRET,
    ClusterCertificates,
    CredentialsError,
    fetch_client_credentials,
)
from antrea_flow.tls import CertificateAuthority, client_context_from_pem, server_context
from antrea_flow.tls.refusals import is_certificate_failure

from .fakeapi import FakeApiServer
from .ipfixkit import eventually, free_port

NS = "flow-aggregator"
LABELS = ("ca.crt", "tls.crt", "tls.key")


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


def connect(api: FakeApiServer, tmp_path: Path):
    connection = api_connection(str(api.kubeconfig(tmp_path / "kubeconfig")))
    assert connection is not None
    return connection


def secret_data(api: FakeApiServer, name: str) -> dict[str, bytes]:
    secret = api.get("secrets", NS, name)
    assert secret is not None, name
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def writes(api: FakeApiServer) -> int:
    return len(api.requests_of("create")) + len(api.requests_of("update"))


def _fetching_exporter(connection, port: int) -> ExportingProcess:
    """An agent's exporter that fetches its TLS credentials through the API, as the agent
    does, and retries quickly."""
    return ExportingProcess(
        TransportAddress("127.0.0.1", port, "tls"),
        exporter_templates(),
        7,
        tls_credentials=functools.partial(_fetch_tls_context, connection),
        server_hostname="localhost",
        backoff_initial=0.05,
        backoff_max=0.2,
    )


def test_the_aggregator_creates_the_ca_the_configmap_and_the_client_secret(api, tmp_path):
    credentials = ClusterCertificates(connect(api, tmp_path), NS).sync()
    ca_secret = api.get("secrets", NS, CA_SECRET)
    assert ca_secret["type"] == "kubernetes.io/tls"
    assert ca_secret["metadata"]["labels"] == {"app": "flow-aggregator"}
    ca = CertificateAuthority.load(*(secret_data(api, CA_SECRET)[k] for k in LABELS[1:]))
    assert ca.certificate == credentials.authority.certificate
    config_map = api.get("configmaps", NS, CA_CONFIGMAP)
    assert config_map["data"]["ca.crt"].encode() == ca.certificate_pem == credentials.trusted
    client = secret_data(api, CLIENT_SECRET)
    assert api.get("secrets", NS, CLIENT_SECRET)["type"] == "kubernetes.io/tls"
    cert = x509.load_pem_x509_certificate(client["tls.crt"])
    cert.verify_directly_issued_by(ca.certificate)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # What an agent gets is a working client context.
    fetched = fetch_client_credentials(connect(api, tmp_path), NS)
    assert fetched.ca == ca.certificate_pem and fetched.certificate == client["tls.crt"]
    client_context_from_pem(fetched.ca, fetched.certificate, fetched.key, LABELS)


def test_a_restart_reuses_the_ca_and_writes_nothing(api, tmp_path):
    first = ClusterCertificates(connect(api, tmp_path), NS).sync()
    before = writes(api)
    again = ClusterCertificates(connect(api, tmp_path), NS).sync()
    assert again.authority.certificate == first.authority.certificate
    assert again.trusted == first.trusted
    assert writes(api) == before


def test_a_replica_that_loses_the_race_takes_the_winners_ca(api, tmp_path):
    winner = CertificateAuthority.create("flow-aggregator-ca")

    def other_replica_creates_it_first() -> None:
        data = {"tls.crt": winner.certificate_pem, "tls.key": winner.private_key_pem}
        api.put(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "kubernetes.io/tls",
                "metadata": {"namespace": NS, "name": CA_SECRET},
                "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
            }
        )

    api.before("create", "secrets", other_replica_creates_it_first)
    credentials = ClusterCertificates(connect(api, tmp_path), NS).sync()
    assert credentials.authority.certificate == winner.certificate
    assert [r.status for r in api.requests_of("create", "secrets")][0] == 409
    client = x509.load_pem_x509_certificate(secret_data(api, CLIENT_SECRET)["tls.crt"])
    client.verify_directly_issued_by(winner.certificate)


def test_replicas_starting_together_agree_on_one_ca(api, tmp_path):
    connection = connect(api, tmp_path)
    barrier = threading.Barrier(4)
    results: list = []

    def replica() -> None:
        barrier.wait()
        results.append(ClusterCertificates(connection, NS).sync())

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len({r.authority.certificate for r in results}) == 1
    stored = secret_data(api, CA_SECRET)["tls.crt"]
    assert results[0].authority.certificate_pem == stored


def test_a_ca_near_its_end_is_replaced_and_the_old_one_stays_trusted(api, tmp_path):
    """Rotated 90 days before expiry: the ConfigMap carries both CAs, the old client
    certificate is still accepted, and an agent that distrusts the new server certificate
    gets fresh credentials and connects."""
    real_now = datetime.datetime.now(datetime.UTC)
    connection = connect(api, tmp_path)
    old = ClusterCertificates(
        connection, NS, now=lambda: real_now - datetime.timedelta(days=300)
    ).sync()
    old_client = fetch_client_credentials(connection, NS)
    new = ClusterCertificates(connection, NS).sync()
    assert new.authority.certificate != old.authority.certificate
    bundle = x509.load_pem_x509_certificates(api.get("configmaps", NS, CA_CONFIGMAP)["data"]
                                             ["ca.crt"].encode())  # fmt: skip
    assert bundle == [new.authority.certificate, old.authority.certificate]
    new_client = fetch_client_credentials(connection, NS)
    x509.load_pem_x509_certificate(new_client.certificate).verify_directly_issued_by(
        new.authority.certificate
    )
    # A server with a certificate of the new CA that trusts both.
    issued = new.authority.issue("flow-aggregator", ["localhost"], ["127.0.0.1"], server=True)
    directory = tmp_path / "server"
    directory.mkdir()
    (directory / "server.crt").write_bytes(issued.certificate_pem)
    (directory / "server.key").write_bytes(issued.private_key_pem)
    (directory / "ca.crt").write_bytes(new.trusted)
    server = server_context(
        directory / "server.crt", directory / "server.key", directory / "ca.crt"
    )
    # The old client certificate with the new bundle: accepted.
    old_cert_new_trust = client_context_from_pem(new.trusted, old_client.certificate,
                                                 old_client.key, LABELS)  # fmt: skip
    assert handshake(server, old_cert_new_trust) is None
    # Everything old: the new server certificate is not trusted; fresh credentials cure it.
    all_old = client_context_from_pem(old_client.ca, old_client.certificate, old_client.key,
                                      LABELS)  # fmt: skip
    failure = handshake(server, all_old)
    assert failure is not None and is_certificate_failure(failure)
    fresh = client_context_from_pem(new_client.ca, new_client.certificate, new_client.key, LABELS)
    assert handshake(server, fresh) is None


def handshake(server_ctx, client_ctx) -> BaseException | None:
    """A TLS handshake over a socket pair; the client's error, if any."""
    import socket
    import ssl

    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname="localhost") as tls:
            tls.sendall(b"x")
            tls.recv(1)  # TLS 1.3: a refused client certificate shows here
    except (OSError, ssl.SSLError) as exc:
        errors.append(exc)
    finally:
        thread.join(5)
        a.close()
        b.close()
    return errors[0] if errors else None


def test_an_agent_without_the_objects_says_what_is_missing(api, tmp_path):
    with pytest.raises(CredentialsError) as info:
        fetch_client_credentials(connect(api, tmp_path), NS)
    message = str(info.value)
    assert f"ConfigMap {NS}/{CA_CONFIGMAP} does not exist" in message
    assert "flow-aggregator.yml" in message
    api.denied.add(("get", "configmaps"))
    with pytest.raises(CredentialsError) as info:
        fetch_client_credentials(connect(api, tmp_path), NS)
    assert "403" in str(info.value) and "verb 'get'" in str(info.value)


def aggregator_conf(api: FakeApiServer, tmp_path: Path, port: int) -> Path:
    """A TLS aggregator on 127.0.0.1:`port` whose certificates go through `api`."""
    conf = tmp_path / "flow-aggregator.conf"
    conf.write_text(
        f"listenAddress: 127.0.0.1:{port}\n"
        f"clientConnection: {{kubeconfig: {api.kubeconfig(tmp_path / 'kubeconfig')}}}\n"
        f"certDir: {tmp_path / 'certs'}\n"
        'metricsBindAddress: ""\n'
        "stateDir: ''\n"
        "flowExportInterval: 1s\n"
    )
    return conf


def test_an_agent_fetches_its_certificate_and_completes_mutual_tls_with_the_aggregator(
    api, tmp_path, caplog
):
    """The agent starts first (nothing to fetch yet, it retries), the aggregator publishes
    the credentials through the API, the agent fetches them and its records arrive."""
    caplog.set_level(logging.INFO)
    port = free_port()
    aggregator = Aggregator(load_aggregator_config(aggregator_conf(api, tmp_path, port)))
    connection = connect(api, tmp_path)

    async def scenario() -> None:
        exporter = _fetching_exporter(connection, port)
        exporter.start()
        await eventually(lambda: exporter.stats.connect_failures >= 2, "failed attempts")
        assert not aggregator.listening
        stop = asyncio.Event()
        task = asyncio.create_task(aggregator.run(stop))
        try:
            exporter.add_mapping(256, {"sourceIPv4Address": "10.10.1.5",
                                       "destinationIPv4Address": "10.10.1.6",
                                       "protocolIdentifier": 6, "flowEndReason": 3})  # fmt: skip
            await eventually(lambda: aggregator.store.stats.received == 1, "the record")
            assert aggregator.ready()
        finally:
            await exporter.stop()
            stop.set()
            await task

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"ConfigMap {NS}/{CA_CONFIGMAP} does not exist yet" in m for m in messages)
    assert any("fetched the CA" in m for m in messages)
    files = sorted(p.name for p in (tmp_path / "certs").iterdir())
    assert files == ["ca.crt", "server.crt", "server.key"]  # the CA key stays in the API


def test_an_agent_that_no_longer_trusts_the_aggregator_fetches_again(api, tmp_path, caplog):
    """The aggregator comes back with a new CA (its Secret was lost): the agent's next
    handshake fails on the server certificate, it fetches the credentials again and its
    records arrive."""
    caplog.set_level(logging.INFO)
    port = free_port()
    conf = aggregator_conf(api, tmp_path, port)
    connection = connect(api, tmp_path)
    record = {"sourceIPv4Address": "10.10.1.5", "destinationIPv4Address": "10.10.1.6",
              "protocolIdentifier": 6, "flowEndReason": 3}  # fmt: skip

    async def scenario() -> None:
        exporter = _fetching_exporter(connection, port)
        first = Aggregator(load_aggregator_config(conf))
        stop = asyncio.Event()
        task = asyncio.create_task(first.run(stop))
        exporter.start()
        exporter.add_mapping(256, record)
        await eventually(lambda: first.store.stats.received == 1, "the first record")
        stop.set()
        await task
        old_ca = api.get("secrets", NS, CA_SECRET)
        api.delete(old_ca)  # the next aggregator makes a new CA
        second = Aggregator(load_aggregator_config(conf))
        stop = asyncio.Event()
        task = asyncio.create_task(second.run(stop))
        try:
            failures = exporter.stats.connect_failures
            exporter.add_mapping(256, record)
            await eventually(lambda: second.store.stats.received >= 1, "a record after the new CA")
            assert exporter.stats.connect_failures > failures
        finally:
            await exporter.stop()
            stop.set()
            await task

    asyncio.run(scenario())
    fetched = [r for r in caplog.records if "fetched the CA" in r.getMessage()]
    assert len(fetched) == 2
    verify = [r for r in caplog.records if "CERTIFICATE_VERIFY_FAILED" in r.getMessage()]
    assert verify, "the agent saw the new server certificate fail to verify"
