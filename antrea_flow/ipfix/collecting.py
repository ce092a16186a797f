"""The IPFIX collecting process: many exporters at once over TCP, UDP or TLS (asyncio).

Each TCP/TLS connection is one session with its own templates; UDP sessions are keyed by
the exporter's address and port, and their templates expire unless refreshed. Malformed
input closes that TCP session or drops that datagram, is counted by reason and logged once
per exporter, and never disturbs other sessions. With TLS a client certificate signed by
the configured CA is required; peers that fail the handshake are refused and counted.
Decoded messages go to a handler: `handler(peer, message)`.
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
from .messages import Message, MessageError, SessionDecoder, StreamFramer

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


@dataclass(slots=True)
class CollectorStats:
    messages: int = 0
    records: int = 0
    sessions_open: int = 0
    sessions_total: int = 0
    malformed: Counter[str] = field(default_factory=Counter)  # by reason
    refused: Counter[str] = field(default_factory=Counter)  # TLS peers refused, by reason
    lost_records: int = 0  # missing according to sequence numbers
    handler_errors: int = 0


class _StreamSession(asyncio.Protocol):
    """One TCP or TLS connection from an exporter.

    TLS runs through an SSLObject over memory BIOs in this protocol rather than asyncio's
    SSL transport: no per-session read buffer of asyncio's size (which adds up with
    thousands of agents), and every handshake failure is ours to count and explain.
    """

    def __init__(self, collector: CollectingProcess):
        self.collector = collector
        self.framer = StreamFramer()
        self.decoder = SessionDecoder()
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
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
        if self._tls is None:
            self._frames(data)
            return
        self._incoming.write(data)
        if not self._open:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except ssl.SSLError as exc:
                if self._handshake_timer is not None:
                    self._handshake_timer.cancel()
                self._refuse(exc)
                return
            self._handshake_timer.cancel()
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
            # Bytes after the good messages of this chunk may already be known to be bad.
            self.framer.feed(b"")
        except MessageError as exc:
            collector._malformed(self.peer, exc, "closing the session")
            self.transport.abort()
        collector.stats.lost_records += self.decoder.lost_records
        self.decoder.lost_records = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.collector._streams.discard(self)
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
        if session is None:
            peer = Peer(addr[0], addr[1], "udp", next(collector._session_ids))
            session = (peer, SessionDecoder(collector.udp_template_timeout))
        peer, decoder = session
        try:
            message = decoder.decode(data, now)
        except MessageError as exc:
            collector._malformed(peer, exc, "dropping the datagram")
            return
        if key not in self.sessions:
            self.sessions[key] = session
            collector.stats.sessions_open += 1
            collector.stats.sessions_total += 1
        self.last_seen[key] = now
        collector.stats.lost_records += decoder.lost_records
        decoder.lost_records = 0
        collector._deliver(peer, message)

    def expire(self, now: float) -> None:
        """Expire unrefreshed templates and forget sessions silent for a template lifetime."""
        timeout = self.collector.udp_template_timeout
        for key, (_, decoder) in list(self.sessions.items()):
            decoder.expire_templates(now)
            if now - self.last_seen[key] >= timeout:
                del self.sessions[key]
                del self.last_seen[key]
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
        clock: Callable[[], float] = time.monotonic,
    ):
        if address.protocol == "tls" and ssl_context is None:
            raise ValueError("collecting over tls needs an SSL context")
        self.address = address
        self.handler = handler
        self.ssl_context = ssl_context if address.protocol == "tls" else None
        self.udp_template_timeout = udp_template_timeout
        self.tls_handshake_timeout = tls_handshake_timeout
        self.clock = clock
        self.stats = CollectorStats()
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
        log.info("collecting IPFIX on %s (port %d)", self.address, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for session in list(self._streams):
                if session.transport is not None:
                    session.transport.close()
            await self._server.wait_closed()
            self._server = None
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            self._expiry_task = None
        if self._udp_transport is not None:
            self._udp_transport.close()
            await self._udp.closed  # the port is free again when stop() returns
            self._udp_transport = None

    async def _expire_udp(self) -> None:
        interval = max(1.0, min(60.0, self.udp_template_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            if self._udp is not None:
                self._udp.expire(self.clock())

    def _deliver(self, peer: Peer, message: Message) -> None:
        self.stats.messages += 1
        self.stats.records += message.record_count
        try:
            self.handler(peer, message)
        except Exception:
            self.stats.handler_errors += 1
            log.exception("record handler failed on a message from %s:%d", peer.address, peer.port)

    def _malformed(self, peer: Peer, exc: MessageError, action: str) -> None:
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
