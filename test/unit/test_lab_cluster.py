"""The lab cluster: Pod addresses, Service endpoints, selectors, policy rules with stable ids,
isolation, errors, and the inventory the agent reads back through its metadata store."""

import copy
import ipaddress
import json

import pytest
import yaml

from antrea_flow.codes import ACTION_ALLOW, ACTION_DROP, ACTION_NONE, ACTION_REJECT
from antrea_flow.k8s.stores import RULE_IDS_ANNOTATION, MetadataStore, PodInfo, PolicyRule, pack_ip
from antrea_flow.lab.cluster import (
    ISOLATION_EGRESS_ID,
    ISOLATION_INGRESS_ID,
    RULE_ID_MASK,
    ClusterError,
    PortMatch,
    ServicePort,
    build_cluster,
    default_objects,
    load_cluster,
    rule_id,
)

ACTION_CODES = {"Allow": ACTION_ALLOW, "Drop": ACTION_DROP, "Reject": ACTION_REJECT}
ACTION_CODES["Pass"] = ACTION_NONE


# -- object builders ----------------------------------------------------------------------


def node(name, *cidrs):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"podCIDRs": list(cidrs)}}  # fmt: skip


def namespace(name, **labels):
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(ns, name, node_name, labels=None, ports=None):
    containers = [{"name": "c", "ports": [{"name": k, "containerPort": v} for k, v in
                                          (ports or {}).items()]}]  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"nodeName": node_name, "containers": containers},
    }


def service(ns, name, selector, cluster_ips, ports):
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": selector, "clusterIPs": cluster_ips, "ports": ports},
    }


def k8s_np(ns, name, spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}  # fmt: skip


def anp(ns, name, spec):
    return {"apiVersion": "crd.antrea.io/v1beta1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}  # fmt: skip


def acnp(name, spec):
    return {"apiVersion": "crd.antrea.io/v1beta1", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}  # fmt: skip


def app(value):
    return {"matchLabels": {"app": value}}


EVERY = [{"podSelector": {}}]  # appliedTo: every Pod (of the namespace, for an ANP)


def small_cluster(*extra):
    """Two nodes (node-b IPv4 only), namespaces a and b, pods with various labels."""
    return [
        node("node-a", "10.1.0.0/24", "fd00:1::/64"),
        node("node-b", "10.2.0.0/24"),
        namespace("a", team="red"),
        namespace("b", team="blue"),
        pod("a", "x", "node-a", {"app": "web", "tier": "front"}, {"http": 8080}),
        pod("a", "y", "node-a", {"app": "db"}, {"sql": 5432}),
        pod("a", "z", "node-b", {"app": "web", "tier": "back"}, {"http": 9090}),
        pod("b", "x", "node-b", {"app": "web"}),
        pod("b", "w", "node-a", {}),
        *extra,
    ]


def keys(pods):
    return sorted(p.key for p in pods)


def rules_of(cluster, policy_name):
    return [r for r in cluster.antrea_rules + cluster.k8s_rules if r.policy_name == policy_name]


def one_line_error(objects, *fragments):
    with pytest.raises(ClusterError) as info:
        build_cluster(objects)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- the default cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def default():
    return load_cluster()


def test_default_cluster_nodes_and_gateways(default):
    assert [n.name for n in default.nodes] == ["node-1", "node-2"]
    node1, node2 = default.nodes
    assert node1.pod_cidrs == (
        ipaddress.ip_network("10.10.1.0/24"),
        ipaddress.ip_network("fd00:10:10:1::/64"),
    )
    assert node2.cidr(4) == ipaddress.ip_network("10.10.2.0/24")
    assert node2.cidr(6) == ipaddress.ip_network("fd00:10:10:2::/64")
    assert node1.gateway(4) == "10.10.1.1"
    assert node1.gateway(6) == "fd00:10:10:1::1"
    assert node2.gateway(4) == "10.10.2.1"
    assert node2.gateway(6) == "fd00:10:10:2::1"
    assert default.node("node-2") is node2


def test_default_cluster_pod_addresses_start_after_the_gateway(default):
    got = {p.key: (p.node.name, p.addresses, p.labels) for p in default.pods}
    assert got == {
        "frontend/client-1": ("node-1", {4: "10.10.1.2", 6: "fd00:10:10:1::2"}, {"app": "client"}),
        "backend/web-1": ("node-1", {4: "10.10.1.3", 6: "fd00:10:10:1::3"}, {"app": "web"}),
        "frontend/client-2": ("node-2", {4: "10.10.2.2", 6: "fd00:10:10:2::2"}, {"app": "client"}),
        "backend/web-2": ("node-2", {4: "10.10.2.3", 6: "fd00:10:10:2::3"}, {"app": "web"}),
        "backend/db": ("node-2", {4: "10.10.2.4", 6: "fd00:10:10:2::4"}, {"app": "db"}),
    }
    assert keys(default.local_pods(default.node("node-1"))) == [
        "backend/web-1",
        "frontend/client-1",
    ]


def test_default_cluster_service(default):
    (svc,) = default.services
    assert (svc.namespace, svc.name) == ("backend", "web")
    assert svc.cluster_ips == ["10.96.0.10", "fd00:10:96::a"]
    assert svc.ports == [ServicePort("http", "TCP", 80, 8080)]
    assert keys(svc.endpoints) == ["backend/web-1", "backend/web-2"]


def test_default_cluster_policies(default):
    reject, allow = default.antrea_rules
    db = [default.pod("backend/db")]
    clients = keys([default.pod("frontend/client-1"), default.pod("frontend/client-2")])
    assert (reject.policy_type, reject.policy_namespace, reject.policy_name) == (
        3,
        "",
        "acnp-db-guard",
    )
    assert (reject.name, reject.direction, reject.action) == ("reject-clients", "ingress", "Reject")
    assert (allow.name, allow.direction, allow.action) == ("allow-web", "ingress", "Allow")
    assert list(reject.applied_to) == db and list(allow.applied_to) == db
    assert keys(reject.peers.pods) == clients
    assert keys(allow.peers.pods) == ["backend/web-1", "backend/web-2"]
    assert reject.ports == () and allow.ports == ()

    (k8s,) = default.k8s_rules
    assert (k8s.policy_type, k8s.policy_namespace, k8s.policy_name) == (
        1,
        "backend",
        "web-allow-frontend",
    )
    assert (k8s.direction, k8s.action, k8s.name) == ("ingress", "Allow", "")
    assert keys(k8s.applied_to) == ["backend/web-1", "backend/web-2"]
    assert keys(k8s.peers.pods) == clients
    assert k8s.ports == (PortMatch("TCP", 8080), PortMatch("TCP", 5201))
    assert default.isolated == {"ingress": {"backend/web-1", "backend/web-2"}, "egress": set()}


def test_default_cluster_rule_ids(default):
    reject, allow = default.antrea_rules
    (k8s,) = default.k8s_rules
    assert reject.rule_id == rule_id(3, "", "acnp-db-guard", "ingress", 0)
    assert allow.rule_id == rule_id(3, "", "acnp-db-guard", "ingress", 1)
    assert k8s.rule_id == rule_id(1, "backend", "web-allow-frontend", "ingress", 0)
    ids = {reject.rule_id, allow.rule_id, k8s.rule_id, ISOLATION_INGRESS_ID, ISOLATION_EGRESS_ID}
    assert len(ids) == 5
    assert all(0 < i <= RULE_ID_MASK for i in ids)


def test_load_cluster_from_a_file_is_the_same_as_the_default(tmp_path, default):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": default_objects()})
    )
    cluster = load_cluster(str(path))
    assert [(p.key, p.addresses) for p in cluster.pods] == [
        (p.key, p.addresses) for p in default.pods
    ]
    assert [r.rule_id for r in cluster.antrea_rules + cluster.k8s_rules] == [
        r.rule_id for r in default.antrea_rules + default.k8s_rules
    ]


def test_load_cluster_wraps_malformed_values_in_a_one_line_error(tmp_path):
    path = tmp_path / "bad.yaml"
    objects = [node("n", "10.0.0.0/33")]
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": objects}))
    with pytest.raises(ClusterError) as info:
        load_cluster(str(path))
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


# -- rule ids -----------------------------------------------------------------------------


def test_rule_ids_are_stable_30_bit_and_non_zero():
    assert rule_id(3, "", "p", "ingress", 0) == rule_id(3, "", "p", "ingress", 0)
    assert rule_id(3, "", "p", "ingress", 0) != rule_id(3, "", "p", "ingress", 1)
    assert rule_id(3, "", "p", "ingress", 0) != rule_id(3, "", "p", "egress", 0)
    assert rule_id(3, "", "p", "ingress", 0) != rule_id(2, "", "p", "ingress", 0)
    for i in range(2000):
        value = rule_id("policy", i)
        assert 0 < value <= RULE_ID_MASK
        assert value & ~0x3FFFFFFF == 0


def test_same_input_gives_the_same_ids_and_other_policies_do_not_move_them():
    policy = acnp("p", {"priority": 2, "appliedTo": EVERY,
                        "ingress": [{"action": "Drop"}, {"action": "Allow"}]})  # fmt: skip
    first = build_cluster(small_cluster(policy))
    second = build_cluster(small_cluster(copy.deepcopy(policy)))
    assert [r.rule_id for r in first.antrea_rules] == [r.rule_id for r in second.antrea_rules]
    other = acnp("q", {"priority": 1, "appliedTo": EVERY, "ingress": [{"action": "Drop"}]})
    third = build_cluster(small_cluster(other, copy.deepcopy(policy)))
    assert [r.rule_id for r in rules_of(third, "p")] == [r.rule_id for r in first.antrea_rules]
    assert first.rule_ids == second.rule_ids


# -- Pod addresses, Services -------------------------------------------------------------


def test_pod_addresses_come_from_each_nodes_cidrs_in_order():
    cluster = build_cluster(small_cluster())
    got = {p.key: p.addresses for p in cluster.pods}
    assert got == {
        "a/x": {4: "10.1.0.2", 6: "fd00:1::2"},
        "a/y": {4: "10.1.0.3", 6: "fd00:1::3"},
        "a/z": {4: "10.2.0.2"},  # node-b has no IPv6 CIDR
        "b/x": {4: "10.2.0.3"},
        "b/w": {4: "10.1.0.4", 6: "fd00:1::4"},
    }
    assert cluster.node("node-b").gateway(6) is None
    assert cluster.pod("a/y").named_ports == {"sql": 5432}


def test_unknown_pod_and_node_lookups_are_cluster_errors():
    cluster = build_cluster(small_cluster())
    with pytest.raises(ClusterError, match="no pod"):
        cluster.pod("a/nope")
    with pytest.raises(ClusterError, match="no node"):
        cluster.node("node-z")


def test_service_endpoints_by_selector_in_the_services_namespace():
    objects = small_cluster(
        service("a", "web", {"app": "web"}, ["10.96.1.1"], [{"port": 80, "targetPort": "http"}]),
        service("a", "front", {"app": "web", "tier": "front"}, ["10.96.1.2"], [{"port": 81}]),
        service("b", "none", {"app": "nothing"}, ["10.96.1.3"], [{"port": 82}]),
        service("b", "no-selector", {}, ["10.96.1.4"], [{"port": 83, "protocol": "udp"}]),
    )
    cluster = build_cluster(objects)
    by_name = {s.name: s for s in cluster.services}
    assert keys(by_name["web"].endpoints) == ["a/x", "a/z"]  # not b/x: other namespace
    assert keys(by_name["front"].endpoints) == ["a/x"]
    assert by_name["none"].endpoints == []
    assert by_name["no-selector"].endpoints == []
    assert by_name["web"].ports == [ServicePort("", "TCP", 80, "http")]
    assert by_name["front"].ports == [ServicePort("", "TCP", 81, 81)]  # targetPort defaults
    assert by_name["no-selector"].ports == [ServicePort("", "UDP", 83, 83)]


def test_service_with_only_cluster_ip_field():
    svc = service("a", "s", {"app": "db"}, [], [{"port": 5432}])
    svc["spec"].pop("clusterIPs")
    svc["spec"]["clusterIP"] = "10.96.1.9"
    cluster = build_cluster(small_cluster(svc))
    assert cluster.services[0].cluster_ips == ["10.96.1.9"]
    assert keys(cluster.services[0].endpoints) == ["a/y"]


# -- label selectors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "selector, expected",
    [
        ({}, ["a/w", "a/x", "a/y", "a/z", "b/w", "b/x"]),
        ({"matchLabels": {"app": "web"}}, ["a/x", "a/z", "b/x"]),
        ({"matchLabels": {"app": "web", "tier": "back"}}, ["a/z"]),
        ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["db", "web"]}]},
         ["a/x", "a/y", "a/z", "b/x"]),
        ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]},
         ["a/w", "a/y", "b/w"]),  # NotIn matches Pods without the key
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, ["a/x", "a/z"]),
        ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]},
         ["a/w", "a/y", "b/w", "b/x"]),
        ({"matchLabels": {"app": "web"},
          "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["front"]}]},
         ["a/z", "b/x"]),
        ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]},
                               {"key": "tier", "operator": "DoesNotExist"}]}, ["b/x"]),
    ],
)  # fmt: skip
def test_label_selectors_in_an_acnp_applied_to(selector, expected):
    objects = small_cluster(
        pod("a", "w", "node-b", {"other": "1"}),
        acnp("p", {"priority": 1, "appliedTo": [{"podSelector": selector}],
                   "ingress": [{"action": "Drop"}]}),
    )  # fmt: skip
    (rule,) = build_cluster(objects).antrea_rules
    assert keys(rule.applied_to) == expected


def test_unknown_selector_operator_is_a_cluster_error():
    objects = small_cluster(
        acnp("p", {"appliedTo": [{"podSelector": {"matchExpressions": [
            {"key": "app", "operator": "Gt", "values": ["1"]}]}}],
            "ingress": [{"action": "Drop"}]}),
    )  # fmt: skip
    one_line_error(objects, "Gt")


def test_acnp_applied_to_namespace_selector_and_everything():
    objects = small_cluster(
        acnp("by-ns", {"priority": 1,
                       "appliedTo": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}],
                       "ingress": [{"action": "Drop"}]}),
        acnp("all", {"priority": 2, "appliedTo": [{"namespaceSelector": {}}],
                     "ingress": [{"action": "Drop"}]}),
        acnp("both", {"priority": 3, "appliedTo": [
            {"namespaceSelector": {"matchLabels": {"team": "red"}}, "podSelector": app("web")},
            {"podSelector": app("db")}], "ingress": [{"action": "Drop"}]}),
    )  # fmt: skip
    cluster = build_cluster(objects)
    by_policy = {r.policy_name: keys(r.applied_to) for r in cluster.antrea_rules}
    assert by_policy == {
        "by-ns": ["b/w", "b/x"],
        "all": ["a/x", "a/y", "a/z", "b/w", "b/x"],
        "both": ["a/x", "a/y", "a/z"],
    }


def test_anp_selectors_are_limited_to_its_namespace():
    objects = small_cluster(
        anp("b", "p", {"priority": 1, "appliedTo": [{"podSelector": app("web")}],
                       "ingress": [{"action": "Drop", "from": [{"podSelector": {}}]}],
                       "egress": [{"action": "Allow",
                                   "to": [{"namespaceSelector": {}, "podSelector": app("db")}]}]}),
    )  # fmt: skip
    egress, ingress = build_cluster(objects).antrea_rules  # sorted: egress < ingress
    assert (ingress.policy_type, ingress.policy_namespace) == (2, "b")
    assert keys(ingress.applied_to) == ["b/x"]
    assert keys(ingress.peers.pods) == ["b/w", "b/x"]
    assert keys(egress.peers.pods) == ["a/y"]  # a namespaceSelector crosses namespaces


# -- Kubernetes NetworkPolicy -------------------------------------------------------------


def test_k8s_peers_pod_namespace_both_and_or():
    objects = small_cluster(
        k8s_np("a", "p", {"podSelector": app("db"), "ingress": [
            {"from": [{"podSelector": app("web")}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]},
            {"from": [{"namespaceSelector": {}, "podSelector": app("web")}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}},
                       "podSelector": app("web")}]},
            {"from": [{"podSelector": app("web")},
                      {"namespaceSelector": {"matchLabels": {"team": "blue"}}}]},
            {},
        ]}),
    )  # fmt: skip
    rules = build_cluster(objects).k8s_rules
    assert [keys(r.peers.pods) for r in rules[:5]] == [
        ["a/x", "a/z"],  # podSelector alone: the policy's namespace
        ["b/w", "b/x"],  # namespaceSelector alone: every Pod there
        ["a/x", "a/z", "b/x"],  # both in one peer: AND
        ["b/x"],
        ["a/x", "a/z", "b/w", "b/x"],  # two peers: OR
    ]
    assert all(not r.peers.every for r in rules[:5])
    assert rules[5].peers.every and rules[5].ports == ()
    assert all(keys(r.applied_to) == ["a/y"] for r in rules)
    assert [r.rule_id for r in rules] == [rule_id(1, "a", "p", "ingress", i) for i in range(6)]


def test_k8s_ip_block_with_except_and_port_ranges():
    objects = small_cluster(
        k8s_np("a", "p", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"ipBlock": {"cidr": "172.16.0.0/12", "except": ["172.16.1.0/24",
                                                                     "172.17.0.0/16"]}},
                    {"ipBlock": {"cidr": "fd00:99::/32"}}],
             "ports": [{"protocol": "TCP", "port": 8000, "endPort": 8100},
                       {"protocol": "UDP", "port": 53}, {"protocol": "SCTP"}, {"port": 22}]},
        ]}),
    )  # fmt: skip
    (rule,) = build_cluster(objects).k8s_rules
    assert rule.direction == "egress"
    assert rule.peers.pods == ()
    assert rule.peers.cidrs == (
        (
            ipaddress.ip_network("172.16.0.0/12"),
            (ipaddress.ip_network("172.16.1.0/24"), ipaddress.ip_network("172.17.0.0/16")),
        ),
        (ipaddress.ip_network("fd00:99::/32"), ()),
    )
    assert rule.ports == (
        PortMatch("TCP", 8000, 8100),
        PortMatch("UDP", 53),
        PortMatch("SCTP", None),
        PortMatch("TCP", 22),
    )


def test_k8s_named_ports_resolve_on_the_pods_that_receive():
    objects = small_cluster(
        k8s_np("a", "in", {"podSelector": app("web"),
                           "ingress": [{"ports": [{"port": "http"}]}]}),
        k8s_np("a", "out", {"podSelector": app("web"), "policyTypes": ["Egress"],
                            "egress": [{"to": [{"podSelector": app("db")}],
                                        "ports": [{"port": "sql"}]}]}),
    )  # fmt: skip
    cluster = build_cluster(objects)
    (ingress,) = rules_of(cluster, "in")
    (egress,) = rules_of(cluster, "out")
    # ingress: the selected Pods' ports (a/x http=8080, a/z http=9090); egress: the peers'
    assert ingress.ports == (PortMatch("TCP", 8080), PortMatch("TCP", 9090))
    assert egress.ports == (PortMatch("TCP", 5432),)


def test_k8s_named_port_on_an_egress_rule_to_everyone_resolves_on_all_pods():
    # `to` absent: any destination; the named port must resolve on the Pods that have it,
    # not fail because the peer list holds no Pod.
    objects = small_cluster(
        k8s_np("b", "out", {"podSelector": {}, "policyTypes": ["Egress"],
                            "egress": [{"ports": [{"port": "sql"}]}]}),
    )  # fmt: skip
    (rule,) = build_cluster(objects).k8s_rules
    assert rule.peers.every
    assert rule.ports == (PortMatch("TCP", 5432),)


@pytest.mark.parametrize(
    "spec, ingress, egress",
    [
        ({"ingress": [{}]}, True, False),
        ({}, True, False),  # no rules at all: still isolated for ingress
        ({"egress": [{}]}, True, True),
        ({"ingress": [{}], "egress": [{}]}, True, True),
        ({"policyTypes": ["Egress"], "ingress": [{}]}, False, True),
        ({"policyTypes": ["Ingress", "Egress"]}, True, True),
        ({"policyTypes": ["Ingress"], "egress": [{}]}, True, False),
    ],
)
def test_k8s_policy_types_and_isolation(spec, ingress, egress):
    objects = small_cluster(k8s_np("a", "p", {"podSelector": app("web"), **spec}))
    cluster = build_cluster(objects)
    assert cluster.isolated["ingress"] == ({"a/x", "a/z"} if ingress else set())
    assert cluster.isolated["egress"] == ({"a/x", "a/z"} if egress else set())
    directions = {r.direction for r in cluster.k8s_rules}
    assert ("ingress" in directions) == (ingress and bool(spec.get("ingress")))
    assert ("egress" in directions) == (egress and bool(spec.get("egress")))


def test_k8s_empty_egress_list_without_policy_types_is_ingress_only():
    # Kubernetes defaults policyTypes to [Ingress] plus Egress only when len(egress) > 0.
    objects = small_cluster(k8s_np("a", "p", {"podSelector": app("web"), "egress": []}))
    cluster = build_cluster(objects)
    assert cluster.isolated["ingress"] == {"a/x", "a/z"}
    assert cluster.isolated["egress"] == set()


def test_k8s_isolation_accumulates_across_policies_and_empty_selector_takes_the_namespace():
    objects = small_cluster(
        k8s_np("a", "one", {"podSelector": app("db"), "policyTypes": ["Ingress"]}),
        k8s_np("b", "all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    )
    cluster = build_cluster(objects)
    assert cluster.isolated == {"ingress": {"a/y", "b/w", "b/x"}, "egress": {"b/w", "b/x"}}
    assert cluster.k8s_rules == []


def test_k8s_egress_rule_targets():
    objects = small_cluster(
        k8s_np("a", "p", {"podSelector": app("db"), "policyTypes": ["Egress"],
                          "egress": [{"to": [{"podSelector": app("web")}]}]}),
    )  # fmt: skip
    (rule,) = build_cluster(objects).k8s_rules
    assert keys(rule.applied_to) == ["a/y"]
    assert keys(rule.peers.pods) == ["a/x", "a/z"]
    assert rule.rule_id == rule_id(1, "a", "p", "egress", 0)


# -- Antrea-native policies ---------------------------------------------------------------


def test_antrea_rules_sorted_by_priority_then_rule_order():
    objects = small_cluster(
        acnp("a-low", {"priority": 10, "appliedTo": EVERY, "ingress": [{"action": "Drop"}]}),
        acnp("z-high", {"priority": 9, "appliedTo": EVERY, "ingress": [
            {"action": "Reject", "name": "first"}, {"action": "Pass"}, {"action": "Allow"}]}),
        anp("a", "mid", {"priority": 9.5, "appliedTo": EVERY, "egress": [{"action": "Drop"}],
                         "ingress": [{"action": "Allow"}]}),
    )  # fmt: skip
    cluster = build_cluster(objects)
    # ingress and egress are evaluated apart: the order that matters is within a direction
    got = [
        (r.policy_name, r.name, r.action) for r in cluster.antrea_rules if r.direction == "ingress"
    ]
    assert got == [
        ("z-high", "first", "Reject"),
        ("z-high", "ingress-1", "Pass"),
        ("z-high", "ingress-2", "Allow"),
        ("mid", "ingress-0", "Allow"),
        ("a-low", "ingress-0", "Drop"),
    ]
    assert [r.name for r in cluster.antrea_rules if r.direction == "egress"] == ["egress-0"]
    rules = {(r.policy_name, r.direction, r.name): r for r in cluster.antrea_rules}
    assert rules[("mid", "egress", "egress-0")].rule_id == rule_id(2, "a", "mid", "egress", 0)
    assert rules[("z-high", "ingress", "ingress-1")].rule_id == rule_id(
        3, "", "z-high", "ingress", 1
    )


def test_antrea_rule_ports_and_ip_blocks():
    objects = small_cluster(
        acnp("p", {"priority": 1, "appliedTo": [{"podSelector": app("db")}], "egress": [
            {"action": "Drop", "to": [{"ipBlock": {"cidr": "10.2.0.0/24",
                                                   "except": ["10.2.0.3/32"]}}],
             "ports": [{"protocol": "UDP", "port": 1000, "endPort": 2000}]},
        ], "ingress": [{"action": "Allow", "ports": [{"port": "sql"}]}]}),
    )  # fmt: skip
    egress, ingress = build_cluster(objects).antrea_rules
    assert egress.peers.cidrs == (
        (ipaddress.ip_network("10.2.0.0/24"), (ipaddress.ip_network("10.2.0.3/32"),)),
    )
    assert egress.ports == (PortMatch("UDP", 1000, 2000),)
    assert ingress.ports == (PortMatch("TCP", 5432),)


# -- errors -------------------------------------------------------------------------------


def test_pod_on_an_unknown_node():
    one_line_error(small_cluster(pod("a", "lost", "node-9")), "a/lost")


def test_node_without_pod_cidrs():
    one_line_error([node("bare")], "bare", "podCIDRs")


def test_cluster_without_nodes():
    one_line_error([namespace("a")], "Node")


def test_unknown_action():
    objects = small_cluster(
        acnp("bad-action", {"appliedTo": EVERY, "ingress": [{"action": "Deny"}]})
    )
    one_line_error(objects, "bad-action", "ingress[0]", "Deny")


def test_headless_service():
    svc = service("a", "headless", {"app": "web"}, ["None"], [{"port": 80}])
    one_line_error(small_cluster(svc), "a/headless")
    svc = service("a", "no-ip", {"app": "web"}, [], [{"port": 80}])
    one_line_error(small_cluster(svc), "a/no-ip")


def test_unknown_protocol_names_the_policy():
    objects = small_cluster(
        k8s_np("a", "icmp-policy", {"podSelector": {},
                                    "ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
    )  # fmt: skip
    one_line_error(objects, "ICMP", "icmp-policy")


def test_named_port_nobody_has_names_the_policy():
    objects = small_cluster(
        acnp("no-such-port", {"appliedTo": EVERY,
                              "ingress": [{"action": "Drop", "ports": [{"port": "gopher"}]}]}),
    )  # fmt: skip
    one_line_error(objects, "gopher", "no-such-port", "ingress[0]: ports[0]")


def test_unsupported_peer():
    objects = small_cluster(
        acnp("p", {"appliedTo": EVERY, "ingress": [{"action": "Drop", "from": [{"fqdn": "x"}]}]})
    )
    one_line_error(objects, "fqdn")


DROP_FROM_CLIENTS = {"name": "no-clients", "action": "Drop",
                     "from": [{"podSelector": app("client")}]}  # fmt: skip


@pytest.mark.parametrize(
    "policy, fragments",
    [
        # fields the lab does not implement: ignoring them would broaden the rule
        (acnp("p", {"priority": 1, "appliedTo": EVERY, "ingress": [
            {**DROP_FROM_CLIENTS, "protocols": [{"icmp": {"icmpType": 8}}]}]}),
         ["ingress[0] (no-clients)", ".protocols"]),
        (acnp("p", {"priority": 1, "appliedTo": EVERY, "egress": [
            {"action": "Drop", "toServices": [{"name": "web", "namespace": "a"}]}]}),
         ["egress[0]", ".toServices"]),
        (acnp("p", {"priority": 1, "appliedTo": EVERY, "egress": [
            {"action": "Allow", "to": [{"podSelector": {}}],
             "l7Protocols": [{"http": {"path": "/x"}}]}]}),
         ["egress[0]", ".l7Protocols"]),
        (acnp("p", {"priority": 1, "appliedTo": EVERY, "ingress": [
            {"action": "Drop",
             "from": [{"podSelector": app("web"), "namespaces": {"match": "Self"}}]}]}),
         ["ingress[0]: from[0].namespaces"]),
        (acnp("p", {"priority": 1, "appliedTo": EVERY, "ingress": [
            {"action": "Drop", "from": [{"serviceAccount": {"name": "sa", "namespace": "a"}}]}]}),
         ["ingress[0]: from[0].serviceAccount"]),
        (acnp("p", {"priority": 1, "appliedTo": EVERY, "ingress": [
            {"action": "Drop", "from": [{"podSelector": {}}, {"group": "g"}]}]}),
         ["ingress[0]: from[1].group"]),
        (acnp("p", {"priority": 1, "appliedTo": [{"group": "g"}], "ingress": [DROP_FROM_CLIENTS]}),
         ["spec.appliedTo[0].group"]),
        (acnp("p", {"priority": 1, "appliedTo": [
            {"podSelector": app("db"), "serviceAccount": {"name": "sa", "namespace": "a"}}],
            "ingress": [DROP_FROM_CLIENTS]}),
         ["spec.appliedTo[0].serviceAccount"]),
        (acnp("p", {"priority": 1, "ingress": [
            {**DROP_FROM_CLIENTS, "appliedTo": [{"service": {"name": "web", "namespace": "a"}}]}]}),
         ["ingress[0] (no-clients): appliedTo[0].service"]),
        (acnp("p", {"priority": 1, "appliedTo": EVERY, "ingress": [
            {"action": "Drop", "ports": [{"protocol": "TCP", "port": 80, "sourcePort": 1000}]}]}),
         ["ingress[0]: ports[0].sourcePort"]),
        (acnp("p", {"priority": 1, "appliedTo": EVERY, "ingress": [
            {"action": "Drop", "to": [{"podSelector": {}}]}]}),
         ["ingress[0].to"]),  # an ingress rule has peers in `from`
        (acnp("p", {"priority": 1, "appliedTo": EVERY, "stage": "x", "ingress": []}),
         ["spec.stage"]),
        (anp("a", "p", {"priority": 1, "appliedTo": [
            {"namespaceSelector": {}, "podSelector": app("db")}], "ingress": [DROP_FROM_CLIENTS]}),
         ["spec.appliedTo[0].namespaceSelector"]),  # an ANP applies in its namespace only
        (k8s_np("a", "p", {"podSelector": {}, "ingress": [
            {"from": [{"podSelector": {}, "serviceAccount": {"name": "sa"}}]}]}),
         ["NetworkPolicy a/p", "ingress[0]: from[0].serviceAccount"]),
        (k8s_np("a", "p", {"podSelector": {}, "egress": [
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
         ["egress[0]: to[0]", "ipBlock"]),
        (k8s_np("a", "p", {"podSelector": {}, "egress": [
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "exclude": ["10.1.0.0/16"]}}]}]}),
         ["egress[0]: to[0].ipBlock.exclude"]),
        (k8s_np("a", "p", {"podSelector": {}, "ingress": [{"from": [{}]}]}),
         ["ingress[0]: from[0] is empty"]),
        # what Antrea requires, so that nothing defaults to a broader rule
        (acnp("p", {"priority": 1, "ingress": [DROP_FROM_CLIENTS]}),
         ["ingress[0] (no-clients)", "no appliedTo"]),
        (acnp("p", {"priority": 1, "ingress": [
            {**DROP_FROM_CLIENTS, "appliedTo": [{"podSelector": app("db")}]},
            {"action": "Allow"}]}),
         ["ingress[1]", "no appliedTo"]),
        (acnp("p", {"priority": 1, "appliedTo": EVERY, "ingress": [
            {**DROP_FROM_CLIENTS, "appliedTo": [{"podSelector": app("db")}]}]}),
         ["ingress[0] (no-clients)", "appliedTo is set in the rule and in the spec"]),
        (acnp("p", {"priority": 1}), ["ClusterNetworkPolicy p", "no appliedTo"]),
        (acnp("p", {"priority": 1, "appliedTo": [{}], "ingress": [DROP_FROM_CLIENTS]}),
         ["spec.appliedTo[0] is empty"]),
        (acnp("p", {"priority": 1, "appliedTo": EVERY, "ingress": [
            {"from": [{"podSelector": app("client")}]}]}),
         ["ingress[0]", "action is missing"]),
        (acnp("p", {"priority": 1, "tier": "baseline", "appliedTo": EVERY,
                    "ingress": [DROP_FROM_CLIENTS]}),
         ["spec.tier baseline"]),
        (acnp("p", {"priority": 1, "tier": "mine", "appliedTo": EVERY,
                    "ingress": [DROP_FROM_CLIENTS]}),
         ["spec.tier 'mine'"]),
    ],
)  # fmt: skip
def test_what_the_lab_does_not_implement_is_a_one_line_error(policy, fragments):
    kind = policy["kind"]
    message = one_line_error(small_cluster(policy), *fragments)
    assert message.startswith(f"{kind} "), message


def test_rule_level_applied_to():
    objects = small_cluster(
        acnp("per-rule", {"priority": 1, "ingress": [
            {"action": "Drop", "appliedTo": [{"podSelector": app("db")}]},
            {"action": "Allow", "appliedTo": [
                {"namespaceSelector": {"matchLabels": {"team": "blue"}}},
                {"podSelector": app("web")}],
             "ports": [{"port": "http"}]}]}),
    )  # fmt: skip
    drop, allow = build_cluster(objects).antrea_rules
    assert keys(drop.applied_to) == ["a/y"]
    assert keys(allow.applied_to) == ["a/x", "a/z", "b/w", "b/x"]
    # a named port resolves on the Pods its own rule applies to (a/y has no port "http")
    assert allow.ports == (PortMatch("TCP", 8080), PortMatch("TCP", 9090))


def test_tiers_come_before_priorities():
    objects = small_cluster(
        acnp("app-first", {"priority": 1, "appliedTo": EVERY, "ingress": [{"action": "Drop"}]}),
        acnp("ops", {"priority": 50, "tier": "securityops", "appliedTo": EVERY,
                     "ingress": [{"action": "Allow"}]}),
        acnp("emergency", {"priority": 90, "tier": "Emergency", "appliedTo": EVERY,
                           "ingress": [{"action": "Pass"}]}),  # Antrea 0.9's name
        anp("a", "platform", {"priority": 2, "tier": "platform", "appliedTo": EVERY,
                              "ingress": [{"action": "Reject"}]}),
    )  # fmt: skip
    order = [r.policy_name for r in build_cluster(objects).antrea_rules]
    assert order == ["emergency", "ops", "platform", "app-first"]


def test_rule_ids_that_collide_are_refused():
    # Rule ids are 30-bit hashes: these names were searched for so that they collide.
    twins = [acnp(n, {"priority": 1, "appliedTo": EVERY, "ingress": [{"action": "Drop"}]})
             for n in ("twin-2f79f", "twin-5d861")]  # fmt: skip
    assert len({rule_id(3, "", p["metadata"]["name"], "ingress", 0) for p in twins}) == 1
    one_line_error(small_cluster(*twins), "collides", "twin-2f79f", "twin-5d861")


def test_a_rule_id_that_collides_with_an_isolation_drop_is_refused():
    # An Antrea rule with the id of the isolation drop would be reported as the isolation.
    name = "collide-1e976de8"  # searched for: its first ingress rule hashes to that id
    assert rule_id(3, "", name, "ingress", 0) == ISOLATION_INGRESS_ID
    policy = acnp(name, {"priority": 1, "appliedTo": EVERY, "ingress": [{"action": "Drop"}]})
    one_line_error(small_cluster(policy), "collides", name, "isolation")


# -- inventory ----------------------------------------------------------------------------


def store_of(cluster):
    inventory = cluster.inventory()
    assert inventory["apiVersion"] == "v1" and inventory["kind"] == "List"
    store = MetadataStore()
    store.replace(inventory["items"])
    return inventory, store


def expected_rule(rule):
    return PolicyRule(
        rule.rule_id,
        rule.policy_type,
        rule.policy_namespace,
        rule.policy_name,
        rule.name,
        rule.direction,
        ACTION_CODES[rule.action],
    )


def test_default_inventory_pods_nodes_services_round_trip(default):
    inventory, store = store_of(default)
    pods = [i for i in inventory["items"] if i["kind"] == "Pod"]
    assert len(pods) == 5
    for item in pods:
        p = default.pod(f"{item['metadata']['namespace']}/{item['metadata']['name']}")
        assert item["status"]["podIPs"] == [{"ip": p.addresses[4]}, {"ip": p.addresses[6]}]
        assert item["status"]["podIP"] == p.addresses[4]
    for p in default.pods:
        info = PodInfo(p.namespace, p.name, p.node.name, p.labels)
        assert store.pod(pack_ip(p.addresses[4])) == info
        assert store.pod(pack_ip(p.addresses[6])) == info
    assert len(store.pods_by_ip) == 10
    assert store.node("node-1").pod_cidrs == default.node("node-1").pod_cidrs
    assert store.node("node-2").addresses == (
        default.node("node-2").address(4),
        default.node("node-2").address(6),
    )
    for address in ("10.96.0.10", "fd00:10:96::a"):
        svc = store.service(pack_ip(address), 80, 6)
        assert svc is not None and svc.port_name_full == "backend/web:http"
        assert store.service(pack_ip(address), 80, 17) is None
        assert store.service(pack_ip(address), 8080, 6) is None
    # inventory() works on copies: the source objects keep no status
    assert all("status" not in o for o in default.objects if o["kind"] == "Pod")


def test_default_inventory_annotations(default):
    inventory, _ = store_of(default)
    policies = {
        i["metadata"]["name"]: json.loads(i["metadata"]["annotations"][RULE_IDS_ANNOTATION])
        for i in inventory["items"]
        if "NetworkPolicy" in i["kind"]
    }
    reject, allow = default.antrea_rules
    (k8s,) = default.k8s_rules
    assert policies == {
        "web-allow-frontend": {
            "ingress": [k8s.rule_id],
            "egress": [],
            "isolationIngress": ISOLATION_INGRESS_ID,
            "isolationEgress": ISOLATION_EGRESS_ID,
        },
        "acnp-db-guard": {"ingress": [reject.rule_id, allow.rule_id], "egress": []},
    }
    others = [i for i in inventory["items"] if "NetworkPolicy" not in i["kind"]]
    assert all(RULE_IDS_ANNOTATION not in (i["metadata"].get("annotations") or {}) for i in others)


def test_default_inventory_rules_by_id(default):
    _, store = store_of(default)
    for rule in default.antrea_rules + default.k8s_rules:
        assert store.rule(rule.rule_id) == expected_rule(rule)
    assert store.rule(default.k8s_rules[0].rule_id) == PolicyRule(
        default.k8s_rules[0].rule_id, 1, "backend", "web-allow-frontend", "", "ingress", 1
    )
    assert store.rule(default.antrea_rules[0].rule_id) == PolicyRule(
        default.antrea_rules[0].rule_id, 3, "", "acnp-db-guard", "reject-clients", "ingress", 3
    )
    assert store.rule(ISOLATION_INGRESS_ID) == PolicyRule(
        ISOLATION_INGRESS_ID, 1, "", "", "", "ingress", ACTION_DROP
    )
    assert store.rule(ISOLATION_EGRESS_ID) == PolicyRule(
        ISOLATION_EGRESS_ID, 1, "", "", "", "egress", ACTION_DROP
    )
    assert len(store.rules) == 5


def test_custom_inventory_rules_round_trip():
    objects = small_cluster(
        anp("a", "guard", {"priority": 3, "appliedTo": EVERY, "ingress": [
            {"action": "Pass", "name": "to-k8s"}, {"action": "Reject"}],
            "egress": [{"action": "Drop", "name": "no-out"}, {"action": "Allow"}]}),
        acnp("global", {"priority": 1, "appliedTo": EVERY, "egress": [
            {"action": "Allow", "name": "dns", "ports": [{"protocol": "UDP", "port": 53}]}]}),
        k8s_np("b", "iso", {"podSelector": {}, "ingress": [{}, {}], "egress": [{}]}),
    )  # fmt: skip
    cluster = build_cluster(objects)
    _, store = store_of(cluster)
    rules = cluster.antrea_rules + cluster.k8s_rules
    assert len(rules) == 8
    for rule in rules:
        assert store.rule(rule.rule_id) == expected_rule(rule)
    got = {(r.policy_name, r.direction, r.name): (r.policy_type, r.action) for r in rules}
    assert got[("guard", "ingress", "to-k8s")] == (2, "Pass")
    assert store.rule(rule_id(2, "a", "guard", "ingress", 0)).action == ACTION_NONE
    assert store.rule(rule_id(2, "a", "guard", "egress", 0)).rule_name == "no-out"
    assert store.rule(rule_id(2, "a", "guard", "egress", 1)).rule_name == "egress-1"
    assert store.rule(rule_id(3, "", "global", "egress", 0)).policy_namespace == ""
    assert store.rule(rule_id(1, "b", "iso", "egress", 0)).action == ACTION_ALLOW
    assert len(store.rules) == 10  # 8 rules + the two isolation drops


def test_inventory_of_an_antrea_and_a_k8s_policy_with_the_same_name():
    # A K8s NetworkPolicy and an Antrea NetworkPolicy are different objects even with the
    # same namespace and name; each must carry its own rule ids.
    objects = small_cluster(
        k8s_np("a", "same", {"podSelector": app("db"), "ingress": [{}]}),
        anp("a", "same", {"priority": 1, "appliedTo": EVERY, "ingress": [{"action": "Drop"}]}),
    )
    cluster = build_cluster(objects)
    inventory, store = store_of(cluster)
    by_api = {
        i["apiVersion"]: json.loads(i["metadata"]["annotations"][RULE_IDS_ANNOTATION])
        for i in inventory["items"]
        if i["kind"] == "NetworkPolicy"
    }
    assert by_api["networking.k8s.io/v1"]["ingress"] == [rule_id(1, "a", "same", "ingress", 0)]
    assert by_api["crd.antrea.io/v1beta1"]["ingress"] == [rule_id(2, "a", "same", "ingress", 0)]
    assert "isolationIngress" not in by_api["crd.antrea.io/v1beta1"]
    assert store.rule(rule_id(1, "a", "same", "ingress", 0)).policy_type == 1
    assert store.rule(rule_id(2, "a", "same", "ingress", 0)).policy_type == 2
    assert store.rule(rule_id(2, "a", "same", "ingress", 0)).action == ACTION_DROP


def test_inventory_of_objects_without_a_namespace_uses_default():
    # The API fills metadata.namespace of namespaced objects; the lab treats a missing one
    # as "default" and the inventory must say so, annotation included.
    policy = k8s_np("default", "p", {"podSelector": {}, "ingress": [{}]})
    del policy["metadata"]["namespace"]
    lone = pod("default", "lone", "node-a")
    del lone["metadata"]["namespace"]
    cluster = build_cluster(small_cluster(lone, policy))
    assert cluster.pod("default/lone").addresses[4] == "10.1.0.5"
    assert cluster.k8s_rules[0].rule_id == rule_id(1, "default", "p", "ingress", 0)
    _, store = store_of(cluster)
    assert store.rule(rule_id(1, "default", "p", "ingress", 0)) is not None
    assert store.rule(ISOLATION_INGRESS_ID) is not None
    assert store.pod(pack_ip("10.1.0.5")).namespace == "default"
