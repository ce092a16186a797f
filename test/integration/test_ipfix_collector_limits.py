"""What peers can make a running collector hold: sessions in all and per address, sessions
that never deliver or go quiet, and template state. Each refusal is counted under its limit,
and a good exporter beside the offending peers delivers everything.

Time limits are checked with the collector's injectable clock: the test moves it and calls
`close_overdue`, the sweep the collector otherwise runs on its own."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

from antrea_flow.ipfix.collecting import CollectorLimits
from antrea_flow.ipfix.elements import REGISTRY, VARIABLE_LENGTH
from antrea_flow.ipfix.messages import MAX_MESSAGE_SIZE

from .ipfixkit import (
    Clock,
    RecordSink,
    add_all,
    assert_exactly_once,
    collecting,
    eventually,
    exporting,
    make_record,
    run,
)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True once the collector closed (or reset) the connection."""
    try:
        return await asyncio.wait_for(reader.read(1), 10.0) == b""
    except ConnectionResetError:
        return True


def test_sessions_per_address_are_bounded_and_a_freed_place_is_taken():
    async def scenario():
        sink = RecordSink()
        limits = CollectorLimits(max_sessions_per_address=3)
        async with collecting("tcp", sink, limits=limits) as collector:
            held = [await connect(collector.port) for _ in range(3)]
            await eventually(lambda: collector.sessions_held == 3, "three sessions held")
            for _ in range(2):
                reader, writer = await connect(collector.port)
                assert await closed_by_peer(reader)
                writer.close()
            assert collector.stats.limits["sessions_per_address"] == 2
            held.pop()[1].close()
            async with exporting(collector) as exporter:
                records = {i: make_record(i) for i in range(50)}
                add_all(exporter, records)
                await eventually(lambda: len(sink.records) == 50, "the exporter delivered")
            assert_exactly_once(sink, records)
            for _, writer in held:
                writer.close()
            await eventually(lambda: collector.sessions_held == 0, "sessions released")

    run(scenario())


def test_sessions_in_all_are_bounded():
    async def scenario():
        async with collecting("tcp", RecordSink(), limits=CollectorLimits(max_sessions=2)) as c:
            held = [await connect(c.port) for _ in range(2)]
            await eventually(lambda: c.sessions_held == 2, "two sessions held")
            reader, writer = await connect(c.port)
            assert await closed_by_peer(reader)
            assert c.stats.limits["sessions"] == 1
            held[0][1].close()
            await eventually(lambda: c.sessions_held == 1, "a session released")
            reader2, writer2 = await connect(c.port)
            await eventually(lambda: c.sessions_held == 2, "the freed place was taken")
            for _, w in (*held, (reader, writer), (reader2, writer2)):
                w.close()

    run(scenario())


def test_a_session_that_never_delivers_a_message_is_closed_after_the_first_message_timeout():
    async def scenario():
        clock = Clock()
        limits = CollectorLimits(first_message_timeout=30.0, idle_timeout=None)
        async with collecting("tcp", RecordSink(), limits=limits, clock=clock) as collector:
            reader, writer = await connect(collector.port)
            writer.write(b"\x00\x0a\x00\xff")  # the start of a header, never the rest
            await writer.drain()
            await eventually(lambda: collector.sessions_held == 1, "session held")
            clock.now += 29.0
            collector.close_overdue(clock.now)
            assert collector.sessions_held == 1
            clock.now += 1.0
            collector.close_overdue(clock.now)
            assert await closed_by_peer(reader)
            assert collector.stats.limits["first_message_timeout"] == 1
            await eventually(lambda: collector.sessions_held == 0, "session released")
            writer.close()

    run(scenario())


def test_a_quiet_session_is_closed_after_the_idle_timeout_and_its_exporter_comes_back():
    async def scenario():
        clock = Clock()
        sink = RecordSink()
        limits = CollectorLimits(idle_timeout=600.0)
        async with collecting("tcp", sink, limits=limits, clock=clock) as collector:
            async with exporting(collector) as exporter:
                add_all(exporter, {0: make_record(0)})
                await eventually(lambda: len(sink.records) == 1, "first record")
                clock.now += 600.0
                collector.close_overdue(clock.now)
                assert collector.stats.limits["idle_timeout"] == 1
                await eventually(lambda: exporter.stats.connections == 2, "reconnected")
                add_all(exporter, {1: make_record(1)})
                await eventually(lambda: len(sink.records) >= 2, "record after reconnect")
            assert {r["octetDeltaCount"] for _, _, r in sink.records} == {0, 1}

    run(scenario())


def test_a_64kb_template_message_closes_only_its_session(caplog):
    pod = REGISTRY.by_name("sourcePodName")
    fields = (MAX_MESSAGE_SIZE - 16 - 4 - 4) // 8
    record = (
        struct.pack(">HH", 256, fields)
        + struct.pack(">HHI", pod.element_id | 0x8000, VARIABLE_LENGTH, pod.enterprise) * fields
    )
    body = struct.pack(">HH", 2, 4 + len(record)) + record
    attack = struct.pack(">HHIII", 10, 16 + len(body), 0, 0, 7) + body

    async def scenario():
        sink = RecordSink()
        async with collecting("tcp", sink) as collector:
            async with exporting(collector) as exporter:
                records = {i: make_record(i) for i in range(20)}
                add_all(exporter, dict(list(records.items())[:10]))
                await eventually(lambda: len(sink.records) == 10, "first half")
                for _ in range(5):
                    reader, writer = await connect(collector.port)
                    writer.write(attack)
                    await writer.drain()
                    assert await closed_by_peer(reader)
                    writer.close()
                add_all(exporter, dict(list(records.items())[10:]))
                await eventually(lambda: len(sink.records) == 20, "second half")
            assert_exactly_once(sink, records)
            assert collector.stats.limits["template_fields"] == 5
            await eventually(lambda: collector.sessions_held == 0, "sessions released")
            assert collector.template_budget.used == 0, "a closed session kept its templates"

    with caplog.at_level(logging.WARNING, logger="antrea_flow.ipfix.collecting"):
        run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "template_fields" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per address and limit


def test_udp_sessions_are_bounded_per_address():
    async def scenario():
        sink = RecordSink()
        limits = CollectorLimits(max_sessions_per_address=2)
        async with collecting("udp", sink, limits=limits) as collector:
            senders = []
            for domain in range(4):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.connect(("127.0.0.1", collector.port))
                senders.append(sock)
                # A header-only message: a valid session start with nothing in it.
                sock.send(struct.pack(">HHIII", 10, 16, 0, 0, domain))
            await eventually(
                lambda: collector.stats.limits["sessions_per_address"] == 2, "two refused"
            )
            assert collector.sessions_held == 2
            for sock in senders:
                sock.close()

    run(scenario())
