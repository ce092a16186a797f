"""The IPFIX exporting process: records to one collector over TCP, UDP or TLS.

Records are encoded when added and wait in a bounded queue; a sender task connects (with
exponential backoff), announces the templates on every new transport session (and every
`template_refresh_interval` over UDP), and packs as many queued records per message as the
maximum message size allows. A record leaves the queue once its whole message is in the
kernel's socket buffer; over TCP and TLS it is kept until the collector's host has
acknowledged that message, and put back at the front of the queue if the session fails
first. So a collector outage costs nothing within the queue bound and nothing the
collector's host acknowledged is sent again (`_take_back` says what TCP cannot tell).
Overflow drops the oldest records and counts them.
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
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..logutil import LogOnce
from .address import TransportAddress
from .messages import (
    DEFAULT_UDP_MESSAGE_SIZE,
    HEADER,
    MAX_MESSAGE_SIZE,
    SET_HEADER,
    MessagePacker,
    template_messages,
)
from .templates import Template

log = logging.getLogger(__name__)

DEFAULT_QUEUE_RECORDS = 65536
DEFAULT_TEMPLATE_REFRESH = 600.0
# How long a TLS 1.3 client waits for the collector to accept its certificate before
# sending records anyway (see _Connection._wait_accepted).
_TLS_ACCEPT_WAIT = 1.0
# How long a plain-TCP exporter waits after its templates for a collector that refuses the
# session (a TLS collector answers plain IPFIX with an alert and closes at once).
_TCP_SETTLE_WAIT = 0.5

# The records of one message: runs of records of one template, each a data set.
_Batch = list[tuple[int, list[bytes]]]


@dataclass(slots=True)
class ExporterStats:
    # Records whose message went to the kernel; when a TCP or TLS session fails, those the
    # collector's host had not acknowledged are taken back out (and counted below).
    records_sent: int = 0
    # Taken back out of records_sent into the queue, to go out again on the next session.
    records_requeued: int = 0
    messages_sent: int = 0
    connections: int = 0  # successful (re)connections
    connect_failures: int = 0
    send_errors: int = 0
    records_dropped: Counter[str] = field(default_factory=Counter)  # by reason
    connected: bool = False

    @property
    def records_written(self) -> int:
        """Every record whose message went to the kernel, re-sent ones again: never
        decreases, so it is what counters in metrics read."""
        return self.records_sent + self.records_requeued


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
        writable = loop.create_future()
        fd = self._sock.fileno()
        loop.add_writer(fd, lambda: writable.done() or writable.set_result(None))
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
    """Exports data records of a fixed set of templates to one collector."""

    def __init__(
        self,
        address: TransportAddress,
        templates: Sequence[Template],
        observation_domain_id: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_queue_records: int = DEFAULT_QUEUE_RECORDS,
        max_message_size: int | None = None,
        template_refresh_interval: float = DEFAULT_TEMPLATE_REFRESH,
        connect_timeout: float = 10.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        clock: Callable[[], float] = time.time,
    ):
        if address.protocol == "tls" and ssl_context is None:
            raise ValueError("exporting over tls needs an SSL context")
        if max_message_size is None:
            max_message_size = (
                DEFAULT_UDP_MESSAGE_SIZE if address.protocol == "udp" else MAX_MESSAGE_SIZE
            )
        self.address = address
        self.templates = {t.template_id: t for t in templates}
        self.observation_domain_id = observation_domain_id
        self.max_message_size = max_message_size
        self.max_queue_records = max_queue_records
        self.template_refresh_interval = template_refresh_interval
        self.stats = ExporterStats()
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self._connect_timeout = connect_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._clock = clock
        self._max_record_size = MessagePacker(0, max_message_size).max_record_size
        self._queue: deque[tuple[int, bytes]] = deque()
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
        template = self.templates[template_id]
        try:
            record = template.encode(values)
        except (
            ValueError,
            TypeError,
            OverflowError,
            AttributeError,
            OSError,
            struct.error,
        ) as exc:
            self._drop("encode_error", 1)
            self._log_once(
                ("encode", template_id),
                logging.ERROR,
                "dropping a record of template %d that cannot be encoded: %s (%s)",
                template_id,
                template.explain_encode_error(values),
                exc,
            )
            return False
        return self._enqueue(template_id, record)

    def add_mapping(self, template_id: int, record: Mapping[str, Any]) -> bool:
        """Queue one record given as a dict of IE names; absent fields take zero values."""
        return self.add(template_id, self.templates[template_id].values_from(record))

    def _enqueue(self, template_id: int, record: bytes) -> bool:
        if len(record) > self._max_record_size:
            self._drop("too_large", 1)
            self._log_once(
                ("too_large", template_id),
                logging.ERROR,
                "dropping a %d-byte record: larger than a %d-byte message allows",
                len(record),
                self.max_message_size,
            )
            return False
        if len(self._queue) >= self.max_queue_records:
            self._drop_oldest(1)
        self._queue.append((template_id, record))
        self._idle.clear()
        self._wakeup.set()
        return True

    def _requeue(self, batches: Sequence[_Batch]) -> int:
        """Put the records of `batches` back at the front of the queue in their order,
        within the queue's bound; returns how many were put back."""
        records = [(tid, r) for batch in batches for tid, run in batch for r in run]
        self._queue.extendleft(reversed(records))
        self._idle.clear()
        if len(self._queue) > self.max_queue_records:
            self._drop_oldest(len(self._queue) - self.max_queue_records)
        return len(records)

    def _drop_oldest(self, count: int) -> None:
        # Keep the newest: flow records carry running totals, so a later record supersedes
        # an earlier one for everything but its delta.
        for _ in range(count):
            self._queue.popleft()
        self._drop("queue_full", count)
        self._log_once(
            "queue_full",
            logging.WARNING,
            "export queue to %s is full (%d records): dropping the oldest",
            self.address,
            self.max_queue_records,
        )

    def _drop(self, reason: str, count: int) -> None:
        self.stats.records_dropped[reason] += count

    @property
    def queued(self) -> int:
        return len(self._queue)

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
        if self._queue:
            self._drop("shutdown", len(self._queue))
            log.warning(
                "closing the exporter to %s with %d records unsent", self.address, len(self._queue)
            )
            self._queue.clear()
        self._idle.set()

    # -- sender ---------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._backoff_initial
        while not (self._closing and not self._queue):
            connection = _Connection(self.address, self._wakeup.set)
            try:
                await connection.open(
                    self._ssl_context, self._server_hostname, self._connect_timeout
                )
            except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
                await connection.close()
                self.stats.connect_failures += 1
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
        """Send templates, then queued records, until closing or the session fails."""
        packer = MessagePacker(self.observation_domain_id, self.max_message_size)
        udp = self.address.protocol == "udp"
        loop = asyncio.get_running_loop()
        await self._send_templates(connection, packer)
        if self.address.protocol == "tcp":
            await connection.settle(_TCP_SETTLE_WAIT)
        refresh_at = loop.time() + self.template_refresh_interval
        # Over TCP and TLS, the messages the collector's host may not have acknowledged
        # yet, oldest first, each with the offset where it ends in the session's stream.
        # What is not acknowledged is in the socket's send buffer, which bounds this.
        unacknowledged: deque[tuple[int, _Batch]] = deque()
        try:
            while True:
                if udp and loop.time() >= refresh_at:
                    await self._send_templates(connection, packer)
                    refresh_at = loop.time() + self.template_refresh_interval
                if not self._queue:
                    self._idle.set()
                    # Before a stop: the collector may have reset the last messages.
                    if connection.closed_reason is not None:
                        raise ConnectionError(connection.closed_reason)
                    if self._closing:
                        return
                    self._wakeup.clear()
                    timeout = max(0.0, refresh_at - loop.time()) if udp else None
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), timeout)
                    continue
                batch = self._take_batch(packer.max_message_size)
                try:
                    message = packer.pack_sets(batch, int(self._clock()))
                    await connection.send(message)
                except BaseException:
                    # Not (entirely) handed to the kernel: the collector cannot have decoded
                    # this message, so its records go back to the front for the next session.
                    self._requeue([batch])
                    raise
                self.stats.records_sent += sum(len(records) for _, records in batch)
                self.stats.messages_sent += 1
                if not udp:
                    unacknowledged.append((connection.written, batch))
                    acknowledged = connection.acknowledged()
                    while unacknowledged and unacknowledged[0][0] <= acknowledged:
                        unacknowledged.popleft()
        except (OSError, ssl.SSLError, ConnectionError):
            if unacknowledged:
                # Before the socket closes: its kernel knows what the collector's host has.
                self._take_back(unacknowledged, connection.acknowledged())
            raise

    def _take_back(self, unacknowledged: deque[tuple[int, _Batch]], acknowledged: int) -> None:
        """Requeue the records of the messages of a failed session that the collector's host
        has not entirely acknowledged (a collector cannot decode part of a message), and
        count them as not sent.

        Acknowledged messages are never sent again. What no exporter over TCP can know: a
        message the collector's host acknowledged but its process never read (killed with
        it in its receive buffer) is lost, and one it read whose acknowledgement was still
        delayed when its host reset the session is sent twice."""
        lost = [batch for end, batch in unacknowledged if end > acknowledged]
        unacknowledged.clear()
        if lost:
            requeued = self._requeue(lost)
            self.stats.records_sent -= requeued
            self.stats.records_requeued += requeued

    def _take_batch(self, max_message_size: int) -> _Batch:
        """Remove and return the oldest records that fit one message, as runs of records
        of the same template (each run becomes one data set)."""
        queue = self._queue
        batch: _Batch = []
        used = HEADER.size
        current = -1
        records: list[bytes] = []
        while queue:
            tid, record = queue[0]
            cost = len(record) + (SET_HEADER.size if tid != current else 0)
            if used + cost > max_message_size:
                break
            queue.popleft()
            if tid != current:
                records = []
                batch.append((tid, records))
                current = tid
            records.append(record)
            used += cost
        return batch

    async def _send_templates(self, connection: _Connection, packer: MessagePacker) -> None:
        for message in template_messages(
            list(self.templates.values()),
            int(self._clock()),
            packer.sequence_number,
            self.observation_domain_id,
            self.max_message_size,
        ):
            await connection.send(message)
            self.stats.messages_sent += 1
