"""Denied packets handed over by the dataplane on NFQUEUE (before its drop or reject rule).

Every packet is given the verdict accept, which lets it go on to the dataplane's own deny
rule: the agent only watches, it can never turn a deny into an allow. The queue is bound
inside the Node's network namespace and set to fail open, so a slow agent changes nothing
(a full queue lets packets through to the deny rule instead of dropping them); the rule that
queues them bypasses the queue when no agent listens. Only packet headers are copied.

What reaches the queue but not the deny store is counted. The kernel numbers each packet it
queues, in order, just before putting it in the socket; one the full socket does not take
goes on (fail open) and leaves a gap in the ids. A gap is counted when the next packet
arrives, and the tail of a burst once the socket has been quiet for QUIET seconds, from the
last id the kernel gave out. Packets whose handler raised are counted too. A packet that
finds QUEUE_LENGTH packets already waiting goes on unnumbered: that one nobody can count.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable

from netfilterqueue import COPY_PACKET, NetfilterQueue

from ..conntrack import netns
from ..logutil import LogOnce

log = logging.getLogger(__name__)

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 0x1
NLM_F_REQUEST = 0x1
COPY_RANGE = 128  # IP and transport headers are all the deny store reads
QUEUE_LENGTH = 4096
PACKET_ID_MASK = 0xFFFFFFFF  # the kernel's packet ids are 32-bit and wrap
QUIET = 0.2  # seconds: ids not read by the end of two quiet spells are counted as missed
# One line per queue of the namespace: number, portid, waiting, mode, range, dropped,
# user dropped, last packet id given out, 1. Per thread: the agent's namespace may differ.
QUEUES_FILE = "/proc/thread-self/net/netfilter/nfnetlink_queue"


def _fail_open_message(queue: int) -> bytes:
    attributes = b"".join(
        struct.pack("=HH", 8, kind) + struct.pack(">I", NFQA_CFG_F_FAIL_OPEN)
        for kind in (NFQA_CFG_MASK, NFQA_CFG_FLAGS)
    )
    payload = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attributes
    header = struct.pack(
        "=IHHII",
        16 + len(payload),
        (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG,
        NLM_F_REQUEST,
        0,
        0,
    )
    return header + payload


class DenyQueue:
    """Reads one NFQUEUE in a thread of its own (the owner of its counters) and passes
    (packet, mark) to `handle` there."""

    def __init__(self, netns_name: str | None, queue: int, handle: Callable[[bytes, int], object]):
        self.netns_name = netns_name
        self.queue = queue
        self.handle = handle
        # Written by the queue's thread only; other threads read them (ints are replaced,
        # never changed in place) or take `counts()`.
        self.packets = 0  # read from the queue
        # Packets that reached the queue but not `handle`, or that `handle` failed on.
        self.socket_overflow = 0
        self.errors = 0
        self._last_id = 0
        self._queues_file: int | None = None
        self._nfq: NetfilterQueue | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._log_once = LogOnce(log)

    def counts(self) -> dict[str, int]:
        """Packets that reached the queue but were not recorded, by outcome."""
        return {"socket_overflow": self.socket_overflow, "error": self.errors}

    def start(self) -> None:
        self._last_id = 0  # binding creates the queue, which numbers its packets from 1
        with netns.entered(self.netns_name):
            self._nfq = NetfilterQueue()
            self._nfq.bind(
                self.queue, self._packet, max_len=QUEUE_LENGTH, mode=COPY_PACKET, range=COPY_RANGE
            )
            self._queues_file = os.open(QUEUES_FILE, os.O_RDONLY)  # stays in this namespace
        os.write(self._nfq.get_fd(), _fail_open_message(self.queue))
        self._thread = threading.Thread(target=self._run, name=f"nfqueue-{self.queue}", daemon=True)
        self._thread.start()
        log.info(
            "recording denied connections from NFQUEUE %d%s",
            self.queue,
            f" in netns {self.netns_name}" if self.netns_name else "",
        )

    def _missed(self, up_to: int) -> None:
        """Count the ids after the last one read, up to `up_to`: packets the socket missed."""
        missed = (up_to - self._last_id) & PACKET_ID_MASK
        self._last_id = up_to
        if missed:
            self.socket_overflow += missed
            self._log_once(
                "overflow",
                logging.WARNING,
                "NFQUEUE %d: the socket was full, %d denied packets did not reach the agent",
                self.queue,
                missed,
            )

    def _last_id_given(self) -> int | None:
        """The last packet id the kernel gave out on this queue."""
        assert self._queues_file is not None
        for line in os.pread(self._queues_file, 65536, 0).splitlines():
            fields = line.split()
            if int(fields[0]) == self.queue:
                return int(fields[7])
        return None

    def _packet(self, packet) -> None:
        try:
            self.packets += 1
            self._missed((packet.id - 1) & PACKET_ID_MASK)
            self._last_id = packet.id
            self.handle(packet.get_payload(), packet.get_mark())
        except Exception as exc:
            self.errors += 1
            self._log_once("handle", logging.ERROR, "recording a denied packet failed: %r", exc)
        finally:
            packet.accept()  # on to the dataplane's own deny rule

    def _run(self) -> None:
        assert self._nfq is not None
        fd = self._nfq.get_fd()
        given: int | None = None  # the kernel's last id, read when the socket was empty
        while not self._stopping.is_set():
            ready, _, _ = select.select([fd], [], [], QUIET)
            if ready:
                given = None
                try:
                    self._nfq.run(block=False)
                except OSError as exc:
                    self._log_once(
                        ("run", exc.errno), logging.WARNING, "NFQUEUE read failed: %s", exc
                    )
                continue
            # Nothing arrived for QUIET seconds since `given` was read: a packet numbered by
            # then that went into the socket would have, so the ids not read never did.
            if given is not None:
                self._missed(given)
            given = self._last_id_given()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._nfq is not None:
            self._nfq.unbind()
            self._nfq = None
        if self._queues_file is not None:
            os.close(self._queues_file)
            self._queues_file = None
