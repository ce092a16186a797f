"""Mutual TLS: peers without a certificate, with one from another CA, or speaking plain
IPFIX are refused and counted while a good exporter on the same collector keeps delivering;
an exporter the collector refuses never counts its records as sent."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest

from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.collecting import CollectingProcess
from antrea_flow.ipfix.messages import encode_message, encode_set, encode_template_record
from antrea_flow.tls import CertificateAuthority, client_context, server_context, write_pem_files

from .ipfixkit import (
    TEMPLATES,
    V4,
    RecordSink,
    assert_exactly_once,
    client_ssl,
    collecting,
    eventually,
    exporting,
    make_record,
    run,
    template_id_of,
)

TLS_VERSIONS = {"tls1.2": ssl.TLSVersion.TLSv1_2, "tls1.3": ssl.TLSVersion.TLSv1_3}


def pinned(context: ssl.SSLContext, version: ssl.TLSVersion) -> ssl.SSLContext:
    context.minimum_version = context.maximum_version = version
    return context


def ipfix_message(counter: int, domain: int) -> bytes:
    """A whole valid IPFIX message: templates 256 and a record of it."""
    template = TEMPLATES[V4]
    record = make_record(counter, ipv6=False)
    return encode_message(
        [
            encode_set(2, [encode_template_record(template)]),
            encode_set(V4, [template.encode_mapping(record)]),
        ],
        1_700_000_000,
        0,
        domain,
    )


async def tls_attempt(port: int, context: ssl.SSLContext, payload: bytes) -> None:
    """Connect, try to send `payload`, and wait until the collector ends the session."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"),
            10,
        )
    except (OSError, ssl.SSLError):
        return  # refused during the handshake (TLS 1.2)
    try:
        with contextlib.suppress(OSError, ssl.SSLError):
            writer.write(payload)
            await writer.drain()
        with contextlib.suppress(OSError, ssl.SSLError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def plain_attempt(port: int, payload: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(OSError):
            writer.write(payload)
            await writer.drain()
            await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize("version", sorted(TLS_VERSIONS))
def test_bad_peers_are_refused_while_a_good_exporter_delivers(version, tls_material):
    tls = tls_material
    tls_version = TLS_VERSIONS[version]
    good_records = {i: make_record(i) for i in range(1, 301)}
    # Records the refused peers try to send: counters that must never reach the handler.
    bad_counters = {100_001, 100_002, 100_003}

    async def scenario():
        sink = RecordSink()
        async with collecting("tls", sink, tls=tls) as collector:
            port = collector.port
            good_ctx = pinned(client_ssl(tls), tls_version)
            async with exporting(collector, ssl_context=good_ctx, domain=1) as good:
                items = list(good_records.values())

                async def feed(part):
                    for record in part:
                        assert good.add_mapping(template_id_of(record), record)
                        await asyncio.sleep(0.001)

                # The good exporter streams during the whole sequence of bad attempts.
                producer = asyncio.create_task(feed(items[:200]))
                await eventually(lambda: len(sink.records) >= 10, "good records flowing")

                no_cert = pinned(client_context(tls.server.ca), tls_version)
                await tls_attempt(port, no_cert, ipfix_message(100_001, 11))
                await eventually(
                    lambda: collector.stats.refused["no_client_certificate"] == 1,
                    "the client without a certificate refused",
                )
                rogue = pinned(client_ssl(tls, cert=tls.rogue_client), tls_version)
                await tls_attempt(port, rogue, ipfix_message(100_002, 12))
                await eventually(
                    lambda: collector.stats.refused["untrusted_certificate"] == 1,
                    "the client signed by another CA refused",
                )
                await plain_attempt(port, ipfix_message(100_003, 13))
                await eventually(
                    lambda: collector.stats.refused["not_tls"] == 1,
                    "the plain IPFIX client refused",
                )
                await producer
                feed_rest = asyncio.create_task(feed(items[200:]))
                await feed_rest
                await eventually(
                    lambda: len(sink.records) >= len(good_records), "every good record"
                )
                assert good.stats.connections == 1, "the good session was disturbed"
                assert good.stats.send_errors == 0
            return sink, collector.stats

    sink, stats = run(scenario())
    assert dict(stats.refused) == {
        "no_client_certificate": 1,
        "untrusted_certificate": 1,
        "not_tls": 1,
    }
    assert not set(sink.counters()) & bad_counters
    assert {m.observation_domain_id for _, m in sink.messages} == {1}
    assert_exactly_once(sink, good_records)
    assert stats.sessions_total == 1  # refused peers never become sessions
    assert not stats.malformed


@pytest.mark.parametrize("version", sorted(TLS_VERSIONS))
@pytest.mark.parametrize("client", ["rogue_certificate", "no_certificate"])
def test_refused_exporter_never_counts_records_as_sent(client, version, tls_material):
    """The collector refuses the exporter after (TLS 1.3) or during (TLS 1.2) the handshake:
    none of its records were accepted, so none may count as sent or leave the queue."""
    tls = tls_material
    if client == "rogue_certificate":
        context = client_ssl(tls, cert=tls.rogue_client)
        label = "untrusted_certificate"
    else:
        context = client_context(tls.server.ca)
        label = "no_client_certificate"
    context = pinned(context, TLS_VERSIONS[version])
    records = {i: make_record(i) for i in range(1, 21)}

    async def scenario():
        sink = RecordSink()
        async with (
            collecting("tls", sink, tls=tls) as collector,
            exporting(collector, ssl_context=context) as exporter,
        ):
            for record in records.values():
                assert exporter.add_mapping(template_id_of(record), record)
            # Let it try (and be refused) several times, and take each refusal in.
            await eventually(lambda: collector.stats.refused[label] >= 3, "three refusals")
            await eventually(
                lambda: exporter.stats.connect_failures + exporter.stats.send_errors >= 3,
                "the exporter knows of three failed sessions",
            )
            assert exporter.stats.records_sent == 0
            assert exporter.queued == len(records), "refused records must stay queued"
            assert not exporter.stats.connected
            assert not exporter.stats.records_dropped
            return sink, collector.stats

    sink, stats = run(scenario())
    assert not sink.records
    assert stats.sessions_total == 0
    assert set(stats.refused) == {label}


def test_plain_exporter_against_tls_collector_backs_off(tls_material):
    """A plain-TCP exporter pointed at a TLS collector is refused right after connecting; it
    must wait (with backoff) between attempts rather than reconnect in a tight loop.

    With a constant backoff of 0.5 s there is at most one attempt per 0.5 s of the measured
    time (a slow machine only makes fewer): an upper bound on attempts, not on speed."""

    async def scenario():
        loop = asyncio.get_running_loop()
        sink = RecordSink()
        async with collecting("tls", sink, tls=tls_material) as collector:
            address = TransportAddress("127.0.0.1", collector.port, "tcp")
            async with exporting(address, backoff_initial=0.5, backoff_max=0.5) as exporter:
                exporter.add_mapping(V4, make_record(1, ipv6=False))
                await eventually(lambda: collector.stats.refused["not_tls"] >= 1, "refused")
                first = collector.stats.refused["not_tls"]
                started = loop.time()
                await asyncio.sleep(1.5)
                attempts = collector.stats.refused["not_tls"] - first
                elapsed = loop.time() - started
        return sink, attempts, elapsed

    sink, attempts, elapsed = run(scenario())
    assert not sink.records
    allowed = int(elapsed / 0.5) + 2
    assert attempts <= allowed, f"{attempts} connections in {elapsed:.1f} s, 0.5 s backoff"


@pytest.mark.parametrize("impostor", ["other_ca", "other_name"])
def test_exporter_refuses_a_collector_it_cannot_verify(impostor, tls_material, tmp_path):
    """A collector whose certificate comes from another CA, or names another host, gets no
    records: the exporter verifies the collector as strictly as the collector verifies it.
    (The impostor accepts our client certificate, so only the exporter can tell.)"""
    if impostor == "other_ca":
        ca = CertificateAuthority.create("impostor-ca")
        issued = ca.issue("collector", ["localhost"], ["127.0.0.1", "::1"], server=True)
    else:
        ca = tls_material.ca
        issued = ca.issue("collector", ["elsewhere.example"], ["192.0.2.1"], server=True)
    _, cert_file, key_file = write_pem_files(tmp_path / "impostor", ca, issued)
    impostor_ctx = server_context(cert_file, key_file, tls_material.server.ca)

    async def scenario():
        sink = RecordSink()
        collector = CollectingProcess(
            TransportAddress("127.0.0.1", 0, "tls"), sink, ssl_context=impostor_ctx
        )
        await collector.start()
        try:
            async with exporting(collector, tls=tls_material) as exporter:
                for i in range(1, 11):
                    exporter.add_mapping(V4, make_record(i, ipv6=False))
                await eventually(lambda: exporter.stats.connect_failures >= 2, "refusals")
                assert exporter.stats.records_sent == 0
                assert exporter.queued == 10
                assert exporter.stats.connections == 0
        finally:
            await collector.stop()
        return sink, collector.stats

    sink, stats = run(scenario())
    assert not sink.records
    assert stats.sessions_total == 0
