"""Enrichment of conntrack entries from Kubernetes metadata: local Pods, flowType, Service
and NetworkPolicy rules, as upstream's flow exporter computes them."""

import json
from functools import partial

import numpy as np
import pytest
from agentkit import ZONE, conntrack_entry, labels, metadata_store, node, pod, poll

from antrea_flow.codes import (
    FLOW_TYPE_FROM_EXTERNAL,
    FLOW_TYPE_INTER_NODE,
    FLOW_TYPE_INTRA_NODE,
    FLOW_TYPE_TO_EXTERNAL,
)
from antrea_flow.conntrack.parser import Dump
from antrea_flow.exporter import enrich as enrich_module
from antrea_flow.exporter.connections import ConnectionStore
from antrea_flow.exporter.enrich import Enricher, FlowMeta
from antrea_flow.k8s.stores import RULE_IDS_ANNOTATION

OBJECTS = [
    node("node-1", "10.10.1.0/24", "fd00:10:10:1::/64"),
    node("node-2", "10.10.2.0/24"),
    pod("frontend", "client", "node-1", "10.10.1.5", "fd00:10:10:1::5"),
    pod("backend", "web", "node-1", "10.10.1.6", "fd00:10:10:1::6"),
    pod("backend", "db", "node-2", "10.10.2.7"),
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "backend", "name": "web"},
        "spec": {
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10", "fd00:10:96::a"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    },
    {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "namespace": "backend",
            "name": "allow-frontend",
            "annotations": {RULE_IDS_ANNOTATION: json.dumps({"ingress": [101]})},
        },
        "spec": {"ingress": [{"from": [{"namespaceSelector": {}}]}]},
    },
    {
        "apiVersion": "crd.antrea.io/v1beta1",
        "kind": "ClusterNetworkPolicy",
        "metadata": {
            "name": "egress-control",
            "annotations": {RULE_IDS_ANNOTATION: json.dumps({"egress": [201, 202]})},
        },
        "spec": {"egress": [{"action": "Allow", "name": "to-backend"}, {"action": "Drop"}]},
    },
]


@pytest.fixture
def store():
    return metadata_store(OBJECTS)


@pytest.fixture
def enrich(store):
    return Enricher(store, "node-1")


# Counters and start time matter to no enrichment test.
entry = partial(conntrack_entry, counters=(1, 100, 1, 60), start_ns=1_000_000_000)


# -- flowType ----------------------------------------------------------------------------


def test_intra_node_both_pods_local(enrich):
    meta = enrich(entry("10.10.1.5", "10.10.1.6"))
    assert meta.flow_type == FLOW_TYPE_INTRA_NODE == 1
    assert (meta.source_pod.namespace, meta.source_pod.name) == ("frontend", "client")
    assert (meta.destination_pod.namespace, meta.destination_pod.name) == ("backend", "web")


def test_intra_node_ipv6(enrich):
    meta = enrich(entry("fd00:10:10:1::5", "fd00:10:10:1::6"))
    assert meta.flow_type == FLOW_TYPE_INTRA_NODE
    assert meta.source_pod.name == "client" and meta.destination_pod.name == "web"


def test_inter_node_to_a_pod_on_another_node(enrich):
    meta = enrich(entry("10.10.1.5", "10.10.2.7"))
    assert meta.flow_type == FLOW_TYPE_INTER_NODE == 2
    assert meta.source_pod.name == "client"
    assert meta.destination_pod is None  # only Pods of this Node are filled in


def test_inter_node_from_a_pod_on_another_node(enrich):
    meta = enrich(entry("10.10.2.7", "10.10.1.6"))
    assert meta.flow_type == FLOW_TYPE_INTER_NODE
    assert meta.source_pod is None
    assert meta.destination_pod.name == "web"


def test_inter_node_seen_from_the_other_node(store):
    meta = Enricher(store, "node-2")(entry("10.10.1.5", "10.10.2.7"))
    assert meta.flow_type == FLOW_TYPE_INTER_NODE
    assert meta.source_pod is None
    assert meta.destination_pod.name == "db"


def test_to_external(enrich):
    meta = enrich(entry("10.10.1.5", "93.184.216.34", dport=443))
    assert meta.flow_type == FLOW_TYPE_TO_EXTERNAL == 3
    assert meta.source_pod.name == "client" and meta.destination_pod is None


def test_to_external_ipv6(enrich):
    meta = enrich(entry("fd00:10:10:1::5", "2001:db8::1", dport=443))
    assert meta.flow_type == FLOW_TYPE_TO_EXTERNAL


def test_from_external_to_a_local_pod(enrich):
    meta = enrich(entry("192.168.77.1", "10.10.1.6"))
    assert meta.flow_type == FLOW_TYPE_FROM_EXTERNAL == 4
    assert meta.source_pod is None and meta.destination_pod.name == "web"


@pytest.mark.parametrize("gateway", ["10.10.1.1", "10.10.2.1", "fd00:10:10:1::1"])
def test_destination_is_a_gateway_is_not_a_flow(enrich, gateway):
    source = "fd00:10:10:1::5" if ":" in gateway else "10.10.1.5"
    assert enrich(entry(source, gateway, dport=10350)) is None


def test_source_is_the_local_gateway_and_destination_a_local_pod_is_inter_node(enrich):
    meta = enrich(entry("10.10.1.1", "10.10.1.6"))
    assert meta.flow_type == FLOW_TYPE_INTER_NODE
    assert meta.source_pod is None and meta.destination_pod.name == "web"


def test_source_is_a_remote_gateway_and_destination_a_local_pod_is_inter_node(enrich):
    assert enrich(entry("10.10.2.1", "10.10.1.6")).flow_type == FLOW_TYPE_INTER_NODE


def test_source_is_a_gateway_and_destination_not_a_local_pod_is_not_a_flow(enrich):
    assert enrich(entry("10.10.1.1", "10.10.2.7")) is None
    assert enrich(entry("10.10.1.1", "10.10.1.77")) is None  # in the CIDR, no Pod


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("10.10.2.7", "93.184.216.34"),  # remote Pod to external
        ("93.184.216.34", "10.10.2.7"),  # external to remote Pod
        ("192.168.77.1", "192.168.77.2"),  # Node to Node
        ("10.10.1.77", "10.10.1.78"),  # local CIDR, but no Pods there
        ("10.10.2.7", "10.10.2.8"),  # between Pods of another Node
    ],
)
def test_no_local_pod_at_either_end_is_not_a_flow(enrich, src, dst):
    assert enrich(entry(src, dst)) is None


def test_pod_cidr_that_is_not_byte_aligned():
    store = metadata_store(
        [
            node("node-1", "10.20.16.0/20"),
            node("node-2", "10.20.32.0/20"),
            pod("default", "a", "node-1", "10.20.17.5"),
            pod("default", "b", "node-2", "10.20.33.5"),
        ]
    )
    enrich = Enricher(store, "node-1")
    assert enrich(entry("10.20.17.5", "10.20.33.5")).flow_type == FLOW_TYPE_INTER_NODE
    assert enrich(entry("10.20.17.5", "10.20.48.1")).flow_type == FLOW_TYPE_TO_EXTERNAL
    assert enrich(entry("10.20.17.5", "10.20.16.1")) is None  # node-1's gateway
    assert enrich(entry("10.20.31.200", "10.20.17.5")).flow_type == FLOW_TYPE_INTER_NODE
    assert enrich(entry("10.20.48.1", "10.20.17.5")).flow_type == FLOW_TYPE_FROM_EXTERNAL


# -- Service -----------------------------------------------------------------------------


def test_service_from_the_ct_mark_service_bit(enrich):
    e = entry("10.10.1.5", "10.10.1.6", service=("10.96.0.10", 80), mark=0x12)
    meta = enrich(e)
    assert meta.cluster_ip == "10.96.0.10"
    assert meta.service_port == 80
    assert meta.service_port_name == "backend/web:http"
    assert meta.destination_pod.name == "web"  # the backend, after DNAT
    assert meta.flow_type == FLOW_TYPE_INTRA_NODE


def test_service_from_dnat_without_the_mark_bit(enrich):
    meta = enrich(entry("10.10.1.5", "10.10.1.6", service=("10.96.0.10", 80), mark=0x2))
    assert (meta.cluster_ip, meta.service_port, meta.service_port_name) == (
        "10.96.0.10",
        80,
        "backend/web:http",
    )


def test_ipv6_service(enrich):
    e = entry("fd00:10:10:1::5", "fd00:10:10:1::6", service=("fd00:10:96::a", 80), mark=0x12)
    meta = enrich(e)
    assert (meta.cluster_ip, meta.service_port, meta.service_port_name) == (
        "fd00:10:96::a",
        80,
        "backend/web:http",
    )


def test_service_bit_with_an_unknown_service_keeps_address_and_port(enrich):
    meta = enrich(entry("10.10.1.5", "10.10.1.6", service=("10.96.0.99", 8443), mark=0x12))
    assert (meta.cluster_ip, meta.service_port, meta.service_port_name) == (
        "10.96.0.99",
        8443,
        "",
    )


def test_no_service_without_dnat_or_mark_bit(enrich):
    meta = enrich(entry("10.10.1.5", "10.10.1.6", mark=0x2))
    assert (meta.cluster_ip, meta.service_port, meta.service_port_name) == ("", 0, "")


def test_service_lookup_uses_the_protocol(enrich):
    # The Service has port 80/TCP only; a UDP connection to the same address and port
    # is DNATed (so it has a Service address) but has no port name.
    e = entry("10.10.1.5", "10.10.1.6", service=("10.96.0.10", 80), proto=17, mark=0x12)
    meta = enrich(e)
    assert (meta.cluster_ip, meta.service_port, meta.service_port_name) == (
        "10.96.0.10",
        80,
        "",
    )


def test_direct_connection_to_the_service_port_of_a_pod_is_not_a_service(enrich):
    a = enrich(entry("10.10.1.5", "10.10.1.6", service=("10.96.0.10", 80), mark=0x12))
    b = enrich(entry("10.10.1.5", "10.10.1.6", dport=80, mark=0x2))  # direct, no Service
    assert a.cluster_ip == "10.96.0.10"
    assert b.cluster_ip == ""


# -- NetworkPolicy rules from the ct labels ----------------------------------------------


def test_rules_from_ct_labels_ingress_in_bytes_12_to_15_egress_in_8_to_11(enrich):
    meta = enrich(entry("10.10.1.5", "10.10.1.6", ct_labels=labels(ingress=101, egress=202)))
    assert meta.ingress_rule.rule_id == 101
    assert (meta.ingress_rule.policy_name, meta.ingress_rule.policy_type) == (
        "allow-frontend",
        1,
    )
    assert meta.ingress_rule.action == 1
    assert meta.egress_rule.rule_id == 202
    assert (meta.egress_rule.policy_name, meta.egress_rule.policy_type) == ("egress-control", 3)
    # A Drop rule's id in the labels still reads Allow: conntrack commits only allowed
    # connections, and upstream reports every rule from the labels as Allow.
    assert (meta.egress_rule.rule_name, meta.egress_rule.action) == ("egress-1", 1)


def test_rule_ids_are_big_endian(enrich, store):
    # 201 little-endian would be a different id; only big-endian finds the rule.
    raw = bytes(8) + (201).to_bytes(4, "big") + bytes(4)
    assert enrich(entry("10.10.1.5", "10.10.1.6", ct_labels=raw)).egress_rule.rule_id == 201
    swapped = bytes(8) + (201).to_bytes(4, "little") + bytes(4)
    meta = enrich(entry("10.10.1.5", "10.10.1.6", ct_labels=swapped, sport=2))
    assert meta.egress_rule is None


def test_only_one_direction_in_the_labels(enrich):
    meta = enrich(entry("10.10.1.5", "10.10.1.6", ct_labels=labels(ingress=101)))
    assert meta.ingress_rule.rule_id == 101
    assert meta.egress_rule is None


def test_no_labels_or_zero_labels_or_unknown_ids_give_no_rules(enrich):
    for raw in (b"", bytes(16), labels(ingress=12345, egress=54321)):
        meta = enrich(entry("10.10.1.5", "10.10.1.6", ct_labels=raw))
        assert meta.ingress_rule is None and meta.egress_rule is None


def test_other_label_bytes_do_not_matter(enrich):
    raw = b"\xff" * 8 + (201).to_bytes(4, "big") + (101).to_bytes(4, "big")
    meta = enrich(entry("10.10.1.5", "10.10.1.6", ct_labels=raw))
    assert (meta.ingress_rule.rule_id, meta.egress_rule.rule_id) == (101, 201)


# -- sharing and metadata changes --------------------------------------------------------


def test_connections_with_the_same_metadata_share_one_flow_meta(enrich):
    a = enrich(entry("10.10.1.5", "10.10.1.6", sport=40000, ct_id=1))
    b = enrich(entry("10.10.1.5", "10.10.1.6", sport=40001, ct_id=2))
    c = enrich(entry("10.10.1.5", "10.10.1.6", sport=40002, proto=17, ct_id=3))
    d = enrich(entry("fd00:10:10:1::5", "fd00:10:10:1::6", ct_id=4))  # same Pods
    assert a is b is c is d


def test_different_metadata_gives_different_flow_meta(enrich):
    a = enrich(entry("10.10.1.5", "10.10.1.6"))
    b = enrich(entry("10.10.1.5", "10.10.1.6", ct_labels=labels(ingress=101)))
    c = enrich(entry("10.10.1.5", "10.10.2.7"))
    d = enrich(entry("10.10.1.5", "10.10.1.6", service=("10.96.0.10", 80), mark=0x12))
    assert len({id(m) for m in (a, b, c, d)}) == 4
    assert a.ingress_rule is None and b.ingress_rule is not None


def test_a_new_pod_is_seen_after_a_store_change(enrich, store):
    e = entry("10.10.1.9", "93.184.216.34")
    assert enrich(e) is None
    store.upsert(pod("frontend", "late", "node-1", "10.10.1.9"))
    meta = enrich(e)
    assert meta is not None
    assert meta.source_pod.name == "late"
    assert meta.flow_type == FLOW_TYPE_TO_EXTERNAL


def test_a_moved_pod_and_changed_rules_are_seen_after_a_store_change(enrich, store):
    e = entry("10.10.1.5", "10.10.1.6", ct_labels=labels(ingress=101))
    before = enrich(e)
    assert before.ingress_rule.policy_name == "allow-frontend"
    store.remove(OBJECTS[6])  # the K8s NetworkPolicy
    store.upsert(pod("backend", "web", "node-2", "10.10.1.6", "fd00:10:10:1::6"))
    after = enrich(e)
    assert after is not before
    assert after.ingress_rule is None
    assert after.destination_pod is None  # no longer on this Node
    assert after.flow_type == FLOW_TYPE_INTER_NODE


def test_a_new_node_cidr_is_seen_after_a_store_change(enrich, store):
    e = entry("10.10.1.5", "10.10.3.4")
    assert enrich(e).flow_type == FLOW_TYPE_TO_EXTERNAL
    store.upsert(node("node-3", "10.10.3.0/24"))
    assert enrich(e).flow_type == FLOW_TYPE_INTER_NODE
    assert enrich(entry("10.10.1.5", "10.10.3.1")) is None  # node-3's gateway now


# -- ownership: one enricher per thread, one consistent view per call ------------------------


def test_the_poll_and_deny_threads_each_enrich_with_their_own_enricher(tmp_path):
    """An enricher's memos are not thread-safe: the deny-queue thread and the poll thread
    once shared one, and a memo cleared between one thread's lookup and read raised."""
    import threading

    import yaml

    from antrea_flow.exporter.agent import Agent
    from antrea_flow.exporter.config import load_agent_config
    from antrea_flow.k8s.stores import DELETED_POD_RETENTION

    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump({"kind": "List", "items": OBJECTS}))
    config = tmp_path / "antrea-agent.conf"
    config.write_text(
        yaml.safe_dump(
            {
                "featureGates": {"FlowExporter": True},
                "flowCollectorAddr": "127.0.0.1:4739:tcp",
                "inventoryFile": str(inventory),
                "metricsBindAddress": "",
            }
        )
    )
    now = [1000.0]
    agent = Agent(load_agent_config(config), "node-1", clock=lambda: now[0])
    agent.refresh_metadata()
    poll_enricher, deny_enricher = agent.store.enrich, agent.denied.enrich
    assert poll_enricher is not deny_enricher
    entry = conntrack_entry("10.10.1.5", "10.10.1.6")
    assert poll_enricher(entry).destination_pod.name == "web"
    assert deny_enricher(entry).destination_pod.name == "web"

    # Both follow each published view, while the other thread keeps enriching.
    failures: list[BaseException] = []
    done = threading.Event()

    def deny_thread() -> None:
        try:
            while not done.is_set():
                for port in range(200):
                    deny_enricher(conntrack_entry("10.10.1.5", "10.10.1.6", sport=port))
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=deny_thread)
    thread.start()
    try:
        for round_ in range(50):
            agent.metadata.replace(OBJECTS if round_ % 2 else OBJECTS[:3])
            for port in range(200):
                poll_enricher(conntrack_entry("10.10.1.5", "10.10.1.6", sport=port))
    finally:
        done.set()
        thread.join()
    assert not failures, failures[0]
    agent.metadata.replace(OBJECTS[:3])  # web is gone (and resolves a while longer)
    now[0] += DELETED_POD_RETENTION + 1
    agent.metadata.expire()
    for enricher in (poll_enricher, deny_enricher):
        meta = enricher(conntrack_entry("10.10.1.5", "10.10.1.6", sport=9))
        assert meta.source_pod.name == "client" and meta.destination_pod is None


# -- groups: a table's new entries enriched once per group ---------------------------------


def varied_entries():
    """Entries over every case above: local, remote, external and gateway ends, IPv4 and
    IPv6, Services by mark bit and by DNAT (TCP and UDP), direct connections to a Service
    port, labels naming rules or nothing, ICMP; each on several source ports."""
    v4 = ["10.10.1.5", "10.10.1.6", "10.10.2.7", "10.10.1.1", "93.184.216.34"]
    v6 = ["fd00:10:10:1::5", "fd00:10:10:1::6", "2001:db8::1"]
    rule_labels = [b"", bytes(16), labels(ingress=101), labels(egress=201),
                   labels(ingress=101, egress=202), labels(ingress=999)]  # fmt: skip
    out = []
    for hosts, service_ip in ((v4, "10.96.0.10"), (v6, "fd00:10:96::a")):
        for src in hosts:
            for dst in hosts:
                if src == dst:
                    continue
                for variant, ct_labels in enumerate(rule_labels):
                    for sport in (40000, 40001):
                        fields = dict(sport=sport, ct_labels=ct_labels)
                        out.append(entry(src, dst, **fields))
                        out.append(entry(src, dst, dport=80, mark=0x2 | 0x10, **fields))
                        out.append(entry(src, dst, service=(service_ip, 80), **fields))
                        out.append(entry(src, dst, proto=17, service=(service_ip, 80), **fields))
                        if variant == 0:
                            out.append(entry(src, dst, proto=1 if hosts is v4 else 58,
                                             sport=sport, dport=8 << 8))  # fmt: skip
    return [e._replace(id=number) for number, e in enumerate(out)]


def meta_fields(meta):
    return None if meta is None else tuple(getattr(meta, name) for name in FlowMeta.__slots__)


def test_groups_join_exactly_the_entries_with_the_same_metadata(store):
    entries = varied_entries()
    groups = Enricher(store, "node-1").groups(Dump.of(entries), np.arange(len(entries)))
    one_by_one = Enricher(store, "node-1")
    metas = [meta_fields(one_by_one(e)) for e in entries]
    by_group = {}
    for group, meta in zip(groups.tolist(), metas, strict=True):
        assert by_group.setdefault(group, meta) == meta
    assert len(by_group) < len(entries) / 2  # the source ports never split a group


def test_a_store_enriching_by_group_holds_what_one_by_one_gives(store):
    entries = varied_entries()
    grouped = ConnectionStore(Enricher(store, "node-1"), 60.0, 15.0, ZONE)
    one_by_one_enricher = Enricher(store, "node-1")
    one_by_one = ConnectionStore(lambda e: one_by_one_enricher(e), 60.0, 15.0, ZONE)
    for connections in (grouped, one_by_one):
        poll(connections, entries, now=0)
    assert len(grouped) == len(one_by_one) > 0

    def held(connections):
        return {c.handle: (c.key, meta_fields(c.meta)) for c in connections}

    assert held(grouped) == held(one_by_one)


def test_groups_stay_exact_when_the_hash_collides(store, monkeypatch):
    # A zero multiplier hashes every key alike: the check against each group's first key
    # must then fall back to comparing the keys themselves.
    entries = varied_entries()
    everything = np.arange(len(entries))
    hashed = Enricher(store, "node-1").groups(Dump.of(entries), everything)
    monkeypatch.setattr(enrich_module, "_MIX", np.uint64(0))
    collided = Enricher(store, "node-1").groups(Dump.of(entries), everything)
    assert len(set(collided.tolist())) == len(set(hashed.tolist())) > 1
    pairs = set(zip(hashed.tolist(), collided.tolist(), strict=True))
    assert len(pairs) == len(set(hashed.tolist()))  # the same partition, other numbers
