"""Which exported flow records a user asked for: `antrea-flow observe`'s flags and the flow
API's query parameters, parsed into one FlowFilter that the API, the CLI's file source and
the UI all apply the same way.

The parameters carry the flags' long names (`pod`, `from-pod`, `verdict`, ...). A parameter
given several times matches any of its values; different parameters must all match. A bare
Pod name (no `NAMESPACE/`) is looked for in the namespaces given by `namespace` (or by
`from-namespace` / `to-namespace` for `from-pod` / `to-pod`), and in any namespace when
there are none: `--pod web -n backend` means backend/web*, where hubble refuses the pair.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .codes import (
    ACTION_DROP,
    ACTION_REJECT,
    FLOW_TYPE_FROM_EXTERNAL,
    FLOW_TYPE_INTER_NODE,
    FLOW_TYPE_INTRA_NODE,
    FLOW_TYPE_TO_EXTERNAL,
)
from .durations import parse_duration
from .errors import UsageError

Record = Mapping[str, Any]

VERDICTS = ("ALLOWED", "DROPPED", "REJECTED")
FLOW_TYPES = {
    "intra-node": FLOW_TYPE_INTRA_NODE,
    "inter-node": FLOW_TYPE_INTER_NODE,
    "to-external": FLOW_TYPE_TO_EXTERNAL,
    "from-external": FLOW_TYPE_FROM_EXTERNAL,
}
FLOW_TYPE_NAMES = {code: name for name, code in FLOW_TYPES.items()}
PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "ipv6-icmp": 58, "sctp": 132}
PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}

# Every parameter a filter takes, with the accepted form its errors quote.
FILTER_PARAMETERS = {
    "pod": "[NAMESPACE/]NAME-PREFIX, e.g. backend/web or web",
    "from-pod": "[NAMESPACE/]NAME-PREFIX",
    "to-pod": "[NAMESPACE/]NAME-PREFIX",
    "namespace": "a namespace name",
    "from-namespace": "a namespace name",
    "to-namespace": "a namespace name",
    "service": "[NAMESPACE/]NAME[:PORT-NAME], e.g. backend/web",
    "node": "a Node name",
    "ip": "an IP address or CIDR, e.g. 10.10.1.2 or 10.10.0.0/16",
    "from-ip": "an IP address or CIDR",
    "to-ip": "an IP address or CIDR",
    "port": "a port number 0-65535",
    "from-port": "a port number 0-65535",
    "to-port": "a port number 0-65535",
    "protocol": "tcp, udp, sctp, icmp, icmpv6 or a protocol number 0-255",
    "verdict": "ALLOWED, DROPPED or REJECTED",
    "policy": "[NAMESPACE/]NAME of a NetworkPolicy",
    "type": "intra-node, inter-node, to-external or from-external",
    "since": 'a duration ago such as "5m" or "1h30m", or a time such as 2026-12-07T10:00:00Z',
    "until": 'a duration ago such as "5m", or a time such as 2026-12-07T10:00:00Z',
}


class FilterError(UsageError):
    """A parameter with a value of the wrong form; `parameter` names it."""

    def __init__(self, parameter: str, value: str, form: str):
        self.parameter, self.value, self.form = parameter, value, form
        super().__init__(f"{parameter}: {value!r} is not valid; expected {form}")


@dataclass(frozen=True, slots=True)
class PodMatch:
    namespace: str | None  # None: any namespace
    prefix: str  # "" with a namespace: every Pod of it

    def matches(self, namespace: str, name: str) -> bool:
        return bool(name) and name.startswith(self.prefix) and self.namespace in (None, namespace)


@dataclass(frozen=True, slots=True)
class NamedMatch:
    """A Service or a NetworkPolicy by [namespace/]name."""

    namespace: str | None
    name: str

    def matches(self, namespace: str, name: str) -> bool:
        return name == self.name and self.namespace in (None, namespace)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """Records wanted; the empty filter takes every record."""

    pods: tuple[PodMatch, ...] = ()
    from_pods: tuple[PodMatch, ...] = ()
    to_pods: tuple[PodMatch, ...] = ()
    namespaces: frozenset[str] = frozenset()
    from_namespaces: frozenset[str] = frozenset()
    to_namespaces: frozenset[str] = frozenset()
    services: tuple[NamedMatch, ...] = ()
    nodes: frozenset[str] = frozenset()
    ips: tuple[Network, ...] = ()
    from_ips: tuple[Network, ...] = ()
    to_ips: tuple[Network, ...] = ()
    ports: frozenset[int] = frozenset()
    from_ports: frozenset[int] = frozenset()
    to_ports: frozenset[int] = frozenset()
    protocols: frozenset[int] = frozenset()
    verdicts: frozenset[str] = frozenset()
    policies: tuple[NamedMatch, ...] = ()
    types: frozenset[int] = frozenset()
    since: float | None = None  # epoch seconds, of the flow's end
    until: float | None = None

    def matches(self, record: Record) -> bool:
        get = record.get
        if self.since is not None or self.until is not None:
            end = flow_end(record)
            if (self.since is not None and end < self.since) or (
                self.until is not None and end > self.until
            ):
                return False
        if self.types and get("flowType") not in self.types:
            return False
        if self.protocols and get("protocolIdentifier") not in self.protocols:
            return False
        if self.verdicts and verdict(record) not in self.verdicts:
            return False
        src_ns, dst_ns = get("sourcePodNamespace", ""), get("destinationPodNamespace", "")
        src_pod, dst_pod = get("sourcePodName", ""), get("destinationPodName", "")
        if self.namespaces and src_ns not in self.namespaces and dst_ns not in self.namespaces:
            return False
        if self.from_namespaces and src_ns not in self.from_namespaces:
            return False
        if self.to_namespaces and dst_ns not in self.to_namespaces:
            return False
        if self.pods and not any(
            p.matches(src_ns, src_pod) or p.matches(dst_ns, dst_pod) for p in self.pods
        ):
            return False
        if self.from_pods and not any(p.matches(src_ns, src_pod) for p in self.from_pods):
            return False
        if self.to_pods and not any(p.matches(dst_ns, dst_pod) for p in self.to_pods):
            return False
        if self.nodes and not (
            get("sourceNodeName") in self.nodes or get("destinationNodeName") in self.nodes
        ):
            return False
        if self.services and not _matches_service(self.services, get("destinationServicePortName")):
            return False
        if self.policies and not _matches_policy(self.policies, record):
            return False
        if self.ports or self.from_ports or self.to_ports:
            src_port, dst_ports = get("sourceTransportPort"), _destination_ports(record)
            if self.ports and src_port not in self.ports and self.ports.isdisjoint(dst_ports):
                return False
            if self.from_ports and src_port not in self.from_ports:
                return False
            if self.to_ports and self.to_ports.isdisjoint(dst_ports):
                return False
        if self.ips or self.from_ips or self.to_ips:
            src, dst = source_ip(record), _destination_ips(record)
            if self.ips and not (_in(src, self.ips) or any(_in(ip, self.ips) for ip in dst)):
                return False
            if self.from_ips and not _in(src, self.from_ips):
                return False
            if self.to_ips and not any(_in(ip, self.to_ips) for ip in dst):
                return False
        return True


def flow_end(record: Record) -> float:
    """When the flow was last seen, in epoch seconds (milliseconds when the record has them)."""
    ms = record.get("flowEndMilliseconds")
    return ms / 1000 if ms else float(record.get("flowEndSeconds") or 0)


def verdict(record: Record) -> str:
    """DROPPED or REJECTED when a rule of either side did so, ALLOWED otherwise."""
    actions = (
        record.get("ingressNetworkPolicyRuleAction"),
        record.get("egressNetworkPolicyRuleAction"),
    )
    if ACTION_DROP in actions:
        return "DROPPED"
    if ACTION_REJECT in actions:
        return "REJECTED"
    return "ALLOWED"


def source_ip(record: Record) -> str:
    return record.get("sourceIPv4Address") or record.get("sourceIPv6Address") or ""


def destination_ip(record: Record) -> str:
    return record.get("destinationIPv4Address") or record.get("destinationIPv6Address") or ""


def service_parts(port_name: str) -> tuple[str, str, str]:
    """("backend", "web", "http") of "backend/web:http"; empty parts where absent."""
    namespace, _, rest = port_name.rpartition("/")
    name, _, port = rest.partition(":")
    return namespace, name, port


def _destination_ips(record: Record) -> tuple[str, ...]:
    """The address dialled as well as the one reached: a Service's cluster IP counts."""
    cluster = record.get("destinationClusterIPv4") or record.get("destinationClusterIPv6")
    dst = destination_ip(record)
    return (dst, cluster) if cluster and cluster not in ("0.0.0.0", "::") else (dst,)


def _destination_ports(record: Record) -> set[int | None]:
    ports = {record.get("destinationTransportPort")}
    if record.get("destinationServicePort"):
        ports.add(record["destinationServicePort"])
    return ports


def _in(ip: str, networks: tuple[Network, ...]) -> bool:
    if not ip:
        return False
    address = ipaddress.ip_address(ip)
    return any(address in network for network in networks)


def _matches_service(services: tuple[NamedMatch, ...], port_name: str | None) -> bool:
    if not port_name:
        return False
    namespace, name, port = service_parts(port_name)
    return any(
        s.matches(namespace, name) or s.matches(namespace, f"{name}:{port}") for s in services
    )


def _matches_policy(policies: tuple[NamedMatch, ...], record: Record) -> bool:
    get = record.get
    sides = (
        (get("ingressNetworkPolicyNamespace", ""), get("ingressNetworkPolicyName", "")),
        (get("egressNetworkPolicyNamespace", ""), get("egressNetworkPolicyName", "")),
    )
    return any(p.matches(ns, name) for p in policies for ns, name in sides if name)


def parse_filter(params: Mapping[str, Sequence[str]], now: float) -> FlowFilter:
    """The filter `params` ask for (each parameter's values as given); FilterError names the
    first parameter whose value has not the accepted form. Unknown parameters are the
    caller's to refuse."""

    def values(name: str) -> list[str]:
        return [v for v in params.get(name, ()) if v != ""]

    def each(name: str, parse) -> list:
        out = []
        for value in values(name):
            try:
                out.append(parse(value.strip()))
            except ValueError:
                raise FilterError(name, value, FILTER_PARAMETERS[name]) from None
        return out

    namespaces = frozenset(each("namespace", _name))
    from_namespaces = frozenset(each("from-namespace", _name))
    to_namespaces = frozenset(each("to-namespace", _name))

    def pods(name: str, default_namespaces: Iterable[str]) -> tuple[PodMatch, ...]:
        out: list[PodMatch] = []
        for namespace, prefix in each(name, _pod):
            if namespace is None and default_namespaces:
                out.extend(PodMatch(ns, prefix) for ns in sorted(default_namespaces))
            else:
                out.append(PodMatch(namespace, prefix))
        return tuple(out)

    since = each("since", lambda v: _time(v, now))
    until = each("until", lambda v: _time(v, now))
    return FlowFilter(
        pods=pods("pod", namespaces),
        from_pods=pods("from-pod", from_namespaces or namespaces),
        to_pods=pods("to-pod", to_namespaces or namespaces),
        namespaces=namespaces,
        from_namespaces=from_namespaces,
        to_namespaces=to_namespaces,
        services=tuple(each("service", _named)),
        nodes=frozenset(each("node", _name)),
        ips=tuple(each("ip", _network)),
        from_ips=tuple(each("from-ip", _network)),
        to_ips=tuple(each("to-ip", _network)),
        ports=frozenset(each("port", _port)),
        from_ports=frozenset(each("from-port", _port)),
        to_ports=frozenset(each("to-port", _port)),
        protocols=frozenset(each("protocol", _protocol)),
        verdicts=frozenset(each("verdict", _verdict)),
        policies=tuple(each("policy", _named)),
        types=frozenset(each("type", _flow_type)),
        since=min(since) if since else None,  # several: the widest window
        until=max(until) if until else None,
    )


def _name(value: str) -> str:
    if not value or "/" in value or any(c.isspace() for c in value):
        raise ValueError(value)
    return value


def _pod(value: str) -> tuple[str | None, str]:
    if "/" in value:
        namespace, _, prefix = value.partition("/")
        if "/" in prefix:
            raise ValueError(value)
        return _name(namespace), prefix
    return None, _name(value)


def _named(value: str) -> NamedMatch:
    namespace, prefix = _pod(value)
    return NamedMatch(namespace, _name(prefix))


def _network(value: str) -> Network:
    return ipaddress.ip_network(value, strict=False)


def _number(value: str) -> int:
    """A decimal number of ASCII digits (int() also takes "1_000" and other scripts' digits)."""
    if not (value.isascii() and value.isdigit()):
        raise ValueError(value)
    return int(value)


def _port(value: str) -> int:
    port = _number(value)
    if not 0 <= port <= 65535:
        raise ValueError(value)
    return port


def _protocol(value: str) -> int:
    if value.lower() in PROTOCOLS:
        return PROTOCOLS[value.lower()]
    number = _number(value)
    if not 0 <= number <= 255:
        raise ValueError(value)
    return number


def _verdict(value: str) -> str:
    upper = value.upper()
    if upper == "FORWARDED":  # hubble's word for it
        return "ALLOWED"
    if upper not in VERDICTS:
        raise ValueError(value)
    return upper


def _flow_type(value: str) -> int:
    try:
        return FLOW_TYPES[value.lower()]
    except KeyError:
        raise ValueError(value) from None


def _time(value: str, now: float) -> float:
    """Epoch seconds of "5m" (that long ago), an ISO 8601 time (UTC unless it says), or a
    number of epoch seconds."""
    try:
        ago = parse_duration(value)
    except ValueError:
        pass
    else:
        if ago < 0:
            raise ValueError(value)  # a time to come: no flow has ended then
        return now - ago
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(value)
        return seconds
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
