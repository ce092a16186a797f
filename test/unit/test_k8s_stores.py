"""The metadata store: Pods by IP, Services by address, NetworkPolicy rules by rule id."""

import json
import logging

import pytest
from agentkit import ip

from antrea_flow.k8s.stores import (
    DELETED_POD_RETENTION,
    RULE_IDS_ANNOTATION,
    MetadataStore,
    PodInfo,
    PolicyRule,
    ServiceInfo,
)


def node(name, *cidrs, address="192.168.77.10"):
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"podCIDR": cidrs[0], "podCIDRs": list(cidrs)} if cidrs else {},
        "status": {"addresses": [{"type": "InternalIP", "address": address},
                                 {"type": "Hostname", "address": name}]},
    }  # fmt: skip


def pod(
    namespace,
    name,
    node_name,
    *ips,
    host_network=False,
    labels=None,
    pod_ip_only=False,
    created=None,
):
    status = {"phase": "Running"}
    if ips:
        status["podIP"] = ips[0]
        if not pod_ip_only:
            status["podIPs"] = [{"ip": i} for i in ips]
    spec = {"nodeName": node_name, "containers": [{"name": "c", "image": "busybox"}]}
    if host_network:
        spec["hostNetwork"] = True
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "labels": labels or {},
                     **({"creationTimestamp": created} if created else {})},
        "spec": spec,
        "status": status,
    }  # fmt: skip


def service(namespace, name, *cluster_ips, ports, single_ip_field=False):
    spec = {"type": "ClusterIP", "ports": ports, "clusterIP": cluster_ips[0]}
    if not single_ip_field:
        spec["clusterIPs"] = list(cluster_ips)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": name},
        "spec": spec,
    }


def policy(api_version, kind, name, ids, namespace=None, ingress=None, egress=None):
    metadata = {"name": name, "annotations": {RULE_IDS_ANNOTATION: json.dumps(ids)}}
    if namespace is not None:
        metadata["namespace"] = namespace
    spec = {}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata, "spec": spec}


def k8s_np(namespace, name, ids, ingress=None, egress=None):
    return policy("networking.k8s.io/v1", "NetworkPolicy", name, ids, namespace, ingress, egress)


# -- Nodes and Pods ----------------------------------------------------------------------


def test_nodes_keep_pod_cidrs_and_ip_addresses():
    store = MetadataStore()
    store.replace([node("node-1", "10.10.1.0/24", "fd00:10:10:1::/64"), node("node-2")])
    n1 = store.node("node-1")
    assert [str(c) for c in n1.pod_cidrs] == ["10.10.1.0/24", "fd00:10:10:1::/64"]
    assert n1.addresses == ("192.168.77.10",)  # the Hostname address is not an IP
    assert store.node("node-2").pod_cidrs == ()


def test_node_with_only_the_legacy_pod_cidr_field():
    obj = node("node-1")
    obj["spec"] = {"podCIDR": "10.10.1.0/24"}
    store = MetadataStore()
    store.upsert(obj)
    assert [str(c) for c in store.node("node-1").pod_cidrs] == ["10.10.1.0/24"]


def test_pods_by_packed_ip_for_every_pod_ip_of_a_dual_stack_pod():
    store = MetadataStore()
    store.replace(
        [pod("frontend", "client", "node-1", "10.10.1.5", "fd00:10:10:1::5", labels={"app": "c"})]
    )
    v4, v6 = store.pod(ip("10.10.1.5")), store.pod(ip("fd00:10:10:1::5"))
    assert v4 == PodInfo("frontend", "client", "node-1", {"app": "c"})
    assert v6 is v4
    assert store.pod(ip("10.10.1.6")) is None
    assert set(store.pods_by_ip) == {ip("10.10.1.5"), ip("fd00:10:10:1::5")}


def test_pod_with_only_pod_ip():
    store = MetadataStore()
    store.upsert(pod("default", "old", "node-2", "10.10.2.9", pod_ip_only=True))
    assert store.pod(ip("10.10.2.9")) == PodInfo("default", "old", "node-2", {})


def test_pending_pod_without_ip_is_not_indexed():
    store = MetadataStore()
    store.upsert(pod("default", "pending", ""))
    assert store.pods_by_ip == {}


def test_host_network_pods_are_skipped():
    store = MetadataStore()
    store.replace(
        [
            pod("kube-system", "kube-proxy", "node-1", "192.168.77.10", host_network=True),
            pod("default", "web", "node-1", "10.10.1.6"),
        ]
    )
    assert store.pod(ip("192.168.77.10")) is None
    assert store.pod(ip("10.10.1.6")).name == "web"


# -- Services ----------------------------------------------------------------------------


def test_services_by_cluster_ip_port_and_protocol_number_dual_stack():
    store = MetadataStore()
    store.upsert(
        service(
            "backend",
            "web",
            "10.96.0.10",
            "fd00:10:96::a",
            ports=[
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "assoc", "port": 3868, "protocol": "SCTP"},
                {"port": 9000},  # protocol defaults to TCP; unnamed
            ],
        )
    )
    http = store.service(ip("10.96.0.10"), 80, 6)
    assert http == ServiceInfo("backend", "web", "http")
    assert http.port_name_full == "backend/web:http"
    assert store.service(ip("fd00:10:96::a"), 80, 6).port_name_full == "backend/web:http"
    assert store.service(ip("10.96.0.10"), 53, 17).port_name_full == "backend/web:dns"
    assert store.service(ip("fd00:10:96::a"), 53, 17).port_name == "dns"
    assert store.service(ip("10.96.0.10"), 3868, 132).port_name == "assoc"
    assert store.service(ip("10.96.0.10"), 9000, 6).port_name_full == "backend/web:"
    # The protocol and port are part of the key.
    assert store.service(ip("10.96.0.10"), 80, 17) is None
    assert store.service(ip("10.96.0.10"), 53, 6) is None
    assert store.service(ip("10.96.0.10"), 8080, 6) is None
    assert len(store.services) == 8


def test_service_with_only_the_cluster_ip_field():
    store = MetadataStore()
    store.upsert(
        service("default", "api", "10.96.0.1", ports=[{"name": "https", "port": 443}],
                single_ip_field=True)
    )  # fmt: skip
    assert store.service(ip("10.96.0.1"), 443, 6).port_name_full == "default/api:https"


def test_headless_services_are_skipped():
    store = MetadataStore()
    store.upsert(service("default", "db", "None", ports=[{"name": "pg", "port": 5432}]))
    assert store.services == {}


def test_external_name_service_without_cluster_ip_is_skipped():
    store = MetadataStore()
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "default", "name": "ext"},
        "spec": {"type": "ExternalName", "externalName": "example.com"},
    }
    store.upsert(obj)
    assert store.services == {}


# -- NetworkPolicy rules -----------------------------------------------------------------


def test_kubernetes_network_policy_rules_are_allow_with_empty_rule_names():
    store = MetadataStore()
    store.upsert(
        k8s_np(
            "backend",
            "allow-web",
            {"ingress": [101, 102], "egress": [201]},
            ingress=[{"from": [{"podSelector": {}}]}, {"ports": [{"port": 80}]}],
            egress=[{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}],
        )
    )
    assert store.rule(101) == PolicyRule(101, 1, "backend", "allow-web", "", "ingress", 1)
    assert store.rule(102) == PolicyRule(102, 1, "backend", "allow-web", "", "ingress", 1)
    assert store.rule(201) == PolicyRule(201, 1, "backend", "allow-web", "", "egress", 1)
    assert set(store.rules) == {101, 102, 201}


def test_isolation_rule_ids_are_k8s_drops_without_policy_name():
    store = MetadataStore()
    store.upsert(
        k8s_np(
            "backend",
            "deny-all",
            {"ingress": [], "egress": [], "isolationIngress": 900, "isolationEgress": 901},
            ingress=[],
            egress=[],
        )
    )
    ingress, egress = store.rule(900), store.rule(901)
    assert (ingress.policy_type, ingress.action, ingress.direction) == (1, 2, "ingress")
    assert (egress.policy_type, egress.action, egress.direction) == (1, 2, "egress")
    assert ingress.policy_name == "" and egress.policy_name == ""
    assert ingress.policy_namespace == "" and ingress.rule_name == ""


def test_antrea_cluster_network_policy_actions_and_rule_names():
    store = MetadataStore()
    store.upsert(
        policy(
            "crd.antrea.io/v1beta1",
            "ClusterNetworkPolicy",
            "acnp-web",
            {"ingress": [301, 302, 303], "egress": [401, 402]},
            ingress=[
                {"action": "Allow", "name": "allow-frontend"},
                {"action": "Drop"},
                {"action": "Reject", "name": "reject-rest"},
            ],
            egress=[{"action": "Drop", "name": "no-internet"}, {"action": "Allow"}],
        )
    )
    assert store.rule(301) == PolicyRule(301, 3, "", "acnp-web", "allow-frontend", "ingress", 1)
    assert store.rule(302) == PolicyRule(302, 3, "", "acnp-web", "ingress-1", "ingress", 2)
    assert store.rule(303) == PolicyRule(303, 3, "", "acnp-web", "reject-rest", "ingress", 3)
    assert store.rule(401) == PolicyRule(401, 3, "", "acnp-web", "no-internet", "egress", 2)
    assert store.rule(402) == PolicyRule(402, 3, "", "acnp-web", "egress-1", "egress", 1)


def test_antrea_network_policy_is_type_2_and_namespaced():
    store = MetadataStore()
    store.upsert(
        policy(
            "crd.antrea.io/v1beta1",
            "NetworkPolicy",
            "anp-db",
            {"ingress": [501], "egress": [601]},
            namespace="db",
            ingress=[{"action": "Reject", "name": "only-backend"}],
            egress=[{"action": "Allow"}],
        )
    )
    assert store.rule(501) == PolicyRule(501, 2, "db", "anp-db", "only-backend", "ingress", 3)
    assert store.rule(601) == PolicyRule(601, 2, "db", "anp-db", "egress-0", "egress", 1)


def test_antrea_policy_v1alpha1_kinds_are_recognised():
    store = MetadataStore()
    store.replace(
        [
            policy("crd.antrea.io/v1alpha1", "ClusterNetworkPolicy", "old-acnp", {"ingress": [7]},
                   ingress=[{"action": "Drop"}]),
            policy("crd.antrea.io/v1alpha1", "NetworkPolicy", "old-anp", {"egress": [8]},
                   namespace="ns", egress=[{"action": "Allow", "name": "e"}]),
        ]
    )  # fmt: skip
    assert (store.rule(7).policy_type, store.rule(7).action) == (3, 2)
    assert (store.rule(8).policy_type, store.rule(8).rule_name) == (2, "e")


def test_policy_without_the_annotation_has_no_rules_and_other_kinds_are_ignored():
    store = MetadataStore()
    bare = k8s_np("default", "bare", {}, ingress=[{}])
    del bare["metadata"]["annotations"]
    other = policy("example.com/v1", "NetworkPolicy", "foreign", {"ingress": [77]}, "default",
                   ingress=[{}])  # fmt: skip
    store.replace([bare, other])
    assert store.rules == {}


def test_cluster_network_policy_with_a_pass_rule_keeps_all_its_rules():
    # Antrea's rule actions include Pass (hand over to K8s NetworkPolicies); upstream's
    # RuleActionToUint8 maps anything but Allow/Drop/Reject to 0 (no action).
    store = MetadataStore()
    store.upsert(
        policy(
            "crd.antrea.io/v1beta1",
            "ClusterNetworkPolicy",
            "tiered",
            {"ingress": [701, 702]},
            ingress=[{"action": "Pass", "name": "to-k8s"}, {"action": "Drop", "name": "rest"}],
        )
    )
    assert store.rule(702) == PolicyRule(702, 3, "", "tiered", "rest", "ingress", 2)
    assert store.rule(701) == PolicyRule(701, 3, "", "tiered", "to-k8s", "ingress", 0)


def test_k8s_and_antrea_network_policies_with_the_same_name_coexist():
    # A K8s NetworkPolicy and an Antrea NetworkPolicy are different objects even with the
    # same namespace and name (different API groups); both sets of rules must be kept.
    store = MetadataStore()
    store.upsert(k8s_np("web", "allow", {"ingress": [11]}, ingress=[{}]))
    store.upsert(
        policy("crd.antrea.io/v1beta1", "NetworkPolicy", "allow", {"ingress": [12]}, "web",
               ingress=[{"action": "Drop"}])
    )  # fmt: skip
    assert store.rule(11) is not None and store.rule(11).policy_type == 1
    assert store.rule(12) is not None and store.rule(12).policy_type == 2


# -- malformed objects -------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        pod("default", "broken-ip", "node-1", "10.10.1.300"),
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "namespace": "d"},
         "spec": {}, "status": {"podIPs": [{"address": "10.10.1.8"}]}},
        service("default", "bad-port", "10.96.0.50", ports=[{"name": "p", "port": "eighty"}]),
        service("default", "bad-ip", "10.96.0.300", ports=[{"name": "p", "port": 80}]),
        node("node-9", "10.10.9.0/33"),
        k8s_np("default", "bad-json", {}, ingress=[{}]),
        k8s_np("default", "ids-not-a-map", [1, 2], ingress=[{}]),
        policy("crd.antrea.io/v1beta1", "ClusterNetworkPolicy", "bad-action",
               {"ingress": [55]}, ingress=[{"action": "Maybe"}]),
    ],
)  # fmt: skip
def test_a_malformed_object_is_ignored_with_a_warning_and_the_others_are_kept(bad, caplog):
    if bad["metadata"]["name"] == "bad-json":
        bad["metadata"]["annotations"][RULE_IDS_ANNOTATION] = "{not json"
    good = [
        node("node-1", "10.10.1.0/24"),
        pod("default", "web", "node-1", "10.10.1.6"),
        service("default", "web", "10.96.0.10", ports=[{"name": "http", "port": 80}]),
        k8s_np("default", "np", {"ingress": [101]}, ingress=[{}]),
    ]
    store = MetadataStore()
    with caplog.at_level(logging.WARNING, logger="antrea_flow.k8s.stores"):
        store.replace([good[0], good[1], bad, good[2], good[3]])
    assert store.node("node-1") is not None
    assert store.pod(ip("10.10.1.6")).name == "web"
    assert store.service(ip("10.96.0.10"), 80, 6).name == "web"
    assert store.rule(101).policy_name == "np"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(bad["metadata"]["name"] in w for w in warnings), warnings
    # Nothing of the malformed object is half-indexed.
    assert store.pod(ip("10.10.1.8")) is None
    assert store.service(ip("10.96.0.50"), 80, 6) is None
    assert 55 not in store.rules
    assert store.node("node-9") is None


# -- feeding -----------------------------------------------------------------------------


def test_upsert_remove_replace_and_the_version_counter():
    now = [1000.0]
    store = MetadataStore(clock=lambda: now[0])
    version = store.version
    web = pod("default", "web", "node-1", "10.10.1.6")
    store.upsert(web)
    assert store.version == version + 1
    assert store.pod(ip("10.10.1.6")).name == "web"
    store.upsert(pod("default", "web", "node-1", "10.10.1.6"))  # a status change elsewhere
    assert store.version == version + 1  # nothing a lookup sees changed

    moved = pod("default", "web", "node-1", "10.10.1.16")  # same object, new IP
    store.upsert(moved)
    assert store.version == version + 2
    assert store.pod(ip("10.10.1.16")).name == "web"
    assert store.pod(ip("10.10.1.6")).name == "web"  # for connections it had there

    store.upsert(pod("default", "db", "node-2", "10.10.2.7"))
    store.remove({"kind": "Pod", "metadata": {"namespace": "default", "name": "web"}})
    assert store.version == version + 4
    assert store.pod(ip("10.10.2.7")).name == "db"

    store.remove({"kind": "Pod", "metadata": {"namespace": "default", "name": "absent"}})
    assert store.version == version + 4
    assert store.pod(ip("10.10.2.7")).name == "db"

    store.replace([node("node-1", "10.10.1.0/24")])
    assert store.version == version + 6
    assert [n.name for n in store.nodes] == ["node-1"]
    assert store.pod(ip("10.10.1.16")).name == "web"  # gone, within the retention
    now[0] += DELETED_POD_RETENTION + 1
    assert store.pod(ip("10.10.1.16")) is None
    assert store.pod(ip("10.10.2.7")) is None
    store.expire()  # frees them
    assert store.pods_by_ip == {}
    assert store.counts.pod_ips == 0 and store.counts.nodes == 1


def test_a_deleted_pod_resolves_for_five_minutes_and_not_after():
    now = [1000.0]
    store = MetadataStore(clock=lambda: now[0])
    web = pod("default", "web", "node-1", "10.10.1.6", created="1970-01-01T00:10:00Z")
    store.apply([("ADDED", web)])
    now[0] = 2000.0
    store.apply([("DELETED", web)])
    now[0] = 2000.0 + DELETED_POD_RETENTION - 1
    assert store.pod(ip("10.10.1.6")).name == "web"
    assert store.pod(ip("10.10.1.6"), at=1500.0).name == "web"
    now[0] = 2000.0 + DELETED_POD_RETENTION + 1
    assert store.pod(ip("10.10.1.6")) is None
    assert store.pod(ip("10.10.1.6"), at=1500.0) is None


def test_a_reused_pod_ip_resolves_by_the_flows_start_time():
    now = [1000.0]
    store = MetadataStore(clock=lambda: now[0])
    old = pod("default", "old", "node-1", "10.10.1.6", created="1970-01-01T00:10:00Z")  # 600
    new = pod("default", "new", "node-1", "10.10.1.6", created="1970-01-01T00:16:40Z")  # 1000
    store.apply([("ADDED", old)])
    now[0] = 990.0
    store.apply([("DELETED", old)])
    now[0] = 1000.0
    store.apply([("ADDED", new)])
    assert store.pod(ip("10.10.1.6")).name == "new"  # now
    assert store.pod(ip("10.10.1.6"), at=700.0).name == "old"  # a flow that began then
    assert store.pod(ip("10.10.1.6"), at=1001.0).name == "new"
    # Before any Pod held it: the clocks disagree; the first holder is the best guess.
    assert store.pod(ip("10.10.1.6"), at=100.0).name == "old"
    # After the only holder ended, nobody had it.
    store.apply([("DELETED", new)])
    assert store.pod(ip("10.10.1.6"), at=1200.0) is None


def test_a_finished_pod_releases_its_ip_like_a_deleted_one():
    now = [1000.0]
    store = MetadataStore(clock=lambda: now[0])
    job = pod("batch", "job", "node-1", "10.10.1.8", created="1970-01-01T00:10:00Z")
    store.apply([("ADDED", job)])
    done = pod("batch", "job", "node-1", "10.10.1.8", created="1970-01-01T00:10:00Z")
    done["status"]["phase"] = "Succeeded"
    now[0] = 1100.0
    store.apply([("MODIFIED", done)])
    assert store.pod(ip("10.10.1.8"), at=900.0).name == "job"
    assert store.pod(ip("10.10.1.8"), at=1200.0) is None
    now[0] = 1100.0 + DELETED_POD_RETENTION + 1
    assert store.pod(ip("10.10.1.8")) is None


def test_replace_of_some_kinds_keeps_the_others():
    store = MetadataStore()
    store.replace(
        [node("node-1", "10.10.1.0/24", address="192.168.77.11"),
         pod("default", "web", "node-1", "10.10.1.6"),
         k8s_np("default", "np", {"ingress": [101]}, ingress=[{}])]
    )  # fmt: skip
    store.replace([], kinds=[("", "Node")])  # a relist of Nodes that finds none
    assert store.nodes == () and store.node_name_of(ip("192.168.77.11")) is None
    assert store.pod(ip("10.10.1.6")).name == "web"
    assert store.rule(101).policy_name == "np"


def test_node_addresses_name_their_node():
    store = MetadataStore()
    store.upsert(node("node-1", "10.10.1.0/24", address="192.168.77.11"))
    assert store.node_name_of(ip("192.168.77.11")) == "node-1"
    store.upsert(node("node-1", "10.10.1.0/24", address="192.168.77.21"))
    assert store.node_name_of(ip("192.168.77.11")) is None
    assert store.node_name_of(ip("192.168.77.21")) == "node-1"


def test_each_watch_event_touches_only_its_objects_entries():
    """Churn is not quadratic: an event re-derives only its own object."""
    store = MetadataStore()
    store.replace([pod("ns", f"p{i}", "node-1", f"10.10.{i // 250}.{i % 250 + 1}")
                   for i in range(2000)])  # fmt: skip
    before = dict(store.pods_by_ip)
    store.apply([("MODIFIED", pod("ns", "p7", "node-2", "10.10.0.8"))])
    changed = [k for k, v in store.pods_by_ip.items() if before.get(k) is not v]
    assert changed == [ip("10.10.0.8")]
    assert store.pod(ip("10.10.0.8")).node_name == "node-2"


def test_objects_of_different_kinds_with_the_same_name_do_not_replace_each_other():
    store = MetadataStore()
    store.upsert(pod("default", "web", "node-1", "10.10.1.6"))
    store.upsert(service("default", "web", "10.96.0.10", ports=[{"name": "http", "port": 80}]))
    assert store.pod(ip("10.10.1.6")) is not None
    assert store.service(ip("10.96.0.10"), 80, 6) is not None


def test_same_name_in_different_namespaces_are_different_objects():
    store = MetadataStore()
    store.upsert(pod("a", "web", "node-1", "10.10.1.6"))
    store.upsert(pod("b", "web", "node-1", "10.10.1.7"))
    assert store.pod(ip("10.10.1.6")).namespace == "a"
    assert store.pod(ip("10.10.1.7")).namespace == "b"


def test_removing_a_policy_removes_its_rules():
    store = MetadataStore()
    np = k8s_np("default", "np", {"ingress": [101], "isolationIngress": 900}, ingress=[{}])
    store.upsert(np)
    assert set(store.rules) == {101, 900}
    store.remove(np)
    assert store.rules == {}
