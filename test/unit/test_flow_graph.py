"""What the UI draws from exported records: the workload a Pod belongs to, the graph of who
talks to whom under each grouping, and each Node's throughput over time."""

from __future__ import annotations

import json

import pytest

from antrea_flow.aggregator.graph import GROUPINGS, flow_graph, node_throughput, workload


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ('{"app.kubernetes.io/name": "shop", "app": "other"}', "shop"),
        ({"app.kubernetes.io/name": "shop", "app": "other"}, "shop"),
        ('{"app": "web", "tier": "front"}', "web"),
        ({"k8s-app": "kube-dns"}, "kube-dns"),
        ({"app.kubernetes.io/name": "", "app": "web"}, "web"),  # an empty label is no name
    ],
)
def test_workload_from_the_name_labels(labels, expected):
    assert workload("anything-5d4f8c7b9-x2k4q", labels) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("web-5d4f8c7b9-x2k4q", "web"),  # Deployment: ReplicaSet hash and Pod id
        ("coredns-565d847f94-b2d4f", "coredns"),
        ("flow-aggregator-7c9f8b6d5-qw2zx", "flow-aggregator"),
        ("antrea-agent-x2k4q", "antrea-agent"),  # DaemonSet
        ("db-0", "db"),  # StatefulSet
        ("kafka-broker-12", "kafka-broker"),
        ("nginx", "nginx"),
        ("web", "web"),
    ],
)
def test_workload_from_the_name_without_its_generated_suffix(name, expected):
    assert workload(name, None) == expected
    assert workload(name, "") == expected
    assert workload(name, "not json") == expected
    assert workload(name, '{"tier": "front"}') == expected


@pytest.mark.parametrize("name", ["my-nginx", "redis-cache", "api-proxy"])
def test_workload_keeps_a_name_whose_last_word_is_not_a_generated_id(name):
    assert workload(name, None) == name


def rec(src: str, dst: str, **fields) -> dict:
    """A record from `src` to `dst`: "ns/pod@node@ip" for a Pod (labels app=<pod name
    without its suffix>), an IP for anything else."""
    out = {
        "protocolIdentifier": 6, "sourceTransportPort": 40000, "destinationTransportPort": 8080,
        "flowStartSeconds": 1000, "flowEndSeconds": 1005, "octetDeltaCount": 100,
        "reverseOctetDeltaCount": 10, "packetDeltaCount": 2, "reversePacketDeltaCount": 1,
        "ingressNetworkPolicyRuleAction": 0, "egressNetworkPolicyRuleAction": 0,
    }  # fmt: skip
    for side, text in (("source", src), ("destination", dst)):
        *pod, ip = text.split("@")
        out[f"{side}{'IPv6' if ':' in ip else 'IPv4'}Address"] = ip
        namespace, _, name = pod[0].partition("/") if pod else ("", "", "")
        out.update({f"{side}PodNamespace": namespace, f"{side}PodName": name})
        out[f"{side}NodeName"] = pod[1] if pod else ""
        if pod:
            out[f"{side}PodLabels"] = json.dumps({"app": name.rstrip("-0123456789")})
    out.update(fields)
    return out


CLIENT_1 = "frontend/client-1@node-1@10.10.1.2"
CLIENT_2 = "frontend/client-2@node-2@10.10.2.2"
WEB_1 = "backend/web-1@node-1@10.10.1.3"
WEB_2 = "backend/web-2@node-2@10.10.2.3"
DB = "backend/db-0@node-2@10.10.2.4"
SERVICE = {"destinationServicePortName": "backend/web:http", "destinationServicePort": 80}
ALLOW = {"ingressNetworkPolicyNamespace": "backend", "ingressNetworkPolicyName": "allow-web",
         "ingressNetworkPolicyRuleAction": 1}  # fmt: skip

RECORDS = [
    # one connection exported twice: its deltas add up, it counts once
    rec(CLIENT_1, WEB_1, **SERVICE, **ALLOW),
    rec(CLIENT_1, WEB_1, **SERVICE, **ALLOW, flowEndSeconds=1065, octetDeltaCount=50,
        reverseOctetDeltaCount=5, packetDeltaCount=1, reversePacketDeltaCount=0),
    # the same Pods on another connection
    rec(CLIENT_1, WEB_1, **SERVICE, **ALLOW, sourceTransportPort=40001, octetDeltaCount=7,
        reverseOctetDeltaCount=0, packetDeltaCount=1, reversePacketDeltaCount=0),
    rec(CLIENT_2, WEB_2, **SERVICE, **ALLOW, octetDeltaCount=1000, reverseOctetDeltaCount=0),
    # denied: dropped by a K8s default deny, rejected by an ACNP's rule
    rec(WEB_1, DB, octetDeltaCount=60, reverseOctetDeltaCount=0, packetDeltaCount=1,
        reversePacketDeltaCount=0, ingressNetworkPolicyRuleAction=2),
    rec(CLIENT_1, DB, octetDeltaCount=60, reverseOctetDeltaCount=0, packetDeltaCount=1,
        reversePacketDeltaCount=0, ingressNetworkPolicyName="acnp-db-guard",
        ingressNetworkPolicyRuleAction=3),
    # to and from what is not a Pod
    rec(CLIENT_1, "192.168.77.254", octetDeltaCount=300, reverseOctetDeltaCount=0,
        egressNetworkPolicyNamespace="frontend", egressNetworkPolicyName="egress-out",
        egressNetworkPolicyRuleAction=1),
    rec("fe80::1", "frontend/client-2@node-2@fd00:10:10:2::2", protocolIdentifier=58,
        octetDeltaCount=72, reverseOctetDeltaCount=0),
]  # fmt: skip


def edges(graph: dict) -> dict[tuple[str, str], dict]:
    return {(e["source"], e["target"]): e for e in graph["edges"]}


def nodes(graph: dict) -> dict[str, dict]:
    return {n["id"]: n for n in graph["nodes"]}


def test_by_workload_sums_the_deltas_and_counts_distinct_connections():
    graph = flow_graph(RECORDS, "workload")
    assert graph["by"] == "workload"
    got = edges(graph)
    assert set(got) == {
        ("frontend/client", "backend/web"),
        ("backend/web", "backend/db"),
        ("frontend/client", "backend/db"),
        ("frontend/client", "192.168.77.254"),
        ("fe80::1", "frontend/client"),
    }
    web = got["frontend/client", "backend/web"]
    assert web["bytes"] == (100 + 10) + (50 + 5) + 7 + 1000
    assert web["packets"] == (2 + 1) + 1 + 1 + (2 + 1)
    assert web["connections"] == 3  # client-1's two and client-2's; the re-export is one
    assert (web["allowed"], web["dropped"], web["rejected"]) == (3, 0, 0)
    assert nodes(graph)["backend/web"] == {  # what it received, and the 60 it sent to db
        "id": "backend/web", "kind": "workload", "namespace": "backend", "bytes": 1172 + 60,
    }  # fmt: skip


def test_verdicts_are_counted_per_connection():
    got = edges(flow_graph(RECORDS, "workload"))
    dropped, rejected = got["backend/web", "backend/db"], got["frontend/client", "backend/db"]
    assert (dropped["allowed"], dropped["dropped"], dropped["rejected"]) == (0, 1, 0)
    assert (rejected["allowed"], rejected["dropped"], rejected["rejected"]) == (0, 0, 1)


def test_what_is_not_a_pod_is_its_ip():
    graph = flow_graph(RECORDS, "workload")
    assert nodes(graph)["192.168.77.254"]["kind"] == "external"
    assert nodes(graph)["fe80::1"] == {
        "id": "fe80::1", "kind": "external", "namespace": "", "bytes": 72,
    }  # fmt: skip
    assert edges(graph)["frontend/client", "192.168.77.254"]["bytes"] == 300


def test_edges_come_busiest_first_and_nodes_by_id():
    graph = flow_graph(RECORDS, "pod")
    sizes = [e["bytes"] for e in graph["edges"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 1000
    assert (graph["edges"][0]["source"], graph["edges"][0]["target"]) == (
        "frontend/client-2", "backend/web-2",
    )  # fmt: skip
    ids = [n["id"] for n in graph["nodes"]]
    assert ids == sorted(ids)


def test_by_pod():
    got = edges(flow_graph(RECORDS, "pod"))
    assert got["frontend/client-1", "backend/web-1"]["bytes"] == 110 + 55 + 7
    assert got["frontend/client-1", "backend/web-1"]["connections"] == 2
    assert got["frontend/client-2", "backend/web-2"]["connections"] == 1
    assert ("frontend/client-1", "backend/db-0") in got


def test_by_namespace():
    graph = flow_graph(RECORDS, "namespace")
    got = edges(graph)
    assert set(got) == {
        ("frontend", "backend"), ("backend", "backend"), ("frontend", "192.168.77.254"),
        ("fe80::1", "frontend"),
    }  # fmt: skip
    assert got["frontend", "backend"]["connections"] == 4
    assert got["frontend", "backend"]["bytes"] == 110 + 55 + 7 + 1000 + 60
    assert nodes(graph)["frontend"]["kind"] == "namespace"


def test_traffic_within_a_group_counts_once_in_its_node():
    graph = flow_graph([rec(CLIENT_1, CLIENT_2, octetDeltaCount=100, reverseOctetDeltaCount=0)],
                       "namespace")  # fmt: skip
    assert edges(graph)["frontend", "frontend"]["bytes"] == 100
    assert nodes(graph)["frontend"]["bytes"] == 100


def test_by_service_keeps_only_records_with_a_service():
    graph = flow_graph(RECORDS, "service")
    got = edges(graph)
    assert set(got) == {
        ("frontend/client-1", "backend/web:http"),
        ("frontend/client-2", "backend/web:http"),
    }
    assert got["frontend/client-1", "backend/web:http"]["connections"] == 2
    assert nodes(graph)["backend/web:http"] == {
        "id": "backend/web:http", "kind": "service", "namespace": "backend", "bytes": 1172,
    }  # fmt: skip


def test_by_node_keeps_only_records_with_both_nodes():
    graph = flow_graph(RECORDS, "node")
    got = edges(graph)
    assert set(got) == {("node-1", "node-1"), ("node-2", "node-2"), ("node-1", "node-2")}
    assert got["node-1", "node-1"]["bytes"] == 110 + 55 + 7
    assert got["node-1", "node-2"]["connections"] == 2  # web-1 -> db-0, client-1 -> db-0
    assert nodes(graph)["node-1"]["kind"] == "node"


def test_by_policy_pairs_the_egress_and_the_ingress_policy():
    got = edges(flow_graph(RECORDS, "policy"))
    assert set(got) == {
        ("(no egress policy)", "backend/allow-web"),
        ("(no egress policy)", "acnp-db-guard"),
        ("frontend/egress-out", "(no ingress policy)"),
    }
    assert got["(no egress policy)", "backend/allow-web"]["connections"] == 3
    assert got["(no egress policy)", "acnp-db-guard"]["rejected"] == 1


def test_every_grouping_is_served():
    assert set(GROUPINGS) == {"workload", "pod", "namespace", "service", "node", "policy"}
    for by in GROUPINGS:
        graph = flow_graph(RECORDS, by)
        assert graph["edges"], by
        assert flow_graph([], by) == {"by": by, "nodes": [], "edges": []}


def _at(end: float, src_node: str, dst_node: str, tx: int, rx: int) -> dict:
    return {
        "flowEndSeconds": int(end), "flowEndMilliseconds": round(end * 1000),
        "sourceNodeName": src_node, "destinationNodeName": dst_node,
        "octetDeltaCount": tx, "reverseOctetDeltaCount": rx,
    }  # fmt: skip


def test_node_throughput_in_bits_per_second_per_step():
    records = [
        _at(1005, "node-1", "node-2", 1000, 500),  # step 0
        _at(1031.5, "node-1", "node-2", 250, 0),  # step 3
        _at(1039.999, "node-2", "node-2", 100, 100),  # step 3, within node-2
        _at(1060, "node-1", "", 40, 20),  # the end: the last step; to outside the cluster
        _at(999.9, "node-1", "node-2", 10**6, 10**6),  # before the start
        _at(1060.1, "node-1", "node-2", 10**6, 10**6),  # after the end
    ]
    result = node_throughput(records, 1000, 1060, 10)
    assert result["start"] == 1000 and result["step"] == 10
    assert result["times"] == [1000, 1010, 1020, 1030, 1040, 1050, 1060]
    by_node = {n["node"]: n for n in result["nodes"]}
    assert list(by_node) == ["node-1", "node-2"]
    assert by_node["node-1"]["tx"] == [800.0, 0, 0, 200.0, 0, 0, 32.0]
    assert by_node["node-1"]["rx"] == [400.0, 0, 0, 0, 0, 0, 16.0]
    # within node-2 its Pods sent 100 bytes each way, and received as much
    assert by_node["node-2"]["tx"] == [400.0, 0, 0, 160.0, 0, 0, 0]
    assert by_node["node-2"]["rx"] == [800.0, 0, 0, 200.0 + 160.0, 0, 0, 0]


def test_node_throughput_uses_seconds_without_milliseconds_and_skips_unknown_nodes():
    records = [
        {"flowEndSeconds": 1012, "sourceNodeName": "node-1", "destinationNodeName": "",
         "octetDeltaCount": 30, "reverseOctetDeltaCount": 0},
        {"flowEndSeconds": 1012, "sourceNodeName": "", "destinationNodeName": "",
         "octetDeltaCount": 999, "reverseOctetDeltaCount": 999},
    ]  # fmt: skip
    result = node_throughput(records, 1000, 1019, 5)
    assert len(result["times"]) == 4
    assert result["nodes"] == [{"node": "node-1", "tx": [0, 0, 48.0, 0], "rx": [0.0] * 4}]
