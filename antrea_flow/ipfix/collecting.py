"""The IPFIX collecting process: many exporters at once over TCP, UDP or TLS (asyncio).

Each TCP/TLS connection is one session with its own templates; UDP sessions are keyed by
the exporter's address and port, and their templates expire unless refreshed. Malformed
input closes that TCP session or drops that datagram, is counted by reason and logged once
per exporter, and never disturbs other sessions. With TLS a client certificate signed by
the configured CA is required; peers that fail the handshake are refused and counted.
Decoded messages go to a handler: `handler(peer, message)`.

What peers can make the collector hold is bounded (`CollectorLimits`): sessions in all and
per address, template state per session and in all, and time: a TCP or TLS session that
has not delivered a whole message within `first_message_timeout`, or sent nothing for
`idle_timeout`, is closed. A refusal is counted by limit and logged once per address.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..logutil import LogOnce
from ..tls.refusals import classify_refusal
from .address import TransportAddress
from .messages import (
    LimitError,
    Message,
    MessageError,
    SessionDecoder,
    StreamFramer,
    TemplateBudget,
    TemplateLimits,
)
from .sequences import SequenceCounts, SequenceTracker

log = logging.getLogger(__name__)

DEFAULT_UDP_TEMPLATE_TIMEOUT = 1800.0
_UDP_RECEIVE_BUFFER = 8 << 20  # absorb bursts of datagrams while the loop is busy


@dataclass(frozen=True, slots=True)
class Peer:
    """The exporter end of one transport session."""

    address: str
    port: int
    protocol: str
    session_id: int


Handler = Callable[[Peer, Message], None]


def exporter_key(peer: Peer, observation_domain_id: int) -> tuple[str, int]:
    """What identifies an exporter's stream across sessions: its address (an IPv4-mapped
    IPv6 one as IPv4) and the observation domain."""
    return peer.address.removeprefix("::ffff:"), observation_domain_id


@dataclass(frozen=True, slots=True)
class CollectorLimits:
    """What peers can make a collecting process hold."""

    max_sessions: int = 4096  # TCP/TLS connections (handshakes included) and UDP sessions
    max_sessions_per_address: int = 256
    first_message_timeout: float = 30.0  # seconds from connect (or TLS handshake) to a message
    idle_timeout: float | None = 600.0  # seconds without data; None: never
    templates: TemplateLimits = TemplateLimits()


# The limits a refusal can be counted under (CollectorStats.limits).
LIMIT_REASONS = (
    "sessions",
    "sessions_per_address",
    "first_message_timeout",
    "idle_timeout",
    "template_fields",
    "templates",
    "domains",
    "session_template_memory",
    "template_memory",
)


@dataclass(slots=True)
class CollectorStats:
    messages: int = 0
    records: int = 0
    sessions_open: int = 0
    sessions_total: int = 0
    malformed: Counter[str] = field(default_factory=Counter)  # by reason
    refused: Counter[str] = field(default_factory=Counter)  # TLS peers refused, by reason
    limits: Counter[str] = field(default_factory=Counter)  # sessions or messages refused
    handler_errors: int = 0
    # Per session and observation domain, from sequence numbers: records lost, and resets.
    sequences: SequenceCounts = field(default_factory=SequenceCounts)

    @property
    def lost_records(self) -> int:
        return self.sequences.lost


class _StreamSession(asyncio.Protocol):
    """One TCP or TLS connection from an exporter.

    TLS runs through an SSLObject over memory BIOs in this protocol rather than asyncio's
    SSL transport: no per-session read buffer of asyncio's size (which adds up with
    thousands of agents), and every handshake failure is ours to count and explain.
    """

    # Set in connection_made, which asyncio calls before any other method of a protocol.
    transport: asyncio.Transport
    peer: Peer

    def __init__(self, collector: CollectingProcess):
        self.collector = collector
        self.framer = StreamFramer()
        self.decoder = collector._decoder(None)
        self.opened_at = collector.clock()
        self.last_data = self.opened_at
        self.delivered = False  # a whole message came through
        self._held = False  # counted against the session limits
        self._open = False
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._handshake_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        host, port = transport.get_extra_info("peername")[:2]
        collector = self.collector
        self.peer = Peer(host, port, collector.address.protocol, next(collector._session_ids))
        if not collector._admit(self.peer):
            transport.abort()
            return
        self._held = True
        collector._streams.add(self)
        if collector.ssl_context is None:
            self._opened()
            return
        self._tls = collector.ssl_context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._handshake_timer = asyncio.get_running_loop().call_later(
            collector.tls_handshake_timeout, self._refuse, TimeoutError()
        )

    def _opened(self) -> None:
        self._open = True
        self.opened_at = self.collector.clock()  # the first message is due from here
        stats = self.collector.stats
        stats.sessions_open += 1
        stats.sessions_total += 1
        log.info(
            "exporter %s:%d connected (%s)", self.peer.address, self.peer.port, self.peer.protocol
        )

    def _refuse(self, exc: BaseException) -> None:
        collector = self.collector
        label, why = classify_refusal(exc)
        collector.stats.refused[label] += 1
        collector._log_once(
            (self.peer.address, label),
            logging.WARNING,
            "refused %s:%d: %s",
            self.peer.address,
            self.peer.port,
            why,
        )
        self._flush()  # the alert tells the peer why
        self.transport.close()

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.last_data = self.collector.clock()
        if self._tls is None:
            self._frames(data)
            return
        self._incoming.write(data)
        if not self._open:
            timer = self._handshake_timer
            assert timer is not None  # armed with self._tls in connection_made
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except ssl.SSLError as exc:
                timer.cancel()
                self._refuse(exc)
                return
            timer.cancel()
            self._opened()
        chunks = []
        closed = False
        try:
            while chunk := self._tls.read(65536):
                chunks.append(chunk)
            closed = True  # an empty read is the exporter's close_notify
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            self.collector._malformed(self.peer, MessageError("tls_error", str(exc)), "closing")
            closed = True
        self._flush()
        if chunks:
            self._frames(b"".join(chunks))
        if closed and not self.transport.is_closing():
            self.transport.close()

    def _frames(self, data: bytes) -> None:
        collector = self.collector
        try:
            for raw in self.framer.feed(data):
                collector._deliver(self.peer, self.decoder.decode(raw, collector.clock()))
                self.delivered = True
            # Bytes after the good messages of this chunk may already be known to be bad.
            self.framer.feed(b"")
        except MessageError as exc:
            collector._malformed(self.peer, exc, "closing the session")
            self.transport.abort()

    def close_for(self, limit: str, detail: str) -> None:
        """Close the session because it overstayed a time limit (counted and logged once)."""
        self.collector._refused_by_limit(self.peer, limit, detail)
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        collector = self.collector
        collector._streams.discard(self)
        self.decoder.close()
        if self._held:
            self._held = False
            collector._release(self.peer)
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if not self._open:
            return
        self._open = False
        self.collector.stats.sessions_open -= 1
        if self.framer.pending_bytes:
            log.info(
                "exporter %s:%d left with %d bytes of an incomplete message",
                self.peer.address,
                self.peer.port,
                self.framer.pending_bytes,
            )
        else:
            log.info("exporter %s:%d disconnected", self.peer.address, self.peer.port)

    def eof_received(self) -> bool:
        return False


class _DatagramEndpoint(asyncio.DatagramProtocol):
    """UDP: sessions keyed by exporter address and port."""

    def __init__(self, collector: CollectingProcess):
        self.collector = collector
        self.sessions: dict[tuple[str, int], tuple[Peer, SessionDecoder]] = {}
        self.last_seen: dict[tuple[str, int], float] = {}
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        collector = self.collector
        key = (addr[0], addr[1])
        now = collector.clock()
        session = self.sessions.get(key)
        new = session is None
        if session is None:
            peer = Peer(addr[0], addr[1], "udp", next(collector._session_ids))
            if not collector._admit(peer):
                return
            session = (peer, collector._decoder(collector.udp_template_timeout))
        peer, decoder = session
        try:
            message = decoder.decode(data, now)
        except MessageError as exc:
            collector._malformed(peer, exc, "dropping the datagram")
            if new:
                decoder.close()
                collector._release(peer)
            return
        if new:
            self.sessions[key] = session
            collector.stats.sessions_open += 1
            collector.stats.sessions_total += 1
        self.last_seen[key] = now
        collector._deliver(peer, message)

    def expire(self, now: float) -> None:
        """Expire unrefreshed templates and forget sessions silent for a template lifetime."""
        timeout = self.collector.udp_template_timeout
        for key, (peer, decoder) in list(self.sessions.items()):
            decoder.expire_templates(now)
            if now - self.last_seen[key] >= timeout:
                del self.sessions[key]
                del self.last_seen[key]
                decoder.close()
                self.collector._release(peer)
                self.collector.stats.sessions_open -= 1


class CollectingProcess:
    """Listens on one address and decodes IPFIX from any number of exporters."""

    def __init__(
        self,
        address: TransportAddress,
        handler: Handler,
        *,
        ssl_context: ssl.SSLContext | None = None,
        udp_template_timeout: float = DEFAULT_UDP_TEMPLATE_TIMEOUT,
        tls_handshake_timeout: float = 10.0,
        limits: CollectorLimits | None = None,
        sequence_scope: str = "session",
        clock: Callable[[], float] = time.monotonic,
    ):
        """`sequence_scope`: "session" follows sequence numbers per session and observation
        domain, as RFC 7011 defines them; "exporter" follows them per exporter address and
        observation domain across sessions, and (over TCP and TLS) drops the records an
        exporter sends again that were received before (`exporter_sequences`), so a handler
        sees each record once."""
        if sequence_scope not in ("session", "exporter"):
            raise ValueError(f"sequence scope {sequence_scope!r} is not session or exporter")
        if address.protocol == "tls" and ssl_context is None:
            raise ValueError("collecting over tls needs an SSL context")
        self.address = address
        self.handler = handler
        self.ssl_context = ssl_context if address.protocol == "tls" else None
        self.udp_template_timeout = udp_template_timeout
        self.tls_handshake_timeout = tls_handshake_timeout
        self.limits = limits or CollectorLimits()
        self.clock = clock
        self.stats = CollectorStats()
        self.template_budget = TemplateBudget(self.limits.templates.max_total_bytes)
        self.exporter_sequences: SequenceTracker | None = None
        if sequence_scope == "exporter":
            self.exporter_sequences = SequenceTracker(
                replays=address.protocol != "udp", counts=self.stats.sequences
            )
        # Sessions counted against the limits: open ones, TLS handshakes, UDP exporters.
        self.sessions_held = 0
        self._held_by_address: Counter[str] = Counter()
        self._sweep_task: asyncio.Task | None = None
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._udp: _DatagramEndpoint | None = None
        self._expiry_task: asyncio.Task | None = None
        self._streams: set[_StreamSession] = set()
        self._session_ids = itertools.count(1)
        self._log_once = LogOnce(log)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host = self.address.host or None
        if self.address.protocol == "udp":
            self._udp_transport, self._udp = await loop.create_datagram_endpoint(
                lambda: _DatagramEndpoint(self), local_addr=(host or "::", self.address.port)
            )
            sock = self._udp_transport.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_RECEIVE_BUFFER)
            self.port = sock.getsockname()[1]
            self._expiry_task = asyncio.create_task(self._expire_udp())
        else:
            self._server = await loop.create_server(
                lambda: _StreamSession(self), host, self.address.port, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]
            self._sweep_task = asyncio.create_task(self._sweep_streams())
        log.info("collecting IPFIX on %s (port %d)", self.address, self.port)

    async def stop(self) -> None:
        if self._sweep_task is not None:
            self._sweep_task.cancel()
            self._sweep_task = None
        if self._server is not None:
            self._server.close()
            for session in list(self._streams):
                session.transport.close()
            await self._server.wait_closed()
            self._server = None
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            self._expiry_task = None
        if self._udp_transport is not None:
            assert self._udp is not None  # both come from create_datagram_endpoint
            self._udp_transport.close()
            await self._udp.closed  # the port is free again when stop() returns
            self._udp_transport = None

    async def _expire_udp(self) -> None:
        interval = max(1.0, min(60.0, self.udp_template_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            if self._udp is not None:
                self._udp.expire(self.clock())

    def _decoder(self, template_timeout: float | None) -> SessionDecoder:
        """A new session's decoder: this collector's limits and shared template budget."""
        return SessionDecoder(
            template_timeout,
            limits=self.limits.templates,
            budget=self.template_budget,
            sequence_counts=self.stats.sequences,
            track_sequences=self.exporter_sequences is None,
        )

    def _admit(self, peer: Peer) -> bool:
        """Count a new session against the limits; False (counted, logged) when refused."""
        limits = self.limits
        held = self._held_by_address[peer.address]
        if self.sessions_held >= limits.max_sessions:
            self._refused_by_limit(
                peer, "sessions", f"this collector holds {limits.max_sessions} sessions already"
            )
            return False
        if held >= limits.max_sessions_per_address:
            self._refused_by_limit(
                peer,
                "sessions_per_address",
                f"{peer.address} holds {limits.max_sessions_per_address} sessions already",
            )
            return False
        self._held_by_address[peer.address] = held + 1
        self.sessions_held += 1
        return True

    def _release(self, peer: Peer) -> None:
        self.sessions_held -= 1
        held = self._held_by_address[peer.address] - 1
        if held > 0:
            self._held_by_address[peer.address] = held
        else:
            del self._held_by_address[peer.address]

    async def _sweep_streams(self) -> None:
        limits = self.limits
        timeouts = [limits.first_message_timeout]
        if limits.idle_timeout is not None:
            timeouts.append(limits.idle_timeout)
        interval = max(0.05, min(5.0, min(timeouts) / 4))
        while True:
            await asyncio.sleep(interval)
            self.close_overdue(self.clock())

    def close_overdue(self, now: float) -> None:
        """Close the TCP/TLS sessions past their first-message or idle timeout."""
        limits = self.limits
        for session in list(self._streams):
            if not session.delivered and now - session.opened_at >= limits.first_message_timeout:
                if session._open:  # a TLS handshake in progress has its own timeout
                    session.close_for(
                        "first_message_timeout",
                        f"no whole IPFIX message within {limits.first_message_timeout:g}s",
                    )
            elif (
                limits.idle_timeout is not None
                and session.delivered
                and now - session.last_data >= limits.idle_timeout
            ):
                session.close_for("idle_timeout", f"no data for {limits.idle_timeout:g}s")

    def _refused_by_limit(self, peer: Peer, limit: str, detail: str) -> None:
        self.stats.limits[limit] += 1
        self._log_once(
            (peer.address, limit),
            logging.WARNING,
            "closing %s:%d (%s): %s (limit %s)",
            peer.address,
            peer.port,
            peer.protocol,
            detail,
            limit,
        )

    def _deliver(self, peer: Peer, message: Message) -> None:
        tracker = self.exporter_sequences
        if tracker is not None:
            seen = tracker.observe(
                exporter_key(peer, message.observation_domain_id),
                message.sequence_number,
                message.record_count,
                message.export_time,
            )
            if seen.received:
                message = message.without_seen(seen.received, seen.wanted)
        self.stats.messages += 1
        self.stats.records += message.record_count
        try:
            self.handler(peer, message)
        except Exception:
            self.stats.handler_errors += 1
            log.exception("record handler failed on a message from %s:%d", peer.address, peer.port)

    def _malformed(self, peer: Peer, exc: MessageError, action: str) -> None:
        if isinstance(exc, LimitError):
            self._refused_by_limit(peer, exc.reason, f"{exc.detail}; {action}")
            return
        self.stats.malformed[exc.reason] += 1
        self._log_once(
            (peer.address, exc.reason),
            logging.WARNING,
            "malformed IPFIX from %s:%d (%s): %s; %s",
            peer.address,
            peer.port,
            peer.protocol,
            exc,
            action,
        )
