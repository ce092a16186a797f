"""The connection store: conntrack entries become connections with export timeouts.

Semantics follow Antrea's flow exporter:
- A connection's flow key is the 5-tuple after DNAT: (original source, reply source,
  protocol, original source port, reply source port); the original destination is kept as
  the Service address.
- Each export reports deltas since the previous export of that connection (never negative;
  the first export's delta is the total).
- Active timeout: a connection with traffic is exported every `active_timeout` (flowEndReason
  2). Idle timeout: one without new packets (or TCP state change) for `idle_timeout` is
  exported (reason 1) and waits, outside the expiry heap, for new activity.
- Dying connections (TCP TIME_WAIT or CLOSE, the kernel's dying bit, or gone from the
  table) are exported once with reason 3. Better than upstream, that export happens on the
  poll that notices the end rather than at the connection's next timeout, and a dying entry
  still in the table is remembered, not re-created, until it leaves the table.
- A min-heap on min(active expiry, idle expiry) says when the next export is due. The
  connections one poll creates share their deadline and so one heap entry.

Each poll is applied as a difference: the dump is joined with the previous one by entry
handle (below) in numpy, and only new, changed and vanished entries reach Python. An
unchanged connection costs nothing per poll, which is what makes large tables cheap.

All timing uses the `now` the caller passes (from an injectable clock).
"""

from __future__ import annotations

import gc
import heapq
import itertools
import operator
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from ..codes import END_ACTIVE, END_IDLE, END_OF_FLOW
from ..conntrack.parser import IPS_DYING, TCP_CLOSE, TCP_TIME_WAIT, Dump, Entry
from ..flowkey import FlowKey, make_key

PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
_CHUNK = 8192
# Antrea's conntrack mark: bits 0-3 say where a committed connection came from; 0 in a
# non-default zone means the connection was committed only to be denied (the deny path
# reports those), so such entries are not flows.
CONN_SOURCE_MASK = 0xF
_NEW_FIELDS = operator.attrgetter(
    "proto", "orig_src", "orig_sport", "reply_src", "reply_sport", "status", "orig_packets",
    "orig_bytes", "reply_packets", "reply_bytes", "start_ns", "tcp_state",
)  # fmt: skip


@dataclass(slots=True, eq=False)
class Connection:
    handle: int  # its key in the store: the conntrack id and more (see `handles`)
    key: FlowKey[bytes]  # after DNAT: the reply's source is the destination
    meta: Any  # enrichment (Pods, the Service dialled, rules), computed once when first seen
    packets: int
    octets: int
    reverse_packets: int
    reverse_octets: int
    tcp_state: int
    start_time: float
    stop_time: float  # when its counters last changed, or the kernel's stop time if dying
    active_expire: float
    idle_expire: float
    exported: tuple[int, int, int, int] = (0, 0, 0, 0)  # the four counters at the last export
    dying: bool = False
    gone: bool = False  # no longer in the table
    finished: bool = False  # its end-of-flow record has been exported
    heap_deadline: float | None = None  # deadline of its one valid heap entry
    # What the eBPF counter path saw of it (ebpf.enable).
    tcp_flags: int = 0  # OR of the TCP flags of its packets
    first_packet: float = 0.0  # times of its first and last packet (0: none seen)
    last_packet: float = 0.0
    counted_packets: int = 0  # its packets, both directions, as the TC program counted them
    untracked: bool = False  # made from counted packets alone: conntrack has no entry
    dialled: FlowKey[bytes] | None = None  # before DNAT (to a Service), when indexed so


class Export(NamedTuple):
    """One record to export: the connection, why, its counters at that moment and the
    deltas since its last export (copied: the connection may change once this is made)."""

    connection: Connection
    reason: int
    packets: int
    octets: int
    reverse_packets: int
    reverse_octets: int
    packet_delta: int
    octet_delta: int
    reverse_packet_delta: int
    reverse_octet_delta: int
    end_time: float


@dataclass(slots=True)
class StoreStats:
    polls: int = 0
    entries: int = 0  # entries in the last dump
    created: int = 0
    ended: int = 0
    filtered: Counter[str] = field(default_factory=Counter)  # connections skipped, by reason
    exported: Counter[int] = field(default_factory=Counter)  # records by flowEndReason
    counted_flows: Counter[str] = field(default_factory=Counter)  # eBPF flows, by outcome
    disagreements: int = 0  # ended connections whose two counts differ beyond packets in flight


@dataclass(frozen=True, slots=True)
class StoreCounts:
    """What a connection store held and did, as of its last update or expiry."""

    connections: int = 0
    filtered: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    exported: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))
    counted_flows: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    disagreements: int = 0


def handles(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Per entry, what tells conntrack entries apart across polls. The kernel's id is a
    32-bit hash (of the entry's address and tuple): live entries can share one (about one
    pair in 100k), and an entry reallocated for the same tuple gets the old id back. The
    low half mixes in the start timestamp and the ports, which differ in both cases."""
    ports = (columns["orig_sport"] << 16) | columns["reply_sport"]
    low = (columns["start_ns"] ^ ports) & 0xFFFFFFFF
    return (columns["id"].astype(np.uint64) << np.uint64(32)) | low.astype(np.uint64)


def handle(entry: Entry) -> int:
    """`handles` for one entry."""
    ports = (entry.orig_sport << 16) | entry.reply_sport
    return (entry.id << 32) | ((entry.start_ns ^ ports) & 0xFFFFFFFF)


class _Expiry(NamedTuple):
    """The times a poll gives the connections it creates."""

    now: float
    active: float  # their active expiry
    idle: float  # their idle expiry
    first: float  # the earlier of the two: their heap deadline


class _Previous:
    """What the last poll saw, sorted by conntrack id: enough to tell what changed."""

    FIELDS = (
        "ids",
        "packets",
        "reverse_packets",
        "tcp_state",
        "dying",
        "tracked",
        "skipped",
        "recheck",
    )

    def __init__(self, size: int = 0):
        self.ids = np.zeros(size, np.uint64)  # entry handles
        self.packets = np.zeros(size, np.int64)
        self.reverse_packets = np.zeros(size, np.int64)
        self.tcp_state = np.zeros(size, np.int64)
        self.dying = np.zeros(size, bool)
        self.tracked = np.zeros(size, bool)  # a stored connection
        self.skipped = np.zeros(size, bool)  # enrichment said no (not a filter)
        self.recheck = np.zeros(size, bool)  # skipped, to be enriched again (counted already)

    def select(self, mask: np.ndarray) -> _Previous:
        out = _Previous()
        for name in self.FIELDS:
            setattr(out, name, getattr(self, name)[mask])
        return out


def _is_dying(entry: Entry) -> bool:
    return bool(entry.status & IPS_DYING) or entry.tcp_state in (TCP_TIME_WAIT, TCP_CLOSE)


class ConnectionStore:
    """Connections of one conntrack zone, updated from complete dumps.

    Owned by the agent's run loop, which updates it in a worker thread while it awaits that
    work and expires it on the loop itself: never both at once. Other threads (and the
    loop while an update runs) read `counts`, published at the end of each update and expiry.
    """

    def __init__(
        self,
        enrich: Callable[[Entry], Any],
        active_timeout: float,
        idle_timeout: float,
        zone: int,
        protocol_filter: tuple[str, ...] | None = None,
        counted: bool = False,
    ):
        """`enrich(entry)` returns the connection's metadata, or None to skip it (e.g. no
        local Pod at either end); it runs once per new conntrack entry. `counted`: flows of
        the eBPF counter path will be merged in (`merge_counted`): connections are then
        also indexed by their 5-tuples."""
        self.enrich = enrich
        self.active_timeout = active_timeout
        self.idle_timeout = idle_timeout
        self.zone = zone
        self.protocols = (
            None if protocol_filter is None else [PROTOCOLS[p] for p in protocol_filter]
        )
        self.stats = StoreStats()
        self.counts = StoreCounts()
        self._by_handle: dict[int, Connection] = {}
        self._previous = _Previous()
        # (deadline, sequence, connections due then); a connection is due at an entry only
        # while its heap_deadline equals the entry's deadline
        self._heap: list[tuple[float, int, list[Connection]]] = []
        self._sequence = itertools.count()
        # With the counter path: tracked connections by 5-tuple (after DNAT, and before it
        # for a Service), and the connections made from counted packets alone.
        self._by_tuple: dict[FlowKey[bytes], Connection] | None = {} if counted else None
        self._untracked: dict[FlowKey[bytes], Connection] = {}
        self._untracked_handles = itertools.count(1)

    def __len__(self) -> int:
        return len(self._by_handle)

    def __iter__(self) -> Iterator[Connection]:
        return iter(self._by_handle.values())

    def forget_skipped(self) -> None:
        """Re-examine skipped entries on the next poll (the metadata changed: a connection
        skipped for having no local Pod may have one now)."""
        self._previous.recheck = self._previous.skipped.copy()

    # -- polling ---------------------------------------------------------------------------

    def update(self, dump: Dump, now: float) -> None:
        """Apply one complete dump of the table (never a partial one: absence ends flows)."""
        # Creating many connections at once (the first poll of a full table) would set off
        # repeated full collections of the cyclic garbage collector over the growing store;
        # the update creates no reference cycles, so refcounting frees all it drops.
        enabled = gc.isenabled()
        gc.disable()
        try:
            self._update(dump, now)
        finally:
            if enabled:
                gc.enable()
            self._publish()

    def _publish(self) -> None:
        stats = self.stats
        self.counts = StoreCounts(
            len(self._by_handle),
            MappingProxyType(dict(stats.filtered)),
            MappingProxyType(dict(stats.exported)),
            MappingProxyType(dict(stats.counted_flows)),
            stats.disagreements,
        )

    def _update(self, dump: Dump, now: float) -> None:
        self.stats.polls += 1
        self.stats.entries = len(dump)
        cols = dump.columns
        keys = handles(cols)
        order = np.argsort(keys, kind="stable")
        ids = keys[order]
        packets = cols["orig_packets"][order]
        reverse_packets = cols["reply_packets"][order]
        tcp_state = cols["tcp_state"][order]
        status = cols["status"][order]
        dying = (
            ((status & IPS_DYING) != 0) | (tcp_state == TCP_TIME_WAIT) | (tcp_state == TCP_CLOSE)
        )

        previous = self._previous
        if len(previous.ids):
            at = np.minimum(np.searchsorted(previous.ids, ids), len(previous.ids) - 1)
            known = previous.ids[at] == ids
            tracked = known & previous.tracked[at]
            changed = tracked & (
                (previous.packets[at] != packets)
                | (previous.reverse_packets[at] != reverse_packets)
                | (previous.tcp_state[at] != tcp_state)
                | (dying & ~previous.dying[at])
            )
            recheck = known & previous.recheck[at]
            skipped = known & previous.skipped[at] & ~recheck
            still_there = np.zeros(len(previous.ids), bool)
            still_there[at[known]] = True
            gone = previous.ids[~still_there & previous.tracked].tolist()
        else:
            known = tracked = changed = skipped = recheck = np.zeros(len(ids), bool)
            gone = []

        for key in gone:
            conn = self._by_handle.get(key)
            if conn is not None:
                if conn.finished:
                    self._forget(conn)
                else:
                    self._end(conn, now, None, gone=True)

        for entry in dump.entries(order[changed]):
            conn = self._by_handle.get(handle(entry))
            if conn is not None and not conn.dying:
                self._observe(conn, entry, now)

        new = ~known
        eligible = (new & self._eligible(cols, order, new)) | recheck
        positions = np.flatnonzero(eligible)
        enrich = self.enrich
        add = self._add
        active, idle = now + self.active_timeout, now + self.idle_timeout
        expiry = _Expiry(now, active, idle, min(active, idle))
        fresh: list[Connection] = []
        refused: list[int] = []  # indexes into positions
        # In chunks, so a full table's first poll never holds all its entries at once.
        for first in range(0, len(positions), _CHUNK):
            chunk = positions[first : first + _CHUNK]
            for index, entry in enumerate(dump.entries(order[chunk]), first):
                meta = enrich(entry)
                if meta is None:
                    refused.append(index)
                else:
                    add(entry, meta, expiry, fresh)
        if fresh:
            heapq.heappush(self._heap, (expiry.first, next(self._sequence), fresh))
        was_refused = np.zeros(len(ids), bool)
        was_refused[positions[refused]] = True
        was_created = np.zeros(len(ids), bool)
        was_created[positions] = True
        was_created &= ~was_refused
        self.stats.created += len(positions) - len(refused)
        first_refusals = int((was_refused & ~recheck).sum())
        if first_refusals:
            self.stats.filtered["no_local_pod"] += first_refusals

        state = _Previous()
        state.ids, state.packets, state.reverse_packets = ids, packets, reverse_packets
        state.tcp_state, state.dying = tcp_state, dying
        state.tracked = tracked | was_created
        state.skipped = skipped | was_refused
        state.recheck = np.zeros(len(ids), bool)
        self._previous = state

    def _eligible(self, cols: dict[str, np.ndarray], order: np.ndarray, new: np.ndarray):
        """Entries that can be flows: right zone, protocol, and committed; counts the new
        ones that are not (so each entry is counted once)."""
        zone = cols["zone"][order]
        ok = zone == self.zone
        reasons = [("zone", ~ok)]
        if self.protocols is not None:
            wrong = ok & ~np.isin(cols["proto"][order], self.protocols)
            reasons.append(("protocol", wrong))
            ok &= ~wrong
        uncommitted = ok & (zone != 0) & ((cols["mark"][order] & CONN_SOURCE_MASK) == 0)
        reasons.append(("uncommitted", uncommitted))
        ok &= ~uncommitted
        for reason, mask in reasons:
            count = int((mask & new).sum())
            if count:
                self.stats.filtered[reason] += count
        return ok

    def _observe(self, conn: Connection, entry: Entry, now: float) -> None:
        """New counters or TCP state for a known connection."""
        if (
            entry.orig_packets != conn.packets
            or entry.reply_packets != conn.reverse_packets
            or entry.tcp_state != conn.tcp_state
        ):
            conn.packets, conn.octets = entry.orig_packets, entry.orig_bytes
            conn.reverse_packets, conn.reverse_octets = entry.reply_packets, entry.reply_bytes
            conn.tcp_state = entry.tcp_state
            conn.stop_time = now
            conn.idle_expire = now + self.idle_timeout
            if conn.heap_deadline is None:  # idle-exported: active again
                conn.active_expire = now + self.active_timeout
                self._schedule(conn, min(conn.active_expire, conn.idle_expire))
        if _is_dying(entry):
            self._end(conn, now, entry)

    def _add(self, entry: Entry, meta: Any, expiry: _Expiry, fresh: list[Connection]) -> None:
        """A new connection; a live one joins `fresh`, the poll's shared heap entry."""
        # Runs for every new connection: the fields read by name in one call, positional
        # arguments, expiry times shared by the whole poll.
        (proto, orig_src, orig_sport, reply_src, reply_sport, status, packets, octets,
         reverse_packets, reverse_octets, start_ns, tcp_state) = _NEW_FIELDS(entry)  # fmt: skip
        now = expiry.now
        key = handle(entry)
        conn = Connection(
            key,
            make_key(FlowKey, (orig_src, reply_src, proto, orig_sport, reply_sport)),
            meta,
            packets,
            octets,
            reverse_packets,
            reverse_octets,
            tcp_state,
            start_ns / 1e9 if start_ns else now,
            now,
            expiry.active,
            expiry.idle,
        )
        self._by_handle[key] = conn
        if self._by_tuple is not None:
            self._by_tuple[conn.key] = conn
            if entry.orig_dst != reply_src or entry.orig_dport != reply_sport:  # DNAT
                conn.dialled = FlowKey(orig_src, entry.orig_dst, proto, orig_sport,
                                       entry.orig_dport)  # fmt: skip
                self._by_tuple[conn.dialled] = conn
        if status & IPS_DYING or tcp_state in (TCP_TIME_WAIT, TCP_CLOSE):
            self._end(conn, now, entry)
        else:
            conn.heap_deadline = expiry.first
            fresh.append(conn)

    def _forget(self, conn: Connection) -> None:
        """Remove a connection whose end was exported and that the table no longer has."""
        if self._by_handle.get(conn.handle) is conn:
            del self._by_handle[conn.handle]
        if conn.untracked:
            if self._untracked.get(conn.key) is conn:
                del self._untracked[conn.key]
        elif self._by_tuple is not None:
            for key in (conn.key, conn.dialled):
                if key is not None and self._by_tuple.get(key) is conn:
                    del self._by_tuple[key]

    def _end(self, conn: Connection, now: float, entry: Entry | None, gone: bool = False) -> None:
        """The connection ended: export it with reason 3 on the next export round."""
        if entry is not None and entry.stop_ns:
            conn.stop_time = entry.stop_ns / 1e9
        if gone:
            conn.gone = True
        if conn.dying:
            return
        conn.dying = True
        self.stats.ended += 1
        self._schedule(conn, now)

    # -- the eBPF counter path -------------------------------------------------------------

    def merge_counted(
        self,
        flows: np.ndarray,
        clock_offset: float,
        now: float,
        denied: Callable[[FlowKey[bytes]], bool] = lambda key: False,
    ) -> None:
        """Apply one eviction of the counter path (FLOW_DTYPE rows; packet times in
        monotonic ns, `clock_offset` the wall clock's lead over it), right after `update`.

        A flow of a tracked connection (by its 5-tuple after or before DNAT, either way
        round) gives it TCP flags, packet times and a count to check conntrack's against;
        its counters stay conntrack's. Any other flow is traffic conntrack does not have
        (untracked, or gone before a poll saw it): a connection of its own, counted from
        these flows alone, enriched like the others, ended once idle. A packet is so in
        exactly one record. Not merged: flows of denied connections (`denied`, the deny
        path records them), filtered protocols, fragments after the first (conntrack counts
        the packet they belong to) and flows with no local Pod."""
        if self._by_tuple is None or len(flows) == 0:
            return
        keys = flows["key"]
        wide = (keys["version"] == 6).tolist()
        sources, destinations = keys["src"].tobytes(), keys["dst"].tobytes()
        protos, sports, dports = (keys[f].tolist() for f in ("proto", "sport", "dport"))
        fragments = keys["fragment"].tolist()
        packets, octets = flows["packets"].tolist(), flows["bytes"].tolist()
        rev_packets, rev_octets = flows["rev_packets"].tolist(), flows["rev_bytes"].tolist()
        firsts = (flows["first_ns"] / 1e9 + clock_offset).tolist()
        lasts = (flows["last_ns"] / 1e9 + clock_offset).tolist()
        flag_bits = flows["flags"].tolist()
        by_tuple, outcomes = self._by_tuple, self.stats.counted_flows
        for i in range(len(flows)):
            at, size = 16 * i, 16 if wide[i] else 4
            source, destination = sources[at : at + size], destinations[at : at + size]
            proto, sport, dport = protos[i], sports[i], dports[i]
            key = make_key(FlowKey, (source, destination, proto, sport, dport))
            back = make_key(FlowKey, (destination, source, proto, dport, sport))
            first, last = firsts[i], lasts[i]
            conn = by_tuple.get(key) or by_tuple.get(back)
            if conn is not None:
                outcomes["matched"] += 1
                self._saw(conn, flag_bits[i], first, last, packets[i] + rev_packets[i])
                continue
            if fragments[i]:
                outcomes["fragment"] += 1
                continue
            if self.protocols is not None and proto not in self.protocols:
                outcomes["protocol"] += 1
                continue
            if denied(key) or denied(back):
                outcomes["denied"] += 1
                continue
            conn = self._untracked.get(key)
            forward = True
            if conn is None:
                conn = self._untracked.get(back)
                forward = conn is None
            if conn is None:
                conn = self._new_untracked(key, first, last, now)
                if conn is None:
                    outcomes["no_local_pod"] += 1
                    continue
            outcomes["untracked"] += 1
            counts = (packets[i], octets[i], rev_packets[i], rev_octets[i])
            if not forward:
                counts = (counts[2], counts[3], counts[0], counts[1])
            conn.packets += counts[0]
            conn.octets += counts[1]
            conn.reverse_packets += counts[2]
            conn.reverse_octets += counts[3]
            conn.stop_time = max(conn.stop_time, last)
            conn.idle_expire = now + self.idle_timeout
            self._saw(conn, flag_bits[i], first, last, counts[0] + counts[2])
            if conn.heap_deadline is None:  # idle-exported: active again
                conn.active_expire = now + self.active_timeout
            self._schedule(conn, min(conn.active_expire, conn.idle_expire))
        self._publish()

    @staticmethod
    def _saw(conn: Connection, flags: int, first: float, last: float, packets: int) -> None:
        conn.tcp_flags |= flags
        if not conn.first_packet or first < conn.first_packet:
            conn.first_packet = first
        conn.last_packet = max(conn.last_packet, last)
        conn.counted_packets += packets

    def _new_untracked(
        self, key: FlowKey[bytes], first: float, last: float, now: float
    ) -> Connection | None:
        source, destination, proto, sport, dport = key
        # As conntrack would have it: no NAT, no mark, no labels (no Service, no rule).
        entry = Entry(
            proto, source, destination, sport, dport, destination, source, dport, sport,
            self.zone, 0, 0, b"", 0, 0, 0, 0, int(first * 1e9), 0, -1, 0,
        )  # fmt: skip
        meta = self.enrich(entry)
        if meta is None:
            return None
        conn = Connection(
            -next(self._untracked_handles), key, meta, 0, 0, 0, 0, -1, first, last,
            now + self.active_timeout, now + self.idle_timeout, untracked=True,
        )  # fmt: skip
        self._by_handle[conn.handle] = conn
        self._untracked[key] = conn
        self.stats.created += 1
        return conn

    # -- expiry ----------------------------------------------------------------------------

    def _schedule(self, conn: Connection, deadline: float) -> None:
        # One valid heap entry per connection: an earlier one already covers it (it is
        # re-evaluated when popped); a later one becomes stale and is skipped.
        if conn.heap_deadline is not None and conn.heap_deadline <= deadline:
            return
        conn.heap_deadline = deadline
        heapq.heappush(self._heap, (deadline, next(self._sequence), [conn]))

    def next_expiry(self) -> float | None:
        """When the next export is due (None with nothing to export)."""
        heap = self._heap
        while heap and all(conn.heap_deadline != heap[0][0] for conn in heap[0][2]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expire(self, now: float) -> list[Export]:
        """The records due at `now`, with the store updated as if they were exported."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, connections = heapq.heappop(heap)
            for conn in connections:
                if conn.heap_deadline != deadline:
                    continue  # stale: superseded by an earlier entry
                conn.heap_deadline = None
                if conn.dying:
                    out.append(self._export(conn, END_OF_FLOW))
                    conn.finished = True
                    if conn.gone:
                        self._forget(conn)
                    continue
                if conn.untracked and conn.idle_expire <= now:
                    # Counted packets stopped coming: that flow is over.
                    out.append(self._export(conn, END_IDLE))
                    conn.finished = True
                    self._forget(conn)
                    continue
                due = min(conn.active_expire, conn.idle_expire)
                if due > now:
                    self._schedule(conn, due)  # its idle expiry moved on since it was queued
                elif conn.idle_expire <= now:
                    out.append(self._export(conn, END_IDLE))  # waits for new activity
                else:
                    out.append(self._export(conn, END_ACTIVE))
                    conn.active_expire = now + self.active_timeout
                    self._schedule(conn, min(conn.active_expire, conn.idle_expire))
        if out:
            self._publish()
        return out

    def _compare(self, conn: Connection) -> None:
        """At its end, conntrack's count and the counter path's should agree, but for the
        packets of the connection's last moments that one saw and the other not yet (a
        poll or an eviction apart): a few, or a hundredth of a long one. Only counted from
        its start (within a second) is it comparable at all."""
        if conn.first_packet > conn.start_time + 1.0:
            return
        tracked = conn.packets + conn.reverse_packets
        if abs(tracked - conn.counted_packets) > 4 + tracked // 100:
            self.stats.disagreements += 1

    def drain(self) -> list[Export]:
        """On shutdown: every connection with something not yet exported (ended ones with
        reason 3, live ones with reason 2), so stopping the agent loses no counts."""
        out = []
        for conn in self._by_handle.values():
            if conn.dying and not conn.finished:
                out.append(self._export(conn, END_OF_FLOW))
                conn.finished = True
            elif not conn.dying and conn.exported != (
                conn.packets,
                conn.octets,
                conn.reverse_packets,
                conn.reverse_octets,
            ):
                out.append(self._export(conn, END_ACTIVE))
        self._publish()
        return out

    def _export(self, conn: Connection, reason: int) -> Export:
        if reason == END_OF_FLOW and conn.counted_packets and not conn.untracked:
            self._compare(conn)
        packets, octets, reverse_packets, reverse_octets = conn.exported
        export = Export(
            conn,
            reason,
            conn.packets,
            conn.octets,
            conn.reverse_packets,
            conn.reverse_octets,
            max(0, conn.packets - packets),
            max(0, conn.octets - octets),
            max(0, conn.reverse_packets - reverse_packets),
            max(0, conn.reverse_octets - reverse_octets),
            conn.stop_time,
        )
        conn.exported = (conn.packets, conn.octets, conn.reverse_packets, conn.reverse_octets)
        self.stats.exported[reason] += 1
        return export
