"""Kubernetes metadata the flow records need: Nodes, Pods by IP, Services by address, and
NetworkPolicy rules by rule id.

Sources (the static inventory file, the Kubernetes API watch) feed objects exactly as the
API returns them; the store keeps, per object, only what the lookups need, and maintains
lookup indexes keyed the way the agent looks things up: packed IP bytes, as conntrack gives
them. One object's change touches the index entries of that object only.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
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

# How long a deleted Pod's IP still resolves to it (upstream keeps deleted objects as
# long): a record of a connection that ended with its Pod arrives after the Pod is gone.
DELETED_POD_RETENTION = 300.0
# Creation times are whole seconds of the API server's clock and flow start times come
# from a Node's: a Pod's lifetime is widened by this much when a record's time picks it.
_CLOCK_SLACK = 2.0
_TERMINAL_PHASES = ("Succeeded", "Failed")  # their IPs are released


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


@dataclass(frozen=True, slots=True)
class PodLife:
    """One Pod's hold on one IP: from its creation until it ended (deleted, or finished
    and its IP released), in seconds since the epoch; `ended` None while it lives."""

    info: PodInfo
    created: float
    ended: float | None = None


@dataclass(frozen=True, slots=True)
class StoreCounts:
    """Sizes of the indexes, published by the owner after each change (for metrics and
    logs on any thread)."""

    nodes: int = 0
    pod_ips: int = 0
    services: int = 0
    rules: int = 0


ObjectKey = tuple[str, str, str, str]  # (API group, kind, namespace, name)
# What one object puts in the indexes: ("node", name, NodeInfo), ("pod", ip, PodLife),
# ("service", (ip, port, protocol), ServiceInfo) or ("rule", rule id, PolicyRule).
Entry = tuple[str, Any, Any]


def _meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def object_key(obj: Mapping[str, Any]) -> ObjectKey:
    """(API group, kind, namespace, name): a K8s and an Antrea NetworkPolicy of the same
    name are different objects."""
    namespace, name = _meta(obj)
    group = (obj.get("apiVersion") or "").rpartition("/")[0]
    return group, obj.get("kind", ""), namespace, name


class MetadataStore:
    """Objects by (group, kind, namespace, name), reduced to index entries.

    Owned by one thread: the one its source feeds it on (the agent's or aggregator's event
    loop, for the inventory file and for the API watch, whose threads hand their events to
    the loop). Readers on other threads (the poll thread, the deny-queue thread) only call
    the lookup methods, each one read of a dict whose values are immutable and replaced
    whole (atomic in CPython), and read `nodes` and `counts`, which the owner replaces
    whole. Nobody but the owner iterates an index. `version` grows with every change that
    alters a lookup, so a reader can tell when what it derived is stale.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        deleted_pod_retention: float = DELETED_POD_RETENTION,
    ) -> None:
        self.clock = clock
        self.retention = deleted_pod_retention
        self._entries: dict[ObjectKey, tuple[Entry, ...]] = {}
        self._nodes: dict[str, NodeInfo] = {}
        self._node_ips: dict[bytes, str] = {}
        self._pods: dict[bytes, tuple[PodLife, ...]] = {}
        self._services: dict[tuple[bytes, int, int], ServiceInfo] = {}
        self._rules: dict[int, PolicyRule] = {}
        self._ended: collections.deque[tuple[float, bytes, PodLife]] = collections.deque()
        self.version = 0
        self.nodes: tuple[NodeInfo, ...] = ()
        self.counts = StoreCounts()

    # -- owner-side views of the indexes (tests, logs) ------------------------------------

    @property
    def nodes_by_name(self) -> Mapping[str, NodeInfo]:
        return self._nodes

    @property
    def pods_by_ip(self) -> Mapping[bytes, tuple[PodLife, ...]]:
        return self._pods

    @property
    def services(self) -> Mapping[tuple[bytes, int, int], ServiceInfo]:
        return self._services

    @property
    def rules(self) -> Mapping[int, PolicyRule]:
        return self._rules

    def kinds(self) -> dict[tuple[str, str], int]:
        """Objects held, by (group, kind)."""
        out: dict[tuple[str, str], int] = collections.Counter()
        for group, kind, _, _ in self._entries:
            out[(group, kind)] += 1
        return dict(out)

    # -- feeding -------------------------------------------------------------------------

    def replace(
        self, objects: Iterable[Mapping[str, Any]], kinds: Iterable[tuple[str, str]] | None = None
    ) -> None:
        """Make the store hold exactly `objects` of `kinds` ((group, kind) pairs; all
        kinds when None): a full resync. Unchanged objects cost a comparison."""
        objects = list(objects)
        self.apply(("ADDED", obj) for obj in objects)
        self.remove_absent(kinds, {object_key(obj) for obj in objects})

    def remove_absent(self, kinds: Iterable[tuple[str, str]] | None, keep: set[ObjectKey]) -> None:
        """Remove the objects of `kinds` (all when None) whose keys are not in `keep`: what
        a resync no longer found."""
        now = self.clock()
        scope = None if kinds is None else set(kinds)
        for key in [k for k in self._entries if k not in keep]:
            if scope is None or (key[0], key[1]) in scope:
                self._set(key, (), now)
        self._published()

    def upsert(self, obj: Mapping[str, Any]) -> None:
        now = self.clock()
        key = object_key(obj)
        self._set(key, self._derive(obj, key, now), now)
        self._published()

    def remove(self, obj: Mapping[str, Any]) -> None:
        now = self.clock()
        self._set(object_key(obj), (), now)
        self._published()

    def apply(self, events: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        """Watch events in order: (ADDED | MODIFIED | DELETED, object)."""
        now = self.clock()
        for kind, obj in events:
            key = object_key(obj)
            entries = () if kind == "DELETED" else self._derive(obj, key, now)
            self._set(key, entries, now)
        self._published()

    def expire(self) -> None:
        """Forget Pods deleted longer ago than the retention (lookups already ignore them;
        this frees them)."""
        self._published()

    def _derive(self, obj: Mapping[str, Any], key: ObjectKey, now: float) -> tuple[Entry, ...]:
        """The index entries of `obj` (none when it is malformed: it is reported)."""
        kind = key[1]
        try:
            if kind == "Node":
                return _node_entries(obj)
            if kind == "Pod":
                return self._pod_entries(obj, key, now)
            if kind == "Service":
                return _service_entries(obj)
            policy_type = NETWORK_POLICY_KINDS.get((obj.get("apiVersion", ""), kind))
            if policy_type is not None:
                return tuple(("rule", r.rule_id, r) for r in _policy_rules(obj, policy_type))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring malformed %s %s/%s: %s", kind, key[2], key[3], exc)
        return ()

    def _pod_entries(self, obj: Mapping[str, Any], key: ObjectKey, now: float):
        previous = {e[1]: e[2] for e in self._entries.get(key, ())}
        entries = []
        for ip, info, created, running in _pod(obj):
            held = previous.get(ip)
            if held is not None and held.info == info and (held.ended is None) == running:
                entries.append(("pod", ip, held))
                continue
            ended = None if running else (held.ended if held and held.ended else now)
            entries.append(("pod", ip, PodLife(info, created, ended)))
        return tuple(entries)

    def _set(self, key: ObjectKey, entries: tuple[Entry, ...], now: float) -> None:
        old = self._entries.get(key, ())
        if old == entries:
            return
        if entries:
            self._entries[key] = entries
        else:
            self._entries.pop(key, None)
        new_places = {(e[0], e[1]) for e in entries}
        for index, place, value in old:
            if (index, place) not in new_places:
                self._drop(index, place, value, now)
        for index, place, value in entries:
            self._put(index, place, value)
        self.version += 1

    def _put(self, index: str, place: Any, value: Any) -> None:
        if index == "pod":
            others = tuple(
                life
                for life in self._pods.get(place, ())
                if life.info.name != value.info.name or life.info.namespace != value.info.namespace
            )
            self._pods[place] = tuple(sorted((*others, value), key=lambda life: life.created))
            if value.ended is not None:
                self._ended.append((value.ended + self.retention, place, value))
        elif index == "node":
            previous = self._nodes.get(place)
            if previous is not None:
                self._unindex_node(previous)
            self._nodes[place] = value
            for address in value.addresses:
                self._node_ips[pack_ip(address)] = place
            self.nodes = tuple(self._nodes.values())
        elif index == "service":
            self._services[place] = value
        else:
            self._rules[place] = value

    def _drop(self, index: str, place: Any, value: Any, now: float) -> None:
        """Take out what an object put at `place`, unless another object has put its own
        value there since (the newer holder wins)."""
        if index == "pod":
            # A Pod that goes (deleted, or its IP changed) still resolves for a while.
            if value.ended is None:
                self._put("pod", place, PodLife(value.info, value.created, now))
        elif index == "node":
            node: NodeInfo = value
            if self._nodes.get(place) is node:
                del self._nodes[place]
                self._unindex_node(node)
                self.nodes = tuple(self._nodes.values())
        elif index == "service":
            if self._services.get(place) is value:
                del self._services[place]
        elif self._rules.get(place) is value:
            del self._rules[place]

    def _unindex_node(self, node: NodeInfo) -> None:
        for address in node.addresses:
            packed = pack_ip(address)
            if self._node_ips.get(packed) == node.name:
                del self._node_ips[packed]

    def _purge(self, now: float) -> None:
        ended = self._ended
        while ended and ended[0][0] <= now:
            _, ip, life = ended.popleft()
            lives = self._pods.get(ip)
            if lives is None or life not in lives:
                continue  # replaced since
            rest = tuple(other for other in lives if other is not life)
            if rest:
                self._pods[ip] = rest
            else:
                del self._pods[ip]
            self.version += 1

    def _published(self) -> None:
        self._purge(self.clock())
        self.counts = StoreCounts(
            len(self._nodes), len(self._pods), len(self._services), len(self._rules)
        )

    # -- lookups (any thread) ------------------------------------------------------------

    def pod(self, ip: bytes, at: float | None = None) -> PodInfo | None:
        """The Pod that had `ip` at time `at` (a flow's start, seconds since the epoch), or
        the one that has it now (or had it last, within the retention) when `at` is None."""
        lives = self._pods.get(ip)
        if not lives:
            return None
        if at is None:
            life = lives[-1]
            for candidate in lives:
                if candidate.ended is None:
                    life = candidate
        else:
            # The last Pod created by then; before every known Pod: the clocks disagree.
            life = lives[0]
            for candidate in lives:
                if candidate.created <= at + _CLOCK_SLACK:
                    life = candidate
            if life.ended is not None and life.ended < at - _CLOCK_SLACK:
                return None  # that Pod was gone when the flow started
        if life.ended is not None and self.clock() - life.ended > self.retention:
            return None
        return life.info

    def service(self, ip: bytes, port: int, protocol: int) -> ServiceInfo | None:
        return self._services.get((ip, port, protocol))

    def rule(self, rule_id: int) -> PolicyRule | None:
        return self._rules.get(rule_id)

    def node(self, name: str) -> NodeInfo | None:
        return self._nodes.get(name)

    def node_name_of(self, ip: bytes) -> str | None:
        """The Node that has `ip` as one of its addresses."""
        return self._node_ips.get(ip)


def _node_entries(obj: Mapping[str, Any]) -> tuple[Entry, ...]:
    _, name = _meta(obj)
    spec = obj.get("spec") or {}
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    addresses = [a["address"] for a in (obj.get("status") or {}).get("addresses") or []]
    node = NodeInfo(
        name,
        tuple(ipaddress.ip_network(c, strict=False) for c in cidrs),
        tuple(a for a in addresses if is_ip(a)),
    )
    return (("node", name, node),)


def _timestamp(text: Any) -> float:
    """An RFC 3339 time of the API (`2026-12-07T19:00:00Z`) in seconds; 0 when absent."""
    if not text:
        return 0.0
    return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


def _pod(obj: Mapping[str, Any]) -> list[tuple[bytes, PodInfo, float, bool]]:
    """(packed IP, the Pod, its creation time, whether it still holds the IP) per Pod IP."""
    namespace, name = _meta(obj)
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if spec.get("hostNetwork"):
        return []  # a host-network Pod's IP is its Node's, not the Pod's
    metadata = obj.get("metadata") or {}
    labels = metadata.get("labels") or {}
    info = PodInfo(namespace, name, spec.get("nodeName") or "", dict(labels))
    created = _timestamp(metadata.get("creationTimestamp"))
    running = status.get("phase") not in _TERMINAL_PHASES
    ips = [p["ip"] for p in status.get("podIPs") or []] or (
        [status["podIP"]] if status.get("podIP") else []
    )
    return [(pack_ip(ip), info, created, running) for ip in ips]


def _service_entries(obj: Mapping[str, Any]) -> tuple[Entry, ...]:
    namespace, name = _meta(obj)
    spec = obj.get("spec") or {}
    cluster_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    out = []
    for ip in cluster_ips:
        if ip == "None":  # headless
            continue
        packed = pack_ip(ip)
        for port in spec.get("ports") or []:
            protocol = PROTOCOL_NUMBERS.get(port.get("protocol", "TCP"), 6)
            info = ServiceInfo(namespace, name, port.get("name") or "")
            out.append(("service", (packed, int(port["port"]), protocol), info))
    return tuple(out)


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
