"""Correlation and aggregation of the flow records of both Nodes of each connection.

Records are keyed by 5-tuple. A record from a source Node knows the source Pod and the
egress policy; one from the destination Node knows the destination Pod and the ingress
policy. Upstream's rules (Antrea's flow aggregator):
- An inter-node record waits for the other Node's half; the two are merged into one record
  with both sides' Pod, Node and policy fields. Intra-node records, and records whose egress
  action is Drop or Reject (no packet reached the other Node), need no peer.
- Each side's counters are kept (`...FromSourceNode`, `...FromDestinationNode`: totals as
  reported, deltas summed since the last export), with each side's throughput in bits/s from
  consecutive records; the common counters follow the latest record.
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
  second with different counts both count.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

FLOW_TYPE_INTER_NODE = 2
ACTION_DROP = 2
ACTION_REJECT = 3
END_OF_FLOW = 3

# Filled from whichever half carries them; never overwritten with an empty value.
IDENTITY_FIELDS = (
    "sourcePodName",
    "sourcePodNamespace",
    "sourceNodeName",
    "destinationPodName",
    "destinationPodNamespace",
    "destinationNodeName",
    "destinationClusterIPv4",
    "destinationClusterIPv6",
    "destinationServicePort",
    "destinationServicePortName",
    "ingressNetworkPolicyName",
    "ingressNetworkPolicyNamespace",
    "ingressNetworkPolicyType",
    "ingressNetworkPolicyRuleName",
    "ingressNetworkPolicyRuleAction",
    "egressNetworkPolicyName",
    "egressNetworkPolicyNamespace",
    "egressNetworkPolicyType",
    "egressNetworkPolicyRuleName",
    "egressNetworkPolicyRuleAction",
)
_EMPTY = (None, "", 0, "0.0.0.0", "::")
_COUNTERS = ("packet", "octet", "reversePacket", "reverseOctet")
SIDES = ("SourceNode", "DestinationNode")


def flow_key(record: dict[str, Any]) -> tuple:
    source = record.get("sourceIPv4Address") or record.get("sourceIPv6Address")
    destination = record.get("destinationIPv4Address") or record.get("destinationIPv6Address")
    return (
        source,
        destination,
        record.get("protocolIdentifier", 0),
        record.get("sourceTransportPort", 0),
        record.get("destinationTransportPort", 0),
    )


def _side(record: dict[str, Any]) -> tuple[str, ...]:
    """Which Node(s) the record speaks for."""
    source = bool(record.get("sourcePodName"))
    destination = bool(record.get("destinationPodName"))
    if source and not destination:
        return ("SourceNode",)
    if destination and not source:
        return ("DestinationNode",)
    return SIDES  # intra-node (both Pods), or a record with neither: it speaks for both


@dataclass(slots=True)
class _SideStats:
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))
    deltas: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))
    end: int = 0  # flowEndSeconds of its latest record
    throughput: int = 0
    reverse_throughput: int = 0
    seen: bool = False


@dataclass(slots=True, eq=False)
class Flow:
    key: tuple
    record: dict[str, Any]  # the merged record (IE names), common counters included
    sides: dict[str, _SideStats]
    needs_peer: bool
    ready: bool
    incomplete: bool = False
    updated: bool = True
    first_seen: float = 0.0
    last_update: float = 0.0
    next_export: float = 0.0
    exporter: tuple[str, int] = ("", 0)  # (address, observation domain) of the latest record
    heap_deadline: float | None = None


@dataclass(slots=True)
class AggregationStats:
    received: int = 0
    ignored: Counter[str] = field(default_factory=Counter)  # records not aggregated, by reason
    correlated: int = 0
    correlation_timeouts: int = 0
    exported: int = 0
    removed: int = 0


def _needs_peer(record: dict[str, Any]) -> bool:
    """As upstream: an inter-node half waits for the other, unless the outcome is decided.
    An egress deny never reached the other Node; an ingress Reject's source half is a
    connection the kernel removes at the RST, before any poll can see it."""
    if record.get("flowType") != FLOW_TYPE_INTER_NODE:
        return False
    if record.get("egressNetworkPolicyRuleAction") in (ACTION_DROP, ACTION_REJECT):
        return False
    if record.get("ingressNetworkPolicyRuleAction") == ACTION_REJECT:
        return False
    return len(_side(record)) == 1


def _throughput(octets: int, seconds: int) -> int:
    return octets * 8 // seconds if seconds > 0 else 0


class AggregationStore:
    """Flows being aggregated; all timing from the `now` the caller passes."""

    def __init__(self, export_interval: float, inactive_timeout: float, correlation_timeout: float):
        self.export_interval = export_interval
        self.inactive_timeout = inactive_timeout
        self.correlation_timeout = correlation_timeout
        self.stats = AggregationStats()
        self._flows: dict[tuple, Flow] = {}
        self._heap: list[tuple[float, int, Flow]] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._flows)

    @property
    def waiting(self) -> int:
        """Flows waiting for the other Node's half."""
        return sum(1 for f in self._flows.values() if not f.ready)

    def get(self, key: tuple) -> Flow | None:
        return self._flows.get(key)

    # -- intake ----------------------------------------------------------------------------

    def add(self, record: dict[str, Any], exporter: tuple[str, int], now: float) -> None:
        """Aggregate one record from an agent (IE names to values)."""
        self.stats.received += 1
        key = flow_key(record)
        if key[0] is None or key[1] is None:
            self.stats.ignored["no_addresses"] += 1
            return
        flow = self._flows.get(key)
        if flow is None:
            self._create(key, record, exporter, now)
            return
        if not self._aggregate(flow, record):
            return
        flow.exporter = exporter
        flow.last_update = now
        flow.updated = True
        if not flow.ready and self._has_both_sides(flow):
            flow.ready = True
            self.stats.correlated += 1
        if flow.incomplete and self._has_both_sides(flow):
            flow.incomplete = False
        if flow.ready:
            if record.get("flowEndReason") == END_OF_FLOW:
                flow.next_export = min(flow.next_export, now)  # the final record, at once
            self._schedule(flow, max(flow.next_export, now))

    def _create(self, key: tuple, record: dict[str, Any], exporter: tuple[str, int], now: float):
        sides = {s: _SideStats() for s in SIDES}
        flow = Flow(
            key=key,
            record=dict(record),
            sides=sides,
            needs_peer=_needs_peer(record),
            ready=False,
            first_seen=now,
            last_update=now,
            next_export=now,
            exporter=exporter,
        )
        for side in _side(record):
            stats = sides[side]
            stats.seen = True
            self._take_counters(stats, record)
            start = record.get("flowStartSeconds", 0)
            stats.throughput = _throughput(stats.totals["octet"], stats.end - start)
            stats.reverse_throughput = _throughput(stats.totals["reverseOctet"], stats.end - start)
        flow.ready = not flow.needs_peer
        self._flows[key] = flow
        self._set_common(flow, _side(record)[0])
        self._schedule(flow, now if flow.ready else now + self.correlation_timeout)

    @staticmethod
    def _take_counters(stats: _SideStats, record: dict[str, Any]) -> None:
        for name in _COUNTERS:
            stats.totals[name] = record.get(f"{name}TotalCount", 0)
            stats.deltas[name] += record.get(f"{name}DeltaCount", 0)
        stats.end = record.get("flowEndSeconds", 0)

    def _aggregate(self, flow: Flow, record: dict[str, Any]) -> bool:
        """Merge a later record of the flow; False when it was ignored (a repeat or stale)."""
        merged = flow.record
        end = record.get("flowEndSeconds", 0)
        sides = _side(record)
        applied = False
        for side in sides:
            stats = flow.sides[side]
            if stats.seen:
                if end < stats.end:
                    continue  # older than what this side already reported
                if end == stats.end and all(
                    record.get(f"{n}TotalCount", 0) == stats.totals[n] for n in _COUNTERS
                ):
                    continue  # the same record again
                previous_end, previous_octets = stats.end, stats.totals["octet"]
                previous_reverse = stats.totals["reverseOctet"]
            else:
                previous_end = record.get("flowStartSeconds", 0)
                previous_octets = previous_reverse = 0
            self._take_counters(stats, record)
            stats.seen = True
            span = end - previous_end
            if span > 0:
                stats.throughput = _throughput(stats.totals["octet"] - previous_octets, span)
                stats.reverse_throughput = _throughput(
                    stats.totals["reverseOctet"] - previous_reverse, span
                )
            applied = True
            for name in _COUNTERS:
                key = f"{name}TotalCount"
                merged[key] = max(merged.get(key, 0), stats.totals[name])
        if not applied:
            self.stats.ignored["repeated_or_stale"] += 1
            return False
        for name in IDENTITY_FIELDS:
            value = record.get(name)
            if value not in _EMPTY and merged.get(name) in _EMPTY:
                merged[name] = value
        if merged.get("flowEndReason") != END_OF_FLOW:
            merged["flowEndReason"] = record.get("flowEndReason", merged.get("flowEndReason"))
        if end >= merged.get("flowEndSeconds", 0):
            merged["flowEndSeconds"] = end
            merged["tcpState"] = record.get("tcpState", merged.get("tcpState", ""))
            self._set_common(flow, sides[0])
        return True

    @staticmethod
    def _set_common(flow: Flow, side: str) -> None:
        """The common counters follow the latest record's side."""
        stats, merged = flow.sides[side], flow.record
        for name in _COUNTERS:
            merged[f"{name}TotalCount"] = max(
                merged.get(f"{name}TotalCount", 0), stats.totals[name]
            )
            merged[f"{name}DeltaCount"] = stats.deltas[name]
        merged["throughput"] = stats.throughput
        merged["reverseThroughput"] = stats.reverse_throughput

    @staticmethod
    def _has_both_sides(flow: Flow) -> bool:
        return all(flow.sides[s].seen for s in SIDES)

    # -- expiry ----------------------------------------------------------------------------

    def _schedule(self, flow: Flow, deadline: float) -> None:
        if flow.heap_deadline is not None and flow.heap_deadline <= deadline:
            return
        flow.heap_deadline = deadline
        heapq.heappush(self._heap, (deadline, next(self._sequence), flow))

    def next_event(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].heap_deadline != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expire(self, now: float) -> list[dict[str, Any]]:
        """Records to export now (aggregated, with per-Node counters and provenance)."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, flow = heapq.heappop(heap)
            if flow.heap_deadline != deadline:
                continue
            flow.heap_deadline = None
            if self._flows.get(flow.key) is not flow:
                continue
            if not flow.ready:
                if now - flow.first_seen >= self.correlation_timeout:
                    flow.ready = True
                    flow.incomplete = True
                    self.stats.correlation_timeouts += 1
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

    def drain(self, now: float) -> list[dict[str, Any]]:
        """On shutdown: every flow updated since its last export, waiting ones included
        (flagged incomplete), so stopping loses nothing received."""
        out = []
        for flow in self._flows.values():
            if not flow.ready:
                flow.ready = flow.incomplete = True
            if flow.updated:
                out.append(self._export(flow, now))
        return out

    def _export(self, flow: Flow, now: float) -> dict[str, Any]:
        record = dict(flow.record)
        for side in SIDES:
            stats = flow.sides[side]
            for name in _COUNTERS:
                record[f"{name}TotalCountFrom{side}"] = stats.totals[name]
                record[f"{name}DeltaCountFrom{side}"] = stats.deltas[name]
            record[f"flowEndSecondsFrom{side}"] = stats.end
            record[f"throughputFrom{side}"] = stats.throughput
            record[f"reverseThroughputFrom{side}"] = stats.reverse_throughput
        address, domain = flow.exporter
        record[
            "originalExporterIPv6Address" if ":" in address else "originalExporterIPv4Address"
        ] = address
        record["originalObservationDomainId"] = domain
        record["incomplete"] = flow.incomplete
        # The next export reports what comes after this one.
        for stats in flow.sides.values():
            stats.deltas = dict.fromkeys(_COUNTERS, 0)
            stats.throughput = stats.reverse_throughput = 0
        for name in _COUNTERS:
            flow.record[f"{name}DeltaCount"] = 0
        flow.record["throughput"] = flow.record["reverseThroughput"] = 0
        flow.updated = False
        flow.next_export = now + self.export_interval
        self.stats.exported += 1
        return record
