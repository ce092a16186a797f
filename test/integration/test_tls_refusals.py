"""A refused client certificate is counted and logged under its real cause: expired, not
yet valid, not for client authentication, badly signed, or from another CA. Each case is a
real handshake (TLS 1.2 and 1.3) against a real collector on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from antrea_flow.tls import (
    CertificateAuthority,
    IssuedCertificate,
    client_context,
    write_pem_files,
)

from .ipfixkit import (
    RecordSink,
    collecting,
    eventually,
    exporting,
    make_record,
    run,
    template_id_of,
)

COLLECTOR_LOG = "antrea_flow.ipfix.collecting"
TLS_VERSIONS = {"tls1.2": ssl.TLSVersion.TLSv1_2, "tls1.3": ssl.TLSVersion.TLSv1_3}
NOW = datetime.datetime.now(datetime.UTC)


def _expired(tls) -> tuple[CertificateAuthority, IssuedCertificate]:
    issued = tls.ca.issue(
        "node-expired", client=True, now=lambda: NOW - datetime.timedelta(days=400)
    )
    return tls.ca, issued


def _not_yet_valid(tls) -> tuple[CertificateAuthority, IssuedCertificate]:
    issued = tls.ca.issue("node-future", client=True, now=lambda: NOW + datetime.timedelta(days=2))
    return tls.ca, issued


def _server_only(tls) -> tuple[CertificateAuthority, IssuedCertificate]:
    return tls.ca, tls.ca.issue("node-server-eku", server=True)


def _bad_signature(tls) -> tuple[CertificateAuthority, IssuedCertificate]:
    good = tls.ca.issue("node-tampered", client=True)
    der = bytearray(good.certificate.public_bytes(serialization.Encoding.DER))
    # The last byte is the end of the ECDSA signature's s: the certificate still parses,
    # names our CA and carries the right key, but its signature no longer verifies.
    der[-1] ^= 0x01
    return tls.ca, IssuedCertificate(x509.load_der_x509_certificate(bytes(der)), good.private_key)


def _foreign_ca(tls) -> tuple[CertificateAuthority, IssuedCertificate]:
    other = CertificateAuthority.create("unrelated-ca")
    return other, other.issue("intruder", client=True)


def _self_signed(tls) -> tuple[CertificateAuthority, IssuedCertificate]:
    own = CertificateAuthority.create("node-self-signed")
    return own, IssuedCertificate(own.certificate, own.private_key)


# cause -> (how to make the client's certificate, its label, what the log line must say)
CAUSES: dict[str, tuple[Callable, str, str]] = {
    "expired": (_expired, "expired_certificate", "has expired"),
    "not_yet_valid": (_not_yet_valid, "certificate_not_yet_valid", "clock skew"),
    "server_only": (_server_only, "wrong_certificate_purpose", "lacks clientAuth"),
    "bad_signature": (_bad_signature, "bad_certificate_signature", "signature does not verify"),
    "foreign_ca": (_foreign_ca, "untrusted_certificate", "not signed by our CA"),
    "self_signed": (_self_signed, "untrusted_certificate", "not signed by our CA"),
}


def client_certificate(tls, cause: str) -> tuple[Path, Path]:
    """The client's tls.crt and tls.key for `cause`."""
    ca, issued = CAUSES[cause][0](tls)
    _, cert, key = write_pem_files(tls.directory / f"client-{cause}", ca, issued)
    return cert, key


def pinned_client(tls, cert: tuple[Path, Path], version: str) -> ssl.SSLContext:
    """A client context that trusts the collector and presents `cert`: only the collector
    has a reason to end the handshake."""
    context = client_context(tls.server.ca, *cert)
    context.minimum_version = context.maximum_version = TLS_VERSIONS[version]
    return context


def refusal_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == COLLECTOR_LOG
        and r.levelno == logging.WARNING
        and r.getMessage().startswith("refused 127.0.0.1:")
    ]


async def handshake(port: int, context: ssl.SSLContext) -> None:
    """One TLS connection that ends when the collector ends it: during the client's
    handshake (TLS 1.2) or right after it (TLS 1.3, where the client finishes first)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"),
            10,
        )
    except (OSError, ssl.SSLError):
        return
    try:
        with contextlib.suppress(OSError, ssl.SSLError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


@pytest.mark.parametrize("version", sorted(TLS_VERSIONS))
@pytest.mark.parametrize("cause", list(CAUSES))
def test_a_refused_exporter_is_counted_and_logged_under_its_real_cause(
    cause, version, tls_material, caplog
):
    _, label, hint = CAUSES[cause]
    context = pinned_client(tls_material, client_certificate(tls_material, cause), version)
    records = {i: make_record(i) for i in range(1, 6)}

    async def scenario():
        sink = RecordSink()
        async with (
            collecting("tls", sink, tls=tls_material) as collector,
            exporting(collector, ssl_context=context) as exporter,
        ):
            for record in records.values():
                assert exporter.add_mapping(template_id_of(record), record)
            # Two refusals: the exporter retried, and the collector logged only the first.
            await eventually(lambda: sum(collector.stats.refused.values()) >= 2, "two refusals")
            assert exporter.stats.records_sent == 0
            assert exporter.queued == len(records), "refused records must stay queued"
            assert not exporter.stats.records_dropped
            return sink, collector.stats

    with caplog.at_level(logging.WARNING, logger=COLLECTOR_LOG):
        sink, stats = run(scenario())
    assert set(stats.refused) == {label}, dict(stats.refused)
    assert stats.sessions_total == 0
    assert not sink.records
    warnings = refusal_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert hint in warnings[0], warnings[0]


@pytest.mark.parametrize("version", sorted(TLS_VERSIONS))
def test_one_address_refused_for_two_causes_logs_both(version, tls_material, caplog):
    """An agent whose certificate expired, then given one from the wrong CA: the second
    cause is news to the operator and is logged too; a repeat of either is not."""
    expired = pinned_client(tls_material, client_certificate(tls_material, "expired"), version)
    rogue_files = (tls_material.rogue_client.cert, tls_material.rogue_client.key)
    rogue = pinned_client(tls_material, rogue_files, version)

    async def scenario():
        async with collecting("tls", RecordSink(), tls=tls_material) as collector:
            refused = collector.stats.refused
            await handshake(collector.port, expired)
            await eventually(lambda: refused["expired_certificate"] == 1, "expired refused")
            await handshake(collector.port, rogue)
            await eventually(lambda: refused["untrusted_certificate"] == 1, "foreign CA refused")
            await handshake(collector.port, expired)
            await eventually(lambda: refused["expired_certificate"] == 2, "expired again")
            return collector.stats

    with caplog.at_level(logging.WARNING, logger=COLLECTOR_LOG):
        stats = run(scenario())
    assert dict(stats.refused) == {"expired_certificate": 2, "untrusted_certificate": 1}
    warnings = refusal_warnings(caplog)
    assert len(warnings) == 2, warnings
    assert "has expired" in warnings[0] and "not signed by our CA" not in warnings[0]
    assert "not signed by our CA" in warnings[1]


def test_a_valid_certificate_for_both_purposes_is_accepted(tls_material):
    """The purpose check refuses a server-only certificate, not one that also allows
    clientAuth: the classification above must not come from an over-strict context."""
    issued = tls_material.ca.issue("node-both", server=True, client=True)
    _, cert, key = write_pem_files(tls_material.directory / "both", tls_material.ca, issued)
    records = {i: make_record(i) for i in range(1, 4)}

    async def scenario():
        sink = RecordSink()
        async with (
            collecting("tls", sink, tls=tls_material) as collector,
            exporting(
                collector, ssl_context=client_context(tls_material.server.ca, cert, key)
            ) as exporter,
        ):
            for record in records.values():
                assert exporter.add_mapping(template_id_of(record), record)
            await eventually(lambda: len(sink.records) == len(records), "every record")
            return collector.stats

    stats = run(scenario())
    assert not stats.refused
    assert stats.sessions_total == 1
