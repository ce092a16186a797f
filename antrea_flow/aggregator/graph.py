"""Exported records summed into what the UI draws: a graph of who talks to whom (the
service map and the sankeys) and each Node's throughput over time.

Bytes and packets are the records' deltas, so a flow exported several times in the window
counts each byte once; connections are distinct 5-tuples with their start time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..flowfilter import Record, destination_ip, flow_end, source_ip, verdict

GROUPINGS = ("workload", "pod", "namespace", "service", "node", "policy")

# The label Kubernetes recommends for an application's name, then the usual ones.
_WORKLOAD_LABELS = ("app.kubernetes.io/name", "app", "k8s-app")
# Generated Pod name suffixes: Deployment (ReplicaSet hash and Pod id), DaemonSet or Job
# (Pod id), StatefulSet (ordinal). Kubernetes makes ids of this alphabet only (no vowels),
# so a name's own last word ("my-nginx", "redis-cache") is not taken for one.
_ID = "[bcdfghjklmnpqrstvwxz2456789]"
_GENERATED = re.compile(rf"(-{_ID}{{6,10}}-{_ID}{{5}}|-{_ID}{{5}}|-\d+)$")


def workload(name: str, labels: str | dict | None) -> str:
    """The application a Pod belongs to: its name label, or its name without the suffix its
    controller added."""
    if isinstance(labels, str) and labels:
        try:
            labels = json.loads(labels)
        except ValueError:
            labels = None
    if isinstance(labels, dict):
        for key in _WORKLOAD_LABELS:
            value = labels.get(key)
            if isinstance(value, str) and value:
                return value
    return _GENERATED.sub("", name) or name


@dataclass(slots=True)
class _Edge:
    bytes: int = 0
    packets: int = 0
    connections: set = field(default_factory=set)
    verdicts: dict[str, set] = field(default_factory=dict)


def _endpoints(record: Record, by: str) -> tuple[tuple[str, str, str], tuple[str, str, str]] | None:
    """((id, kind, namespace) of the source, of the destination) when grouped `by`; None
    when the record has no such pair (no Service, no Node, no policy)."""
    get = record.get
    if by == "service":
        service = get("destinationServicePortName")
        if not service:
            return None
        return _pod_end(record, "source", "pod"), (service, "service", service.partition("/")[0])
    if by == "node":
        src, dst = get("sourceNodeName"), get("destinationNodeName")
        if not (src and dst):
            return None
        return (src, "node", ""), (dst, "node", "")
    if by == "policy":
        egress = _policy(get("egressNetworkPolicyNamespace"), get("egressNetworkPolicyName"))
        ingress = _policy(get("ingressNetworkPolicyNamespace"), get("ingressNetworkPolicyName"))
        if not (egress or ingress):
            return None
        return (egress or "(no egress policy)", "policy", ""), (
            ingress or "(no ingress policy)",
            "policy",
            "",
        )
    return _pod_end(record, "source", by), _pod_end(record, "destination", by)


def _policy(namespace: str | None, name: str | None) -> str:
    if not name:
        return ""
    return f"{namespace}/{name}" if namespace else name


def _pod_end(record: Record, side: str, by: str) -> tuple[str, str, str]:
    get = record.get
    namespace, name = get(f"{side}PodNamespace") or "", get(f"{side}PodName") or ""
    if not name:
        ip = source_ip(record) if side == "source" else destination_ip(record)
        return ip, "external", ""
    if by == "namespace":
        return namespace, "namespace", namespace
    if by == "workload":
        return f"{namespace}/{workload(name, get(f'{side}PodLabels'))}", "workload", namespace
    return f"{namespace}/{name}", "pod", namespace


def flow_graph(records: Iterable[Record], by: str) -> dict[str, Any]:
    """{"nodes": [{id, kind, namespace, bytes}], "edges": [{source, target, bytes, packets,
    connections, allowed, dropped, rejected}]}, edges busiest first."""
    edges: dict[tuple[str, str], _Edge] = {}
    nodes: dict[str, dict[str, Any]] = {}
    for record in records:
        ends = _endpoints(record, by)
        if ends is None:
            continue
        (src, src_kind, src_ns), (dst, dst_kind, dst_ns) = ends
        get = record.get
        octets = (get("octetDeltaCount") or 0) + (get("reverseOctetDeltaCount") or 0)
        packets = (get("packetDeltaCount") or 0) + (get("reversePacketDeltaCount") or 0)
        connection = (
            source_ip(record),
            destination_ip(record),
            get("sourceTransportPort"),
            get("destinationTransportPort"),
            get("protocolIdentifier"),
            get("flowStartSeconds"),
        )
        edge = edges.get((src, dst))
        if edge is None:
            edge = edges[src, dst] = _Edge()
        edge.bytes += octets
        edge.packets += packets
        edge.connections.add(connection)
        edge.verdicts.setdefault(verdict(record), set()).add(connection)
        ends = ((src, src_kind, src_ns), (dst, dst_kind, dst_ns))
        for node_id, kind, namespace in ends if src != dst else ends[:1]:  # within: once
            node = nodes.get(node_id)
            if node is None:
                node = nodes[node_id] = {"id": node_id, "kind": kind, "namespace": namespace}
                node["bytes"] = 0
            node["bytes"] += octets
    out_edges: list[dict[str, Any]] = [
        {
            "source": src,
            "target": dst,
            "bytes": edge.bytes,
            "packets": edge.packets,
            "connections": len(edge.connections),
            **{
                v.lower(): len(edge.verdicts.get(v, ())) for v in ("ALLOWED", "DROPPED", "REJECTED")
            },
        }
        for (src, dst), edge in edges.items()
    ]
    out_edges.sort(key=lambda e: (-e["bytes"], e["source"], e["target"]))
    return {"by": by, "nodes": sorted(nodes.values(), key=lambda n: n["id"]), "edges": out_edges}


def node_throughput(records: Iterable[Record], start: float, end: float, step: float) -> dict:
    """Bits per second each Node's Pods sent (tx) and received (rx) in each `step` from
    `start` to `end`; a record's bytes fall in the step of its end."""
    buckets = max(1, int((end - start) // step) + 1)
    series: dict[str, dict[str, list[float]]] = {}

    def add(node: str | None, direction: str, index: int, octets: int) -> None:
        if not node or not octets:
            return
        values = series.get(node)
        if values is None:
            values = series[node] = {"tx": [0.0] * buckets, "rx": [0.0] * buckets}
        values[direction][index] += octets * 8 / step

    for record in records:
        moment = flow_end(record)
        if not start <= moment <= end:
            continue
        index = min(buckets - 1, int((moment - start) // step))
        get = record.get
        forward, reverse = get("octetDeltaCount") or 0, get("reverseOctetDeltaCount") or 0
        src, dst = get("sourceNodeName"), get("destinationNodeName")
        add(src, "tx", index, forward)
        add(dst, "rx", index, forward)
        add(dst, "tx", index, reverse)
        add(src, "rx", index, reverse)
    return {
        "start": start,
        "step": step,
        "times": [start + i * step for i in range(buckets)],
        "nodes": [{"node": node, **values} for node, values in sorted(series.items())],
    }
