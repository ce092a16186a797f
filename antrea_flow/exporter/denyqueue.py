"""Denied packets handed over by the dataplane on NFQUEUE (before its drop or reject rule).

Every packet is given the verdict accept, which lets it go on to the dataplane's own deny
rule: the agent only watches, it can never turn a deny into an allow. The queue is bound
inside the Node's network namespace and set to fail open, so a slow agent changes nothing
(a full queue lets packets through to the deny rule instead of dropping them); the rule that
queues them bypasses the queue when no agent listens. Only packet headers are copied.
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
    """Reads one NFQUEUE in a thread and passes (packet, mark) to `handle`."""

    def __init__(self, netns_name: str | None, queue: int, handle: Callable[[bytes, int], object]):
        self.netns_name = netns_name
        self.queue = queue
        self.handle = handle
        self.packets = 0
        self._nfq: NetfilterQueue | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._log_once = LogOnce(log)

    def start(self) -> None:
        with netns.entered(self.netns_name):
            self._nfq = NetfilterQueue()
            self._nfq.bind(
                self.queue, self._packet, max_len=QUEUE_LENGTH, mode=COPY_PACKET, range=COPY_RANGE
            )
        os.write(self._nfq.get_fd(), _fail_open_message(self.queue))
        self._thread = threading.Thread(target=self._run, name=f"nfqueue-{self.queue}", daemon=True)
        self._thread.start()
        log.info(
            "recording denied connections from NFQUEUE %d%s",
            self.queue,
            f" in netns {self.netns_name}" if self.netns_name else "",
        )

    def _packet(self, packet) -> None:
        try:
            self.packets += 1
            self.handle(packet.get_payload(), packet.get_mark())
        except Exception:
            self._log_once(
                "handle", logging.ERROR, "recording a denied packet failed", exc_info=True
            )
        finally:
            packet.accept()  # on to the dataplane's own deny rule

    def _run(self) -> None:
        assert self._nfq is not None
        fd = self._nfq.get_fd()
        while not self._stopping.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    self._nfq.run(block=False)
                except OSError as exc:
                    self._log_once(
                        ("run", exc.errno), logging.WARNING, "NFQUEUE read failed: %s", exc
                    )

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._nfq is not None:
            self._nfq.unbind()
            self._nfq = None
