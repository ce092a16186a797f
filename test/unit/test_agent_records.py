"""Flow records from exports of the connection store, in the IEs of Antrea's exporter
templates (256 IPv4, 257 IPv6), and their round trip through the template codec."""

import json
from functools import partial

import pytest
from agentkit import (
    ACTIVE,
    ESTABLISHED,
    IDLE,
    TIME_WAIT,
    ZONE,
    conntrack_entry,
    ip,
    labels,
    metadata_store,
    node,
    pod,
    poll,
)

from antrea_flow.codes import END_ACTIVE, END_IDLE, END_OF_FLOW
from antrea_flow.conntrack.parser import IPS_DYING, TCP_STATES
from antrea_flow.exporter.agent import observation_domain_id
from antrea_flow.exporter.connections import Connection, ConnectionStore, Export
from antrea_flow.exporter.enrich import Enricher, FlowMeta
from antrea_flow.exporter.records import flow_record
from antrea_flow.flowkey import FlowKey
from antrea_flow.ipfix.antrea import (
    EXPORTER_TEMPLATE_ID_IPV4,
    EXPORTER_TEMPLATE_ID_IPV6,
    exporter_element_names,
    exporter_templates,
)
from antrea_flow.k8s.stores import RULE_IDS_ANNOTATION, PodInfo, PolicyRule

T0 = 1_700_000_000.0  # the clock at the first poll
START_NS = 1_699_999_990_500_000_000  # conntrack's start timestamp: 9.5s before T0
TEMPLATES = {t.template_id: t for t in exporter_templates()}
NODE = "node-1"


OBJECTS = [
    node("node-1", "10.10.1.0/24", "fd00:10:10:1::/64"),
    node("node-2", "10.10.2.0/24", "fd00:10:10:2::/64"),
    pod("frontend", "client", "node-1", "10.10.1.5", "fd00:10:10:1::5"),
    pod("backend", "web", "node-1", "10.10.1.6", "fd00:10:10:1::6"),
    pod("backend", "db", "node-2", "10.10.2.7", "fd00:10:10:2::7"),
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "backend", "name": "web"},
        "spec": {
            "clusterIPs": ["10.96.0.10", "fd00:10:96::a"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        },
    },
    {
        "apiVersion": "crd.antrea.io/v1beta1",
        "kind": "NetworkPolicy",
        "metadata": {
            "namespace": "backend",
            "name": "web-ingress",
            "annotations": {RULE_IDS_ANNOTATION: json.dumps({"ingress": [101]})},
        },
        "spec": {"ingress": [{"action": "Allow", "name": "from-frontend"}]},
    },
    {
        "apiVersion": "crd.antrea.io/v1beta1",
        "kind": "ClusterNetworkPolicy",
        "metadata": {
            "name": "egress-audit",
            "annotations": {RULE_IDS_ANNOTATION: json.dumps({"egress": [201]})},
        },
        "spec": {"egress": [{"action": "Allow"}]},
    },
]


entry = partial(conntrack_entry, start_ns=START_NS)


@pytest.fixture
def store():
    return ConnectionStore(Enricher(metadata_store(OBJECTS), NODE), ACTIVE, IDLE, ZONE)


def only_export(store, entries, now):
    """Poll `entries` at T0 and export what is due at `now`."""
    poll(store, entries, T0)
    (export,) = store.expire(now)
    return export


def round_trip(template_id, record):
    template = TEMPLATES[template_id]
    assert set(record) <= set(template.keys), set(record) - set(template.keys)
    raw = template.encode_mapping(record)
    decoded, end = template.decode(raw, 0)
    assert end == len(raw)
    for key, value in record.items():
        assert decoded[key] == value, key
    return decoded


SERVICE_FLOW = dict(
    service=("10.96.0.10", 80), mark=0x12, ct_labels=labels(ingress=101, egress=201)
)


def test_intra_node_service_flow_has_every_ie_of_the_ipv4_template(store):
    e = entry("10.10.1.5", "10.10.1.6", (10, 1000, 8, 800), **SERVICE_FLOW)
    export = only_export(store, [e], T0 + IDLE)
    assert export.reason == END_IDLE
    template_id, record = flow_record(export, NODE)
    assert template_id == EXPORTER_TEMPLATE_ID_IPV4 == 256
    assert set(record) == set(exporter_element_names(ipv6=False))
    assert set(record) == set(TEMPLATES[256].keys)
    assert record == {
        "flowStartSeconds": 1_699_999_990,
        "flowEndSeconds": int(T0),
        "flowEndReason": END_IDLE,
        "sourceTransportPort": 40000,
        "destinationTransportPort": 8080,  # after DNAT: the backend's port
        "protocolIdentifier": 6,
        "packetTotalCount": 10,
        "octetTotalCount": 1000,
        "packetDeltaCount": 10,  # the first export's delta is the total
        "octetDeltaCount": 1000,
        "sourceIPv4Address": "10.10.1.5",
        "destinationIPv4Address": "10.10.1.6",  # the backend, not the Service address
        "reversePacketTotalCount": 8,
        "reverseOctetTotalCount": 800,
        "reversePacketDeltaCount": 8,
        "reverseOctetDeltaCount": 800,
        "sourcePodName": "client",
        "sourcePodNamespace": "frontend",
        "sourceNodeName": "node-1",
        "destinationPodName": "web",
        "destinationPodNamespace": "backend",
        "destinationNodeName": "node-1",
        "destinationClusterIPv4": "10.96.0.10",
        "destinationServicePort": 80,
        "destinationServicePortName": "backend/web:http",
        "ingressNetworkPolicyName": "web-ingress",
        "ingressNetworkPolicyNamespace": "backend",
        "ingressNetworkPolicyType": 2,
        "ingressNetworkPolicyRuleName": "from-frontend",
        "ingressNetworkPolicyRuleAction": 1,
        "egressNetworkPolicyName": "egress-audit",
        "egressNetworkPolicyNamespace": "",
        "egressNetworkPolicyType": 3,
        "egressNetworkPolicyRuleName": "egress-0",
        "egressNetworkPolicyRuleAction": 1,
        "tcpState": "ESTABLISHED",
        "flowType": 1,
    }
    round_trip(template_id, record)


def test_ipv6_record_uses_template_257_and_ipv6_elements(store):
    e = entry(
        "fd00:10:10:1::5",
        "fd00:10:10:1::6",
        service=("fd00:10:96::a", 80),
        mark=0x12,
        ct_labels=labels(ingress=101, egress=201),
    )
    template_id, record = flow_record(only_export(store, [e], T0 + IDLE), NODE)
    assert template_id == EXPORTER_TEMPLATE_ID_IPV6 == 257
    assert set(record) == set(TEMPLATES[257].keys)
    assert record["sourceIPv6Address"] == "fd00:10:10:1::5"
    assert record["destinationIPv6Address"] == "fd00:10:10:1::6"
    assert record["destinationClusterIPv6"] == "fd00:10:96::a"
    assert not any("IPv4" in key for key in record)
    decoded = round_trip(template_id, record)
    assert decoded["destinationClusterIPv6"] == "fd00:10:96::a"


def test_inter_node_record_names_only_the_local_pod(store):
    e = entry("10.10.1.5", "10.10.2.7", dport=5432)
    template_id, record = flow_record(only_export(store, [e], T0 + IDLE), NODE)
    assert record["flowType"] == 2
    assert (record["sourcePodName"], record["sourcePodNamespace"]) == ("client", "frontend")
    assert record["sourceNodeName"] == "node-1"
    for key in ("destinationPodName", "destinationPodNamespace", "destinationNodeName"):
        assert key not in record
    assert record["destinationIPv4Address"] == "10.10.2.7"
    assert record["destinationTransportPort"] == 5432
    decoded = round_trip(template_id, record)
    assert decoded["destinationPodName"] == ""
    assert decoded["destinationNodeName"] == ""


def test_inter_node_record_from_the_destination_side(store):
    e = entry("10.10.2.7", "10.10.1.6", sport=51000, dport=8080)
    template_id, record = flow_record(only_export(store, [e], T0 + IDLE), NODE)
    assert record["flowType"] == 2
    assert "sourcePodName" not in record and "sourceNodeName" not in record
    assert record["destinationPodName"] == "web"
    assert record["destinationNodeName"] == "node-1"
    round_trip(template_id, record)


def test_to_external_record_without_service_or_policies(store):
    e = entry("10.10.1.5", "93.184.216.34", dport=443)
    template_id, record = flow_record(only_export(store, [e], T0 + IDLE), NODE)
    assert record["flowType"] == 3
    for key in (
        "destinationClusterIPv4",
        "destinationServicePort",
        "destinationServicePortName",
        "ingressNetworkPolicyName",
        "ingressNetworkPolicyType",
        "ingressNetworkPolicyRuleAction",
        "egressNetworkPolicyName",
        "egressNetworkPolicyType",
        "egressNetworkPolicyRuleAction",
    ):
        assert key not in record
    decoded = round_trip(template_id, record)
    # Upstream's values for "none": 0.0.0.0, port 0, empty names, type and action 0.
    assert decoded["destinationClusterIPv4"] == "0.0.0.0"
    assert decoded["destinationServicePort"] == 0
    assert decoded["destinationServicePortName"] == ""
    assert decoded["ingressNetworkPolicyType"] == 0
    assert decoded["egressNetworkPolicyRuleAction"] == 0


def test_from_external_record(store):
    e = entry("192.168.77.1", "10.10.1.6", sport=33000)
    template_id, record = flow_record(only_export(store, [e], T0 + IDLE), NODE)
    assert record["flowType"] == 4
    assert record["sourceIPv4Address"] == "192.168.77.1"
    assert record["destinationPodName"] == "web"
    round_trip(template_id, record)


def test_udp_record_has_an_empty_tcp_state(store):
    e = entry("10.10.1.5", "10.10.1.6", proto=17, dport=53)
    template_id, record = flow_record(only_export(store, [e], T0 + IDLE), NODE)
    assert record["protocolIdentifier"] == 17
    assert record["tcpState"] == ""
    assert round_trip(template_id, record)["tcpState"] == ""


def test_time_wait_connection_ends_with_reason_3_and_its_state_name(store):
    poll(store, [entry("10.10.1.5", "10.10.1.6", (5, 500, 4, 400))], T0)
    poll(store, [entry("10.10.1.5", "10.10.1.6", (7, 700, 6, 600), tcp=TIME_WAIT)], T0 + 5)
    (export,) = store.expire(T0 + 5)
    template_id, record = flow_record(export, NODE)
    assert record["flowEndReason"] == END_OF_FLOW == 3
    assert record["tcpState"] == "TIME_WAIT"
    assert record["flowEndSeconds"] == int(T0 + 5)
    assert (record["packetDeltaCount"], record["octetDeltaCount"]) == (7, 700)
    round_trip(template_id, record)


def test_dying_udp_connection_ends_at_the_kernels_stop_time(store):
    stop_ns = int((T0 + 3.75) * 1e9)
    e = entry("10.10.1.5", "10.10.1.6", proto=17, dport=53, status=IPS_DYING, stop_ns=stop_ns)
    poll(store, [e], T0 + 5)
    (export,) = store.expire(T0 + 5)
    template_id, record = flow_record(export, NODE)
    assert record["flowEndReason"] == 3
    assert record["flowEndSeconds"] == int(T0 + 3.75)
    round_trip(template_id, record)


def test_totals_and_deltas_across_exports(store):
    a = ("10.10.1.5", "10.10.1.6")
    poll(store, [entry(*a, (10, 1000, 8, 800))], T0)
    now = T0
    for step in range(1, 12):  # traffic every 5s keeps it active
        now = T0 + 5 * step
        poll(store, [entry(*a, (10 + step, 1000 + 100 * step, 8, 800))], now)
    poll(store, [entry(*a, (30, 3000, 9, 900))], T0 + 59)
    (first,) = store.expire(T0 + ACTIVE)
    _, record = flow_record(first, NODE)
    assert record["flowEndReason"] == END_ACTIVE == 2
    assert record["flowEndSeconds"] == int(T0 + 59)
    assert (record["packetTotalCount"], record["packetDeltaCount"]) == (30, 30)
    assert (record["reverseOctetTotalCount"], record["reverseOctetDeltaCount"]) == (900, 900)

    poll(store, [entry(*a, (50, 5500, 12, 1000))], T0 + 65)
    (second,) = store.expire(T0 + 65 + IDLE)
    template_id, record = flow_record(second, NODE)
    assert record["flowEndReason"] == END_IDLE
    assert (record["packetTotalCount"], record["octetTotalCount"]) == (50, 5500)
    assert (record["packetDeltaCount"], record["octetDeltaCount"]) == (20, 2500)
    assert (record["reversePacketTotalCount"], record["reverseOctetTotalCount"]) == (12, 1000)
    assert (record["reversePacketDeltaCount"], record["reverseOctetDeltaCount"]) == (3, 100)
    assert record["flowStartSeconds"] == 1_699_999_990  # unchanged across exports
    round_trip(template_id, record)


def test_large_counters_survive_the_round_trip(store):
    big = (2**40 + 3, 2**62 + 5, 2**33, 2**63 - 1)
    e = entry("10.10.1.5", "10.10.1.6", big)
    template_id, record = flow_record(only_export(store, [e], T0 + IDLE), NODE)
    assert (
        record["packetTotalCount"],
        record["octetTotalCount"],
        record["reversePacketTotalCount"],
        record["reverseOctetTotalCount"],
    ) == big
    round_trip(template_id, record)


# -- records from hand-built connections -------------------------------------------------


def direct_export(meta, *, tcp_state=ESTABLISHED, key=None, reason=END_ACTIVE):
    conn = Connection(
        7,
        key or FlowKey(ip("10.10.1.5"), ip("10.10.1.6"), 6, 40000, 8080),
        meta,
        100,
        10_000,
        90,
        9_000,
        tcp_state,
        1_600_000_000.9,
        1_600_000_100.2,
        0.0,
        0.0,
    )
    return Export(conn, reason, 100, 10_000, 90, 9_000, 40, 4_000, 30, 3_000, 1_600_000_100.2)


@pytest.mark.parametrize("state", list(range(len(TCP_STATES))))
def test_every_kernel_tcp_state_name(state):
    meta = FlowMeta(None, PodInfo("ns", "p", NODE), "", 0, "", None, None, 4)
    template_id, record = flow_record(direct_export(meta, tcp_state=state), NODE)
    assert record["tcpState"] == TCP_STATES[state]
    assert round_trip(template_id, record)["tcpState"] == TCP_STATES[state]


def test_kernel_tcp_state_names():
    assert TCP_STATES == (
        "NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
        "TIME_WAIT", "CLOSE", "SYN_SENT2",
    )  # fmt: skip


def test_record_of_a_direct_export_with_drop_and_reject_rules():
    ingress = PolicyRule(301, 3, "", "acnp", "deny-web", "ingress", 3)
    egress = PolicyRule(900, 1, "", "", "", "egress", 2)  # isolated Pod's drop
    meta = FlowMeta(
        PodInfo("frontend", "client", NODE),
        None,
        "10.96.0.10",
        80,
        "backend/web:http",
        ingress,
        egress,
        2,
    )
    template_id, record = flow_record(direct_export(meta, reason=END_ACTIVE), NODE)
    assert template_id == 256
    assert record["flowStartSeconds"] == 1_600_000_000
    assert record["flowEndSeconds"] == 1_600_000_100
    assert record["flowEndReason"] == END_ACTIVE
    assert (record["packetTotalCount"], record["packetDeltaCount"]) == (100, 40)
    assert (record["octetTotalCount"], record["octetDeltaCount"]) == (10_000, 4_000)
    assert (record["reversePacketTotalCount"], record["reversePacketDeltaCount"]) == (90, 30)
    assert (record["reverseOctetTotalCount"], record["reverseOctetDeltaCount"]) == (9_000, 3_000)
    assert record["ingressNetworkPolicyType"] == 3
    assert record["ingressNetworkPolicyRuleAction"] == 3
    assert record["ingressNetworkPolicyRuleName"] == "deny-web"
    assert record["egressNetworkPolicyType"] == 1
    assert record["egressNetworkPolicyRuleAction"] == 2
    assert record["egressNetworkPolicyName"] == ""
    assert record["destinationServicePortName"] == "backend/web:http"
    assert record["sourceNodeName"] == NODE and "destinationNodeName" not in record
    decoded = round_trip(template_id, record)
    assert decoded["egressNetworkPolicyRuleAction"] == 2


def test_record_node_name_is_the_agents_node():
    meta = FlowMeta(PodInfo("a", "x", "node-7"), PodInfo("a", "y", "node-7"), "", 0, "",
                    None, None, 1)  # fmt: skip
    _, record = flow_record(direct_export(meta), "node-7")
    assert record["sourceNodeName"] == record["destinationNodeName"] == "node-7"


@pytest.mark.parametrize(
    "node_name, domain",
    # FNV-1 (not FNV-1a) 32-bit test vectors: "a" is 0xe40c292c in FNV-1a.
    [("", 0x811C9DC5), ("a", 0x050C5D7E), ("foobar", 0x31F0B262)],
)
def test_observation_domain_id_is_the_fnv1_hash_of_the_node_name(node_name, domain):
    assert observation_domain_id(node_name) == domain
