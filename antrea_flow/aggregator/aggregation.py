"""Correlation and aggregation of the flow records of both Nodes of each connection.

Records are keyed by 5-tuple. A record from a source Node knows the source Pod and the
egress policy; one from the destination Node knows the destination Pod and the ingress
policy. Upstream's rules (Antrea's flow aggregator):
- An inter-node record waits for the other Node's half; the two are merged into one record
  with both sides' Pod, Node and policy fields. Intra-node records, and records whose egress
  action is Drop or Reject (no packet reached the other Node), need no peer.
- Each side's counters are kept (`...FromSourceNode`, `...FromDestinationNode`: totals as
  reported, deltas summed since the last export), with each side's throughput in bits/s from
  consecutive records; the common totals are the larger side's, the common throughput the
  latest record's, and the common deltas what the common totals grew since the last export
  (so they add up to the totals whichever Node reported last).
- A flow is exported every `export_interval` while it receives records, with deltas since
  its previous export; flowEndReason 3 (end of flow) is kept once seen; a flow with no record
  for `inactive_timeout` is removed.

Better than upstream:
- identity fields (Pods, Nodes, Service, policies) missing from a record are filled from any
  later half, so a late half still completes it;
- a half whose peer never arrives is exported after `correlation_timeout`, flagged incomplete
  (and counted), not dropped;
- a flow that ended is exported at once rather than at its next interval;
- a repeated record (same side, end time and totals) is ignored, while two records of one
  second with different counts both count;
- a new connection on the 5-tuple of one that ended (fixed-port UDP, fast reconnects) is a
  new flow: a side's record with another start time, lower totals after the end of flow, or
  the other side's first record starting after that end. The old flow is exported first if
  it has something unexported;
- a throughput an unsigned64 cannot carry is clamped (and counted), never a dropped record.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

from ..codes import ACTION_DROP, ACTION_REJECT, END_OF_FLOW, FLOW_TYPE_INTER_NODE
from ..flowkey import FlowKey, make_key
from ..ipfix.antrea import (
    DELTAS,
    TOTALS,
    FlowRecord,
)

# Filled from whichever half carries them; never overwritten with an empty value.
# One flat Literal: mypy takes a union of Literal aliases for no literal key.
IdentityName = Literal[
    "sourcePodName", "sourcePodNamespace", "sourceNodeName", "destinationPodName",
    "destinationPodNamespace", "destinationNodeName", "destinationServicePort",
    "destinationServicePortName", "ingressNetworkPolicyName", "ingressNetworkPolicyNamespace",
    "ingressNetworkPolicyType", "ingressNetworkPolicyRuleName", "ingressNetworkPolicyRuleAction",
    "egressNetworkPolicyName", "egressNetworkPolicyNamespace", "egressNetworkPolicyType",
    "egressNetworkPolicyRuleName", "egressNetworkPolicyRuleAction",
    "destinationClusterIPv4", "destinationClusterIPv6",
]  # fmt: skip
IDENTITY_FIELDS: tuple[IdentityName, ...] = get_args(IdentityName)
_EMPTY = (None, "", 0, "0.0.0.0", "::")
MAX_UNSIGNED64 = (1 << 64) - 1
# One shared tuple for the common case rather than one per flow (75k flows, 75k tuples the
# garbage collector walks).
_NOTHING_BEFORE = (0, 0, 0, 0)
ThroughputName = Literal[
    "throughput",
    "throughputFromSourceNode",
    "throughputFromDestinationNode",
    "reverseThroughput",
    "reverseThroughputFromSourceNode",
    "reverseThroughputFromDestinationNode",
]
_THROUGHPUTS: tuple[ThroughputName, ...] = get_args(ThroughputName)
SIDES = ("SourceNode", "DestinationNode")
SideFieldName = Literal[
    "packetTotalCountFromSourceNode", "octetTotalCountFromSourceNode",
    "reversePacketTotalCountFromSourceNode", "reverseOctetTotalCountFromSourceNode",
    "packetDeltaCountFromSourceNode", "octetDeltaCountFromSourceNode",
    "reversePacketDeltaCountFromSourceNode", "reverseOctetDeltaCountFromSourceNode",
    "flowEndSecondsFromSourceNode", "throughputFromSourceNode",
    "reverseThroughputFromSourceNode",
    "packetTotalCountFromDestinationNode", "octetTotalCountFromDestinationNode",
    "reversePacketTotalCountFromDestinationNode", "reverseOctetTotalCountFromDestinationNode",
    "packetDeltaCountFromDestinationNode", "octetDeltaCountFromDestinationNode",
    "reversePacketDeltaCountFromDestinationNode", "reverseOctetDeltaCountFromDestinationNode",
    "flowEndSecondsFromDestinationNode", "throughputFromDestinationNode",
    "reverseThroughputFromDestinationNode",
]  # fmt: skip
# Per-Node IEs of each side (source first, in _SIDE_ATTRIBUTES' order), paired with the
# _SideStats attribute each is read from.
_SIDE_ATTRIBUTES = (
    "packets", "octets", "reverse_packets", "reverse_octets",
    "d_packets", "d_octets", "d_reverse_packets", "d_reverse_octets",
    "end", "throughput", "reverse_throughput",
)  # fmt: skip
_SIDE_NAMES: tuple[SideFieldName, ...] = get_args(SideFieldName)
_SIDE_FIELDS: dict[str, tuple[tuple[SideFieldName, str], ...]] = {
    "SourceNode": tuple(zip(_SIDE_NAMES[:11], _SIDE_ATTRIBUTES, strict=True)),
    "DestinationNode": tuple(zip(_SIDE_NAMES[11:], _SIDE_ATTRIBUTES, strict=True)),
}


def flow_key(record: FlowRecord) -> FlowKey[str | None]:
    return make_key(
        FlowKey,
        (
            record.get("sourceIPv4Address") or record.get("sourceIPv6Address"),
            record.get("destinationIPv4Address") or record.get("destinationIPv6Address"),
            record.get("protocolIdentifier", 0),
            record.get("sourceTransportPort", 0),
            record.get("destinationTransportPort", 0),
        ),
    )


def _side(record: FlowRecord) -> tuple[str, ...]:
    """Which Node(s) the record speaks for."""
    source = bool(record.get("sourcePodName"))
    destination = bool(record.get("destinationPodName"))
    if source and not destination:
        return ("SourceNode",)
    if destination and not source:
        return ("DestinationNode",)
    return SIDES  # intra-node (both Pods), or a record with neither: it speaks for both


class _SideStats:
    """One Node's view of a flow: its latest totals, its deltas since the last export, the
    end time of its latest record and its throughput (bits/s) between its records."""

    __slots__ = (
        "packets", "octets", "reverse_packets", "reverse_octets",
        "d_packets", "d_octets", "d_reverse_packets", "d_reverse_octets",
        "start", "end", "throughput", "reverse_throughput",
    )  # fmt: skip

    def __init__(self, record: FlowRecord):
        self.start = start = record.get("flowStartSeconds", 0)  # this Node's, of its connection
        self.packets = record.get("packetTotalCount", 0)
        self.octets = octets = record.get("octetTotalCount", 0)
        self.reverse_packets = record.get("reversePacketTotalCount", 0)
        self.reverse_octets = reverse_octets = record.get("reverseOctetTotalCount", 0)
        self.d_packets = record.get("packetDeltaCount", 0)
        self.d_octets = record.get("octetDeltaCount", 0)
        self.d_reverse_packets = record.get("reversePacketDeltaCount", 0)
        self.d_reverse_octets = record.get("reverseOctetDeltaCount", 0)
        self.end = end = record.get("flowEndSeconds", 0)
        self.throughput = _throughput(octets, end - start)
        self.reverse_throughput = _throughput(reverse_octets, end - start)

    def reported_before(self) -> tuple[int, int, int, int]:
        """The totals this Node had reported before its first record here: totals less
        deltas (of that first record: call it before `update`). Usually nothing: a
        connection's first record's deltas are its totals."""
        packets, octets = self.packets - self.d_packets, self.octets - self.d_octets
        reverse_packets = self.reverse_packets - self.d_reverse_packets
        reverse_octets = self.reverse_octets - self.d_reverse_octets
        if not (packets or octets or reverse_packets or reverse_octets):
            return _NOTHING_BEFORE
        return (
            packets if packets > 0 else 0,
            octets if octets > 0 else 0,
            reverse_packets if reverse_packets > 0 else 0,
            reverse_octets if reverse_octets > 0 else 0,
        )

    def lower_totals(self, record: FlowRecord) -> bool:
        """The record counts less than this side did: a connection that began again."""
        return (
            record.get("packetTotalCount", 0) < self.packets
            or record.get("octetTotalCount", 0) < self.octets
        )

    def same_totals(self, record: FlowRecord) -> bool:
        return (
            record.get("packetTotalCount", 0) == self.packets
            and record.get("octetTotalCount", 0) == self.octets
            and record.get("reversePacketTotalCount", 0) == self.reverse_packets
            and record.get("reverseOctetTotalCount", 0) == self.reverse_octets
        )

    def update(self, record: FlowRecord) -> None:
        """A later record of this side: totals replaced, deltas summed, throughput since
        the previous record."""
        end = record.get("flowEndSeconds", 0)
        span = end - self.end
        octets, reverse_octets = (
            record.get("octetTotalCount", 0),
            record.get("reverseOctetTotalCount", 0),
        )
        if span > 0:
            self.throughput = _throughput(octets - self.octets, span)
            self.reverse_throughput = _throughput(reverse_octets - self.reverse_octets, span)
        self.packets, self.octets = record.get("packetTotalCount", 0), octets
        self.reverse_packets, self.reverse_octets = (
            record.get("reversePacketTotalCount", 0),
            reverse_octets,
        )
        self.d_packets += record.get("packetDeltaCount", 0)
        self.d_octets += record.get("octetDeltaCount", 0)
        self.d_reverse_packets += record.get("reversePacketDeltaCount", 0)
        self.d_reverse_octets += record.get("reverseOctetDeltaCount", 0)
        self.end = end

    def exported(self) -> None:
        self.d_packets = self.d_octets = self.d_reverse_packets = self.d_reverse_octets = 0
        self.throughput = self.reverse_throughput = 0

    def set_common(self, merged: FlowRecord) -> None:
        """The common counters follow the latest record's side; totals never go down."""
        for name, value in zip(
            TOTALS,
            (self.packets, self.octets, self.reverse_packets, self.reverse_octets),
            strict=True,
        ):
            if value > merged.get(name, 0):
                merged[name] = value
        merged["packetDeltaCount"], merged["octetDeltaCount"] = self.d_packets, self.d_octets
        merged["reversePacketDeltaCount"] = self.d_reverse_packets
        merged["reverseOctetDeltaCount"] = self.d_reverse_octets
        merged["throughput"], merged["reverseThroughput"] = (
            self.throughput,
            self.reverse_throughput,
        )


@dataclass(slots=True, eq=False)
class Flow:
    key: FlowKey[str | None]
    record: FlowRecord  # the merged record (IE names), common counters included
    source: _SideStats | None  # None until a record of that side arrived
    destination: _SideStats | None  # (one object for both when records are intra-node)
    needs_peer: bool
    ready: bool
    incomplete: bool = False
    updated: bool = True
    first_seen: float = 0.0
    last_update: float = 0.0
    next_export: float = 0.0
    exporter: tuple[str, int] = ("", 0)  # (address, observation domain) of the latest record
    # The common totals at the previous export: the next export's common deltas are what
    # the totals grew since, whichever Node's record made them grow.
    exported_totals: tuple[int, ...] = _NOTHING_BEFORE
    heap_deadline: float | None = None
    # (exporter, sequence number) of the records it holds that no export carried yet.
    pending: list[tuple[tuple[str, int], int]] | None = None

    @property
    def both_sides(self) -> bool:
        return self.source is not None and self.destination is not None


@dataclass(slots=True)
class AggregationStats:
    received: int = 0
    ignored: Counter[str] = field(default_factory=Counter)  # records not aggregated, by reason
    correlated: int = 0
    correlation_timeouts: int = 0
    new_connections: int = 0  # flows replaced by a new connection on their 5-tuple
    # Flows let go to stay within max_flows, by outcome: "exported" early (they held
    # records not exported yet, waiting ones exported incomplete), "idle" (nothing to lose).
    evicted: Counter[str] = field(default_factory=Counter)
    exported: int = 0
    removed: int = 0
    clamped: Counter[str] = field(default_factory=Counter)  # exported values, by element


def _needs_peer(record: FlowRecord, sides: tuple[str, ...]) -> bool:
    """As upstream: an inter-node half waits for the other, unless the outcome is decided.
    An egress deny never reached the other Node; an ingress Reject's source half is a
    connection the kernel removes at the RST, before any poll can see it."""
    if record.get("flowType") != FLOW_TYPE_INTER_NODE:
        return False
    if record.get("egressNetworkPolicyRuleAction") in (ACTION_DROP, ACTION_REJECT):
        return False
    if record.get("ingressNetworkPolicyRuleAction") == ACTION_REJECT:
        return False
    return len(sides) == 1


def _throughput(octets: int, seconds: int) -> int:
    return octets * 8 // seconds if seconds > 0 else 0


def _ended(flow: Flow) -> bool:
    return flow.record.get("flowEndReason") == END_OF_FLOW


def _new_connection(flow: Flow, record: FlowRecord, sides: tuple[str, ...]) -> bool:
    """Whether `record` (speaking for `sides`) is of another connection than `flow`, on the
    same 5-tuple."""
    start = record.get("flowStartSeconds", 0)
    for side in sides:
        stats = flow.source if side == "SourceNode" else flow.destination
        if stats is not None:
            # A Node reports one start time per connection; after the end of flow, lower
            # totals tell a connection that began again within the same second.
            return start != stats.start or (_ended(flow) and stats.lower_totals(record))
    # The first record of this side: a new connection if it began after the flow ended.
    return _ended(flow) and start > flow.record.get("flowEndSeconds", 0)


DEFAULT_MAX_FLOWS = 1_000_000


class AggregationStore:
    """Flows being aggregated; all timing from the `now` the caller passes.

    At most `max_flows` are held: a new flow beyond it lets the oldest one go (the first
    created of those held), exporting at once what it had not exported yet, so the bound
    costs an early export, never a record."""

    def __init__(
        self,
        export_interval: float,
        inactive_timeout: float,
        correlation_timeout: float,
        max_flows: int = DEFAULT_MAX_FLOWS,
    ):
        self.export_interval = export_interval
        self.inactive_timeout = inactive_timeout
        self.correlation_timeout = correlation_timeout
        self.max_flows = max_flows
        self.stats = AggregationStats()
        self._flows: dict[tuple, Flow] = {}
        # Flows in the order they were created, the oldest first; some may be gone already
        # (skipped when met, and the deque rebuilt when they outnumber the flows held).
        self._age: deque[Flow] = deque()
        self._heap: list[tuple[float, int, Flow]] = []
        self._sequence = itertools.count()
        self._waiting = 0
        # Records of flows a new connection replaced, exported by the next `expire`.
        self._retired: list[FlowRecord] = []
        self._retired_at: float | None = None
        self._pending: dict[tuple[str, int], set[int]] = {}
        # The sequence numbers exports carried since the last `take_carried`: pending until
        # the sinks settle those exports.
        self._carried: list[tuple[tuple[str, int], int]] = []

    def __len__(self) -> int:
        return len(self._flows)

    def pending(self) -> dict[tuple[str, int], frozenset[int]]:
        """By exporter, the sequence numbers of the records not yet carried by an export
        that was `settle`d: what a restarted aggregator needs from a replay (the rest it
        exported, or ignored)."""
        return {exporter: frozenset(seqs) for exporter, seqs in self._pending.items() if seqs}

    def take_carried(self) -> list[tuple[tuple[str, int], int]]:
        """The (exporter, sequence number) pairs exports carried since the last call."""
        carried, self._carried = self._carried, []
        return carried

    def settle(self, carried: Iterable[tuple[tuple[str, int], int]]) -> None:
        """What `take_carried` returned is in the sinks' hands: no longer pending."""
        pending = self._pending
        for exporter, sequence in carried:
            pending[exporter].discard(sequence)

    @property
    def waiting(self) -> int:
        """Flows waiting for the other Node's half (kept as flows change: O(1))."""
        return self._waiting

    def get(self, key: FlowKey) -> Flow | None:
        return self._flows.get(key)

    # -- intake ----------------------------------------------------------------------------

    def add(
        self,
        record: FlowRecord,
        exporter: tuple[str, int],
        now: float,
        sequence: int | None = None,
    ) -> None:
        """Aggregate one record from an agent (IE names to values); `sequence` is its
        number in the exporter's stream, kept until an export carried it (see `pending`)."""
        self.stats.received += 1
        key = flow_key(record)
        if key.source is None or key.destination is None:
            self.stats.ignored["no_addresses"] += 1
            return
        flow = self._flows.get(key)
        sides = _side(record)
        if flow is not None and _new_connection(flow, record, sides):
            self._retire(flow, now)
            flow = None
        if flow is None:
            flow = self._create(key, record, sides, exporter, now)
        elif not self._aggregate(flow, record, sides):
            return
        else:
            self._updated(flow, record, exporter, now)
        if sequence is not None:
            if flow.pending is None:
                flow.pending = []
            flow.pending.append((exporter, sequence))
            held = self._pending.get(exporter)
            if held is None:
                held = self._pending[exporter] = set()
            held.add(sequence)

    def _updated(self, flow: Flow, record: FlowRecord, exporter: tuple[str, int], now: float):
        flow.exporter = exporter
        flow.last_update = now
        flow.updated = True
        if flow.both_sides:
            if not flow.ready:
                self._set_ready(flow)
                self.stats.correlated += 1
            flow.incomplete = False
        if flow.ready:
            if record.get("flowEndReason") == END_OF_FLOW:
                flow.next_export = min(flow.next_export, now)  # the final record, at once
            self._schedule(flow, max(flow.next_export, now))

    def _create(
        self,
        key: FlowKey[str | None],
        record: FlowRecord,
        sides: tuple[str, ...],
        exporter: tuple[str, int],
        now: float,
    ) -> Flow:
        stats = _SideStats(record)
        needs_peer = _needs_peer(record, sides)
        if len(self._flows) >= self.max_flows:
            self._evict_oldest(now)
        flow = Flow(
            key,
            record.copy(),
            stats if "SourceNode" in sides else None,
            stats if "DestinationNode" in sides else None,
            needs_peer,
            not needs_peer,
            first_seen=now,
            last_update=now,
            next_export=now,
            exporter=exporter,
            # What was reported before this record is not this flow's to count again (an
            # aggregator that started while the connection was under way).
            exported_totals=stats.reported_before(),
        )
        self._flows[key] = flow
        age = self._age
        age.append(flow)
        if len(age) > 2 * len(self._flows) + 1024:
            self._age = deque(self._flows.values())  # a dict keeps its creation order
        if needs_peer:
            self._waiting += 1
        stats.set_common(flow.record)
        self._schedule(flow, now if flow.ready else now + self.correlation_timeout)
        return flow

    def _set_ready(self, flow: Flow, incomplete: bool = False) -> None:
        """The flow stops waiting for its peer: it found it, or it goes out without it."""
        flow.ready = True
        self._waiting -= 1
        if incomplete:
            flow.incomplete = True
            self.stats.correlation_timeouts += 1

    def _retire(self, flow: Flow, now: float) -> None:
        """A new connection takes the flow's 5-tuple: what the flow has not exported yet
        goes out with the next `expire`, and the flow is forgotten."""
        del self._flows[flow.key]
        self.stats.new_connections += 1
        if not flow.ready:
            self._set_ready(flow, incomplete=True)
        if flow.updated:
            self._export_soon(flow, now)

    def _export_soon(self, flow: Flow, now: float) -> None:
        """The flow's last record, for the next `expire` (the flow is no longer held)."""
        self._retired.append(self._export(flow, now))
        if self._retired_at is None:
            self._retired_at = now

    def _evict_oldest(self, now: float) -> None:
        """Let the oldest flow held go; what it had not exported goes out with the next
        `expire`, as a retired flow's does."""
        flows, age = self._flows, self._age
        while age:
            flow = age.popleft()
            if flows.get(flow.key) is flow:
                break
        else:
            return
        del flows[flow.key]
        if not flow.ready:  # out without its peer; not a correlation timeout
            flow.ready = flow.incomplete = True
            self._waiting -= 1
        if flow.updated:
            self.stats.evicted["exported"] += 1
            self._export_soon(flow, now)
        else:
            self.stats.evicted["idle"] += 1

    def _aggregate(self, flow: Flow, record: FlowRecord, sides: tuple[str, ...]) -> bool:
        """Merge a later record of the flow; False when it was ignored (a repeat or stale)."""
        merged = flow.record
        end = record.get("flowEndSeconds", 0)
        applied = None
        for side in sides:
            stats = flow.source if side == "SourceNode" else flow.destination
            if stats is None:
                stats = _SideStats(record)
                if side == "SourceNode":
                    flow.source = stats
                else:
                    flow.destination = stats
                before = stats.reported_before()
                if before is not _NOTHING_BEFORE:
                    flow.exported_totals = tuple(map(max, flow.exported_totals, before))
            elif stats is applied:
                continue  # an intra-node flow's two sides are one object
            elif end < stats.end or (end == stats.end and stats.same_totals(record)):
                continue  # older than what this side reported, or the same record again
            else:
                stats.update(record)
            applied = stats
            for name, value in zip(
                TOTALS,
                (stats.packets, stats.octets, stats.reverse_packets, stats.reverse_octets),
                strict=True,
            ):
                if value > merged.get(name, 0):
                    merged[name] = value
        if applied is None:
            self.stats.ignored["repeated_or_stale"] += 1
            return False
        for identity in IDENTITY_FIELDS:
            known = record.get(identity)
            if known not in _EMPTY and merged.get(identity) in _EMPTY:
                merged[identity] = known
        reason = record.get("flowEndReason")
        if reason is not None and merged.get("flowEndReason") != END_OF_FLOW:
            merged["flowEndReason"] = reason
        # What agents with the counter path saw of the packets, from either Node.
        merged["tcpControlBits"] = merged.get("tcpControlBits", 0) | record.get("tcpControlBits", 0)
        start_ms = record.get("flowStartMilliseconds", 0)
        if start_ms and not 0 < merged.get("flowStartMilliseconds", 0) <= start_ms:
            merged["flowStartMilliseconds"] = start_ms
        if record.get("flowEndMilliseconds", 0) > merged.get("flowEndMilliseconds", 0):
            merged["flowEndMilliseconds"] = record["flowEndMilliseconds"]
        if end >= merged.get("flowEndSeconds", 0):
            merged["flowEndSeconds"] = end
            merged["tcpState"] = record.get("tcpState", merged.get("tcpState", ""))
            applied.set_common(merged)
        return True

    # -- expiry ----------------------------------------------------------------------------

    def _schedule(self, flow: Flow, deadline: float) -> None:
        if flow.heap_deadline is not None and flow.heap_deadline <= deadline:
            return
        flow.heap_deadline = deadline
        heapq.heappush(self._heap, (deadline, next(self._sequence), flow))

    def next_event(self) -> float | None:
        """When `expire` has something to do next (None: nothing is scheduled)."""
        heap = self._heap
        while heap and heap[0][2].heap_deadline != heap[0][0]:
            heapq.heappop(heap)
        due = heap[0][0] if heap else None
        if self._retired_at is not None:
            return self._retired_at if due is None else min(due, self._retired_at)
        return due

    def _take_retired(self) -> list[FlowRecord]:
        out, self._retired, self._retired_at = self._retired, [], None
        return out

    def expire(self, now: float, limit: int | None = None) -> list[FlowRecord]:
        """Records to export now (aggregated, with per-Node counters and provenance); at
        most `limit` (besides those of flows a new connection replaced), the rest stay due
        for the next call."""
        out = self._take_retired()
        heap = self._heap
        while heap and heap[0][0] <= now and (limit is None or len(out) < limit):
            deadline, _, flow = heapq.heappop(heap)
            if flow.heap_deadline != deadline:
                continue
            flow.heap_deadline = None
            if self._flows.get(flow.key) is not flow:
                continue
            if not flow.ready:
                if now - flow.first_seen >= self.correlation_timeout:
                    self._set_ready(flow, incomplete=True)
                else:
                    self._schedule(flow, flow.first_seen + self.correlation_timeout)
                    continue
            if flow.updated and now >= flow.next_export:
                out.append(self._export(flow, now))
            if now - flow.last_update >= self.inactive_timeout and not flow.updated:
                del self._flows[flow.key]
                self.stats.removed += 1
                continue
            if flow.updated:
                self._schedule(flow, max(flow.next_export, now))
            else:
                self._schedule(flow, flow.last_update + self.inactive_timeout)
        return out

    def drain(self, now: float) -> list[FlowRecord]:
        """On shutdown: every flow updated since its last export, waiting ones included
        (flagged incomplete), so stopping loses nothing received."""
        out = self._take_retired()
        for flow in self._flows.values():
            if not flow.ready:
                self._set_ready(flow)
                flow.incomplete = True
            if flow.updated:
                out.append(self._export(flow, now))
        return out

    def _export(self, flow: Flow, now: float) -> FlowRecord:
        record = flow.record.copy()
        for side, stats in (("SourceNode", flow.source), ("DestinationNode", flow.destination)):
            for side_field, attribute in _SIDE_FIELDS[side]:
                record[side_field] = getattr(stats, attribute) if stats is not None else 0
        address, domain = flow.exporter
        record[
            "originalExporterIPv6Address" if ":" in address else "originalExporterIPv4Address"
        ] = address
        record["originalObservationDomainId"] = domain
        record["incomplete"] = flow.incomplete
        # Agents without the counter path say when to the second.
        if not record.get("flowStartMilliseconds"):
            record["flowStartMilliseconds"] = record.get("flowStartSeconds", 0) * 1000
        end_ms = record.get("flowEndSeconds", 0) * 1000
        if record.get("flowEndMilliseconds", 0) < end_ms:
            record["flowEndMilliseconds"] = end_ms
        for rate in _THROUGHPUTS:
            value = record.get(rate, 0)
            if not 0 <= value <= MAX_UNSIGNED64:
                record[rate] = 0 if value < 0 else MAX_UNSIGNED64
                self.stats.clamped[rate] += 1
        totals = tuple(record.get(total, 0) for total in TOTALS)
        for delta, total, before in zip(DELTAS, totals, flow.exported_totals, strict=True):
            record[delta] = max(0, total - before)
        flow.exported_totals = tuple(map(max, totals, flow.exported_totals))
        # The next export reports what comes after this one.
        for stats in {id(s): s for s in (flow.source, flow.destination) if s is not None}.values():
            stats.exported()
        merged = flow.record
        for delta in DELTAS:
            merged[delta] = 0
        merged["throughput"] = merged["reverseThroughput"] = 0
        flow.updated = False
        flow.next_export = now + self.export_interval
        if flow.pending is not None:
            self._carried += flow.pending
            flow.pending = None
        self.stats.exported += 1
        return record
