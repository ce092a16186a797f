"""Exporter to collector over TCP, UDP and mutual TLS, on 127.0.0.1 and ::1: every record of
the Antrea templates arrives once, unchanged, packed many to a message; UDP datagrams stay
within the default 1452-byte message size."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.messages import (
    DEFAULT_UDP_MESSAGE_SIZE,
    HEADER,
    SET_HEADER,
    SessionDecoder,
)

from .ipfixkit import (
    TEMPLATES,
    V4,
    V6,
    RecordSink,
    add_all,
    add_paced,
    assert_exactly_once,
    collecting,
    eventually,
    exporting,
    make_record,
    run,
    stop_and_drain,
    template_id_of,
    through_sentinel,
)

RECORDS = 600


def mixed_records(count: int, seed: int = 7) -> dict[int, dict]:
    """Records of both templates in runs of 1 to 40 of the same family, as an agent's export
    round produces them (its stores hold IPv4 and IPv6 connections side by side)."""
    rng = random.Random(seed)
    records: dict[int, dict] = {}
    ipv6 = False
    i = 1
    while i <= count:
        for _ in range(rng.randint(1, 40)):
            if i > count:
                break
            records[i] = make_record(i, ipv6=ipv6)
            i += 1
        ipv6 = not ipv6
    return records


def data_messages(sink: RecordSink) -> int:
    return sum(1 for _, message in sink.messages if message.data_sets)


@pytest.mark.parametrize(
    ("protocol", "host"),
    [
        ("tcp", "127.0.0.1"),
        ("udp", "127.0.0.1"),
        ("tls", "127.0.0.1"),
        ("tcp", "::1"),
        ("udp", "::1"),
        ("tls", "::1"),
    ],
)
def test_every_record_arrives_once_unchanged(protocol, host, tls_material):
    sent = mixed_records(RECORDS)
    assert {template_id_of(r) for r in sent.values()} == {V4, V6}

    async def scenario():
        sink = RecordSink()
        async with (
            collecting(protocol, sink, host=host, tls=tls_material) as collector,
            exporting(collector, tls=tls_material, domain=4242) as exporter,
        ):
            if protocol == "udp":
                await add_paced(exporter, sent, lambda: len(sink.records))
            else:
                add_all(exporter, sent)
            await eventually(lambda: len(sink.records) >= RECORDS, "every record decoded")
            assert await exporter.wait_idle(5.0)
            # Anything duplicated would have come before the sentinel (UDP), or before the
            # end of the session (TCP, TLS).
            if protocol == "udp":
                await through_sentinel(exporter, sink)
            else:
                await stop_and_drain(exporter, collector)
            stats, cstats = exporter.stats, collector.stats
        return sink, stats, cstats

    sink, stats, cstats = run(scenario())
    assert_exactly_once(sink, sent)
    sentinel = 1 if protocol == "udp" else 0
    assert stats.records_sent == RECORDS + sentinel
    assert stats.connections == 1 and stats.send_errors == 0
    assert not stats.records_dropped
    assert cstats.records == RECORDS + sentinel
    assert not cstats.malformed and not cstats.refused
    assert cstats.lost_records == 0
    assert cstats.sessions_total == 1
    # Every message came from one session of our exporter, observation domain 4242.
    assert {peer.session_id for peer, _ in sink.messages} == {sink.messages[0][0].session_id}
    assert {m.observation_domain_id for _, m in sink.messages} == {4242}
    assert all(peer.protocol == protocol for peer, _ in sink.messages)
    assert all(peer.address.removeprefix("::ffff:") == host for peer, _ in sink.messages)
    # Many records per message: runs of one template are packed together.
    per_message = RECORDS / data_messages(sink)
    assert per_message >= (2.5 if protocol == "udp" else 10), f"{per_message:.1f} per message"
    assert stats.messages_sent < RECORDS / 2


def test_alternating_templates_still_pack_many_records_per_message():
    """A dual-stack agent's records alternate between templates 256 and 257; an IPFIX message
    may carry one data set per template, so alternation must not mean one record per
    message (with 16 + 4 bytes of headers and a send per record)."""
    count = 400
    sent = {i: make_record(i, ipv6=i % 2 == 1) for i in range(1, count + 1)}

    async def scenario():
        sink = RecordSink()
        async with collecting("tcp", sink) as collector, exporting(collector) as exporter:
            add_all(exporter, sent)
            await eventually(lambda: len(sink.records) >= count, "every record decoded")
            return sink, exporter.stats.messages_sent

    sink, messages_sent = run(scenario())
    assert_exactly_once(sink, sent)
    used = data_messages(sink)
    assert used <= count / 10, f"{count} alternating records took {used} data messages"
    assert messages_sent <= count / 10


class UdpTap(asyncio.DatagramProtocol):
    """A bare UDP socket standing in for the collector: keeps every datagram as received,
    with the data records an independent decoder finds in it."""

    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, list[int], list[dict]]] = []  # (data, set ids, records)
        self.records: list[dict] = []
        self.decoder = SessionDecoder(template_timeout=60.0)

    def datagram_received(self, data: bytes, addr) -> None:
        message = self.decoder.decode(data)
        records = [r for data_set in message.data_sets for r in data_set.records]
        set_ids = [data_set.template.template_id for data_set in message.data_sets]
        self.datagrams.append((data, set_ids, records))
        self.records.extend(records)


def test_udp_datagrams_never_exceed_1452_bytes():
    # Variable-length fields make records of 200 to 600 bytes, so messages fill up to the
    # limit in many different ways.
    sent = mixed_records(800, seed=11)
    chunk = 50

    async def scenario():
        loop = asyncio.get_running_loop()
        transport, tap = await loop.create_datagram_endpoint(UdpTap, local_addr=("127.0.0.1", 0))
        try:
            port = transport.get_extra_info("sockname")[1]
            async with exporting(TransportAddress("127.0.0.1", port, "udp")) as exporter:
                assert exporter.max_message_size == DEFAULT_UDP_MESSAGE_SIZE == 1452
                await add_paced(exporter, sent, lambda: len(tap.records), chunk=chunk)
        finally:
            transport.close()
        return tap

    tap = run(scenario())
    sizes = [len(d) for d, _, _ in tap.datagrams]
    assert max(sizes) <= 1452, f"datagrams of {sorted(sizes)[-5:]} bytes"
    # Each datagram is exactly one message: its header length is the datagram's.
    assert all(HEADER.unpack_from(d)[1] == len(d) for d, _, _ in tap.datagrams)
    # Packing is greedy across templates: a datagram ends only when the next record (plus a
    # set header if its template differs from the last set's) would not have fitted
    # (except where the test paused the producer).
    data = [(d, tids, records) for d, tids, records in tap.datagrams if records]
    checked = 0
    for (d1, tids1, _), (_, tids2, records2) in itertools.pairwise(data):
        first = records2[0]
        if first["octetDeltaCount"] % chunk == 1:
            continue
        size = len(TEMPLATES[tids2[0]].encode_mapping(first))
        size += 0 if tids1[-1] == tids2[0] else SET_HEADER.size
        assert len(d1) + size > 1452, f"a {len(d1)}-byte datagram had room for {size} more"
        checked += 1
    assert checked > len(data) / 2
    # The independent decode gives back every record once, unchanged.
    counters = [r["octetDeltaCount"] for r in tap.records]
    assert sorted(counters) == sorted(sent)
    assert {r["octetDeltaCount"]: r for r in tap.records} == sent


def test_udp_record_too_large_for_a_datagram_is_dropped_and_counted():
    huge = make_record(1, ipv6=False)
    huge["destinationPodName"] = "p" * 2000

    async def scenario():
        sink = RecordSink()
        async with collecting("udp", sink) as collector, exporting(collector) as exporter:
            assert not exporter.add_mapping(V4, huge)
            small = make_record(2, ipv6=False)
            assert exporter.add_mapping(V4, small)
            await eventually(lambda: len(sink.records) >= 1, "the small record")
            return sink, exporter.stats

    sink, stats = run(scenario())
    assert stats.records_dropped["too_large"] == 1
    assert sink.counters() == [2]
