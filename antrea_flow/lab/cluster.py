"""The lab cluster: Kubernetes objects resolved into what the dataplane needs.

A cluster is described with the objects a Kubernetes API would hold (Nodes, Namespaces,
Pods, Services, NetworkPolicies, Antrea NetworkPolicies and ClusterNetworkPolicies). The
lab assigns Pod addresses from each Node's podCIDRs (the gateway takes the first address,
as Antrea's antrea-gw0 does), resolves selectors and Service endpoints, gives every policy
rule a stable 30-bit id, and renders the whole cluster back as an inventory: the same
objects with Pod IPs and the rule ids (annotation antrea-flow.io/rule-ids) filled in. A
policy field the lab does not implement is an error, never ignored.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from ..codes import POLICY_TYPE_K8S
from ..errors import UsageError
from ..k8s.inventory import read_inventory
from ..k8s.stores import NETWORK_POLICY_KINDS, RULE_IDS_ANNOTATION

UNDERLAY_V4 = ipaddress.ip_network("192.168.77.0/24")
UNDERLAY_V6 = ipaddress.ip_network("fd00:77::/64")
EXTERNAL_HOST_INDEX = 254  # the external host's address in the underlay networks
PROTOCOLS = ("TCP", "UDP", "SCTP")
ACTIONS = ("Allow", "Drop", "Reject", "Pass")
RULE_ID_MASK = 0x3FFFFFFF  # 30 bits: fits a packet mark beside the lab's own flag bits
# Antrea's static Tiers below the baseline (which comes after Kubernetes NetworkPolicies and
# is not implemented); the capitalised names of Antrea 0.9 map to them as in Antrea.
TIER_PRIORITIES = {
    "emergency": 50,
    "securityops": 100,
    "networkops": 150,
    "platform": 200,
    "application": 250,
}
_OLD_TIER_NAMES = {"Emergency", "SecurityOps", "NetworkOps", "Platform", "Application", "Baseline"}

# The fields of policies the lab implements. Any other field would be ignored, and the rule
# compiled without it would match more than the policy says: it is an error instead.
_K8S_SPEC = {"podSelector", "policyTypes", "ingress", "egress"}
_ANTREA_SPEC = {"tier", "priority", "appliedTo", "ingress", "egress"}
_K8S_RULE = {"ingress": {"from", "ports"}, "egress": {"to", "ports"}}
# enableLogging and logLabel only ask for logs: the rule matches the same packets.
_ANTREA_RULE = {
    d: keys | {"action", "name", "appliedTo", "enableLogging", "logLabel"}
    for d, keys in _K8S_RULE.items()
}
_PEER = {"podSelector", "namespaceSelector", "ipBlock"}
_IP_BLOCK = {"cidr", "except"}
_PORT = {"protocol", "port", "endPort"}
_CLUSTER_APPLIED_TO = {"podSelector", "namespaceSelector"}
_NAMESPACED_APPLIED_TO = {"podSelector"}


class ClusterError(UsageError):
    pass


def _fnv1a(text: str) -> int:
    value = 0x811C9DC5
    for byte in text.encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def rule_id(*parts: object) -> int:
    """A stable non-zero 30-bit id for a policy rule, from what identifies it."""
    return (_fnv1a("/".join(str(p) for p in parts)) & RULE_ID_MASK) or 1


ISOLATION_INGRESS_ID = rule_id("isolation", "ingress")
ISOLATION_EGRESS_ID = rule_id("isolation", "egress")


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    name: str
    index: int  # 1-based, decides the underlay addresses
    pod_cidrs: tuple  # IPv4 and/or IPv6 networks

    def address(self, version: int, offset: int = 0) -> str:
        """The node's underlay address (offset 0) or its Pod SNAT address (offset 100)."""
        net = UNDERLAY_V4 if version == 4 else UNDERLAY_V6
        return str(net.network_address + 10 + self.index + offset)

    def gateway(self, version: int) -> str | None:
        for cidr in self.pod_cidrs:
            if cidr.version == version:
                return str(cidr.network_address + 1)
        return None

    def cidr(self, version: int):
        return next((c for c in self.pod_cidrs if c.version == version), None)


@dataclass(slots=True, eq=False)
class Pod:
    namespace: str
    name: str
    node: Node
    labels: dict[str, str]
    addresses: dict[int, str]  # IP version -> address
    named_ports: dict[str, int]
    obj: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    protocol: str
    port: int
    target_port: int | str


@dataclass(slots=True, eq=False)
class Service:
    namespace: str
    name: str
    cluster_ips: list[str]
    ports: list[ServicePort]
    endpoints: list[Pod]


@dataclass(frozen=True, slots=True)
class PortMatch:
    protocol: str  # TCP, UDP, SCTP
    port: int | None  # None: every port of the protocol
    end_port: int | None = None


@dataclass(frozen=True, slots=True)
class Peers:
    """The other end of a rule: Pods, CIDRs (with exceptions), or anything (every=True)."""

    pods: tuple[Pod, ...] = ()
    cidrs: tuple[tuple[Any, tuple[Any, ...]], ...] = ()  # (network, excepted networks)
    every: bool = False


@dataclass(slots=True, eq=False)
class Rule:
    rule_id: int
    policy_type: int  # 1 K8s NetworkPolicy, 2 Antrea NetworkPolicy, 3 ClusterNetworkPolicy
    policy_namespace: str
    policy_name: str
    name: str
    direction: str  # ingress | egress
    action: str  # Allow | Drop | Reject | Pass
    applied_to: tuple[Pod, ...]
    peers: Peers
    ports: tuple[PortMatch, ...]  # empty: every port
    order: tuple  # evaluation order of Antrea rules: (tier, priority, policy, rule index)


@dataclass(slots=True)
class Cluster:
    nodes: list[Node]
    pods: list[Pod]
    services: list[Service]
    antrea_rules: list[Rule]  # in evaluation order
    k8s_rules: list[Rule]  # all allow rules of K8s NetworkPolicies
    isolated: dict[str, set[str]]  # direction -> keys of isolated Pods
    objects: list[dict[str, Any]]  # the source objects
    rule_ids: dict[tuple[str, str, str, str], dict[str, Any]] = field(default_factory=dict)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ClusterError(f"no node {name!r}")

    def pod(self, key: str) -> Pod:
        for pod in self.pods:
            if pod.key == key:
                return pod
        raise ClusterError(f"no pod {key!r}; pods are {', '.join(p.key for p in self.pods)}")

    def local_pods(self, node: Node) -> list[Pod]:
        return [p for p in self.pods if p.node is node]

    def external_address(self, version: int) -> str:
        net = UNDERLAY_V4 if version == 4 else UNDERLAY_V6
        return str(net.network_address + EXTERNAL_HOST_INDEX)

    def inventory(self) -> dict[str, Any]:
        """The cluster as the agent's inventoryFile reads it: a `kind: List`."""
        items = []
        pods = {(p.namespace, p.name): p for p in self.pods}
        for obj in self.objects:
            out = copy.deepcopy(obj)
            kind = out.get("kind")
            meta = out.setdefault("metadata", {})
            if kind not in _CLUSTER_SCOPED and not meta.get("namespace"):
                meta["namespace"] = "default"  # as the lab (and the API server) reads it
            if kind == "Node":
                node = self.node(meta["name"])
                out["status"] = {
                    "addresses": [
                        {"type": "InternalIP", "address": node.address(4)},
                        {"type": "InternalIP", "address": node.address(6)},
                    ]
                }
            elif kind == "Pod":
                pod = pods[(meta["namespace"], meta["name"])]
                ips = [pod.addresses[v] for v in (4, 6) if v in pod.addresses]
                out["status"] = {
                    "phase": "Running",
                    "podIP": ips[0],
                    "podIPs": [{"ip": ip} for ip in ips],
                }
            key = _policy_key(out)
            if key in self.rule_ids:
                meta.setdefault("annotations", {})[RULE_IDS_ANNOTATION] = json.dumps(
                    self.rule_ids[key], sort_keys=True
                )
            items.append(out)
        return {"apiVersion": "v1", "kind": "List", "items": items}


# -- loading --------------------------------------------------------------------------------


def default_objects() -> list[dict[str, Any]]:
    text = resources.files(__package__).joinpath("default_cluster.yaml").read_text()
    return yaml.safe_load(text)["items"]


def load_cluster(path: str | None = None) -> Cluster:
    """The default cluster, or the one described in `path` (the same shape)."""
    objects = default_objects() if path is None else read_inventory(path)
    try:
        return build_cluster(objects)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ClusterError):
            raise
        where = path or "the default cluster"
        raise ClusterError(f"{where}: cannot build the lab cluster: {exc!r}") from None


_CLUSTER_SCOPED = ("Node", "Namespace", "ClusterNetworkPolicy")


def _policy_key(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """(API group, kind, namespace or "" when cluster-scoped, name) of a policy."""
    namespace, name = _meta(obj)
    kind = obj.get("kind", "")
    group = (obj.get("apiVersion") or "").rpartition("/")[0]
    return group, kind, "" if kind in _CLUSTER_SCOPED else namespace, name


def _meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("name") or ""


def build_cluster(objects: list[dict[str, Any]]) -> Cluster:
    nodes: list[Node] = []
    namespaces: dict[str, dict[str, str]] = {}
    for obj in objects:
        if obj.get("kind") == "Node":
            _, name = _meta(obj)
            spec = obj.get("spec") or {}
            cidrs = tuple(ipaddress.ip_network(c) for c in spec.get("podCIDRs") or [])
            if not cidrs:
                raise ClusterError(f"node {name} has no spec.podCIDRs")
            nodes.append(Node(name, len(nodes) + 1, cidrs))
        elif obj.get("kind") == "Namespace":
            _, name = _meta(obj)
            labels = dict((obj.get("metadata") or {}).get("labels") or {})
            labels.setdefault("kubernetes.io/metadata.name", name)
            namespaces[name] = labels
    if not nodes:
        raise ClusterError("the cluster has no Node")
    by_name = {n.name: n for n in nodes}
    pods: list[Pod] = []
    next_host: dict[tuple[str, int], int] = {}
    for obj in objects:
        if obj.get("kind") != "Pod":
            continue
        namespace, name = _meta(obj)
        namespaces.setdefault(namespace, {"kubernetes.io/metadata.name": namespace})
        spec = obj.get("spec") or {}
        node_name = spec.get("nodeName")
        node = by_name.get(node_name) if node_name is not None else None
        if node is None:
            raise ClusterError(f"pod {namespace}/{name}: spec.nodeName must name a Node")
        addresses = {}
        for cidr in node.pod_cidrs:
            host = next_host.get((node.name, cidr.version), 2)  # .1 is the gateway
            next_host[(node.name, cidr.version)] = host + 1
            addresses[cidr.version] = str(cidr.network_address + host)
        named_ports = {
            p["name"]: int(p["containerPort"])
            for c in spec.get("containers") or []
            for p in c.get("ports") or []
            if p.get("name")
        }
        labels = dict((obj.get("metadata") or {}).get("labels") or {})
        pods.append(Pod(namespace, name, node, labels, addresses, named_ports, obj))

    services = [_service(obj, pods) for obj in objects if obj.get("kind") == "Service"]
    antrea_rules: list[Rule] = []
    k8s_rules: list[Rule] = []
    isolated: dict[str, set[str]] = {"ingress": set(), "egress": set()}
    rule_ids: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for obj in objects:
        kind = (obj.get("apiVersion", ""), obj.get("kind", ""))
        if kind not in NETWORK_POLICY_KINDS:
            continue
        policy_type = NETWORK_POLICY_KINDS[kind]
        resolver = _Selectors(pods, namespaces)
        namespace, name = _meta(obj)
        cluster_scoped = kind[1] == "ClusterNetworkPolicy"
        try:
            if policy_type == POLICY_TYPE_K8S:
                rules, isolation = _k8s_policy(obj, resolver)
                for direction, keys in isolation.items():
                    isolated[direction] |= keys
            else:
                rules = _antrea_policy(obj, policy_type, resolver)
        except ClusterError as exc:
            where = name if cluster_scoped else f"{namespace}/{name}"
            raise ClusterError(f"{kind[1]} {where}: {exc}") from None
        if policy_type == POLICY_TYPE_K8S:
            k8s_rules += rules
        else:
            antrea_rules += rules
        ids: dict[str, Any] = {"ingress": [], "egress": []}
        for rule in rules:
            ids[rule.direction].append(rule.rule_id)
        if policy_type == POLICY_TYPE_K8S:
            ids["isolationIngress"] = ISOLATION_INGRESS_ID
            ids["isolationEgress"] = ISOLATION_EGRESS_ID
        rule_ids[_policy_key(obj)] = ids
    antrea_rules.sort(key=lambda r: r.order)
    _check_unique_ids(antrea_rules + k8s_rules)
    return Cluster(nodes, pods, services, antrea_rules, k8s_rules, isolated, objects, rule_ids)


def _check_unique_ids(rules: list[Rule]) -> None:
    seen = {
        ISOLATION_INGRESS_ID: "the ingress isolation drop",
        ISOLATION_EGRESS_ID: "the egress isolation drop",
    }
    for rule in rules:
        if rule.rule_id in seen:
            raise ClusterError(
                f"rule id {rule.rule_id} of {rule.policy_name} collides with "
                f"{seen[rule.rule_id]}; rename {rule.policy_name}"
            )
        seen[rule.rule_id] = rule.policy_name


def _service(obj: Mapping[str, Any], pods: list[Pod]) -> Service:
    namespace, name = _meta(obj)
    spec = obj.get("spec") or {}
    cluster_ips = [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip]
    if not cluster_ips or "None" in cluster_ips:
        raise ClusterError(
            f"service {namespace}/{name} needs spec.clusterIPs (headless is not supported)"
        )
    selector = spec.get("selector") or {}
    endpoints = [
        p
        for p in pods
        if p.namespace == namespace
        and selector
        and _match_labels({"matchLabels": selector}, p.labels)
    ]
    ports = [
        ServicePort(
            p.get("name") or "",
            (p.get("protocol") or "TCP").upper(),
            int(p["port"]),
            p.get("targetPort", p["port"]),
        )
        for p in spec.get("ports") or []
    ]
    return Service(namespace, name, cluster_ips, ports, endpoints)


# -- selectors ------------------------------------------------------------------------------


def _match_labels(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics; an empty selector matches everything."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ClusterError(f"unknown label selector operator {operator!r}")
    return True


class _Selectors:
    def __init__(self, pods: list[Pod], namespaces: dict[str, dict[str, str]]):
        self.pods = pods
        self.namespaces = namespaces

    def pods_matching(
        self,
        pod_selector: Mapping[str, Any] | None,
        namespace_selector: Mapping[str, Any] | None,
        namespace: str | None,
    ) -> tuple[Pod, ...]:
        """Pods selected by a podSelector in `namespace` (None: all namespaces), or by a
        namespaceSelector (with an optional podSelector) across namespaces."""
        out = []
        for pod in self.pods:
            if namespace_selector is not None:
                if not _match_labels(namespace_selector, self.namespaces.get(pod.namespace, {})):
                    continue
            elif namespace is not None and pod.namespace != namespace:
                continue
            if _match_labels(pod_selector, pod.labels):
                out.append(pod)
        return tuple(out)

    def peers(
        self, entries: list[Mapping[str, Any]] | None, namespace: str | None, where: str
    ) -> Peers:
        if not entries:
            return Peers(every=True)
        pods: list[Pod] = []
        cidrs = []
        for i, entry in enumerate(entries):
            _only(entry, _PEER, f"{where}[{i}]")
            if "ipBlock" in entry:
                if len(entry) > 1:
                    raise ClusterError(f"{where}[{i}]: ipBlock cannot be set with a selector")
                block = entry["ipBlock"]
                _only(block, _IP_BLOCK, f"{where}[{i}].ipBlock")
                excepts = tuple(ipaddress.ip_network(e) for e in block.get("except") or [])
                cidrs.append((ipaddress.ip_network(block["cidr"]), excepts))
                continue
            if not entry:
                raise ClusterError(f"{where}[{i}] is empty: set podSelector or namespaceSelector")
            for pod in self.pods_matching(
                entry.get("podSelector"), entry.get("namespaceSelector"), namespace
            ):
                if pod not in pods:
                    pods.append(pod)
        return Peers(tuple(pods), tuple(cidrs))

    def applied_to(
        self, entries: list[Mapping[str, Any]], keys: set[str], namespace: str | None, where: str
    ) -> tuple[Pod, ...]:
        applied: list[Pod] = []
        for i, entry in enumerate(entries):
            _only(entry, keys, f"{where}[{i}]")
            if not entry:
                raise ClusterError(f"{where}[{i}] is empty: set {' or '.join(sorted(keys))}")
            for pod in self.pods_matching(
                entry.get("podSelector"), entry.get("namespaceSelector"), namespace
            ):
                if pod not in applied:
                    applied.append(pod)
        return tuple(applied)


def _only(obj: Mapping[str, Any], known: set[str], where: str) -> None:
    """Refuse the fields the lab does not implement (ignored, they would broaden a rule)."""
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ClusterError(
            f"{where}.{unknown[0]} is not supported by the lab (it implements "
            f"{', '.join(sorted(known))})"
        )


def _rule_where(direction: str, index: int, rule: Mapping[str, Any]) -> str:
    name = rule.get("name")
    return f"{direction}[{index}]" + (f" ({name})" if name else "")


def _ports(
    entries: list[Mapping[str, Any]] | None, pods: Iterable[Pod], where: str
) -> tuple[PortMatch, ...]:
    out = []
    for i, entry in enumerate(entries or []):
        _only(entry, _PORT, f"{where}[{i}]")
        protocol = (entry.get("protocol") or "TCP").upper()
        if protocol not in PROTOCOLS:
            raise ClusterError(f"{where}[{i}]: unsupported protocol {protocol!r}")
        port = entry.get("port")
        if isinstance(port, str):  # a named port: the numbers it names on the Pods
            numbers = sorted({p.named_ports[port] for p in pods if port in p.named_ports})
            if not numbers:
                raise ClusterError(f"{where}[{i}]: no pod has a port named {port!r}")
            out += [PortMatch(protocol, n) for n in numbers]
            continue
        out.append(PortMatch(protocol, port, entry.get("endPort")))
    return tuple(out)


def _egress_targets(s: _Selectors, peers: Peers) -> tuple[Pod, ...]:
    """The Pods whose named ports an egress rule's ports may name."""
    return tuple(s.pods) if peers.every else peers.pods


def _k8s_policy(obj: Mapping[str, Any], s: _Selectors) -> tuple[list[Rule], dict[str, set[str]]]:
    namespace, name = _meta(obj)
    spec = obj.get("spec") or {}
    _only(spec, _K8S_SPEC, "spec")
    selected = s.pods_matching(spec.get("podSelector"), None, namespace)
    types = spec.get("policyTypes") or (["Ingress"] + (["Egress"] if spec.get("egress") else []))
    isolation: dict[str, set[str]] = {}
    rules = []
    for direction in ("ingress", "egress"):
        if direction.capitalize() not in types:
            continue
        isolation[direction] = {p.key for p in selected}
        peer_key = "from" if direction == "ingress" else "to"
        for index, rule in enumerate(spec.get(direction) or []):
            where = _rule_where(direction, index, rule)
            _only(rule, _K8S_RULE[direction], where)
            peers = s.peers(rule.get(peer_key), namespace, f"{where}: {peer_key}")
            targets = selected if direction == "ingress" else _egress_targets(s, peers)
            rules.append(
                Rule(
                    rule_id(POLICY_TYPE_K8S, namespace, name, direction, index),
                    POLICY_TYPE_K8S,
                    namespace,
                    name,
                    "",
                    direction,
                    "Allow",
                    selected,
                    peers,
                    _ports(rule.get("ports"), targets, f"{where}: ports"),
                    (),
                )
            )
    return rules, isolation


def _tier_priority(tier: Any) -> int:
    if tier is None:
        return TIER_PRIORITIES["application"]
    name = tier.lower() if tier in _OLD_TIER_NAMES else tier
    if name == "baseline":
        raise ClusterError(
            "spec.tier baseline is not supported by the lab (its rules come after Kubernetes "
            "NetworkPolicies)"
        )
    if name not in TIER_PRIORITIES:
        raise ClusterError(
            f"spec.tier {tier!r} is not one of {', '.join(TIER_PRIORITIES)} (the lab has no "
            "Tier objects)"
        )
    return TIER_PRIORITIES[name]


def _antrea_policy(obj: Mapping[str, Any], policy_type: int, s: _Selectors) -> list[Rule]:
    namespace, name = _meta(obj)
    cluster_scoped = obj.get("kind") == "ClusterNetworkPolicy"
    scope = None if cluster_scoped else namespace
    spec = obj.get("spec") or {}
    _only(spec, _ANTREA_SPEC, "spec")
    tier = _tier_priority(spec.get("tier"))
    priority = float(spec.get("priority", 5))
    applied_keys = _CLUSTER_APPLIED_TO if cluster_scoped else _NAMESPACED_APPLIED_TO
    # As Antrea validates it: appliedTo in the spec, or in every rule, never in both.
    spec_applied = spec.get("appliedTo") or []
    applied = s.applied_to(spec_applied, applied_keys, scope, "spec.appliedTo")
    rules = []
    for direction in ("ingress", "egress"):
        peer_key = "from" if direction == "ingress" else "to"
        for index, rule in enumerate(spec.get(direction) or []):
            where = _rule_where(direction, index, rule)
            _only(rule, _ANTREA_RULE[direction], where)
            action = rule.get("action")
            if action not in ACTIONS:
                given = "is missing" if action is None else f"{action!r} is not"
                raise ClusterError(f"{where}: action {given} one of {', '.join(ACTIONS)}")
            rule_applied = applied
            if rule.get("appliedTo"):
                if spec_applied:
                    raise ClusterError(
                        f"{where}: appliedTo is set in the rule and in the spec (set one of them)"
                    )
                rule_applied = s.applied_to(
                    rule["appliedTo"], applied_keys, scope, f"{where}: appliedTo"
                )
            elif not spec_applied:
                raise ClusterError(
                    f"{where}: no appliedTo, and none in the spec (Antrea requires one of them)"
                )
            peers = s.peers(rule.get(peer_key), scope, f"{where}: {peer_key}")
            targets = rule_applied if direction == "ingress" else _egress_targets(s, peers)
            rules.append(
                Rule(
                    rule_id(
                        policy_type, "" if cluster_scoped else namespace, name, direction, index
                    ),
                    policy_type,
                    "" if cluster_scoped else namespace,
                    name,
                    rule.get("name") or f"{direction}-{index}",
                    direction,
                    action,
                    rule_applied,
                    peers,
                    _ports(rule.get("ports"), targets, f"{where}: ports"),
                    (tier, priority, name, direction, index),
                )
            )
    if not spec_applied and not rules:
        raise ClusterError("no appliedTo in the spec nor in a rule (Antrea requires one of them)")
    return rules
