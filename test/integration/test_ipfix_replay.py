"""Replay over real sockets: an exporter sends its acknowledged messages of the last
`replay_window` seconds again at the start of each session, and a collector that follows
sequence numbers per exporter (`sequence_scope="exporter"`) takes each record once.

What this buys: a collector's host acknowledges bytes its process may never read (killed
with them in its receive buffer) or may never pass on (killed before exporting them). No
exporter over TCP can tell; with the replay, a collector that comes back gets them again."""

from __future__ import annotations

import asyncio
import socket
import struct

from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.collecting import CollectorLimits

from .ipfixkit import (
    V4,
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


def test_a_reconnect_replays_and_the_collector_takes_each_record_once():
    async def scenario():
        clock = Clock()
        sink = RecordSink()
        limits = CollectorLimits(idle_timeout=60.0)
        async with collecting(
            "tcp", sink, limits=limits, clock=clock, sequence_scope="exporter"
        ) as collector:
            async with exporting(collector, replay_window=600.0) as exporter:
                first = {i: make_record(i, ipv6=False) for i in range(40)}
                add_all(exporter, first)
                await eventually(lambda: len(sink.records) == 40, "first records")
                await eventually(
                    lambda: exporter.delivery.replay_held == 40, "acknowledged, kept for replay"
                )
                clock.now += 60.0
                collector.close_overdue(clock.now)  # the session ends; the exporter is back
                await eventually(lambda: exporter.stats.connections == 2, "reconnected")
                await eventually(
                    lambda: exporter.stats.records_replayed == 40, "the replay went out"
                )
                second = {i: make_record(i, ipv6=False) for i in range(40, 60)}
                add_all(exporter, second)
                await eventually(lambda: len(sink.records) >= 60, "second records")
            assert_exactly_once(sink, {**first, **second})
            counts = collector.stats.sequences
            assert counts.repeated == 40 and counts.lost == 0 and counts.resets == 0

    run(scenario())


def test_messages_a_dead_collectors_host_acknowledged_reach_the_next_collector():
    """The collector's host takes a message into its receive buffer and acknowledges it;
    the collector dies without reading it. Without the replay it is gone; with it, the
    next collector gets it at the start of the session."""

    async def scenario():
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        sink = RecordSink()
        collector = None
        async with exporting(
            TransportAddress("127.0.0.1", port, "tcp"), replay_window=600.0
        ) as exporter:
            conn, _ = await loop.sock_accept(listener)
            records = {i: make_record(i, ipv6=False) for i in range(25)}
            add_all(exporter, records)
            await eventually(lambda: exporter.stats.records_sent == 25, "all written")
            await eventually(lambda: exporter.delivery.replay_held == 25, "all acknowledged")
            # Killed with every byte unread: an abortive close.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            listener.close()
            async with collecting("tcp", sink, port=port, sequence_scope="exporter") as c:
                collector = c
                await eventually(lambda: len(sink.records) == 25, "the replay arrived")
        assert_exactly_once(sink, records)
        assert all(tid == V4 for _, tid, _ in sink.records)
        assert collector.stats.sequences.lost == 0

    run(scenario())
