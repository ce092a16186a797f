"""Exported records read back from ClickHouse's `flows` table, for the flow API's history
and `antrea-flow observe --clickhouse`: a FlowFilter as a SELECT, and rows as records keyed
by IE names again.

The SQL says what the filter says, to the second for times; callers keep only the rows the
filter itself matches, so the two can never disagree. IO-free: the database adapters in
`clickhouse` run the statement.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Sequence
from typing import Any

from ..codes import ACTION_DROP, ACTION_REJECT
from ..flowfilter import FlowFilter, NamedMatch, PodMatch
from .chschema import FLOWS, Column

_DENIED = f"({ACTION_DROP}, {ACTION_REJECT})"


def quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _like(text: str) -> str:
    """`text` as a LIKE pattern that matches it literally."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _strings(values: Iterable[str]) -> str:
    return "(" + ", ".join(quote(v) for v in sorted(values)) + ")"


def _numbers(values: Iterable[int]) -> str:
    return "(" + ", ".join(str(v) for v in sorted(values)) + ")"


def _any(conditions: Iterable[str]) -> str:
    return "(" + " OR ".join(conditions) + ")"


def _pod(match: PodMatch, side: str) -> str:
    name = f"{side}PodName"
    condition = f"{name} != '' AND startsWith({name}, {quote(match.prefix)})"
    if match.namespace is not None:
        condition += f" AND {side}PodNamespace = {quote(match.namespace)}"
    return f"({condition})"


def _service(match: NamedMatch) -> str:
    namespace = _like(match.namespace) if match.namespace is not None else "%"
    # The name may carry the port's name (NAME:PORT), matched whole, or leave it open.
    suffix = "" if ":" in match.name else ":%"
    return f"destinationServicePortName LIKE {quote(f'{namespace}/{_like(match.name)}{suffix}')}"


def _policy(match: NamedMatch) -> str:
    sides = []
    for direction in ("ingress", "egress"):
        condition = f"{direction}NetworkPolicyName = {quote(match.name)}"
        if match.namespace is not None:
            condition += f" AND {direction}NetworkPolicyNamespace = {quote(match.namespace)}"
        sides.append(f"({condition})")
    return _any(sides)


def _in_networks(column: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]):
    # An empty address (no cluster IP) is never in a range: compared as the unspecified one of
    # the range's family, which no range but /0 holds.
    checks = []
    for network in networks:
        unspecified = "::" if network.version == 6 else "0.0.0.0"
        checks.append(
            f"({column} != '' AND isIPAddressInRange(if({column} = '', '{unspecified}', "
            f"{column}), {quote(str(network))}))"
        )
    return _any(checks)


def _verdict(verdict: str) -> str:
    ingress, egress = "ingressNetworkPolicyRuleAction", "egressNetworkPolicyRuleAction"
    dropped = f"({ingress} = {ACTION_DROP} OR {egress} = {ACTION_DROP})"
    if verdict == "DROPPED":
        return dropped
    if verdict == "REJECTED":
        return f"(({ingress} = {ACTION_REJECT} OR {egress} = {ACTION_REJECT}) AND NOT {dropped})"
    return f"NOT ({ingress} IN {_DENIED} OR {egress} IN {_DENIED})"


def where(flow_filter: FlowFilter) -> list[str]:
    """The filter's conditions on the `flows` table's columns."""
    f = flow_filter
    conditions = []
    if f.since is not None:
        conditions.append(f"flowEndSeconds >= toDateTime({math.floor(f.since)})")
    if f.until is not None:
        conditions.append(f"flowEndSeconds <= toDateTime({math.ceil(f.until)})")
    if f.types:
        conditions.append(f"flowType IN {_numbers(f.types)}")
    if f.protocols:
        conditions.append(f"protocolIdentifier IN {_numbers(f.protocols)}")
    if f.verdicts:
        conditions.append(_any(_verdict(v) for v in sorted(f.verdicts)))
    if f.namespaces:
        names = _strings(f.namespaces)
        conditions.append(f"(sourcePodNamespace IN {names} OR destinationPodNamespace IN {names})")
    if f.from_namespaces:
        conditions.append(f"sourcePodNamespace IN {_strings(f.from_namespaces)}")
    if f.to_namespaces:
        conditions.append(f"destinationPodNamespace IN {_strings(f.to_namespaces)}")
    if f.pods:
        conditions.append(_any(_pod(p, s) for p in f.pods for s in ("source", "destination")))
    if f.from_pods:
        conditions.append(_any(_pod(p, "source") for p in f.from_pods))
    if f.to_pods:
        conditions.append(_any(_pod(p, "destination") for p in f.to_pods))
    if f.nodes:
        names = _strings(f.nodes)
        conditions.append(f"(sourceNodeName IN {names} OR destinationNodeName IN {names})")
    if f.services:
        conditions.append(_any(_service(s) for s in f.services))
    if f.policies:
        conditions.append(_any(_policy(p) for p in f.policies))
    destination_ports = ("destinationTransportPort", "destinationServicePort")
    if f.ports:
        ports = _numbers(f.ports)
        columns = ("sourceTransportPort", *destination_ports)
        conditions.append(_any(f"{c} IN {ports}" for c in columns))
    if f.from_ports:
        conditions.append(f"sourceTransportPort IN {_numbers(f.from_ports)}")
    if f.to_ports:
        ports = _numbers(f.to_ports)
        conditions.append(_any(f"{c} IN {ports}" for c in destination_ports))
    destination_ips = ("destinationIP", "destinationClusterIP")
    if f.ips:
        columns = ("sourceIP", *destination_ips)
        conditions.append(_any(_in_networks(c, f.ips) for c in columns))
    if f.from_ips:
        conditions.append(_in_networks("sourceIP", f.from_ips))
    if f.to_ips:
        conditions.append(_any(_in_networks(c, f.to_ips) for c in destination_ips))
    return conditions


def select(database: str, columns: Sequence[Column], flow_filter: FlowFilter, last: int) -> str:
    """The latest `last` rows the filter matches, newest first."""
    conditions = where(flow_filter)
    clause = "\nWHERE " + "\n  AND ".join(conditions) if conditions else ""
    order = (
        "flowEndMilliseconds"
        if any(c.name == "flowEndMilliseconds" for c in columns)
        else ("flowEndSeconds")
    )
    return (
        f"SELECT {', '.join(_selected(c) for c in columns)}\nFROM {database}.{FLOWS}{clause}\n"
        f"ORDER BY {order} DESC, timeInserted DESC\nLIMIT {last}"
    )


def _selected(column: Column) -> str:
    # Times as epoch numbers: a DateTime read as a Python datetime depends on time zones.
    if column.sql_type == "DateTime":
        return f"toUnixTimestamp({column.name}) AS {column.name}"
    if column.sql_type.startswith("DateTime64"):
        return f"toUnixTimestamp64Milli({column.name}) AS {column.name}"
    return column.name


def records(columns: Sequence[Column], rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """Rows of `columns` as records: each column under its element's name again (the
    address family's where Theia has one column for both), times as epoch seconds and
    milliseconds."""
    out = []
    names = [c.name for c in columns]
    source_ip = names.index("sourceIP") if "sourceIP" in names else None
    for row in rows:
        family = int(source_ip is not None and ":" in str(row[source_ip]))
        record: dict[str, Any] = {}
        for column, value in zip(columns, row, strict=True):
            element = column.elements[family]
            if column.alternative and value and ":" in str(value):
                element = column.alternative  # the exporter's own family
            record[element] = bool(value) if column.name == "incomplete" else value
        out.append(record)
    return out
