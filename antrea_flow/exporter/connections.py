"""The connection store: conntrack entries become connections with export timeouts.

Semantics follow Antrea's flow exporter:
- A connection's flow key is the 5-tuple after DNAT: (original source, reply source,
  protocol, original source port, reply source port); the original destination is kept as
  the Service address.
- Each export reports deltas since the previous export of that connection (never negative;
  the first export's delta is the total).
- Active timeout: a connection with traffic is exported every `active_timeout` (flowEndReason
  2). Idle timeout: one without new packets (or TCP state change) for `idle_timeout` is
  exported (reason 1) and then has no deadline until new activity.
- Dying connections (TCP TIME_WAIT or CLOSE, the kernel's dying bit, or gone from the
  table) are exported once with reason 3. Better than upstream, that export happens on the
  poll that notices the end rather than at the connection's next timeout, and a dying entry
  still in the table is remembered, not re-created, until it leaves the table.

Connections are rows of numpy columns (about 200 bytes each, no Python object per
connection), and each poll is applied as a difference: the dump is joined with the previous
one by entry handle (below), which also says each tracked entry's row; counters, ends and
deadlines of the changed and vanished entries are set with array operations, and only new
entries reach Python (once per group of entries with the same metadata, to be enriched).
An unchanged connection costs nothing per poll, which is what makes large tables cheap.
Expiry takes the rows whose deadline is due.

All timing uses the `now` the caller passes (from an injectable clock).
"""

from __future__ import annotations

import itertools
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


@dataclass(slots=True, eq=False)
class Connection:
    """One connection as it leaves a store: what a record is made of. The connection store
    makes one per export (its connections are rows, see ConnectionStore); the deny store
    keeps its few as these."""

    handle: int  # the conntrack entry's (see `handles`); negative: made from counted packets
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
    # What the eBPF counter path saw of it (ebpf.enable).
    tcp_flags: int = 0  # OR of the TCP flags of its packets
    first_packet: float = 0.0  # times of its first and last packet (0: none seen)
    last_packet: float = 0.0
    counted_packets: int = 0  # its packets, both directions, as the TC program counted them
    untracked: bool = False  # made from counted packets alone: conntrack has no entry


class Export(NamedTuple):
    """One record to export: the connection, why, its counters at that moment and the
    deltas since its last export."""

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


class _Expiry(NamedTuple):
    """The times a poll gives the connections it creates."""

    now: float
    active: float  # their active expiry
    idle: float  # their idle expiry
    first: float  # the earlier of the two: their deadline


class _Previous:
    """What the last poll saw, sorted by entry handle: enough to tell what changed, and
    where each tracked entry's connection is."""

    def __init__(self, size: int = 0):
        self.ids = np.zeros(size, np.uint64)  # entry handles
        self.packets = np.zeros(size, np.int64)
        self.reverse_packets = np.zeros(size, np.int64)
        self.tcp_state = np.zeros(size, np.int64)
        self.dying = np.zeros(size, bool)
        self.tracked = np.zeros(size, bool)  # a stored connection
        self.slot = np.full(size, -1, np.int64)  # its row, where tracked
        self.skipped = np.zeros(size, bool)  # enrichment said no (not a filter)
        self.recheck = np.zeros(size, bool)  # skipped, to be enriched again (counted already)


# One row per connection held. Rows are reused once their connection is forgotten; a free
# row has no deadline, and rows never handed out are not read.
_ROW = np.dtype(
    [
        ("live", bool),  # a connection holds the row
        ("handle", np.uint64),  # the entry's handle; for an untracked connection, a number
        ("source", np.uint8, (16,)),  # packed address; IPv4 in the first 4 bytes
        ("destination", np.uint8, (16,)),
        ("wide", bool),  # IPv6
        ("protocol", np.uint8),
        ("source_port", np.uint16),
        ("destination_port", np.uint16),
        ("meta", np.int32),  # index into the store's metadata objects
        ("packets", np.int64),
        ("octets", np.int64),
        ("reverse_packets", np.int64),
        ("reverse_octets", np.int64),
        ("exported_packets", np.int64),  # the four counters at the last export
        ("exported_octets", np.int64),
        ("exported_reverse_packets", np.int64),
        ("exported_reverse_octets", np.int64),
        ("tcp_state", np.int8),
        ("start_time", np.float64),
        ("stop_time", np.float64),  # when its counters last changed, or the kernel's stop
        ("active_expire", np.float64),
        ("idle_expire", np.float64),
        # When expiry looks at it next; NaN for none (idle-exported: it waits for activity).
        ("deadline", np.float64),
        ("dying", bool),
        ("gone", bool),  # no longer in the table
        ("finished", bool),  # its end-of-flow record has been exported
        ("untracked", bool),  # made from counted packets alone: conntrack has no entry
        # What the eBPF counter path saw of it (ebpf.enable).
        ("tcp_flags", np.uint8),  # OR of the TCP flags of its packets
        ("first_packet", np.float64),  # times of its first and last packet (0: none seen)
        ("last_packet", np.float64),
        ("counted_packets", np.int64),  # both directions, as the TC program counted them
    ]
)
_COUNTERS = ("packets", "octets", "reverse_packets", "reverse_octets")
_EXPORTED = tuple(f"exported_{name}" for name in _COUNTERS)
_FIRST_ROWS = 1024


def _row_key(row: tuple) -> FlowKey[bytes]:
    """The 5-tuple of a row (as `item()` gives it)."""
    _live, _handle, source, destination, wide, protocol, source_port, destination_port = row[:8]
    size = 16 if wide else 4
    return make_key(FlowKey, (source.tobytes()[:size], destination.tobytes()[:size], protocol,
                              source_port, destination_port))  # fmt: skip


class ConnectionStore:
    """Connections of one conntrack zone, updated from complete dumps.

    A connection is a row of numpy columns, not a Python object: a table of 100k costs
    about 200 bytes a connection, and a poll updates, ends and schedules them all with
    array operations. A `Connection` is made only for what leaves the store (an `Export`,
    or iterating it).

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
        self._rows = np.zeros(_FIRST_ROWS, _ROW)
        self._used = 0  # rows ever handed out: those past it were never used
        self._free = np.zeros(0, np.int64)  # rows below `_used` no connection holds
        self._count = 0
        # Metadata objects by index (rows hold the index), and each one's index by id.
        self._metas: list[Any] = []
        self._meta_index: dict[int, int] = {}
        self._previous = _Previous()
        # With the counter path: tracked rows by 5-tuple (after DNAT, and before it for a
        # Service), the 5-tuple before DNAT by row, and untracked rows by 5-tuple.
        self._by_tuple: dict[FlowKey[bytes], int] | None = {} if counted else None
        self._dialled: dict[int, FlowKey[bytes]] = {}
        self._untracked: dict[FlowKey[bytes], int] = {}
        self._untracked_numbers = itertools.count(1)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Connection]:
        """The connections held, as snapshots."""
        live = np.flatnonzero(self._live())
        return iter([self._connection(slot) for slot in live.tolist()])

    def forget_skipped(self) -> None:
        """Re-examine skipped entries on the next poll (the metadata changed: a connection
        skipped for having no local Pod may have one now)."""
        self._previous.recheck = self._previous.skipped.copy()

    # -- rows ------------------------------------------------------------------------------

    def _live(self) -> np.ndarray:
        """Per row below `_used`, whether a connection holds it."""
        return self._rows["live"][: self._used]

    def _allocate(self, count: int) -> np.ndarray:
        """`count` rows for new connections, zeroed (no deadline)."""
        reused, self._free = self._free[:count], self._free[count:]
        fresh = count - len(reused)
        if self._used + fresh > len(self._rows):
            # Rows past `_used` are never read: left as zero pages until written.
            grown = np.zeros(max(2 * len(self._rows), self._used + fresh), _ROW)
            grown[: self._used] = self._rows[: self._used]
            self._rows = grown
        slots = np.concatenate([reused, np.arange(self._used, self._used + fresh)])
        self._used += fresh
        self._rows[reused] = np.zeros(1, _ROW)
        self._rows["deadline"][slots] = np.nan
        self._count += count
        return slots

    def _release(self, slots: np.ndarray) -> None:
        """Forget the connections of `slots` (their ends exported, gone from the table)."""
        if not len(slots):
            return
        if self._by_tuple is not None or self._untracked:
            for slot in slots.tolist():
                self._unindex(slot)
        rows = self._rows
        rows["live"][slots] = False
        rows["deadline"][slots] = np.nan
        self._free = np.concatenate([self._free, slots])
        self._count -= len(slots)

    def _unindex(self, slot: int) -> None:
        key = self._key(slot)
        if self._rows["untracked"][slot]:
            if self._untracked.get(key) == slot:
                del self._untracked[key]
            return
        if self._by_tuple is None:
            return
        for indexed in (key, self._dialled.pop(slot, None)):
            if indexed is not None and self._by_tuple.get(indexed) == slot:
                del self._by_tuple[indexed]

    def _meta(self, meta: Any) -> int:
        index = self._meta_index.get(id(meta))
        if index is None:
            index = self._meta_index[id(meta)] = len(self._metas)
            self._metas.append(meta)
        return index

    def _compact_metas(self) -> None:
        """Drop the metadata objects no connection refers to any more (enrichment makes
        new ones as the cluster changes)."""
        live = self._live()
        used, inverse = np.unique(self._rows["meta"][: self._used][live], return_inverse=True)
        self._metas = [self._metas[i] for i in used.tolist()]
        self._meta_index = {id(meta): i for i, meta in enumerate(self._metas)}
        self._rows["meta"][np.flatnonzero(live)] = inverse

    def _key(self, slot: int) -> FlowKey[bytes]:
        return _row_key(self._rows[slot].item())

    def _connection(self, slot: int) -> Connection:
        """A snapshot of the connection in `slot`."""
        row = self._rows[slot].item()
        (_live, handle, _source, _destination, _wide, _protocol, _sport, _dport, meta,
         packets, octets, reverse_packets, reverse_octets, exported_packets, exported_octets,
         exported_reverse_packets, exported_reverse_octets, tcp_state, start_time, stop_time,
         active_expire, idle_expire, _deadline, _dying, _gone, _finished, untracked,
         tcp_flags, first_packet, last_packet, counted_packets) = row  # fmt: skip
        return Connection(
            -handle if untracked else handle,
            _row_key(row),
            self._metas[meta],
            packets,
            octets,
            reverse_packets,
            reverse_octets,
            tcp_state,
            start_time,
            stop_time,
            active_expire,
            idle_expire,
            (
                exported_packets,
                exported_octets,
                exported_reverse_packets,
                exported_reverse_octets,
            ),  # fmt: skip
            tcp_flags,
            first_packet,
            last_packet,
            counted_packets,
            untracked,
        )

    # -- polling ---------------------------------------------------------------------------

    def update(self, dump: Dump, now: float) -> None:
        """Apply one complete dump of the table (never a partial one: absence ends flows)."""
        try:
            self._update(dump, now)
            if len(self._metas) > max(1024, 2 * self._count):
                self._compact_metas()
        finally:
            self._publish()

    def _publish(self) -> None:
        stats = self.stats
        self.counts = StoreCounts(
            self._count,
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
        slot = np.full(len(ids), -1, np.int64)

        previous = self._previous
        if len(previous.ids):
            at = np.minimum(np.searchsorted(previous.ids, ids), len(previous.ids) - 1)
            known = previous.ids[at] == ids
            tracked = known & previous.tracked[at]
            slot[tracked] = previous.slot[at[tracked]]
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
            gone = previous.slot[~still_there & previous.tracked]
        else:
            known = tracked = changed = skipped = recheck = np.zeros(len(ids), bool)
            gone = np.zeros(0, np.int64)

        if len(gone):
            finished = self._rows["finished"][gone]
            self._release(gone[finished])
            self._end(gone[~finished], now, gone=True)

        positions = np.flatnonzero(changed)
        if len(positions):
            self._observe(slot[positions], order[positions], cols, dying[positions], now)

        new = np.flatnonzero(~known)
        eligible = recheck.copy()
        eligible[new] = self._eligible(cols, order[new])
        positions = np.flatnonzero(eligible)
        active, idle = now + self.active_timeout, now + self.idle_timeout
        expiry = _Expiry(now, active, idle, min(active, idle))
        metas = self._enrich(dump, order[positions])
        accepted = metas >= 0
        created = positions[accepted]
        if len(created):
            slot[created] = self._add(dump, order[created], metas[accepted], ids[created],
                                      dying[created], expiry)  # fmt: skip
        was_refused = np.zeros(len(ids), bool)
        was_refused[positions[~accepted]] = True
        self.stats.created += len(created)
        first_refusals = int((was_refused & ~recheck).sum())
        if first_refusals:
            self.stats.filtered["no_local_pod"] += first_refusals

        state = _Previous()
        state.ids, state.packets, state.reverse_packets = ids, packets, reverse_packets
        state.tcp_state, state.dying = tcp_state, dying
        state.tracked = slot >= 0
        state.slot = slot
        state.skipped = skipped | was_refused
        state.recheck = np.zeros(len(ids), bool)
        self._previous = state

    def _enrich(self, dump: Dump, entries: np.ndarray) -> np.ndarray:
        """The metadata index of each of the dump's `entries`, -1 where enrichment says no.
        An enricher that can tell which entries get the same metadata (`groups`) is asked
        once per group; any other once per entry."""
        groups = getattr(self.enrich, "groups", None)
        if groups is not None and len(entries):
            inverse = groups(dump, entries)  # numbers 0..k-1, each used
            asked = np.empty(int(inverse.max()) + 1, np.int64)
            asked[inverse] = np.arange(len(entries))  # one entry of each group
        else:
            asked, inverse = np.arange(len(entries)), None
        answers = np.full(len(asked), -1, np.int32)
        enrich, meta_index = self.enrich, self._meta
        # In chunks, so a full table's first poll never holds all its entries at once.
        for first in range(0, len(asked), _CHUNK):
            chunk = asked[first : first + _CHUNK]
            for number, entry in enumerate(dump.entries(entries[chunk]), first):
                meta = enrich(entry)
                if meta is not None:
                    answers[number] = meta_index(meta)
        return answers if inverse is None else answers[inverse]

    def _eligible(self, cols: dict[str, np.ndarray], entries: np.ndarray) -> np.ndarray:
        """Which of the new `entries` can be flows: right zone, protocol, and committed;
        counts those that are not (each entry once: it is new only once)."""
        if not len(entries):
            return np.zeros(0, bool)
        zone = cols["zone"][entries]
        ok = zone == self.zone
        reasons = [("zone", ~ok)]
        if self.protocols is not None:
            wrong = ok & ~np.isin(cols["proto"][entries], self.protocols)
            reasons.append(("protocol", wrong))
            ok &= ~wrong
        uncommitted = ok & (zone != 0) & ((cols["mark"][entries] & CONN_SOURCE_MASK) == 0)
        reasons.append(("uncommitted", uncommitted))
        ok &= ~uncommitted
        for reason, mask in reasons:
            count = int(mask.sum())
            if count:
                self.stats.filtered[reason] += count
        return ok

    def _observe(
        self,
        slots: np.ndarray,
        entries: np.ndarray,
        cols: dict[str, np.ndarray],
        dying: np.ndarray,
        now: float,
    ) -> None:
        """New counters or TCP state for known connections (`entries`: their dump
        positions); connections already ending take none."""
        rows = self._rows
        live = ~rows["dying"][slots]
        slots, entries, dying = slots[live], entries[live], dying[live]
        packets, reverse_packets = cols["orig_packets"][entries], cols["reply_packets"][entries]
        tcp_state = cols["tcp_state"][entries]
        moved = (
            (rows["packets"][slots] != packets)
            | (rows["reverse_packets"][slots] != reverse_packets)
            | (rows["tcp_state"][slots] != tcp_state)
        )
        if moved.any():
            at, where = slots[moved], entries[moved]
            rows["packets"][at], rows["octets"][at] = packets[moved], cols["orig_bytes"][where]
            rows["reverse_packets"][at] = reverse_packets[moved]
            rows["reverse_octets"][at] = cols["reply_bytes"][where]
            rows["tcp_state"][at] = tcp_state[moved]
            rows["stop_time"][at] = now
            rows["idle_expire"][at] = now + self.idle_timeout
            waiting = at[np.isnan(rows["deadline"][at])]  # idle-exported: active again
            rows["active_expire"][waiting] = now + self.active_timeout
            rows["deadline"][waiting] = min(now + self.active_timeout, now + self.idle_timeout)
        if dying.any():
            self._end(slots[dying], now, cols["stop_ns"][entries[dying]])

    def _add(
        self,
        dump: Dump,
        entries: np.ndarray,
        metas: np.ndarray,
        ids: np.ndarray,
        dying: np.ndarray,
        expiry: _Expiry,
    ) -> np.ndarray:
        """New connections for the dump's `entries`; their rows."""
        slots = self._allocate(len(entries))
        cols, rows = dump.columns, self._rows
        source, wide = dump.packed("orig_src", entries)
        destination, _ = dump.packed("reply_src", entries)
        rows["live"][slots] = True
        rows["handle"][slots] = ids
        rows["source"][slots] = source.view(np.uint8).reshape(-1, 16)
        rows["destination"][slots] = destination.view(np.uint8).reshape(-1, 16)
        rows["wide"][slots] = wide
        rows["protocol"][slots] = cols["proto"][entries]
        rows["source_port"][slots] = cols["orig_sport"][entries]
        rows["destination_port"][slots] = cols["reply_sport"][entries]
        rows["meta"][slots] = metas
        for name, column in zip(
            _COUNTERS, ("orig_packets", "orig_bytes", "reply_packets", "reply_bytes"), strict=True
        ):
            rows[name][slots] = cols[column][entries]
        rows["tcp_state"][slots] = cols["tcp_state"][entries]
        start_ns = cols["start_ns"][entries]
        rows["start_time"][slots] = np.where(start_ns != 0, start_ns / 1e9, expiry.now)
        rows["stop_time"][slots] = expiry.now
        rows["active_expire"][slots] = expiry.active
        rows["idle_expire"][slots] = expiry.idle
        rows["deadline"][slots[~dying]] = expiry.first
        if self._by_tuple is not None:
            self._index(slots, dump, entries)
        if dying.any():
            self._end(slots[dying], expiry.now, cols["stop_ns"][entries[dying]])
        return slots

    def _index(self, slots: np.ndarray, dump: Dump, entries: np.ndarray):
        """Index new tracked connections by 5-tuple for the counter path: after DNAT, and
        before it (the Service dialled) where that differs."""
        assert self._by_tuple is not None
        dialled_dst, _ = dump.packed("orig_dst", entries)
        orig_dport = dump.columns["orig_dport"][entries].tolist()
        for i, slot in enumerate(slots.tolist()):
            key = self._key(slot)
            self._by_tuple[key] = slot
            destination = bytes(dialled_dst[i])[: len(key.source)]
            port = orig_dport[i]
            if destination != key.destination or port != key.destination_port:  # DNAT
                dialled = FlowKey(key.source, destination, key.protocol, key.source_port, port)
                self._dialled[slot] = dialled
                self._by_tuple[dialled] = slot

    def _end(
        self, slots: np.ndarray, now: float, stop_ns: np.ndarray | None = None, gone=False
    ) -> None:
        """The connections ended: exported with reason 3 on the next export round."""
        rows = self._rows
        if stop_ns is not None:
            known = stop_ns != 0
            rows["stop_time"][slots[known]] = stop_ns[known] / 1e9
        if gone:
            rows["gone"][slots] = True
        ending = slots[~rows["dying"][slots]]
        rows["dying"][ending] = True
        self.stats.ended += len(ending)
        rows["deadline"][ending] = np.fmin(rows["deadline"][ending], now)

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
            slot = by_tuple.get(key)
            if slot is None:
                slot = by_tuple.get(back)
            if slot is not None:
                outcomes["matched"] += 1
                self._saw(slot, flag_bits[i], first, last, packets[i] + rev_packets[i])
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
            slot = self._untracked.get(key)
            forward = True
            if slot is None:
                slot = self._untracked.get(back)
                forward = slot is None
            if slot is None:
                slot = self._new_untracked(key, first, last, now)
                if slot is None:
                    outcomes["no_local_pod"] += 1
                    continue
            outcomes["untracked"] += 1
            counts = (packets[i], octets[i], rev_packets[i], rev_octets[i])
            if not forward:
                counts = (counts[2], counts[3], counts[0], counts[1])
            # A view: assignments go to the row. Of `self._rows` as it is now: a new
            # untracked connection may have grown it.
            row = self._rows[slot]
            for name, count in zip(_COUNTERS, counts, strict=True):
                row[name] += count
            row["stop_time"] = max(row["stop_time"], last)
            row["idle_expire"] = now + self.idle_timeout
            self._saw(slot, flag_bits[i], first, last, counts[0] + counts[2])
            if np.isnan(row["deadline"]):  # idle-exported: active again
                row["active_expire"] = now + self.active_timeout
            row["deadline"] = np.fmin(
                row["deadline"], min(row["active_expire"], row["idle_expire"])
            )
        self._publish()

    def _saw(self, slot: int, flags: int, first: float, last: float, packets: int) -> None:
        row = self._rows[slot]
        row["tcp_flags"] |= flags
        if not row["first_packet"] or first < row["first_packet"]:
            row["first_packet"] = first
        row["last_packet"] = max(row["last_packet"], last)
        row["counted_packets"] += packets

    def _new_untracked(
        self, key: FlowKey[bytes], first: float, last: float, now: float
    ) -> int | None:
        source, destination, proto, sport, dport = key
        # As conntrack would have it: no NAT, no mark, no labels (no Service, no rule).
        entry = Entry(
            proto, source, destination, sport, dport, destination, source, dport, sport,
            self.zone, 0, 0, b"", 0, 0, 0, 0, int(first * 1e9), 0, -1, 0,
        )  # fmt: skip
        meta = self.enrich(entry)
        if meta is None:
            return None
        (slot,) = self._allocate(1).tolist()
        row = self._rows[slot]
        row["live"] = row["untracked"] = True
        row["handle"] = next(self._untracked_numbers)
        row["source"] = np.frombuffer(source.ljust(16, b"\0"), np.uint8)
        row["destination"] = np.frombuffer(destination.ljust(16, b"\0"), np.uint8)
        row["wide"] = len(source) == 16
        row["protocol"], row["source_port"], row["destination_port"] = proto, sport, dport
        row["meta"] = self._meta(meta)
        row["tcp_state"] = -1
        row["start_time"], row["stop_time"] = first, last
        row["active_expire"] = now + self.active_timeout
        row["idle_expire"] = now + self.idle_timeout
        self._untracked[key] = slot
        self.stats.created += 1
        return slot

    # -- expiry ----------------------------------------------------------------------------

    def next_expiry(self) -> float | None:
        """When the next export is due (None with nothing to export)."""
        deadlines = self._rows["deadline"][: self._used]
        if not len(deadlines) or np.isnan(deadlines).all():
            return None
        return float(np.nanmin(deadlines))

    def expire(self, now: float) -> list[Export]:
        """The records due at `now`, with the store updated as if they were exported."""
        rows = self._rows
        deadlines = rows["deadline"][: self._used]
        due = np.flatnonzero(deadlines <= now)
        if not len(due):
            return []
        due = due[np.argsort(deadlines[due], kind="stable")]  # the earliest first
        out = []
        forget = []
        for slot in due.tolist():
            row = rows[slot]
            row["deadline"] = np.nan
            if row["dying"]:
                out.append(self._export(slot, END_OF_FLOW))
                row["finished"] = True
                if row["gone"]:
                    forget.append(slot)
                continue
            if row["untracked"] and row["idle_expire"] <= now:
                # Counted packets stopped coming: that flow is over.
                out.append(self._export(slot, END_IDLE))
                row["finished"] = True
                forget.append(slot)
                continue
            active_expire, idle_expire = float(row["active_expire"]), float(row["idle_expire"])
            due_at = min(active_expire, idle_expire)
            if due_at > now:
                row["deadline"] = due_at  # its idle expiry moved on since it was due
            elif idle_expire <= now:
                out.append(self._export(slot, END_IDLE))  # waits for new activity
            else:
                out.append(self._export(slot, END_ACTIVE))
                row["active_expire"] = now + self.active_timeout
                row["deadline"] = min(now + self.active_timeout, idle_expire)
        self._release(np.array(forget, np.int64))
        self._publish()
        return out

    def _compare(self, connection: Connection) -> None:
        """At its end, conntrack's count and the counter path's should agree, but for the
        packets of the connection's last moments that one saw and the other not yet (a
        poll or an eviction apart): a few, or a hundredth of a long one. Only counted from
        its start (within a second) is it comparable at all."""
        if connection.first_packet > connection.start_time + 1.0:
            return
        tracked = connection.packets + connection.reverse_packets
        if abs(tracked - connection.counted_packets) > 4 + tracked // 100:
            self.stats.disagreements += 1

    def drain(self) -> list[Export]:
        """On shutdown: every connection with something not yet exported (ended ones with
        reason 3, live ones with reason 2), so stopping the agent loses no counts."""
        rows = self._rows[: self._used]
        live = rows["live"]
        ending = live & rows["dying"] & ~rows["finished"]
        unexported = np.zeros(len(rows), bool)
        for name, exported in zip(_COUNTERS, _EXPORTED, strict=True):
            unexported |= rows[name] != rows[exported]
        out = [self._export(slot, END_OF_FLOW) for slot in np.flatnonzero(ending).tolist()]
        rows["finished"][ending] = True
        active = live & ~rows["dying"] & unexported
        out += [self._export(slot, END_ACTIVE) for slot in np.flatnonzero(active).tolist()]
        self._publish()
        return out

    def _export(self, slot: int, reason: int) -> Export:
        connection = self._connection(slot)
        if reason == END_OF_FLOW and connection.counted_packets and not connection.untracked:
            self._compare(connection)
        packets, octets, reverse_packets, reverse_octets = connection.exported
        export = Export(
            connection,
            reason,
            connection.packets,
            connection.octets,
            connection.reverse_packets,
            connection.reverse_octets,
            max(0, connection.packets - packets),
            max(0, connection.octets - octets),
            max(0, connection.reverse_packets - reverse_packets),
            max(0, connection.reverse_octets - reverse_octets),
            connection.stop_time,
        )
        row = self._rows[slot]
        for name, exported in zip(_COUNTERS, _EXPORTED, strict=True):
            row[exported] = row[name]
        self.stats.exported[reason] += 1
        return export
