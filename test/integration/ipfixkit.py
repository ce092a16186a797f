"""Helpers for the IPFIX integration tests: records, a recording handler, bounded waits,
and collectors/exporters as async context managers that always stop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antrea_flow.ipfix import antrea
from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.collecting import CollectingProcess, Peer
from antrea_flow.ipfix.exporting import ExportingProcess
from antrea_flow.ipfix.messages import Message
from antrea_flow.ipfix.templates import Template
from antrea_flow.tls import client_context, server_context

# Every wait in these tests is bounded by this (a liveness bound, not a timing assertion:
# on a healthy machine each condition holds within milliseconds).
WAIT = 15.0

TEMPLATES: dict[int, Template] = {t.template_id: t for t in antrea.exporter_templates()}
V4 = antrea.EXPORTER_TEMPLATE_ID_IPV4
V6 = antrea.EXPORTER_TEMPLATE_ID_IPV6


class Clock:
    """A settable clock for the components' `clock=`: time moves only when a test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(coro: Coroutine[Any, Any, Any], timeout: float = 120.0) -> Any:
    """Run one test scenario on a fresh event loop, bounded as a whole."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def make_record(i: int, ipv6: bool | None = None) -> dict[str, Any]:
    """A record of template 256 (IPv4) or 257 (IPv6, default for odd i) with values that are
    distinct per i and per field; octetDeltaCount == i identifies it."""
    if ipv6 is None:
        ipv6 = i % 2 == 1
    family = "IPv6" if ipv6 else "IPv4"
    if ipv6:
        src, dst = f"fd00:10:244:1::{i % 65536:x}", f"fd00:10:244:2::{(i * 7 + 1) % 65536:x}"
        cluster = f"fd00:10:96::{(i % 4096) + 1:x}"
    else:
        src = str(ipaddress.IPv4Address(0x0AF40100 + i % 65536))
        dst = str(ipaddress.IPv4Address(0x0AF40200 + (i * 7 + 1) % 65536))
        cluster = str(ipaddress.IPv4Address(0x0A600000 + (i % 4096) + 1))
    start = 1_700_000_000 + i
    return {
        "flowStartSeconds": start,
        "flowEndSeconds": start + 60 + i % 5,
        "flowEndReason": 1 + i % 3,
        "sourceTransportPort": 1024 + i % 60000,
        "destinationTransportPort": 80 + i % 7,
        "protocolIdentifier": (6, 17, 132)[i % 3],
        "packetTotalCount": 10_000 + 3 * i,
        "octetTotalCount": (1 << 40) + 1500 * i,
        "packetDeltaCount": 100 + i,
        "octetDeltaCount": i,
        f"source{family}Address": src,
        f"destination{family}Address": dst,
        "reversePacketTotalCount": 20_000 + 5 * i,
        "reverseOctetTotalCount": (1 << 33) + 700 * i,
        "reversePacketDeltaCount": 200 + i,
        "reverseOctetDeltaCount": 1500 + 11 * i,
        "sourcePodName": f"client-{i}",
        "sourcePodNamespace": "ns-é" if i % 4 == 0 else "default",
        "sourceNodeName": f"node-{i % 3}",
        "destinationPodName": f"server-{i}-" + "x" * (i % 300),  # crosses the 255 length form
        "destinationPodNamespace": "prod",
        "destinationNodeName": "" if i % 5 == 0 else f"node-{(i + 1) % 3}",
        "destinationServicePort": 8080 + i % 10,
        "destinationServicePortName": f"prod/svc-{i % 10}:http",
        "ingressNetworkPolicyName": f"allow-{i % 4}",
        "ingressNetworkPolicyNamespace": "prod",
        "ingressNetworkPolicyType": 1 + i % 4,
        "ingressNetworkPolicyRuleName": f"rule-{i % 6}",
        "ingressNetworkPolicyRuleAction": i % 4,
        "egressNetworkPolicyName": "",
        "egressNetworkPolicyNamespace": "",
        "egressNetworkPolicyType": 0,
        "egressNetworkPolicyRuleName": "",
        "egressNetworkPolicyRuleAction": (i + 1) % 4,
        "tcpState": ("ESTABLISHED", "TIME_WAIT", "")[i % 3],
        "flowType": 1 + i % 4,
        f"destinationCluster{family}": cluster,
    }


def template_id_of(record: dict[str, Any]) -> int:
    return V4 if "sourceIPv4Address" in record else V6


@dataclass
class RecordSink:
    """A collector handler that keeps every decoded record with its peer and template."""

    records: list[tuple[Peer, int, dict[str, Any]]] = field(default_factory=list)
    messages: list[tuple[Peer, Message]] = field(default_factory=list)

    def __call__(self, peer: Peer, message: Message) -> None:
        self.messages.append((peer, message))
        for data_set in message.data_sets:
            for record in data_set.records:
                self.records.append((peer, data_set.template.template_id, record))

    def by_counter(self) -> dict[int, list[tuple[int, dict[str, Any]]]]:
        """Records keyed by octetDeltaCount (the test's record number)."""
        out: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        for _, tid, record in self.records:
            out.setdefault(record["octetDeltaCount"], []).append((tid, record))
        return out

    def counters(self) -> list[int]:
        return [record["octetDeltaCount"] for _, _, record in self.records]


async def eventually(
    predicate: Callable[[], bool], what: str, timeout: float = WAIT, interval: float = 0.01
) -> None:
    """Wait until `predicate()` holds; fail with `what` if it does not within `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)


def assert_exactly_once(sink: RecordSink, sent: dict[int, dict[str, Any]]) -> None:
    """Every sent record (keyed by octetDeltaCount) arrived once, with identical values and
    on its own template; nothing else arrived."""
    got = sink.by_counter()
    missing = sorted(set(sent) - set(got))
    extra = sorted(set(got) - set(sent))
    duplicated = sorted(k for k, v in got.items() if len(v) > 1)
    assert not missing, f"{len(missing)} records never arrived, e.g. {missing[:10]}"
    assert not extra, f"records that were never sent arrived: {extra[:10]}"
    assert not duplicated, f"records arrived more than once: {duplicated[:10]}"
    for counter, record in sent.items():
        ((tid, decoded),) = got[counter]
        assert tid == template_id_of(record)
        assert decoded == record, f"record {counter} changed on the way"


def server_ssl(tls) -> ssl.SSLContext:
    return server_context(tls.server.cert, tls.server.key, tls.server.ca)


def client_ssl(tls, *, cert=None) -> ssl.SSLContext:
    """A client context trusting our CA, presenting `cert` (CertFiles) or the good client."""
    cert = tls.client if cert is None else cert
    return client_context(tls.server.ca, cert.cert, cert.key)


@contextlib.asynccontextmanager
async def collecting(
    protocol: str,
    handler: Callable[[Peer, Message], None],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls=None,
    **kwargs: Any,
) -> AsyncIterator[CollectingProcess]:
    ssl_context = server_ssl(tls) if protocol == "tls" else None
    collector = CollectingProcess(
        TransportAddress(host, port, protocol), handler, ssl_context=ssl_context, **kwargs
    )
    await collector.start()
    try:
        yield collector
    finally:
        await collector.stop()


@contextlib.asynccontextmanager
async def exporting(
    collector_or_address: CollectingProcess | TransportAddress,
    *,
    tls=None,
    ssl_context: ssl.SSLContext | None = None,
    domain: int = 1,
    server_hostname: str | None = None,
    **kwargs: Any,
) -> AsyncIterator[ExportingProcess]:
    """An exporter to the collector (or address), stopped at the end. Over TLS it trusts
    `tls`'s CA and presents its client certificate unless `ssl_context` says otherwise, and
    verifies the collector by the address it connects to (127.0.0.1 and ::1 are in the
    server certificate) unless `server_hostname` names another."""
    if isinstance(collector_or_address, CollectingProcess):
        c = collector_or_address
        address = TransportAddress(c.address.host, c.port, c.address.protocol)
    else:
        address = collector_or_address
    if address.protocol == "tls" and ssl_context is None:
        ssl_context = client_ssl(tls)
    kwargs.setdefault("backoff_initial", 0.05)
    kwargs.setdefault("backoff_max", 0.2)
    kwargs.setdefault("connect_timeout", 5.0)
    exporter = ExportingProcess(
        address,
        list(TEMPLATES.values()),
        domain,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        **kwargs,
    )
    exporter.start()
    try:
        yield exporter
    finally:
        await exporter.stop(drain_timeout=2.0)


def add_all(exporter: ExportingProcess, records: dict[int, dict[str, Any]]) -> None:
    for record in records.values():
        assert exporter.add_mapping(template_id_of(record), record)


async def add_paced(
    exporter: ExportingProcess,
    records: dict[int, dict[str, Any]],
    received: Callable[[], int],
    chunk: int = 50,
) -> None:
    """Add records `chunk` at a time, each chunk once the previous ones were received.

    For UDP: the exporter and collector share one event loop here, so a burst would pile up
    in the collector's socket buffer while the exporter runs, and a default-sized buffer
    (net.core.rmem_max) overflows; a real exporter and collector run side by side.
    """
    items = list(records.values())
    base = received()
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        for record in part:
            assert exporter.add_mapping(template_id_of(record), record)
        target = base + start + len(part)
        await eventually(lambda t=target: received() >= t, f"{target - base} records received")


# The octetDeltaCount of a record sent only to mark a point in an exporter's stream.
SENTINEL = 999_999_999


async def through_sentinel(exporter: ExportingProcess, sink: RecordSink) -> None:
    """Queue a sentinel record (IPv6, octetDeltaCount SENTINEL) behind everything `exporter`
    holds, wait until it reaches `sink`, then take it (and a message that carried nothing
    else) out of `sink`. The collector handles one exporter's messages in the order they
    were sent (a TCP or TLS session is ordered, and so are one socket's datagrams over
    loopback), so what has not reached `sink` by then was not right behind: this is how a
    test knows that no duplicate comes, without sleeping. The sentinel counts in both
    sides' stats (one record, one message)."""

    def sentinel(record: dict[str, Any]) -> bool:
        return record.get("octetDeltaCount") == SENTINEL  # (options records have none)

    assert exporter.add_mapping(V6, make_record(SENTINEL, ipv6=True))
    await eventually(
        lambda: any(sentinel(record) for _, _, record in sink.records), "the sentinel record"
    )
    sink.records[:] = [r for r in sink.records if not sentinel(r[2])]
    sink.messages[:] = [
        (peer, message)
        for peer, message in sink.messages
        if not message.data_sets
        or not all(sentinel(r) for data_set in message.data_sets for r in data_set.records)
    ]


async def stop_and_drain(exporter: ExportingProcess, collector: CollectingProcess) -> None:
    """Stop `exporter` (TCP or TLS) and wait until `collector` has seen its session end: the
    collector has then read every byte the exporter sent, duplicates included, and nothing
    more can come (a stopped exporter does not reconnect)."""
    assert collector.address.protocol != "udp", "a UDP session never ends: through_sentinel"
    await exporter.stop(drain_timeout=WAIT)
    await eventually(lambda: collector.stats.sessions_open == 0, "the session ended")


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for subprocesses that need a number up front)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def api_aggregator_conf(directory: Path, api_port: int, extra: str = "") -> Path:
    """flow-aggregator.conf of an aggregator on loopback (plain TCP, nothing else listening
    but its flow API on `api_port`), with `extra` YAML lines."""
    conf = directory / "flow-aggregator.conf"
    conf.write_text(
        textwrap.dedent(
            f"""\
            aggregatorTransportProtocol: tcp
            listenAddress: "127.0.0.1:0"
            metricsBindAddress: ""
            certDir: {directory / "certs"}
            stateDir: ""
            apiBindAddress: "127.0.0.1:{api_port}"
            """
        )
        + textwrap.dedent(extra)
    )
    return conf
