"""The IPFIX exporting process: records to one collector over TCP, UDP or TLS.

A thin asyncio driver around `delivery.Delivery`, which decides what goes out and what goes
again: a sender task connects (with exponential backoff), writes the messages the delivery
core hands out, and reports where each ends in the stream and what the collector's host has
acknowledged (the kernel's SIOCOUTQ), or at what point a session failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import ssl
import struct
import termios
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from ..logutil import LogOnce
from ..tls.refusals import is_certificate_failure
from .address import TransportAddress
from .delivery import DEFAULT_QUEUE_RECORDS, DEFAULT_TEMPLATE_REFRESH, Delivery, ExporterStats
from .messages import DEFAULT_UDP_MESSAGE_SIZE, MAX_MESSAGE_SIZE
from .templates import Template

log = logging.getLogger(__name__)

# How often a session with messages not yet acknowledged asks the kernel about them when it
# has nothing to send (so that they count as delivered, and their replay window starts).
_ACK_POLL = 1.0
# How long a TLS 1.3 client waits for the collector to accept its certificate before
# sending records anyway (see _Connection._wait_accepted).
_TLS_ACCEPT_WAIT = 1.0
# How long a plain-TCP exporter waits after its templates for a collector that refuses the
# session (a TLS collector answers plain IPFIX with an alert and closes at once).
_TCP_SETTLE_WAIT = 0.5


class TLSCredentialsError(Exception):
    """`tls_credentials` could not provide a context; the message says why."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the collector listening on this port and protocol?)"
    return str(exc) or type(exc).__name__


class _Connection:
    """One transport session on a non-blocking socket driven by the event loop.

    `send` returns once every byte of a message is in the kernel's socket buffer (TLS runs
    through an SSLObject over memory BIOs for that reason: asyncio's SSL transport keeps
    its own buffers), and `written` counts every byte of the TCP stream so far, so the
    caller knows where each message ends and, from `acknowledged`, which ones the
    collector's host has. A reader task notices when the collector closes or refuses the
    session.
    """

    def __init__(self, address: TransportAddress, wakeup: Callable[[], None]):
        self.address = address
        self.closed_reason: str | None = None
        self.written = 0  # bytes of the TCP stream handed to the kernel
        self._wakeup = wakeup
        self._sock: socket.socket | None = None
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._reader: asyncio.Task | None = None
        self._received = asyncio.Event()

    async def open(
        self, ssl_context: ssl.SSLContext | None, server_hostname: str | None, timeout: float
    ) -> None:
        await asyncio.wait_for(self._open(ssl_context, server_hostname), timeout)

    async def _open(self, ssl_context: ssl.SSLContext | None, server_hostname: str | None) -> None:
        loop = asyncio.get_running_loop()
        udp = self.address.protocol == "udp"
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        infos = await loop.getaddrinfo(self.address.host, self.address.port, type=kind)
        error: OSError | None = None
        for family, _, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            self._sock = sock
            break
        if self._sock is None:
            raise error or OSError(f"no address for {self.address.host}")
        if udp:
            return
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.address.protocol == "tls":
            assert ssl_context is not None
            self._tls = ssl_context.wrap_bio(
                self._incoming, self._outgoing, server_hostname=server_hostname or self.address.host
            )
            await self._handshake()
        self._reader = asyncio.create_task(self._read())
        if self._tls is not None and self._tls.version() == "TLSv1.3":
            await self._wait_accepted()

    async def _handshake(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._tls is not None and self._sock is not None
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush_tls()
                data = await loop.sock_recv(self._sock, 65536)
                if not data:
                    raise ConnectionError(
                        "the collector closed the connection during the TLS handshake"
                    ) from None
                self._incoming.write(data)
        await self._flush_tls()

    async def _flush_tls(self) -> None:
        data = self._outgoing.read()
        if data:
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        # Not loop.sock_sendall: when it fails half-way it does not say how much the kernel
        # took, and `written` must follow the stream's sequence numbers.
        assert self._sock is not None
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await self._writable()
                continue
            self.written += sent
            view = view[sent:]

    async def _writable(self) -> None:
        loop = asyncio.get_running_loop()
        writable: asyncio.Future[None] = loop.create_future()
        assert self._sock is not None
        fd = self._sock.fileno()

        def wake() -> None:
            if not writable.done():
                writable.set_result(None)

        loop.add_writer(fd, wake)
        try:
            await writable
        finally:
            loop.remove_writer(fd)

    def acknowledged(self) -> int:
        """How many bytes of the stream the collector's host has acknowledged (TCP, TLS).

        SIOCOUTQ tells what was written but is not acknowledged yet; the kernel still
        answers after the session was reset."""
        assert self._sock is not None
        outq = fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return self.written - struct.unpack("i", outq)[0]

    async def _wait_accepted(self) -> None:
        # In TLS 1.3 the client's handshake completes before the server has checked the
        # client certificate; a refusal arrives as an alert afterwards. Records written in
        # between would be lost, so wait until the server has sent a session ticket (which
        # it does only after accepting us), or refused us, or a short time has passed.
        assert self._tls is not None
        deadline = time.monotonic() + _TLS_ACCEPT_WAIT
        while self.closed_reason is None:
            session = self._tls.session
            if session is not None and session.has_ticket:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._received.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._received.wait(), remaining)
        raise ConnectionError(self.closed_reason)

    async def _read(self) -> None:
        # Collectors never send records back: reading only tells us when they close the
        # session or refuse us, and lets TLS process its post-handshake messages.
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        try:
            while True:
                data = await loop.sock_recv(self._sock, 65536)
                if not data:
                    self.closed_reason = "the collector closed the connection"
                    break
                if self._tls is None:
                    # IPFIX collectors never send data over TCP: this one is not speaking
                    # plain IPFIX (a TLS alert, most likely).
                    self.closed_reason = (
                        "the collector closed the connection after answering with data an "
                        "IPFIX collector never sends (does it expect TLS?)"
                    )
                    break
                if self._tls is not None:
                    self._incoming.write(data)
                    try:
                        while self._tls.read(65536):
                            pass
                        # An empty read is the collector's close_notify.
                        self.closed_reason = "the collector closed the TLS session"
                        break
                    except ssl.SSLWantReadError:
                        pass
                    except ssl.SSLZeroReturnError:
                        self.closed_reason = "the collector closed the TLS session"
                        break
                self._received.set()
        except (OSError, ssl.SSLError) as exc:
            self.closed_reason = f"the collector ended the session: {_describe(exc)}"
        self._received.set()
        self._wakeup()

    async def settle(self, timeout: float) -> None:
        """Give the collector `timeout` seconds to refuse the session before records go."""
        self._received.clear()
        if self.closed_reason is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._received.wait(), timeout)
        if self.closed_reason is not None:
            raise ConnectionError(self.closed_reason)

    async def send(self, message: bytes) -> None:
        if self.closed_reason is not None:
            raise ConnectionError(self.closed_reason)
        assert self._sock is not None
        if self.address.protocol == "udp":
            # A connected socket reports an earlier datagram's ICMP "port unreachable" as
            # ECONNREFUSED on this send, which then did not happen: the records stay.
            await asyncio.get_running_loop().sock_sendall(self._sock, message)
        elif self._tls is None:
            await self._write(message)
        else:
            self._tls.write(message)
            await self._flush_tls()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._sock is None:
            return
        if self._tls is not None and self.closed_reason is None:
            with contextlib.suppress(ssl.SSLError, OSError, asyncio.TimeoutError):
                self._tls.unwrap()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self._flush_tls(), 1.0)
        self._sock.close()
        self._sock = None


class ExportingProcess:
    """Exports data records of a fixed set of templates to one collector. Owned by the
    event loop it runs on."""

    def __init__(
        self,
        address: TransportAddress,
        templates: Sequence[Template],
        observation_domain_id: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        tls_credentials: Callable[[], Awaitable[ssl.SSLContext]] | None = None,
        server_hostname: str | None = None,
        max_queue_records: int = DEFAULT_QUEUE_RECORDS,
        max_message_size: int | None = None,
        template_refresh_interval: float = DEFAULT_TEMPLATE_REFRESH,
        replay_window: float = 0.0,
        first_sequence: int = 0,
        connect_timeout: float = 10.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        clock: Callable[[], float] = time.time,
    ):
        """`replay_window`: seconds of acknowledged messages sent again at the start of each
        TCP/TLS session (for a collector that drops what it has; 0: none). `first_sequence`:
        the sequence number of the first record (an agent picks it at random, so that a
        restarted agent's numbering is not mistaken for the previous one's).
        `tls_credentials`: where a TLS context comes from when there is none (or the last
        one's certificates were refused): called before a connection attempt, its failure
        counts as one."""
        if address.protocol == "tls" and ssl_context is None and tls_credentials is None:
            raise ValueError("exporting over tls needs an SSL context or a way to get one")
        if max_message_size is None:
            max_message_size = (
                DEFAULT_UDP_MESSAGE_SIZE if address.protocol == "udp" else MAX_MESSAGE_SIZE
            )
        self.address = address
        self.max_message_size = max_message_size
        self.delivery = Delivery(
            templates,
            observation_domain_id,
            max_message_size=max_message_size,
            reliable=address.protocol != "udp",
            max_queue_records=max_queue_records,
            replay_window=replay_window,
            replay_records=max_queue_records,
            template_refresh=template_refresh_interval,
            first_sequence=first_sequence,
        )
        self.templates = self.delivery.templates
        self.stats: ExporterStats = self.delivery.stats
        self._ssl_context = ssl_context
        self._tls_credentials = tls_credentials
        self._server_hostname = server_hostname
        self._connect_timeout = connect_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._log_once = LogOnce(log)

    # -- producer side --------------------------------------------------------------------

    def add(self, template_id: int, values: Sequence[Any]) -> bool:
        """Queue one record given as values in template order; False if it was dropped."""
        return self._queued(self.delivery.add(template_id, values))

    def add_mapping(self, template_id: int, record: Mapping[str, Any]) -> bool:
        """Queue one record given as a dict of IE names; absent fields take zero values."""
        return self._queued(self.delivery.add_mapping(template_id, record))

    def _queued(self, added: bool) -> bool:
        if added:
            self._idle.clear()
            self._wakeup.set()
        return added

    @property
    def queued(self) -> int:
        return self.delivery.queued

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"ipfix-exporter {self.address}")

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued record has been sent; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Send what is queued (for up to `drain_timeout` seconds), then close."""
        self._closing = True
        self._wakeup.set()
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        unsent = self.delivery.drop_all("shutdown")
        if unsent:
            log.warning("closing the exporter to %s with %d records unsent", self.address, unsent)
        self._idle.set()

    # -- sender ---------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._backoff_initial
        while not (self._closing and self.delivery.idle):
            connection = _Connection(self.address, self._wakeup.set)
            try:
                if self._ssl_context is None and self._tls_credentials is not None:
                    self._ssl_context = await self._tls_credentials()
                await connection.open(
                    self._ssl_context, self._server_hostname, self._connect_timeout
                )
            except (
                TimeoutError,
                OSError,
                ssl.SSLError,
                ConnectionError,
                TLSCredentialsError,
            ) as exc:
                await connection.close()
                self.stats.connect_failures += 1
                if self._tls_credentials is not None and is_certificate_failure(exc):
                    self._ssl_context = None  # the next attempt gets them afresh
                self._log_once(
                    ("connect", _describe(exc)),
                    logging.WARNING,
                    "cannot connect to collector %s: %s; retrying with backoff up to %ss",
                    self.address,
                    _describe(exc),
                    self._backoff_max,
                )
            else:
                self.stats.connections += 1
                self.stats.connected = True
                self._log_once("connected", logging.INFO, "connected to collector %s", self.address)
                sent_before = self.stats.records_sent
                try:
                    await self._serve(connection)
                except (OSError, ssl.SSLError, ConnectionError) as exc:
                    self.stats.send_errors += 1
                    self._log_once(
                        ("lost", _describe(exc)),
                        logging.WARNING,
                        "lost the collector %s: %s; reconnecting",
                        self.address,
                        _describe(exc),
                    )
                finally:
                    self.stats.connected = False
                    await connection.close()
                if self.stats.records_sent > sent_before:
                    # The session carried records: reconnect at once, and report the next
                    # outage afresh. A collector that accepts and drops us gets the backoff.
                    backoff = self._backoff_initial
                    self._log_once = LogOnce(log)
                    continue
            if self._closing:
                return
            await self._sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)

    async def _sleep(self, seconds: float) -> None:
        # Only stop() cuts a backoff short: new records must not turn it into a busy loop.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _serve(self, connection: _Connection) -> None:
        """Write what the delivery core hands out until closing or the session fails."""
        delivery = self.delivery
        reliable = delivery.reliable
        try:
            for template_message in delivery.open_session(self._clock()):
                await connection.send(template_message)
            if self.address.protocol == "tcp":
                await connection.settle(_TCP_SETTLE_WAIT)
            while True:
                now = self._clock()
                message = delivery.next_message(now)
                if message is None:
                    if delivery.idle:
                        self._idle.set()
                    # Before a stop: the collector may have reset the last messages.
                    if connection.closed_reason is not None:
                        raise ConnectionError(connection.closed_reason)
                    if reliable:
                        delivery.acknowledged(connection.acknowledged(), now)
                    if self._closing:
                        delivery.closed(now)
                        return
                    await self._wait(delivery, reliable, now)
                    continue
                await connection.send(message)
                delivery.sent(connection.written, now)
                if reliable:
                    delivery.acknowledged(connection.acknowledged(), now)
        except BaseException:
            # A failed session, or a stop that could not wait: before the socket closes,
            # its kernel knows what the collector's host has.
            acknowledged = 0
            if reliable:
                with contextlib.suppress(OSError):
                    acknowledged = connection.acknowledged()
            delivery.failed(acknowledged, self._clock())
            raise

    async def _wait(self, delivery: Delivery, reliable: bool, now: float) -> None:
        """Until a record is added, templates are due (UDP) or it is time to ask the
        kernel about acknowledgements (TCP, TLS)."""
        self._wakeup.clear()
        due = delivery.templates_due(now)
        timeout = None if due is None else max(0.0, due - now)
        if reliable and delivery.awaiting_acknowledgement:
            timeout = _ACK_POLL if timeout is None else min(timeout, _ACK_POLL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)
