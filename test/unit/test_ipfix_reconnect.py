"""The exporter across collector restarts, on real sockets over 127.0.0.1: records added
while the collector goes away and comes back arrive exactly once, including the ones
written after the collector closed (with FIN or RST) and a message its host took only
in part."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from antrea_flow.ipfix import antrea
from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.collecting import CollectingProcess, Peer
from antrea_flow.ipfix.exporting import ExportingProcess
from antrea_flow.ipfix.messages import Message, SessionDecoder, StreamFramer
from antrea_flow.tls import client_context, server_context

V4 = antrea.EXPORTER_TEMPLATE_ID_IPV4
# A liveness bound for every wait: on a healthy machine each condition holds in milliseconds.
WAIT = 15.0


def record(i: int, padding: int = 0) -> dict[str, Any]:
    """A template-256 record identified by octetDeltaCount == i."""
    return {
        "octetDeltaCount": i,
        "sourceIPv4Address": "10.244.1.2",
        "destinationIPv4Address": "10.244.2.3",
        "sourceTransportPort": 1024 + i % 60000,
        "sourcePodName": f"client-{i}",
        "destinationPodName": "server-" + "x" * padding,
    }


def ids(message: Message) -> list[int]:
    return [r["octetDeltaCount"] for data_set in message.data_sets for r in data_set.records]


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT}s: {what}")
        await asyncio.sleep(0.005)


def assert_exactly_once(received: list[int], count: int) -> None:
    seen = Counter(received)
    missing = [i for i in range(1, count + 1) if i not in seen]
    repeated = sorted(i for i, n in seen.items() if n > 1)
    assert not missing, f"{len(missing)} of {count} records never arrived: {missing[:10]}"
    assert not repeated, f"records that arrived more than once: {repeated[:10]}"
    assert set(seen) == set(range(1, count + 1))


def make_exporter(port: int, protocol: str, tls) -> ExportingProcess:
    ssl_context = None
    if protocol == "tls":
        ssl_context = client_context(tls.server.ca, tls.client.cert, tls.client.key)
    return ExportingProcess(
        TransportAddress("127.0.0.1", port, protocol),
        antrea.exporter_templates(),
        1,
        ssl_context=ssl_context,
        backoff_initial=0.05,
        backoff_max=0.2,
        connect_timeout=5.0,
    )


async def start_collector(
    port: int, protocol: str, tls, handler: Callable[[Peer, Message], None]
) -> CollectingProcess:
    ssl_context = None
    if protocol == "tls":
        ssl_context = server_context(tls.server.cert, tls.server.key, tls.server.ca)
    collector = CollectingProcess(
        TransportAddress("127.0.0.1", port, protocol), handler, ssl_context=ssl_context
    )
    await collector.start()
    return collector


def exporter_socket(collector_port: int) -> tuple[int, int]:
    """(bytes not acknowledged, pending timer) of the established TCP socket to
    `collector_port`, as /proc/net/tcp shows them. Timer 4 is the probe of a closed
    window, which the kernel runs only once every byte it transmitted is acknowledged."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if remote_port == collector_port and fields[3] == "01":  # ESTABLISHED
                return int(fields[4].split(":")[0], 16), int(fields[5].split(":")[0], 16)
    raise AssertionError(f"no established TCP socket to port {collector_port}")


class Producer:
    """Adds records 1, 2, 3, ... to an exporter, one per event-loop turn or so, the way an
    agent keeps exporting whatever happens to the collector."""

    def __init__(self, exporter: ExportingProcess):
        self.exporter = exporter
        self.added = 0
        self.running = asyncio.Event()
        self.running.set()

    def add(self) -> None:
        self.added += 1
        assert self.exporter.add_mapping(V4, record(self.added))

    async def run(self) -> None:
        while True:
            await self.running.wait()
            self.add()
            await asyncio.sleep(0.001)


@pytest.mark.parametrize("close", ["fin", "rst"])
@pytest.mark.parametrize("protocol", ["tcp", "tls"])
def test_records_added_while_the_collector_restarts_arrive_exactly_once(
    protocol, close, tls_material
):
    """The collector stops (its own stop: FIN; or an abortive close: RST) while records
    keep coming; the next record is written at once, before the exporter has read the
    close, so the collector's host answers it with a reset. It is sent again to the
    restarted collector, and nothing arrives twice.

    The collector stops once it has read what was sent and its host has acknowledged it:
    bytes its host took but it never read are lost to any exporter over TCP, and a reset
    hides acknowledgements its host was still delaying (the messages go out again)."""
    received: list[int] = []

    def handler(peer: Peer, message: Message) -> None:
        received.extend(ids(message))

    async def scenario():
        first = await start_collector(0, protocol, tls_material, handler)
        port = first.port
        second = None
        exporter = make_exporter(port, protocol, tls_material)
        exporter.start()
        producer = Producer(exporter)
        producing = asyncio.create_task(producer.run())
        try:
            await eventually(lambda: len(received) >= 30, "records reach the first collector")
            producer.running.clear()
            await eventually(lambda: len(received) == producer.added, "the collector caught up")
            await eventually(lambda: exporter_socket(port)[0] == 0, "all acknowledged")
            if close == "rst":
                # The collector has no abortive close of its own: linger 0 on its sockets.
                for session in first._streams:
                    sock = session.transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await first.stop()
            producer.add()
            producer.running.set()

            await eventually(lambda: not exporter.stats.connected, "the outage noticed")
            failures = exporter.stats.connect_failures
            await eventually(lambda: exporter.stats.connect_failures > failures, "a retry")
            assert exporter.queued > 0

            second = await start_collector(port, protocol, tls_material, handler)
            restarted_at = producer.added
            await eventually(lambda: len(received) > restarted_at + 30, "records after restart")
            producing.cancel()
            await exporter.stop(drain_timeout=5.0)
            # The exporter has closed: once the collector sees the end of the session it has
            # read every byte, duplicates included.
            await eventually(lambda: second.stats.sessions_open == 0, "the session ended")
        finally:
            producing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producing
            await exporter.stop(drain_timeout=1.0)
            await first.stop()
            if second is not None:
                await second.stop()
        return producer.added, exporter.stats, first.stats, second.stats

    added, stats, first_stats, second_stats = asyncio.run(scenario())
    assert_exactly_once(received, added)
    assert stats.records_sent == added
    assert not stats.records_dropped
    assert stats.connections == 2
    assert not first_stats.malformed and not second_stats.malformed
    if close == "fin":
        # The record written after the collector's FIN was reset by its host, not decoded.
        assert stats.records_requeued >= 1


def test_a_message_the_collector_host_took_only_in_part_is_sent_again():
    """A collector that stops reading fills its receive window in the middle of a message;
    then it resets the session. Messages its host acknowledged in full are never sent
    again; the one it took in part, and the ones after, go to the next collector."""
    small, large, tail = range(1, 6), range(6, 46), range(46, 51)

    async def scenario():
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        # Inherited by the accepted socket: a window of a few kilobytes.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        received: list[int] = []
        exporter = make_exporter(port, "tcp", None)
        exporter.start()
        collector = conn = None
        try:
            conn, _ = await loop.sock_accept(listener)
            for i in small:
                exporter.add_mapping(V4, record(i))
            await eventually(lambda: exporter.stats.records_sent == len(small), "small sent")
            for i in large:  # one message, larger than the collector's window
                exporter.add_mapping(V4, record(i, padding=200))
            await eventually(lambda: exporter.stats.records_sent == large.stop - 1, "large sent")
            for i in tail:
                exporter.add_mapping(V4, record(i))
            await eventually(lambda: exporter.stats.records_sent == tail.stop - 1, "all written")
            await eventually(lambda: exporter_socket(port)[1] == 4, "the window closed")
            # What the collector's host holds: every byte of it acknowledged, none read.
            pending = fcntl.ioctl(conn.fileno(), termios.FIONREAD, b"\0\0\0\0")
            held = conn.recv(struct.unpack("i", pending)[0], socket.MSG_PEEK)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            listener.close()

            framer, decoder = StreamFramer(), SessionDecoder()
            taken = [i for raw in framer.feed(held) for i in ids(decoder.decode(raw))]
            assert taken == list(small)
            assert framer.pending_bytes > 0, "the window should close inside the large message"

            collector = await start_collector(
                port, "tcp", None, lambda peer, message: received.extend(ids(message))
            )
            await eventually(lambda: exporter.stats.connections == 2, "reconnected")
            await exporter.stop(drain_timeout=5.0)
            await eventually(lambda: collector.stats.sessions_open == 0, "the session ended")
        finally:
            await exporter.stop(drain_timeout=1.0)
            if conn is not None:
                conn.close()
            listener.close()
            if collector is not None:
                await collector.stop()
        return taken, received, exporter.stats

    taken, received, stats = asyncio.run(scenario())
    assert_exactly_once(taken + received, tail.stop - 1)
    assert stats.records_sent == tail.stop - 1
    assert stats.records_requeued == len(received)
    assert not stats.records_dropped
