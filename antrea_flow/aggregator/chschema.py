"""The ClickHouse schema of exported flow records, and records turned into its columns.

The `flows` table is Theia's (its columns, types, ordering key and TTL), with the columns
upstream's aggregator inserts that Theia's table lacks (`egressNodeName`) and ours after
them: each Node's counters, the counter path's TCP flags and packet times in
milliseconds, the provenance of the latest record and whether the record is a half
exported without its peer. The views are Theia's `flows_pod_view`, `flows_node_view` and
`flows_policy_view` (SummingMergeTree, fed by materialized views), which its Grafana
dashboards query. `antrea_flow_schema` records the version of what was created, so a
later release can migrate it.

IO-free: statements as text, records as a pyarrow Table; the database adapters in
`clickhouse` run them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..ipfix.antrea import FlowRecord

SCHEMA_VERSION = 1
VERSION_TABLE = "antrea_flow_schema"
FLOWS = "flows"


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    sql_type: str  # the column's ClickHouse type
    elements: tuple[str, str]  # the record's element for it in IPv4 and in IPv6 records
    default: object  # its value when a record lacks the element
    alternative: str | None  # an element taken where the first is empty
    optional: bool  # records often lack it: read apart, not in the one lookup of the others
    # Arrow's conversion of the column's values (after it, ClickHouse's: seconds to
    # DateTime); `fix` mends what the elements say differently from Theia.
    fix: Callable[[pa.Array], pa.Array] | None = None

    @property
    def arrow_type(self) -> pa.DataType:
        return _TYPES[self.sql_type]


_TYPES = {
    "DateTime": pa.uint32(),  # from epoch seconds
    "DateTime64(3)": pa.timestamp("ms"),  # from epoch milliseconds
    "String": pa.string(),
    "UInt8": pa.uint8(),
    "UInt16": pa.uint16(),
    "UInt32": pa.uint32(),
    "UInt64": pa.uint64(),
}


def _column(
    name: str,
    sql_type: str,
    ipv4: str | None = None,
    ipv6: str | None = None,
    fix: Callable[[pa.Array], pa.Array] | None = None,
    default: object = None,
    alternative: str | None = None,
    optional: bool = False,
) -> Column:
    """A column from the element of its name, or from an element of each address family
    (Theia has one address column for both)."""
    if default is None:
        default = "" if sql_type == "String" else 0
    elements = (ipv4 or name, ipv6 or ipv4 or name)
    return Column(
        name, sql_type, elements, default, alternative, optional or bool(alternative), fix
    )


def _no_service(ips: pa.Array) -> pa.Array:
    # An agent sends 0.0.0.0 or :: for a connection without a Service: Theia stores "".
    unset = pc.is_in(ips, pa.array(["0.0.0.0", "::"]))
    return pc.if_else(unset, pa.scalar("", pa.string()), ips)


def _as_flag(values: pa.Array) -> pa.Array:
    return pc.cast(values, pa.uint8())


# Theia's order: packetTotalCount, octetTotalCount, packetDeltaCount, ... reverse...
_COUNTERS = [
    f"{direction}{kind if direction else kind.lower()}{unit}Count"
    for direction in ("", "reverse")
    for unit in ("Total", "Delta")
    for kind in ("Packet", "Octet")
]

# Theia's columns, in its order, less those antrea-flow's records have nothing for, which
# keep their defaults: timeInserted (now()), trusted, clusterUUID and the Egress columns.
THEIA_COLUMNS: tuple[Column, ...] = (
    _column("flowStartSeconds", "DateTime"),
    _column("flowEndSeconds", "DateTime"),
    _column("flowEndSecondsFromSourceNode", "DateTime"),
    _column("flowEndSecondsFromDestinationNode", "DateTime"),
    _column("flowEndReason", "UInt8"),
    _column("sourceIP", "String", "sourceIPv4Address", "sourceIPv6Address"),
    _column("destinationIP", "String", "destinationIPv4Address", "destinationIPv6Address"),
    _column("sourceTransportPort", "UInt16"),
    _column("destinationTransportPort", "UInt16"),
    _column("protocolIdentifier", "UInt8"),
    *(_column(name, "UInt64") for name in _COUNTERS),
    _column("sourcePodName", "String"),
    _column("sourcePodNamespace", "String"),
    _column("sourceNodeName", "String"),
    _column("destinationPodName", "String"),
    _column("destinationPodNamespace", "String"),
    _column("destinationNodeName", "String"),
    _column(
        "destinationClusterIP",
        "String",
        "destinationClusterIPv4",
        "destinationClusterIPv6",
        fix=_no_service,
    ),
    _column("destinationServicePort", "UInt16"),
    _column("destinationServicePortName", "String"),
    _column("ingressNetworkPolicyName", "String"),
    _column("ingressNetworkPolicyNamespace", "String"),
    _column("ingressNetworkPolicyRuleName", "String"),
    _column("ingressNetworkPolicyRuleAction", "UInt8"),
    _column("ingressNetworkPolicyType", "UInt8"),
    _column("egressNetworkPolicyName", "String"),
    _column("egressNetworkPolicyNamespace", "String"),
    _column("egressNetworkPolicyRuleName", "String"),
    _column("egressNetworkPolicyRuleAction", "UInt8"),
    _column("egressNetworkPolicyType", "UInt8"),
    _column("tcpState", "String"),
    _column("flowType", "UInt8"),
    # Only with metadata (the API or an inventory file).
    _column("sourcePodLabels", "String", optional=True),
    _column("destinationPodLabels", "String", optional=True),
    _column("throughput", "UInt64"),
    _column("reverseThroughput", "UInt64"),
    _column("throughputFromSourceNode", "UInt64"),
    _column("throughputFromDestinationNode", "UInt64"),
    _column("reverseThroughputFromSourceNode", "UInt64"),
    _column("reverseThroughputFromDestinationNode", "UInt64"),
)
# Theia's columns the records leave to their defaults, after the others.
_THEIA_DEFAULTS = (
    "clusterUUID String",
    "trusted UInt8 DEFAULT 0",
    "egressName String",
    "egressIP String",
    "egressNodeName String",  # upstream's aggregator inserts it; Theia's table lacks it
)

OUR_COLUMNS: tuple[Column, ...] = (
    *(
        _column(f"{name}From{side}", "UInt64")
        for name in _COUNTERS
        for side in ("SourceNode", "DestinationNode")
    ),
    _column("flowStartMilliseconds", "DateTime64(3)"),
    _column("flowEndMilliseconds", "DateTime64(3)"),
    _column("tcpControlBits", "UInt16"),
    # The exporter's family is not the flow's.
    _column(
        "originalExporterIP",
        "String",
        "originalExporterIPv4Address",
        alternative="originalExporterIPv6Address",
    ),  # fmt: skip
    _column("originalObservationDomainId", "UInt32"),
    _column("incomplete", "UInt8", fix=_as_flag, default=False, optional=True),  # a bool
)

COLUMNS: tuple[Column, ...] = THEIA_COLUMNS + OUR_COLUMNS


def records_table(records: Sequence[FlowRecord], columns: Sequence[Column] = COLUMNS) -> pa.Table:
    """`records` as one Arrow table of `columns`, in their order, built with no per-record
    Python work but one C-level lookup of all its elements (records lacking some take the
    defaults): the insert is columnar from there."""
    by_family: tuple[list[FlowRecord], list[FlowRecord]] = ([], [])
    ipv6 = [("sourceIPv6Address" in record) for record in records]
    for record, family in zip(records, ipv6, strict=True):
        by_family[family].append(record)
    if not records:
        return pa.Table.from_arrays(
            [pa.array([], c.arrow_type) for c in columns], names=[c.name for c in columns]
        )
    if not by_family[0] or not by_family[1]:
        return _family_table(int(ipv6[0]), records, columns)  # one family: already in order
    both = pa.concat_tables([_family_table(f, by_family[f], columns) for f in (0, 1)])
    # Back in the records' order (the oldest rows are the first the sink would drop).
    families = np.array(ipv6)
    placed = np.concatenate([np.flatnonzero(~families), np.flatnonzero(families)])
    return both.take(np.argsort(placed, kind="stable"))


def _family_table(
    family: int, records: Sequence[FlowRecord], columns: Sequence[Column]
) -> pa.Table:
    common = [c for c in columns if not c.optional]
    lookup = operator.itemgetter(*(c.elements[family] for c in common))
    defaults = {c.elements[family]: c.default for c in common}
    rows = []
    for record in records:
        try:
            rows.append(lookup(record))
        except KeyError:  # rare: a record without one of the elements every record has
            rows.append(lookup({**defaults, **record}))
    values = dict(zip((c.name for c in common), zip(*rows, strict=True), strict=True))
    arrays = []
    for column in columns:
        column_values: Sequence[object]
        if column.optional:
            element, default = column.elements[family], column.default
            column_values = [record.get(element, default) for record in records]
        else:
            column_values = values[column.name]
        array = pa.array(column_values, column.arrow_type if column.fix is None else None)
        if column.fix is not None:
            array = column.fix(array)
        if column.alternative:
            alternative, default = column.alternative, column.default
            others = pa.array([r.get(alternative, default) for r in records], column.arrow_type)
            array = pc.if_else(pc.equal(array, column.default), others, array)
        arrays.append(array)
    return pa.Table.from_arrays(arrays, names=[c.name for c in columns])


def _ttl(seconds: int) -> str:
    return f"TTL timeInserted + INTERVAL {seconds} SECOND" if seconds else ""


def flows_table(database: str, ttl_seconds: int) -> str:
    columns = ",\n    ".join(
        ["timeInserted DateTime DEFAULT now()"]
        + [f"{c.name} {c.sql_type}" for c in THEIA_COLUMNS]
        + list(_THEIA_DEFAULTS)
        + [f"{c.name} {c.sql_type}" for c in OUR_COLUMNS]
    )
    return (
        f"CREATE TABLE IF NOT EXISTS {database}.{FLOWS} (\n    {columns}\n)\n"
        f"ENGINE = MergeTree\nORDER BY (timeInserted, flowEndSeconds)\n{_ttl(ttl_seconds)}\n"
        # As Theia: expired rows are merged away at most an hour after they expire. A
        # retried insert with the token of one stored before is ignored (the last 1000).
        "SETTINGS merge_with_ttl_timeout = 3600, non_replicated_deduplication_window = 1000"
    )


_TIMES = (
    "timeInserted",
    "flowEndSeconds",
    "flowEndSecondsFromSourceNode",
    "flowEndSecondsFromDestinationNode",
)
_POD_KEYS = _TIMES + (
    "sourcePodName", "destinationPodName", "destinationIP", "destinationServicePort",
    "destinationServicePortName", "flowType", "sourcePodNamespace", "destinationPodNamespace",
    "sourceTransportPort", "destinationTransportPort", "clusterUUID",
)  # fmt: skip
_NODE_KEYS = _TIMES + (
    "sourceNodeName", "destinationNodeName", "sourcePodNamespace", "destinationPodNamespace",
    "clusterUUID",
)  # fmt: skip
_POLICY_KEYS = _TIMES + (
    "egressNetworkPolicyName", "egressNetworkPolicyNamespace", "egressNetworkPolicyRuleAction",
    "ingressNetworkPolicyName", "ingressNetworkPolicyNamespace",
    "ingressNetworkPolicyRuleAction", "sourcePodName", "sourceTransportPort",
    "sourcePodNamespace", "destinationPodName", "destinationTransportPort",
    "destinationPodNamespace", "destinationServicePort", "destinationServicePortName",
    "destinationIP", "clusterUUID",
)  # fmt: skip
_POD_SUMS = (
    "octetDeltaCount", "reverseOctetDeltaCount", "throughput", "reverseThroughput",
    "throughputFromSourceNode", "throughputFromDestinationNode",
)  # fmt: skip
_NODE_SUMS = (
    "octetDeltaCount", "reverseOctetDeltaCount", "throughput", "reverseThroughput",
    "throughputFromSourceNode", "reverseThroughputFromSourceNode",
    "throughputFromDestinationNode", "reverseThroughputFromDestinationNode",
)  # fmt: skip

# Theia's views: name -> (key columns, summed columns).
VIEWS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "flows_pod_view": (_POD_KEYS, _POD_SUMS),
    "flows_node_view": (_NODE_KEYS, _NODE_SUMS),
    "flows_policy_view": (_POLICY_KEYS, _NODE_SUMS),
}


def view(database: str, name: str, ttl_seconds: int) -> str:
    keys, sums = VIEWS[name]
    selected = ",\n    ".join([*keys, *(f"sum({s}) AS {s}" for s in sums)])
    return (
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.{name}\nENGINE = SummingMergeTree\n"
        f"ORDER BY ({', '.join(keys)})\n{_ttl(ttl_seconds)}\n"
        "SETTINGS merge_with_ttl_timeout = 3600\n"
        f"POPULATE\nAS SELECT\n    {selected}\nFROM {database}.{FLOWS}\n"
        f"GROUP BY {', '.join(keys)}"
    )


def create_statements(database: str, ttl_seconds: int) -> list[str]:
    """What makes a fresh database: the flows table, the views, and the version table with
    this release's version."""
    return [
        flows_table(database, ttl_seconds),
        *(view(database, name, ttl_seconds) for name in VIEWS),
        f"CREATE TABLE IF NOT EXISTS {database}.{VERSION_TABLE} "
        "(version UInt32, applied DateTime DEFAULT now()) ENGINE = MergeTree ORDER BY version",
        f"INSERT INTO {database}.{VERSION_TABLE} (version) VALUES ({SCHEMA_VERSION})",
    ]
