"""The eBPF counter path of one Node: the loaded program, the interfaces it is on, and the
evictions that take its flows out of the kernel for the connection store.

`evict` empties the map (and what the ring buffer holds of packets the map had no room
for) and returns the flows, merged across CPUs; the agent calls it on its poll, just
before reading conntrack. A thread of its own reads the ring buffer: records there mean
the map is full, and `on_full` asks the agent for an early eviction.
"""

from __future__ import annotations

import collections
import errno
import logging
import select
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .attach import Interfaces
from .bpfsys import RingBuffer, lookup
from .drain import BatchReader, fallback_flows, merge_cpus, records_from_bytes
from .program import CounterProgram, load

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CounterStats:
    """Written by the evicting thread (the agent's poll worker); read whole."""

    evictions: int = 0
    flows: int = 0  # flows evicted (map and fallback)
    packets: int = 0
    stale_slots: int = 0
    fallback: Counter[str] = field(default_factory=Counter)  # records by errno name
    fill: float = 0.0  # entries of the last eviction / map size
    durations: list[float] = field(default_factory=list)  # seconds, taken by the metrics
    lost: int = 0  # packets that found neither an entry nor ring-buffer room


class PacketCounter:
    """Owned by the agent: `start` and `stop` run on its loop's executor, `evict` in its
    poll worker (never at once). The ring-buffer thread owns the ring buffer's reader and
    only appends raw records to `_records`, which `evict` takes."""

    def __init__(
        self,
        netns: str | None,
        max_flows: int,
        interfaces: Iterable[str] = (),
        gateway: str = "antrea-gw0",
        *,
        load_program: Callable[[int], CounterProgram] = load,
    ):
        self.netns = netns
        self.max_flows = max_flows
        self.interface_names = tuple(interfaces)
        self.gateway = gateway
        self.stats = CounterStats()
        self.on_full: Callable[[], None] = lambda: None
        self._load = load_program
        self.program: CounterProgram | None = None
        self.interfaces: Interfaces | None = None
        self._reader: BatchReader | None = None
        self._ring: RingBuffer | None = None
        self._records: collections.deque[bytes] = collections.deque()
        self._full = False  # set by the ring-buffer thread, cleared by evict
        self._stop = threading.Event()
        self._ring_thread: threading.Thread | None = None
        self._last_eviction_ns = 0

    def start(self) -> None:
        """Load, attach, and start reading the ring buffer (blocking; LoadError, or
        AttachError, says what went wrong)."""
        program = self._load(self.max_flows)
        try:
            interfaces = Interfaces(program, self.netns, self.interface_names, self.gateway)
            interfaces.start()
        except BaseException:
            program.close()
            raise
        self.program, self.interfaces = program, interfaces
        self._reader = BatchReader(program.flows_fd, program.max_flows, program.cpus)
        self._ring = RingBuffer(program.fallback_fd, program.fallback_size)
        self._ring_thread = threading.Thread(target=self._read_ring, name="ebpf-ring", daemon=True)
        self._ring_thread.start()

    @property
    def full(self) -> bool:
        return self._full

    def _read_ring(self) -> None:
        ring = self._ring
        assert ring is not None
        poller = select.poll()
        poller.register(ring.fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            records = ring.read()
            if records:
                self._records.extend(records)
                if not self._full:
                    self._full = True
                    self.on_full()

    def evict(self) -> tuple[np.ndarray, float]:
        """Every flow counted since the last eviction (FLOW_DTYPE), and the wall clock's
        lead over the packets' monotonic times."""
        assert self._reader is not None and self.program is not None
        started = time.perf_counter()
        began_ns = time.monotonic_ns()
        keys, values = self._reader.take_all()
        merged = merge_cpus(keys, values, self._last_eviction_ns)
        self._last_eviction_ns = began_ns
        chunks = []
        while self._records:
            chunks.append(self._records.popleft())
        self._full = False
        records = records_from_bytes(chunks)
        flows = merged.flows
        if len(records):
            for error, count in Counter(records["error"].tolist()).items():
                self.stats.fallback[_errno_name(error)] += count
            flows = np.concatenate([flows, fallback_flows(records)])
        stats = self.stats
        stats.evictions += 1
        stats.flows += len(flows)
        stats.packets += int(flows["packets"].sum() + flows["rev_packets"].sum())
        stats.stale_slots += merged.stale_slots
        stats.fill = len(keys) / self.max_flows
        lost = lookup(self.program.lost_fd, b"\0\0\0\0", 8 * self.program.cpus) or b""
        stats.lost = sum(struct.unpack(f"={len(lost) // 8}Q", lost))
        stats.durations.append(time.perf_counter() - started)
        return flows, time.time() - time.monotonic()

    def stop(self) -> None:
        """Detach and unload (what the map still holds is lost: evict first)."""
        self._stop.set()
        if self._ring_thread is not None:
            self._ring_thread.join(5)
        if self.interfaces is not None:
            self.interfaces.stop()
        if self._ring is not None:
            self._ring.close()
        if self.program is not None:
            self.program.close()
        self.program = self.interfaces = self._reader = self._ring = None


def _errno_name(error: int) -> str:
    return errno.errorcode.get(-error, str(error)) if error < 0 else str(error)
