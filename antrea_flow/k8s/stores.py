"""Kubernetes metadata the flow records need: Nodes, Pods by IP, Services by address, and
NetworkPolicy rules by rule id.

Sources (a static inventory file now, a Kubernetes API watch later) feed objects exactly as
the API returns them; the store keeps them by kind and key and maintains lookup indexes
keyed the way the agent looks things up: packed IP bytes, as conntrack gives them.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..codes import (
    ACTION_ALLOW,
    ACTION_DROP,
    ACTION_NONE,
    ACTION_REJECT,
    POLICY_TYPE_ACNP,
    POLICY_TYPE_ANP,
    POLICY_TYPE_K8S,
)
from ..ipfix.address import is_ip

log = logging.getLogger(__name__)

ACTIONS = {"allow": ACTION_ALLOW, "drop": ACTION_DROP, "reject": ACTION_REJECT, "pass": ACTION_NONE}
PROTOCOL_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}

# Each rule of a NetworkPolicy is identified in the dataplane by a 32-bit rule id (Antrea:
# the OpenFlow conjunction id). The dataplane that enforces the policy publishes the ids of
# its rules in this annotation: {"ingress": [id, ...], "egress": [id, ...]} in rule order,
# plus optional "isolationIngress"/"isolationEgress" ids for the drops of isolated Pods.
RULE_IDS_ANNOTATION = "antrea-flow.io/rule-ids"

NETWORK_POLICY_KINDS = {
    ("networking.k8s.io/v1", "NetworkPolicy"): POLICY_TYPE_K8S,
    ("crd.antrea.io/v1beta1", "NetworkPolicy"): POLICY_TYPE_ANP,
    ("crd.antrea.io/v1alpha1", "NetworkPolicy"): POLICY_TYPE_ANP,
    ("crd.antrea.io/v1beta1", "ClusterNetworkPolicy"): POLICY_TYPE_ACNP,
    ("crd.antrea.io/v1alpha1", "ClusterNetworkPolicy"): POLICY_TYPE_ACNP,
}


def pack_ip(text: str) -> bytes:
    """The packed form of an IP literal (ValueError for anything else)."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except (OSError, TypeError):
        raise ValueError(f"{text!r} is not an IP address") from None


def unpack_ip(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


@dataclass(frozen=True, slots=True)
class PodInfo:
    namespace: str
    name: str
    node_name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    namespace: str
    name: str
    port_name: str  # the ServicePort's name ("" when unnamed)

    @property
    def port_name_full(self) -> str:
        """`namespace/name:port`, Antrea's destinationServicePortName."""
        return f"{self.namespace}/{self.name}:{self.port_name}"


@dataclass(frozen=True, slots=True)
class PolicyRule:
    rule_id: int
    policy_type: int
    policy_namespace: str  # "" for cluster-scoped policies
    policy_name: str  # "" for the drops of isolated Pods (as upstream)
    rule_name: str
    direction: str  # "ingress" or "egress"
    action: int


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    pod_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    addresses: tuple[str, ...]


def _meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def _kind(obj: Mapping[str, Any]) -> tuple[str, str]:
    return obj.get("apiVersion", ""), obj.get("kind", "")


@dataclass(frozen=True, slots=True)
class MetadataView:
    """One consistent state of the store's indexes, never changed once published."""

    nodes: Mapping[str, NodeInfo]
    pods_by_ip: Mapping[bytes, PodInfo]
    services: Mapping[tuple[bytes, int, int], ServiceInfo]
    rules: Mapping[int, PolicyRule]
    version: int

    def pod(self, ip: bytes) -> PodInfo | None:
        return self.pods_by_ip.get(ip)

    def service(self, ip: bytes, port: int, protocol: int) -> ServiceInfo | None:
        return self.services.get((ip, port, protocol))

    def rule(self, rule_id: int) -> PolicyRule | None:
        return self.rules.get(rule_id)


_EMPTY_VIEW = MetadataView({}, {}, {}, {}, 0)


class MetadataStore:
    """Objects by (kind, namespace, name), with indexes rebuilt for the kinds that change.

    Owned by the thread that feeds it (the agent's or aggregator's event loop, through its
    source). Readers on any thread (the poll thread, the deny-queue thread) read `view`, the
    indexes the owner published last, once per lookup or batch of lookups: it is replaced as
    a whole, never changed, so a reader never sees the Pods of one version with the Nodes of
    another. The lookup methods each read it once.
    """

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str, str, str], Mapping[str, Any]] = {}
        self.view = _EMPTY_VIEW

    @property
    def nodes(self) -> Mapping[str, NodeInfo]:
        return self.view.nodes

    @property
    def pods_by_ip(self) -> Mapping[bytes, PodInfo]:
        return self.view.pods_by_ip

    @property
    def services(self) -> Mapping[tuple[bytes, int, int], ServiceInfo]:
        return self.view.services

    @property
    def rules(self) -> Mapping[int, PolicyRule]:
        return self.view.rules

    @property
    def version(self) -> int:
        return self.view.version

    # -- feeding -------------------------------------------------------------------------

    @staticmethod
    def key(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
        """(API group, kind, namespace, name): a K8s and an Antrea NetworkPolicy of the same
        name are different objects."""
        namespace, name = _meta(obj)
        group = (obj.get("apiVersion") or "").rpartition("/")[0]
        return group, obj.get("kind", ""), namespace, name

    def replace(self, objects: Iterable[Mapping[str, Any]]) -> None:
        """Make the store hold exactly `objects` (a full resync)."""
        self._objects = {self.key(o): o for o in objects}
        self._reindex()

    def upsert(self, obj: Mapping[str, Any]) -> None:
        self._objects[self.key(obj)] = obj
        self._reindex()

    def remove(self, obj: Mapping[str, Any]) -> None:
        self._objects.pop(self.key(obj), None)
        self._reindex()

    def _reindex(self) -> None:
        nodes: dict[str, NodeInfo] = {}
        pods: dict[bytes, PodInfo] = {}
        services: dict[tuple[bytes, int, int], ServiceInfo] = {}
        rules: dict[int, PolicyRule] = {}
        for obj in self._objects.values():
            api_version, kind = _kind(obj)
            try:
                if kind == "Node":
                    node = _node(obj)
                    nodes[node.name] = node
                elif kind == "Pod":
                    for ip, pod in _pod(obj):
                        pods[ip] = pod
                elif kind == "Service":
                    services.update(_service(obj))
                elif (api_version, kind) in NETWORK_POLICY_KINDS:
                    for rule in _policy_rules(obj, NETWORK_POLICY_KINDS[(api_version, kind)]):
                        rules[rule.rule_id] = rule
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                namespace, name = _meta(obj)
                log.warning("ignoring malformed %s %s/%s: %s", kind, namespace, name, exc)
        self.view = MetadataView(nodes, pods, services, rules, self.view.version + 1)

    # -- lookups ---------------------------------------------------------------------------

    def pod(self, ip: bytes) -> PodInfo | None:
        return self.view.pod(ip)

    def service(self, ip: bytes, port: int, protocol: int) -> ServiceInfo | None:
        return self.view.service(ip, port, protocol)

    def rule(self, rule_id: int) -> PolicyRule | None:
        return self.view.rule(rule_id)


def _node(obj: Mapping[str, Any]) -> NodeInfo:
    _, name = _meta(obj)
    spec = obj.get("spec") or {}
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    addresses = [a["address"] for a in (obj.get("status") or {}).get("addresses") or []]
    return NodeInfo(
        name,
        tuple(ipaddress.ip_network(c, strict=False) for c in cidrs),
        tuple(a for a in addresses if is_ip(a)),
    )


def _pod(obj: Mapping[str, Any]) -> list[tuple[bytes, PodInfo]]:
    namespace, name = _meta(obj)
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if spec.get("hostNetwork"):
        return []  # a host-network Pod's IP is its Node's, not the Pod's
    labels = (obj.get("metadata") or {}).get("labels") or {}
    info = PodInfo(namespace, name, spec.get("nodeName") or "", dict(labels))
    ips = [p["ip"] for p in status.get("podIPs") or []] or (
        [status["podIP"]] if status.get("podIP") else []
    )
    return [(pack_ip(ip), info) for ip in ips]


def _service(obj: Mapping[str, Any]) -> dict[tuple[bytes, int, int], ServiceInfo]:
    namespace, name = _meta(obj)
    spec = obj.get("spec") or {}
    cluster_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    out = {}
    for ip in cluster_ips:
        if ip == "None":  # headless
            continue
        packed = pack_ip(ip)
        for port in spec.get("ports") or []:
            protocol = PROTOCOL_NUMBERS.get(port.get("protocol", "TCP"), 6)
            out[(packed, int(port["port"]), protocol)] = ServiceInfo(
                namespace, name, port.get("name") or ""
            )
    return out


def _policy_rules(obj: Mapping[str, Any], policy_type: int) -> list[PolicyRule]:
    namespace, name = _meta(obj)
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    raw = annotations.get(RULE_IDS_ANNOTATION)
    if not raw:
        return []
    ids = json.loads(raw)
    spec = obj.get("spec") or {}
    rules = []
    for direction in ("ingress", "egress"):
        specs = spec.get(direction) or []
        for index, rule_id in enumerate(ids.get(direction) or []):
            rule = specs[index] if index < len(specs) else {}
            if policy_type == POLICY_TYPE_K8S:
                action, rule_name = ACTION_ALLOW, ""
            else:
                action = ACTIONS[(rule.get("action") or "Allow").lower()]
                rule_name = rule.get("name") or f"{direction}-{index}"
            rules.append(
                PolicyRule(int(rule_id), policy_type, namespace, name, rule_name, direction, action)
            )
        isolation_id = ids.get(f"isolation{direction.capitalize()}")
        if isolation_id:
            # Drops of Pods isolated by a K8s NetworkPolicy carry only the type and action.
            rules.append(
                PolicyRule(int(isolation_id), POLICY_TYPE_K8S, "", "", "", direction, ACTION_DROP)
            )
    return rules
