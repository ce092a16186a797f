"""A Node's netfilter rules, checked by walking the generated chains for a packet.

The evaluator below reads the iptables-restore document and follows it the way netfilter
does for the matches and targets the generator emits (-j/-g/RETURN, marks, connlabels,
terminal verdicts); anything else it meets fails the test, so a new kind of rule cannot go
unchecked. The verdicts are then compared with the policy semantics of the lab cluster.
"""

import ipaddress
import os
import re
import shlex
import subprocess
import uuid
from dataclasses import dataclass
from fractions import Fraction

import pytest

from antrea_flow.conntrack.parser import Entry
from antrea_flow.exporter.denyqueue import QUEUE_LENGTH
from antrea_flow.exporter.enrich import Enricher
from antrea_flow.k8s.stores import MetadataStore, pack_ip
from antrea_flow.lab.cluster import (
    ISOLATION_EGRESS_ID,
    ISOLATION_INGRESS_ID,
    RULE_ID_MASK,
    build_cluster,
    default_objects,
    load_cluster,
    rule_id,
)
from antrea_flow.lab.rules import (
    EXCEPT_FLAG,
    NOT_QUEUED_COMMENT,
    NodeRules,
    _label_matches,
)

# -- the evaluator ------------------------------------------------------------------------

TERMINAL = {"ACCEPT", "DROP", "REJECT", "NFQUEUE"}


@dataclass
class Packet:
    src: str
    dst: str
    proto: str  # tcp, udp, sctp, icmp, icmpv6
    dport: int = 0
    state: str = "NEW"
    out_iface: str | None = None


@dataclass
class Outcome:
    verdict: str
    mark: int
    labels: set[int]
    reject_with: str | None = None
    queue: int | None = None
    queue_bypass: bool = False
    limited: bool = False  # the terminal rule had a limit match
    comment: str | None = None
    to_source: str | None = None

    def label_bytes(self) -> bytes:
        """CTA_LABELS as the kernel dumps it: label bit n is bit n % 8 of byte n // 8."""
        raw = bytearray(16)
        for n in self.labels:
            raw[n // 8] |= 1 << (n % 8)
        return bytes(raw)

    @property
    def ingress_id(self) -> int:
        return int.from_bytes(self.label_bytes()[12:16], "big")

    @property
    def egress_id(self) -> int:
        return int.from_bytes(self.label_bytes()[8:12], "big")


class Document:
    def __init__(self, text: str):
        self.tables: dict[str, dict] = {}
        current = None
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            if line.startswith("*"):
                current = self.tables.setdefault(line[1:], {"policy": {}, "chains": {}})
            elif line.startswith(":"):
                name, policy = line[1:].split()[:2]
                current["policy"][name] = policy
                current["chains"].setdefault(name, [])
            elif line == "COMMIT":
                current = None
            else:
                tokens = shlex.split(line)
                assert tokens[0] == "-A", line
                assert tokens[1] in current["chains"], f"chain not declared: {line}"
                current["chains"][tokens[1]].append(tokens[2:])

    def lines(self, table):
        return [
            (name, rule) for name, rules in self.tables[table]["chains"].items() for rule in rules
        ]

    def evaluate(self, table, chain, packet, over_limit=False) -> Outcome:
        state = {"mark": 0, "labels": set(), "over_limit": over_limit}
        result = self._run(table, chain, packet, state, depth=0)
        if result is None:
            result = Outcome(self.tables[table]["policy"][chain], 0, set())
        result.mark = state["mark"]
        result.labels = state["labels"]
        return result

    def _run(self, table, chain, packet, state, depth):
        assert depth < 20, "chain loop"
        chains = self.tables[table]["chains"]
        for rule in chains[chain]:
            matched, target, args, info = self._match(rule, packet, state)
            if not matched or target is None:
                continue
            goto = target[0] == "-g"
            name = target[1]
            if name == "RETURN":
                return None
            if name in chains:
                result = self._run(table, name, packet, state, depth + 1)
                if result is not None or goto:
                    return result
                continue
            assert not goto, f"goto to a non-chain {name}"
            if name == "MARK":
                op, value = args[0], int(args[1], 0)
                if op == "--set-mark":
                    state["mark"] = value
                elif op == "--or-mark":
                    state["mark"] |= value
                elif op == "--and-mark":
                    state["mark"] &= value
                else:
                    raise AssertionError(f"MARK option {op}")
                continue
            if name == "SNAT":
                assert args[0] == "--to-source"
                return Outcome("SNAT", 0, set(), to_source=args[1])
            assert name in TERMINAL, f"evaluator does not know target {name}: {rule}"
            out = Outcome(name, 0, set(), limited=info["limited"], comment=info["comment"])
            if name == "REJECT":
                assert args[0] == "--reject-with"
                out.reject_with = args[1]
            elif name == "NFQUEUE":
                assert args[:2] == ["--queue-num", args[1]]
                out.queue = int(args[1])
                out.queue_bypass = "--queue-bypass" in args
            else:
                assert args == [], rule
            return out
        return None

    @staticmethod
    def _match(rule, packet, state):
        """(matched, target, target args, info); raises on anything it does not know."""
        seen = set()
        info = {"limited": False, "comment": None}
        labels_to_set = []
        matched = True
        i = 0
        negate = False

        def once(option):
            assert option not in seen, f"multiple {option} flags not allowed: {rule}"
            seen.add(option)

        while i < len(rule):
            token = rule[i]
            if token in ("-j", "-g"):
                target = (token, rule[i + 1])
                if matched:
                    for n in labels_to_set:
                        state["labels"].add(n)
                return matched, target, rule[i + 2 :], info
            if token == "!":
                negate = True
                i += 1
                continue
            if token in ("-s", "-d"):
                once(token)
                address = packet.src if token == "-s" else packet.dst
                net = ipaddress.ip_network(rule[i + 1])
                ip = ipaddress.ip_address(address)
                matched &= ip.version == net.version and ip in net
                i += 2
            elif token == "-o":
                once(token)
                matched &= packet.out_iface == rule[i + 1]
                i += 2
            elif token == "-p":
                once(token)
                matched &= packet.proto == rule[i + 1]
                i += 2
            elif token == "--dport":
                once(token)
                assert "-p" in seen and rule[rule.index("-p") + 1] in ("tcp", "udp", "sctp")
                low, _, high = rule[i + 1].partition(":")
                matched &= int(low) <= packet.dport <= int(high or low)
                i += 2
            elif token == "-m":
                module = rule[i + 1]
                i += 2
                if module == "conntrack":
                    if rule[i] == "!":
                        negate = True
                        i += 1
                    assert rule[i] == "--ctstate", rule
                    matched &= (packet.state in rule[i + 1].split(",")) != negate
                    negate = False
                    i += 2
                elif module == "mark":
                    if rule[i] == "!":
                        negate = True
                        i += 1
                    assert rule[i] == "--mark", rule
                    value, _, mask = rule[i + 1].partition("/")
                    mask = int(mask, 0) if mask else 0xFFFFFFFF
                    hit = state["mark"] & mask == int(value, 0)
                    matched &= hit != negate
                    negate = False
                    i += 2
                elif module == "limit":
                    assert rule[i] == "--limit" and rule[i + 2] == "--limit-burst", rule
                    info["limited"] = True
                    matched &= not state["over_limit"]
                    i += 4
                elif module == "comment":
                    assert rule[i] == "--comment", rule
                    info["comment"] = rule[i + 1]
                    i += 2
                elif module == "connlabel":
                    assert rule[i] == "--label" and rule[i + 2] == "--set", rule
                    labels_to_set.append(int(rule[i + 1]))
                    i += 3
                else:
                    raise AssertionError(f"evaluator does not know -m {module}: {rule}")
            else:
                raise AssertionError(f"evaluator does not know {token}: {rule}")
            assert not negate, f"negation only supported for -m mark and -m conntrack: {rule}"
        if matched:
            for n in labels_to_set:  # a rule of matches only: connlabel --set still applies
                state["labels"].add(n)
        return matched, None, [], info


# -- helpers ------------------------------------------------------------------------------


class Lab:
    """A cluster and its generated documents, evaluated per Node."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.documents = {
            (n.name, v): Document(NodeRules(cluster, n, v).document())
            for n in cluster.nodes
            for v in (4, 6)
        }

    def ip(self, who, version):
        if "/" in who:
            return self.cluster.pod(who).addresses[version]
        return who

    def packet(self, src, dst, proto, dport, version):
        return Packet(self.ip(src, version), self.ip(dst, version), proto, dport)

    def decide(
        self, node, src, dst, proto="tcp", dport=8080, version=4, over_limit=False, state="NEW"
    ):
        """(mangle outcome, filter outcome) of a new connection's first packet on `node` (or
        of a packet in another conntrack state)."""
        doc = self.documents[(node, version)]
        packet = self.packet(src, dst, proto, dport, version)
        packet.state = state
        mangle = doc.evaluate("mangle", "FORWARD", packet, over_limit)
        filtered = doc.evaluate("filter", "FORWARD", packet)
        return mangle, filtered

    def rule(self, policy, direction, index):
        for r in self.cluster.antrea_rules + self.cluster.k8s_rules:
            if (r.policy_name, r.direction) == (policy, direction):
                if index == 0:
                    return r.rule_id
                index -= 1
        raise AssertionError(f"no rule {policy} {direction} {index}")


def assert_allowed(mangle, filtered, ingress=0, egress=0):
    assert filtered.verdict == "ACCEPT", filtered
    assert (filtered.ingress_id, filtered.egress_id) == (ingress, egress)
    assert filtered.label_bytes()[:8] == bytes(8)
    assert mangle.verdict == "ACCEPT" and mangle.queue is None, mangle
    assert mangle.mark & EXCEPT_FLAG == 0  # the exception flag never leaks


def assert_queued(mangle, denying_id):
    assert mangle.verdict == "NFQUEUE", mangle
    assert (mangle.queue, mangle.queue_bypass, mangle.limited) == (1, True, True)
    assert mangle.mark == denying_id


def assert_dropped(mangle, filtered, denying_id):
    assert filtered.verdict == "DROP", filtered
    assert filtered.labels == set()
    assert_queued(mangle, denying_id)


def assert_rejected(mangle, filtered, denying_id, reject_with):
    assert filtered.verdict == "REJECT", filtered
    assert filtered.reject_with == reject_with
    assert_queued(mangle, denying_id)


def node(name, *cidrs):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"podCIDRs": list(cidrs)}}  # fmt: skip


def pod(ns, name, node_name, labels, ports=None):
    containers = [{"name": "c", "ports": [{"name": k, "containerPort": v} for k, v in
                                          (ports or {}).items()]}]  # fmt: skip
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node_name, "containers": containers}}  # fmt: skip


def acnp(name, spec):
    return {"apiVersion": "crd.antrea.io/v1beta1", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}  # fmt: skip


def k8s_np(ns, name, spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}  # fmt: skip


def app(value):
    return {"podSelector": {"matchLabels": {"app": value}}}


FRONTEND = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "frontend"}}}
VERSIONS = pytest.mark.parametrize("version", [4, 6])
REJECT_ICMP = {4: "icmp-port-unreachable", 6: "icmp6-port-unreachable"}
ICMP = {4: "icmp", 6: "icmpv6"}


@pytest.fixture(scope="module")
def lab():
    return Lab(load_cluster())


def custom(*extra):
    return Lab(build_cluster(default_objects() + list(extra)))


# -- the default cluster ------------------------------------------------------------------


@VERSIONS
@pytest.mark.parametrize("client", ["frontend/client-1", "frontend/client-2"])
@pytest.mark.parametrize("web", ["backend/web-1", "backend/web-2"])
@pytest.mark.parametrize("port", [8080, 5201])
def test_frontend_to_web_is_allowed_with_the_k8s_rule_id(lab, version, client, web, port):
    k8s_id = lab.rule("web-allow-frontend", "ingress", 0)
    web_node = lab.cluster.pod(web).node.name
    client_node = lab.cluster.pod(client).node.name
    assert_allowed(*lab.decide(web_node, client, web, "tcp", port, version), ingress=k8s_id)
    if client_node != web_node:  # the source Node has no egress policy for clients
        assert_allowed(*lab.decide(client_node, client, web, "tcp", port, version))


@VERSIONS
@pytest.mark.parametrize(
    "source, proto, port",
    [
        ("frontend/client-1", "tcp", 80),
        ("frontend/client-2", "tcp", 8081),
        ("frontend/client-2", "udp", 8080),
        ("backend/db", "tcp", 8080),
        ("backend/web-1", "tcp", 5201),
        ("external", "tcp", 8080),
    ],
)
def test_others_to_web_are_dropped_by_isolation(lab, version, source, proto, port):
    if source == "external":
        source = lab.cluster.external_address(version)
    mangle, filtered = lab.decide("node-2", source, "backend/web-2", proto, port, version)
    assert_dropped(mangle, filtered, ISOLATION_INGRESS_ID)


@VERSIONS
def test_denied_over_the_rate_is_accepted_in_mangle_with_the_not_queued_comment(lab, version):
    mangle, filtered = lab.decide(
        "node-2", "backend/db", "backend/web-2", "tcp", 80, version, over_limit=True
    )
    assert mangle.verdict == "ACCEPT"
    assert mangle.comment == NOT_QUEUED_COMMENT
    assert mangle.mark == ISOLATION_INGRESS_ID
    assert filtered.verdict == "DROP"  # enforcement does not depend on the queue


@VERSIONS
def test_invalid_packets_are_queued_as_the_filter_denies_them(lab, version):
    # conntrack INVALID (e.g. a TCP RST of no connection) is not ESTABLISHED: the filter's
    # policy chains deny it, so the agent must be handed it like a new connection's packet.
    mangle, filtered = lab.decide(
        "node-2", "backend/db", "backend/web-2", "tcp", 80, version, state="INVALID"
    )
    assert_dropped(mangle, filtered, ISOLATION_INGRESS_ID)
    reject_id = lab.rule("acnp-db-guard", "ingress", 0)
    mangle, filtered = lab.decide(
        "node-2", "frontend/client-2", "backend/db", "tcp", 80, version, state="INVALID"
    )
    assert_rejected(mangle, filtered, reject_id, "tcp-reset")
    for state in ("ESTABLISHED", "RELATED"):
        mangle, filtered = lab.decide(
            "node-2", "backend/db", "backend/web-2", "tcp", 80, version, state=state
        )
        assert (mangle.verdict, mangle.queue, filtered.verdict) == ("ACCEPT", None, "ACCEPT")


@VERSIONS
@pytest.mark.parametrize("client", ["frontend/client-1", "frontend/client-2"])
def test_clients_to_db_are_rejected(lab, version, client):
    reject_id = lab.rule("acnp-db-guard", "ingress", 0)
    for proto, port, how in [
        ("tcp", 5432, "tcp-reset"),
        ("udp", 53, REJECT_ICMP[version]),
        (ICMP[version], 0, REJECT_ICMP[version]),
        ("sctp", 9, REJECT_ICMP[version]),
    ]:
        mangle, filtered = lab.decide("node-2", client, "backend/db", proto, port, version)
        assert_rejected(mangle, filtered, reject_id, how)
    if client.endswith("-1"):  # ingress is enforced on the destination Node only
        assert_allowed(*lab.decide("node-1", client, "backend/db", "tcp", 5432, version))


@VERSIONS
@pytest.mark.parametrize("web", ["backend/web-1", "backend/web-2"])
def test_web_to_db_is_allowed_with_the_acnp_rule_id(lab, version, web):
    allow_id = lab.rule("acnp-db-guard", "ingress", 1)
    for proto, port in [("tcp", 5432), ("udp", 53)]:
        mangle, filtered = lab.decide("node-2", web, "backend/db", proto, port, version)
        assert_allowed(mangle, filtered, ingress=allow_id)


@VERSIONS
def test_unpoliced_traffic_passes_without_labels(lab, version):
    assert_allowed(*lab.decide("node-2", "backend/db", "frontend/client-2", "tcp", 80, version))
    external = lab.cluster.external_address(version)
    assert_allowed(*lab.decide("node-1", "frontend/client-1", external, "tcp", 443, version))
    assert_allowed(*lab.decide("node-1", external, "frontend/client-1", "udp", 53, version))


def test_established_packets_skip_policy_in_filter(lab):
    doc = lab.documents[("node-2", 4)]
    packet = lab.packet("backend/db", "backend/web-2", "tcp", 80, 4)
    packet.state = "ESTABLISHED"
    assert doc.evaluate("filter", "FORWARD", packet).verdict == "ACCEPT"
    assert doc.evaluate("mangle", "FORWARD", packet).queue is None


def test_labels_read_back_by_the_agent_name_the_rule(lab):
    """The filter's label bits, read as CTA_LABELS by the enricher, give the policy."""
    store = MetadataStore()
    store.replace(lab.cluster.inventory()["items"])
    enrich = Enricher(store, "node-2")
    client, web = lab.cluster.pod("frontend/client-1"), lab.cluster.pod("backend/web-2")
    for version in (4, 6):
        _, filtered = lab.decide("node-2", client.key, web.key, "tcp", 8080, version)
        src, dst = pack_ip(client.addresses[version]), pack_ip(web.addresses[version])
        entry = Entry(6, src, dst, 40000, 8080, dst, src, 8080, 40000, 65520, 0, 0x1,
                      filtered.label_bytes(), 1, 60, 1, 60, 0, 0, 3, 1)  # fmt: skip
        meta = enrich(entry)
        assert meta.ingress_rule.policy_name == "web-allow-frontend"
        assert meta.ingress_rule.policy_type == 1
        assert meta.egress_rule is None


def test_policy_chains_exist_for_local_pods_only(lab):
    for (name, version), doc in lab.documents.items():
        local = [p for p in lab.cluster.pods if p.node.name == name]
        jumps = [r for c, r in doc.lines("filter") if c == "FORWARD" and r[0] in ("-s", "-d")]
        addresses = {r[1] for r in jumps}
        plen = 32 if version == 4 else 128
        assert addresses == {f"{p.addresses[version]}/{plen}" for p in local}
        assert len(jumps) == 2 * len(local)


# -- Antrea-native semantics on custom clusters -------------------------------------------


PASS_CLUSTER = (
    acnp("pass-frontend", {"priority": 1, "appliedTo": [app("web")],
                           "ingress": [{"action": "Pass", "from": [FRONTEND]}]}),
    acnp("web-lockdown", {"priority": 2, "appliedTo": [app("web")],
                          "ingress": [{"name": "drop-all", "action": "Drop"}]}),
)  # fmt: skip


@VERSIONS
def test_pass_skips_lower_antrea_rules_to_the_k8s_policies(version):
    lab = custom(*PASS_CLUSTER)
    k8s_id = lab.rule("web-allow-frontend", "ingress", 0)
    drop_id = lab.rule("web-lockdown", "ingress", 0)
    mangle, filtered = lab.decide("node-2", "frontend/client-1", "backend/web-2", "tcp", 8080,
                                  version)  # fmt: skip
    assert_allowed(mangle, filtered, ingress=k8s_id)
    # passed, then denied by the K8s isolation, not by the lower-priority Drop
    mangle, filtered = lab.decide("node-2", "frontend/client-1", "backend/web-2", "tcp", 80,
                                  version)  # fmt: skip
    assert_dropped(mangle, filtered, ISOLATION_INGRESS_ID)
    # not passed: the Antrea Drop decides
    mangle, filtered = lab.decide("node-2", "backend/db", "backend/web-2", "tcp", 8080, version)
    assert_dropped(mangle, filtered, drop_id)


def test_pass_without_k8s_policy_allows():
    lab = custom(
        acnp("pass-db", {"priority": 0.5, "appliedTo": [app("db")],
                         "ingress": [{"action": "Pass", "from": [app("client")]}]}),
    )  # fmt: skip
    assert_allowed(*lab.decide("node-2", "frontend/client-1", "backend/db", "tcp", 5432))


@VERSIONS
def test_antrea_allow_bypasses_k8s_isolation(version):
    lab = custom(
        acnp("db-to-web", {"priority": 1, "appliedTo": [app("web")], "ingress": [
            {"name": "db-http", "action": "Allow", "from": [app("db")],
             "ports": [{"protocol": "TCP", "port": 80}]}]}),
    )  # fmt: skip
    allow_id = lab.rule("db-to-web", "ingress", 0)
    mangle, filtered = lab.decide("node-2", "backend/db", "backend/web-2", "tcp", 80, version)
    assert_allowed(mangle, filtered, ingress=allow_id)
    mangle, filtered = lab.decide("node-2", "backend/db", "backend/web-2", "tcp", 81, version)
    assert_dropped(mangle, filtered, ISOLATION_INGRESS_ID)


def test_priority_decides_across_policies_not_names():
    lab = custom(
        acnp("a-drop", {"priority": 10, "appliedTo": [app("web")],
                        "ingress": [{"action": "Drop", "from": [app("db")]}]}),
        acnp("z-allow", {"priority": 9, "appliedTo": [app("web")],
                         "ingress": [{"action": "Allow", "from": [app("db")]}]}),
    )  # fmt: skip
    allow_id = lab.rule("z-allow", "ingress", 0)
    assert_allowed(
        *lab.decide("node-2", "backend/db", "backend/web-2", "tcp", 80), ingress=allow_id
    )


def test_rule_order_within_a_policy():
    lab = custom(
        acnp("ordered", {"priority": 1, "appliedTo": [app("web")], "ingress": [
            {"action": "Drop", "from": [app("db")], "ports": [{"protocol": "TCP", "port": 80}]},
            {"action": "Allow", "from": [app("db")]}]}),
    )  # fmt: skip
    drop_id, allow_id = lab.rule("ordered", "ingress", 0), lab.rule("ordered", "ingress", 1)
    assert_dropped(*lab.decide("node-2", "backend/db", "backend/web-2", "tcp", 80), drop_id)
    assert_allowed(
        *lab.decide("node-2", "backend/db", "backend/web-2", "tcp", 81), ingress=allow_id
    )


EGRESS_CLUSTER = (
    acnp("egress-guard", {"priority": 1, "appliedTo": [app("client")], "egress": [
        {"name": "no-node-2", "action": "Drop", "to": [
            {"ipBlock": {"cidr": "10.10.2.0/24", "except": ["10.10.2.3/32"]}},
            {"ipBlock": {"cidr": "fd00:10:10:2::/64", "except": ["fd00:10:10:2::3/128"]}}]},
        {"name": "to-web", "action": "Allow", "to": [{"namespaceSelector": {}, **app("web")}]},
    ]}),
)  # fmt: skip


@VERSIONS
def test_egress_drop_with_ip_block_except_on_the_source_node_only(version):
    lab = custom(*EGRESS_CLUSTER)
    drop_id = lab.rule("egress-guard", "egress", 0)
    allow_id = lab.rule("egress-guard", "egress", 1)
    k8s_id = lab.rule("web-allow-frontend", "ingress", 0)
    # into node-2's CIDR: dropped on the source Node
    assert_dropped(*lab.decide("node-1", "frontend/client-1", "frontend/client-2", "udp", 53,
                               version), drop_id)  # fmt: skip
    # ... and not evaluated on the destination Node (client-2 has no ingress policy)
    assert_allowed(*lab.decide("node-2", "frontend/client-1", "frontend/client-2", "udp", 53,
                               version))  # fmt: skip
    # the excepted address (web-2) falls through to the next rule: Allow, egress label
    mangle, filtered = lab.decide("node-1", "frontend/client-1", "backend/web-2", "tcp", 8080,
                                  version)  # fmt: skip
    assert_allowed(mangle, filtered, egress=allow_id)
    mangle, filtered = lab.decide("node-2", "frontend/client-1", "backend/web-2", "tcp", 8080,
                                  version)  # fmt: skip
    assert_allowed(mangle, filtered, ingress=k8s_id)
    # same-node egress and ingress both label the connection
    mangle, filtered = lab.decide("node-2", "frontend/client-2", "backend/web-2", "tcp", 8080,
                                  version)  # fmt: skip
    assert_allowed(mangle, filtered, ingress=k8s_id, egress=allow_id)
    # outside the block: no rule matches
    assert_allowed(*lab.decide("node-1", "frontend/client-1", "frontend/client-1", "tcp", 1,
                               version))  # fmt: skip
    external = lab.cluster.external_address(version)
    assert_allowed(*lab.decide("node-1", "frontend/client-1", external, "tcp", 443, version))
    # not applied to web Pods
    assert_allowed(*lab.decide("node-1", "backend/web-1", "frontend/client-2", "tcp", 1,
                               version))  # fmt: skip
    # client-2 -> db on node-2: the egress drop of the source comes first
    assert_dropped(*lab.decide("node-2", "frontend/client-2", "backend/db", "tcp", 5432,
                               version), drop_id)  # fmt: skip


def test_k8s_egress_isolation_with_port_range_and_named_port():
    objects = default_objects()
    for obj in objects:
        if obj["metadata"].get("name") == "db":
            obj["spec"]["containers"] = [{"name": "c", "ports": [
                {"name": "sql", "containerPort": 5432}]}]  # fmt: skip
    lab = Lab(build_cluster(objects + [
        k8s_np("frontend", "client-egress", {
            "podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {}, **app("web")}],
                        "ports": [{"protocol": "TCP", "port": 8000, "endPort": 8100}]},
                       {"to": [{"namespaceSelector": {}, **app("db")}],
                        "ports": [{"port": "sql"}]}]}),
    ]))  # fmt: skip
    range_id = lab.rule("client-egress", "egress", 0)
    sql_id = lab.rule("client-egress", "egress", 1)
    web_in = lab.rule("web-allow-frontend", "ingress", 0)
    # same Node: the egress and the ingress rule both label the connection
    mangle, filtered = lab.decide("node-1", "frontend/client-1", "backend/web-1", "tcp", 8080)
    assert_allowed(mangle, filtered, ingress=web_in, egress=range_id)
    for port in (7999, 8101):
        mangle, filtered = lab.decide("node-1", "frontend/client-1", "backend/web-1", "tcp", port)
        assert_dropped(mangle, filtered, ISOLATION_EGRESS_ID)
    mangle, filtered = lab.decide("node-1", "frontend/client-1", "backend/db", "tcp", 5432)
    assert_allowed(mangle, filtered, egress=sql_id)
    mangle, filtered = lab.decide("node-1", "frontend/client-1", "backend/db", "udp", 5432)
    assert_dropped(mangle, filtered, ISOLATION_EGRESS_ID)
    # to anything else (the external host) the isolated client is dropped
    external = lab.cluster.external_address(4)
    assert_dropped(*lab.decide("node-1", "frontend/client-1", external, "tcp", 8080),
                   ISOLATION_EGRESS_ID)  # fmt: skip
    # web Pods are not selected: not isolated for egress
    assert_allowed(*lab.decide("node-1", "backend/web-1", external, "tcp", 8080))


def test_named_port_in_an_ingress_rule():
    objects = default_objects()
    for obj in objects:
        if obj["metadata"].get("name") == "db":
            obj["spec"]["containers"] = [{"name": "c", "ports": [
                {"name": "sql", "containerPort": 5432}]}]  # fmt: skip
    lab = Lab(build_cluster(objects + [
        k8s_np("backend", "db-sql", {"podSelector": {"matchLabels": {"app": "db"}},
                                     "ingress": [{"ports": [{"port": "sql"}]}]}),
    ]))  # fmt: skip
    k8s_id = lab.rule("db-sql", "ingress", 0)
    # web is allowed by the ACNP first (Allow bypasses the K8s policy)
    allow_id = lab.rule("acnp-db-guard", "ingress", 1)
    assert_allowed(*lab.decide("node-2", "backend/web-2", "backend/db", "tcp", 9), ingress=allow_id)
    external = lab.cluster.external_address(4)
    assert_allowed(*lab.decide("node-2", external, "backend/db", "tcp", 5432), ingress=k8s_id)
    assert_dropped(*lab.decide("node-2", external, "backend/db", "tcp", 5433), ISOLATION_INGRESS_ID)


REJECT_PORTS = acnp("reject-ports", {"priority": 0.5, "appliedTo": [app("db")], "ingress": [
    {"action": "Reject", "from": [app("web")], "ports": [
        {"protocol": "TCP", "port": 5432}, {"protocol": "UDP", "port": 53}]}]})  # fmt: skip


def test_reject_rule_with_ports():
    # A Reject rule with port matches must not repeat -p (iptables: "multiple -p flags not
    # allowed"): TCP ports answer with a reset, other protocols with ICMP.
    lab = custom(REJECT_PORTS)
    reject_id = lab.rule("reject-ports", "ingress", 0)
    for version in (4, 6):
        mangle, filtered = lab.decide("node-2", "backend/web-2", "backend/db", "tcp", 5432, version)
        assert_rejected(mangle, filtered, reject_id, "tcp-reset")
        mangle, filtered = lab.decide("node-2", "backend/web-2", "backend/db", "udp", 53, version)
        assert_rejected(mangle, filtered, reject_id, REJECT_ICMP[version])


def test_rule_level_applied_to_is_enforced_per_rule():
    lab = custom(
        acnp("per-rule", {"priority": 0.5, "ingress": [
            {"name": "db-from-web", "action": "Drop", "from": [app("web")],
             "appliedTo": [app("db")]},
            {"name": "web-from-db", "action": "Drop", "from": [app("db")],
             "appliedTo": [app("web")]}]}),
    )  # fmt: skip
    db_rule, web_rule = lab.rule("per-rule", "ingress", 0), lab.rule("per-rule", "ingress", 1)
    assert_dropped(*lab.decide("node-2", "backend/web-2", "backend/db", "tcp", 5432), db_rule)
    assert_dropped(*lab.decide("node-2", "backend/db", "backend/web-2", "tcp", 8080), web_rule)
    # neither rule applies to client-2 (the db rule is not applied to web Pods, and so on)
    assert_allowed(*lab.decide("node-2", "backend/db", "frontend/client-2", "tcp", 80))
    k8s_id = lab.rule("web-allow-frontend", "ingress", 0)
    assert_allowed(*lab.decide("node-2", "frontend/client-2", "backend/web-2", "tcp", 8080),
                   ingress=k8s_id)  # fmt: skip


# -- the deny handoff ---------------------------------------------------------------------


def limits(doc):
    """(chain, rule) of every rule of the mangle table with a rate limit."""
    return [(chain, rule) for chain, rule in doc.lines("mangle") if "limit" in rule]


@VERSIONS
def test_every_deny_rule_of_a_node_shares_one_limit(version):
    # node-2 of the default cluster has three deny rules (ingress isolation of web-2, reject
    # of clients to db, and the egress guard's drop below): one limit for all of them.
    lab = custom(*EGRESS_CLUSTER)
    doc = lab.documents[("node-2", version)]
    deny_chains = {
        name: rules
        for name, rules in doc.tables["mangle"]["chains"].items()
        if name.startswith("AFL-DENY-")
    }
    assert len(deny_chains) == 3
    ((packet_in, rule),) = limits(doc)
    assert rule[rule.index("-j") + 1] == "NFQUEUE"
    for name, rules in deny_chains.items():
        mark = name.removeprefix("AFL-DENY-")
        assert rules == [["-j", "MARK", "--set-mark", mark], ["-g", packet_in]], name


@VERSIONS
def test_a_burst_fits_in_the_agents_queue(lab, version):
    # A packet that finds the agent's queue full goes on uncounted (fail open): a burst
    # alone must not fill it.
    for name in ("node-1", "node-2"):
        ((_, rule),) = limits(lab.documents[(name, version)])
        assert int(rule[rule.index("--limit-burst") + 1]) <= QUEUE_LENGTH, name


# -- ct labels ----------------------------------------------------------------------------


def labels_of(matches):
    bits = [int(n) for n in re.findall(r"--label (\d+) --set", matches)]
    assert len(bits) == len(set(bits)) == matches.count("-m connlabel")
    raw = bytearray(16)
    for n in bits:
        raw[n // 8] |= 1 << (n % 8)
    return bytes(raw)


@pytest.mark.parametrize(
    "value", [1, 0x80, 0x100, 0x01020304, 0x3FFFFFFF, RULE_ID_MASK, rule_id("x"), 0xFFFFFFFF]
)
def test_label_matches_encode_the_id_big_endian(value):
    ingress = labels_of(_label_matches(value, "ingress"))
    assert int.from_bytes(ingress[12:16], "big") == value
    assert ingress[:12] == bytes(12)
    egress = labels_of(_label_matches(value, "egress"))
    assert int.from_bytes(egress[8:12], "big") == value
    assert egress[:8] == bytes(8) and egress[12:] == bytes(4)


def test_label_matches_of_the_default_rules(lab):
    for rule in lab.cluster.antrea_rules + lab.cluster.k8s_rules:
        raw = labels_of(_label_matches(rule.rule_id, rule.direction))
        start = 12 if rule.direction == "ingress" else 8
        assert int.from_bytes(raw[start : start + 4], "big") == rule.rule_id


# -- Service NAT and SNAT -----------------------------------------------------------------


def dnat_choices(doc, cluster_ip, proto, port, version):
    """[(probability of picking it, destination)] of a Service port's DNAT chain."""
    plen = 32 if version == 4 else 128
    head = ["-d", f"{cluster_ip}/{plen}", "-p", proto, "--dport", str(port)]
    jumps = [r for c, r in doc.lines("nat") if c == "PREROUTING" and r[:6] == head]
    assert len(jumps) == 1, jumps
    assert jumps[0][6] == "-j"
    remaining = Fraction(1)
    out = []
    rules = doc.tables["nat"]["chains"][jumps[0][7]]
    for i, rule in enumerate(rules):
        text = " ".join(rule)
        m = re.fullmatch(
            r"(?:-m statistic --mode random --probability (\S+) )?-p (\S+) -j DNAT "
            r"--to-destination (\S+)",
            text,
        )
        assert m, text
        assert m.group(2) == proto
        if m.group(1) is None:
            assert i == len(rules) - 1, "only the last endpoint is unconditional"
            p = Fraction(1)
        else:
            p = Fraction(m.group(1))
        out.append((remaining * p, m.group(3)))
        remaining *= 1 - p
    assert remaining == 0
    return out


@VERSIONS
def test_default_service_dnat_is_uniform(lab, version):
    cluster_ip = "10.96.0.10" if version == 4 else "fd00:10:96::a"
    for node_name in ("node-1", "node-2"):
        doc = lab.documents[(node_name, version)]
        choices = dnat_choices(doc, cluster_ip, "tcp", 80, version)
        targets = [
            lab.cluster.pod(k).addresses[version] for k in ("backend/web-1", "backend/web-2")
        ]
        if version == 4:
            expected = [f"{t}:8080" for t in targets]
        else:
            expected = [f"[{t}]:8080" for t in targets]
        assert [d for _, d in choices] == expected
        assert all(abs(p - Fraction(1, 2)) < Fraction(1, 10000) for p, _ in choices)


def test_service_with_three_endpoints_and_named_target_port():
    objects = [
        node("n1", "10.20.1.0/24", "fd00:20:1::/64"),
        node("n2", "10.20.2.0/24", "fd00:20:2::/64"),
        pod("s", "a", "n1", {"app": "x"}, {"web": 8443}),
        pod("s", "b", "n2", {"app": "x"}, {"web": 8443}),
        pod("s", "c", "n2", {"app": "x"}, {"web": 8443}),
        pod("other", "d", "n1", {"app": "x"}),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "s"},
         "spec": {"selector": {"app": "x"}, "clusterIPs": ["10.96.5.5", "fd00:96::5"],
                  "ports": [{"name": "https", "port": 443, "targetPort": "web"},
                            {"name": "dns", "protocol": "UDP", "port": 53}]}},
    ]  # fmt: skip
    lab = Lab(build_cluster(objects))
    for version, cluster_ip in ((4, "10.96.5.5"), (6, "fd00:96::5")):
        doc = lab.documents[("n1", version)]
        addresses = [lab.cluster.pod(f"s/{n}").addresses[version] for n in "abc"]
        wrap = (lambda a: a) if version == 4 else (lambda a: f"[{a}]")
        https = dnat_choices(doc, cluster_ip, "tcp", 443, version)
        assert [d for _, d in https] == [f"{wrap(a)}:8443" for a in addresses]
        assert all(abs(p - Fraction(1, 3)) < Fraction(1, 10000) for p, _ in https)
        dns = dnat_choices(doc, cluster_ip, "udp", 53, version)
        assert [d for _, d in dns] == [f"{wrap(a)}:53" for a in addresses]


@VERSIONS
def test_snat_only_for_destinations_outside_every_pod_cidr(lab, version):
    for node_obj in lab.cluster.nodes:
        doc = lab.documents[(node_obj.name, version)]
        own = node_obj.cidr(version)
        for other in lab.cluster.nodes:
            dst = str(other.cidr(version).network_address + 9)
            packet = Packet(str(own.network_address + 2), dst, "tcp", 80, out_iface="eth0")
            assert doc.evaluate("nat", "POSTROUTING", packet).verdict == "ACCEPT"
        external = lab.cluster.external_address(version)
        packet = Packet(str(own.network_address + 2), external, "tcp", 80, out_iface="eth0")
        outcome = doc.evaluate("nat", "POSTROUTING", packet)
        assert outcome.verdict == "SNAT"
        assert outcome.to_source == node_obj.address(version, 100)
        # traffic of the Node itself (not from its Pod CIDR) is not rewritten
        packet = Packet(node_obj.address(version), external, "tcp", 80, out_iface="eth0")
        assert doc.evaluate("nat", "POSTROUTING", packet).verdict == "ACCEPT"


# -- iptables-restore accepts every document ----------------------------------------------


def all_labs():
    return {
        "default": Lab(load_cluster()),
        "pass": custom(*PASS_CLUSTER),
        "egress": custom(*EGRESS_CLUSTER),
        "reject-ports": custom(REJECT_PORTS),
    }


@pytest.mark.root
@pytest.mark.needs("ip", "iptables-restore", "ip6tables-restore")
@pytest.mark.parametrize("name", ["default", "pass", "egress", "reject-ports"])
def test_iptables_restore_accepts_the_documents(name):
    lab = all_labs()[name]
    netns = f"afltest-rules-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        for node_obj in lab.cluster.nodes:
            for version, command in ((4, "iptables-restore"), (6, "ip6tables-restore")):
                text = NodeRules(lab.cluster, node_obj, version).document()
                result = subprocess.run(
                    ["ip", "netns", "exec", netns, command, "--test"],
                    input=text,
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert result.returncode == 0, (
                    f"{name} {node_obj.name} IPv{version}: {result.stderr.strip()}"
                )
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)


def test_documents_are_deterministic():
    first, second = Lab(load_cluster()), Lab(load_cluster())
    for n in first.cluster.nodes:
        for v in (4, 6):
            assert (
                NodeRules(first.cluster, n, v).document()
                == NodeRules(second.cluster, second.cluster.node(n.name), v).document()
            )


def test_udp_of_port_5201_bypasses_conntrack_before_anything_tracks_it():
    lab = Lab(load_cluster())
    for n in lab.cluster.nodes:
        for v in (4, 6):
            raw = NodeRules(lab.cluster, n, v).raw()
            rules = [line for line in raw if line.startswith("-A PREROUTING")]
            assert rules[:4] == [
                "-A PREROUTING -p udp --dport 5201 -j CT --notrack",
                "-A PREROUTING -p udp --dport 5201 -j ACCEPT",
                "-A PREROUTING -p udp --sport 5201 -j CT --notrack",
                "-A PREROUTING -p udp --sport 5201 -j ACCEPT",
            ]
            assert all("--zone" in line for line in rules[4:])
