"""The flow API's follow streams, all served by one thread over non-blocking sockets.

A request handler answers a follow request's headers and hands the connection over; from
then on this thread feeds each stream from the FlowWindow at the stream's own pace: runs of
records an unfiltered stream shares with the others, or those its filter matches. One
thread for every stream keeps the aggregator's loop from competing with fifty threads for
the interpreter: it runs only when a stream can take more.

A stream a whole window behind is told how many records it lost and closed; one whose
client takes nothing for SEND_TIMEOUT seconds is closed; one whose client went is closed
at once; an idle one gets a keep-alive every KEEPALIVE seconds. All of it is counted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable

from ..flowfilter import FlowFilter
from .window import Entry, FlowWindow

log = logging.getLogger(__name__)

SEND_TIMEOUT = 10.0  # seconds a client may leave what we send untaken before it is cut off
KEEPALIVE = 15.0  # seconds of silence after which a stream sends a keep-alive
FOLLOW_BATCH = 256  # records a stream takes from the window at once
MAX_STREAMS = 1024


def line(entry: Entry, sse: bool) -> bytes:
    """A record as a stream sends it: its NDJSON line, or a server-sent event with its number."""
    if sse:
        return b"id: %d\ndata: %s\n\n" % (entry.seq, entry.line()[:-1])
    return entry.line()


def control(message: dict, sse: bool) -> bytes:
    data = json.dumps(message).encode()
    return b"event: error\ndata: " + data + b"\n\n" if sse else data + b"\n"


class _Stream:
    __slots__ = ("sock", "filter", "everything", "sse", "cursor", "out", "sent", "records",
                 "progress", "quiet_since", "closing")  # fmt: skip

    def __init__(self, sock: socket.socket, flow_filter: FlowFilter, cursor: int, sse: bool,
                 first: bytes, records: int, now: float):  # fmt: skip
        self.sock = sock
        self.filter = flow_filter
        self.everything = flow_filter == FlowFilter()  # then no record needs looking at
        self.sse = sse
        self.cursor = cursor  # the number of the next record it wants
        self.out: bytes | None = first or None  # what it is sending now
        self.sent = 0  # of `out`
        self.records = records  # in `out`
        self.progress = now  # when its client last took something
        self.quiet_since = now  # when it last sent a record or a keep-alive
        self.closing = False  # close once `out` is sent


class StreamPump:
    """Owner: its thread ("flow-api-streams") owns the streams, their sockets and the
    selector. Other threads call `add`, `wake` (the window does, on every publish) and
    `stop`: `add` queues, `wake` writes a byte to a pipe the thread waits on."""

    def __init__(self, window: FlowWindow, stats, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.stats = stats  # the API's ApiStats
        self.clock = clock
        self.open = 0  # streams held (written by the thread; read whole by `full`)
        self._incoming: queue.SimpleQueue[_Stream] = queue.SimpleQueue()
        self._streams: dict[int, _Stream] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flow-api-streams", daemon=True)
        window.subscribe(self.wake)

    def start(self) -> None:
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._thread.start()

    def full(self) -> bool:
        return self.open + self._incoming.qsize() >= MAX_STREAMS

    def add(
        self, sock: socket.socket, flow_filter: FlowFilter, cursor: int, sse: bool, first: bytes,
        records: int,
    ) -> None:  # fmt: skip
        """A stream from record `cursor` on, `first` (holding `records` records) sent first."""
        sock.setblocking(False)
        self._incoming.put(_Stream(sock, flow_filter, cursor, sse, first, records, self.clock()))
        self.wake()

    def wake(self) -> None:
        # BlockingIOError: a wake-up is pending already; another OSError: stopped.
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")

    def stop(self) -> None:
        """Close every stream (their clients see the end) and end the thread."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.window.unsubscribe(self.wake)
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        try:
            self._serve_until_stopped()
        except Exception:  # a bug: the streams end (their clients see it), the API stays
            log.exception("the flow API's follow streams stopped")
        finally:
            for stream in list(self._streams.values()):
                self._close(stream)
            self._selector.close()

    def _serve_until_stopped(self) -> None:
        while not self._stopping.is_set():
            self._take_new()
            busy = False
            timeout = 1.0
            now = self.clock()
            for stream in list(self._streams.values()):
                more, wait = self._serve(stream, now)
                busy = busy or more
                timeout = min(timeout, wait)
            for key, events in self._selector.select(0 if busy else max(0.0, timeout)):
                if key.fd == self._wake_read:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_read, 4096)
                elif events & selectors.EVENT_READ:
                    self._check_gone(key.data)

    def _take_new(self) -> None:
        while True:
            try:
                stream = self._incoming.get_nowait()
            except queue.Empty:
                return
            self._streams[stream.sock.fileno()] = stream
            self._selector.register(stream.sock, selectors.EVENT_READ, stream)
            self.open += 1
            self.stats.stream(+1)

    def _serve(self, stream: _Stream, now: float) -> tuple[bool, float]:
        """Send what the stream can take now; (whether it can go on at once, how long until
        it needs looking at again)."""
        if stream.out is None:
            self._fill(stream, now)
        if stream.out is None:  # nothing for it yet: more to read, or a keep-alive to wait for
            return stream.cursor < self.window.next_seq, stream.quiet_since + KEEPALIVE - now
        try:
            sent = stream.sock.send(memoryview(stream.out)[stream.sent :])
        except BlockingIOError:
            sent = 0
        except OSError:  # the client went
            self._close(stream)
            return False, 1.0
        if sent:
            stream.sent += sent
            stream.progress = now
        if stream.sent < len(stream.out):
            if now - stream.progress >= SEND_TIMEOUT:
                self.stats.count(self.stats.cut_off, "send_timeout")
                self._close(stream)
                return False, 1.0
            self._want_write(stream, True)
            return False, stream.progress + SEND_TIMEOUT - now
        if stream.records:
            self.stats.wrote(stream.records)
        stream.out, stream.sent, stream.records = None, 0, 0
        stream.quiet_since = now
        self._want_write(stream, False)
        if stream.closing:
            self._close(stream)
            return False, 1.0
        return stream.cursor < self.window.next_seq, 1.0

    def _fill(self, stream: _Stream, now: float) -> None:
        """The stream's next bytes: records from the window, the news that it fell behind,
        or a keep-alive when it has been quiet long enough."""
        window = self.window
        entries, stream.cursor, lost = window.read(stream.cursor, FOLLOW_BATCH)
        if lost:
            self.stats.count(self.stats.cut_off, "window")
            message = {
                "error": f"cut off: this stream fell {lost} records behind the "
                f"{window.capacity}-record window (read faster, or filter more)",
                "lost": lost,
            }
            stream.out, stream.closing = control(message, stream.sse), True
            return
        if entries:
            if stream.everything and not stream.sse:
                stream.out, stream.records = window.lines(entries), len(entries)
                return
            if not stream.everything:
                entries = [e for e in entries if stream.filter.matches(e.record)]
            if entries:
                stream.out = b"".join([line(e, stream.sse) for e in entries])
                stream.records = len(entries)
            return
        if now - stream.quiet_since >= KEEPALIVE:
            stream.out = b": keep-alive\n\n" if stream.sse else b"\n"

    def _want_write(self, stream: _Stream, blocked: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if blocked else 0)
        if self._selector.get_key(stream.sock).events != events:
            self._selector.modify(stream.sock, events, stream)

    def _check_gone(self, stream: _Stream) -> None:
        """A stream's client has nothing to say after its request: what it sends is dropped,
        and the end of what it sends means it went."""
        try:
            data = stream.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(stream)

    def _close(self, stream: _Stream) -> None:
        if self._streams.pop(stream.sock.fileno(), None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(stream.sock)
        stream.sock.close()
        self.open -= 1
        self.stats.stream(-1)
