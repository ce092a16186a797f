"""Records into the ClickHouse schema's columns: every column from its element, both
address families in one batch, Theia's conventions, and the defaults of what is absent."""

from __future__ import annotations

import datetime

import pyarrow as pa
import pytest

from antrea_flow.aggregator import chschema
from antrea_flow.aggregator.aggregation import AggregationStore
from antrea_flow.aggregator.chschema import COLUMNS, records_table
from antrea_flow.ipfix.antrea import aggregator_element_names, exporter_templates


def aggregated(i: int, ipv6: bool) -> dict:
    """A record as the aggregator exports it: an agent's record through the real store."""
    template = exporter_templates(packet_details=True)[1 if ipv6 else 0]
    record = dict(zip(template.keys, template.values_from({}), strict=True))
    family = "IPv6" if ipv6 else "IPv4"
    start = 1_790_000_000 + i
    record.update(
        {
            f"source{family}Address": f"fd00::{i}" if ipv6 else f"10.10.1.{i}",
            f"destination{family}Address": f"fd00::{i + 1}" if ipv6 else f"10.10.1.{i + 1}",
            f"destinationCluster{family}": "fd00:96::10" if ipv6 else "10.96.0.10",
            "protocolIdentifier": 6,
            "sourceTransportPort": 40000 + i,
            "destinationTransportPort": 8080,
            "flowStartSeconds": start,
            "flowEndSeconds": start + 10,
            "flowStartMilliseconds": start * 1000 + 250,
            "flowEndMilliseconds": (start + 10) * 1000 + 750,
            "tcpControlBits": 0x1B,
            "packetTotalCount": 4 + i,
            "packetDeltaCount": 4 + i,
            "octetTotalCount": 400 + i,
            "octetDeltaCount": 400 + i,
            "reverseOctetTotalCount": 900 + i,
            "reverseOctetDeltaCount": 900 + i,
            "sourcePodName": f"client-{i}",
            "sourcePodNamespace": "frontend",
            "destinationPodName": "web-1",
            "destinationServicePort": 80,
            "destinationServicePortName": "backend/web:http",
            "ingressNetworkPolicyName": "web-allow-frontend",
            "ingressNetworkPolicyRuleAction": 1,
            "tcpState": "TIME_WAIT",
            "flowType": 1,  # intra-node: exported without waiting for a peer
        }
    )
    store = AggregationStore(60, 90, 60)
    store.add(record, ("192.168.77.101", 7), now=0)
    (out,) = store.expire(0)
    return out


def column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist()


def test_every_column_takes_its_element_in_both_families():
    records = [aggregated(2, ipv6=False), aggregated(3, ipv6=True)]
    table = records_table(records)
    assert table.column_names == [c.name for c in COLUMNS]
    by_source = {row["sourceIP"]: row for row in table.to_pylist()}
    for record in records:
        ipv6 = "sourceIPv6Address" in record
        family = "IPv6" if ipv6 else "IPv4"
        row = by_source[record[f"source{family}Address"]]
        assert row["destinationIP"] == record[f"destination{family}Address"]
        assert row["destinationClusterIP"] == record[f"destinationCluster{family}"]
        assert row["originalExporterIP"] == record["originalExporterIPv4Address"]
        for c in COLUMNS:
            element = c.elements[ipv6]
            if c.alternative:
                continue
            if c.sql_type.startswith("DateTime64"):
                expected = datetime.datetime.fromtimestamp(record[element] / 1000)
                assert row[c.name] == expected, c.name
            elif c.name != "incomplete" and element in record:
                assert row[c.name] == record[element], c.name


def test_every_element_the_aggregator_exports_has_a_column():
    names = set(aggregator_element_names(False)) | set(aggregator_element_names(True))
    stored = {element for c in COLUMNS for element in (*c.elements, c.alternative)}
    assert names - stored == set()


def test_theia_conventions_no_service_is_empty_and_incomplete_is_a_flag():
    records = [
        {
            "destinationClusterIPv4": "0.0.0.0",
            "incomplete": True,
            "originalExporterIPv6Address": "fd00::77",
        },
        {"destinationClusterIPv6": "::", "sourceIPv6Address": "fd00::1", "incomplete": False},
        {"destinationClusterIPv4": "10.96.0.10"},
    ]
    table = records_table(records)
    assert sorted(column(table, "destinationClusterIP")) == ["", "", "10.96.0.10"]
    assert sorted(column(table, "incomplete")) == [0, 0, 1]
    # An IPv6 exporter of an IPv4 flow.
    assert sorted(column(table, "originalExporterIP")) == ["", "", "fd00::77"]


def test_absent_elements_take_their_defaults():
    (row,) = records_table([{"sourcePodName": "web-1"}]).to_pylist()
    assert row["sourcePodName"] == "web-1"
    assert row["destinationPodName"] == "" and row["sourceIP"] == ""
    assert row["octetDeltaCount"] == 0 and row["flowEndSeconds"] == 0


def test_no_records_give_an_empty_table_of_every_column():
    table = records_table([])
    assert table.num_rows == 0 and table.column_names == [c.name for c in COLUMNS]


def test_a_value_that_does_not_fit_its_column_is_an_error_not_a_wrapped_number():
    with pytest.raises(pa.ArrowException):
        records_table([{"sourceTransportPort": 70000}])


def test_the_table_and_views_are_theias_with_ours_after_them():
    ddl = chschema.flows_table("default", 3600)
    theia = [line.split()[0] for line in ddl.splitlines()[1:] if line.startswith("    ")]
    assert theia[:3] == ["timeInserted", "flowStartSeconds", "flowEndSeconds"]
    # Theia's last columns, then ours.
    cut = theia.index("egressNodeName")
    assert theia[cut - 4 : cut] == ["clusterUUID", "trusted", "egressName", "egressIP"]
    assert {c.name for c in chschema.OUR_COLUMNS} == set(theia[cut + 1 :])
    assert "ORDER BY (timeInserted, flowEndSeconds)" in ddl
    assert "TTL timeInserted + INTERVAL 3600 SECOND" in ddl
    assert "TTL" not in chschema.flows_table("default", 0)
    for view in chschema.VIEWS:
        assert "ENGINE = SummingMergeTree" in chschema.view("default", view, 3600)


def test_records_of_both_families_keep_their_order():
    records = [aggregated(i, ipv6=i % 3 == 0) for i in range(1, 10)]
    table = records_table(records)
    assert column(table, "sourceTransportPort") == [40000 + i for i in range(1, 10)]
