"""The agent on the lab: one Agent per Node (in the Node's namespace, listening on the lab's
deny queue), both exporting to one collector. Allowed connections carry the allowing ingress
rule on the destination Node's record; denied connections become deny records with the
denying rule, built from the packets the dataplane queued, with exact packet counts."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from antrea_flow.exporter.agent import observation_domain_id

from .conftest import (
    ANSWER_TIMEOUT,
    CLIENT_1,
    CLIENT_2,
    DB,
    DROP_TIMEOUT,
    HTTP,
    TCP,
    UDP,
    WAIT,
    WEB_1,
    WEB_2,
    AgentHarness,
    Lab,
    wait_until,
)

pytestmark = pytest.mark.root

VERSIONS = pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
K8S, ACNP = 1, 3
ALLOW, DROP, REJECT = 1, 2, 3
END_OF_FLOW = 3


@pytest.fixture(scope="module")
def agents(lab: Lab, inventory_file: Path):
    with AgentHarness(lab, inventory_file) as harness:
        yield harness


def address_key(version: int, side: str) -> str:
    return f"{side}IPv{version}Address"


def flow_records(agents: AgentHarness, node: str, source_ip: str, port: int, proto: int, v: int):
    return agents.records(
        _node=node,
        protocolIdentifier=proto,
        sourceTransportPort=port,
        **{address_key(v, "source"): source_ip},
    )


def wait_flow(agents, node, source_ip, port, proto, version, what) -> list[dict]:
    return wait_until(
        lambda: flow_records(agents, node, source_ip, port, proto, version), what, WAIT
    )


def assert_ingress(record: dict, name: str, namespace: str, kind: int, rule: str, action: int):
    got = {
        "name": record["ingressNetworkPolicyName"],
        "namespace": record["ingressNetworkPolicyNamespace"],
        "type": record["ingressNetworkPolicyType"],
        "rule": record["ingressNetworkPolicyRuleName"],
        "action": record["ingressNetworkPolicyRuleAction"],
    }
    want = {"name": name, "namespace": namespace, "type": kind, "rule": rule, "action": action}
    assert got == want


# -- the traffic: made once, before the tests look for its records ---------------------

ALLOWED = {
    "client-1-web-2": (CLIENT_1, WEB_2, ("web-allow-frontend", "backend", K8S, "")),
    "client-2-web-2": (CLIENT_2, WEB_2, ("web-allow-frontend", "backend", K8S, "")),
    "web-1-db": (WEB_1, DB, ("acnp-db-guard", "", ACNP, "allow-web")),
    "web-2-db": (WEB_2, DB, ("acnp-db-guard", "", ACNP, "allow-web")),
}
REJECTED = (CLIENT_1, CLIENT_2)
DATAGRAMS, DATAGRAM_SIZE = 5, 100


@pytest.fixture(scope="module")
def traffic(lab: Lab, agents: AgentHarness) -> dict[tuple, int]:
    """Every connection of this module, made while the agents run: its local port by
    (kind, name, IP version). Their records all come one idle timeout later."""
    ports: dict[tuple, int] = {}
    for version in (4, 6):
        for name, (source, destination, _) in ALLOWED.items():
            status, port = lab.http_get(source, lab.ip(destination, version))
            assert status == 200
            ports[("allowed", name, version)] = port
        outcome, port = lab.tcp(DB, lab.ip(WEB_1, version), HTTP, DROP_TIMEOUT)
        assert outcome == "timeout"
        ports[("dropped", DB, version)] = port
        for source in REJECTED:
            outcome, port = lab.tcp(source, lab.ip(DB, version), HTTP, ANSWER_TIMEOUT)
            assert outcome == "refused"
            ports[("rejected", source, version)] = port
        ports[("datagrams", CLIENT_2, version)] = lab.udp_burst(
            CLIENT_2, lab.ip(DB, version), HTTP, DATAGRAMS, DATAGRAM_SIZE
        )
    return ports


def ended(agents, node, source_ip, port, proto, version, what) -> list[dict]:
    """The records of one connection once its last record ended it (flowEndReason 3)."""

    def done() -> list[dict] | None:
        records = flow_records(agents, node, source_ip, port, proto, version)
        return records if records and records[-1]["flowEndReason"] == END_OF_FLOW else None

    return wait_until(done, what, WAIT)


# -- allowed connections ----------------------------------------------------------------


@VERSIONS
@pytest.mark.parametrize("name", ALLOWED)
def test_allowed_record_carries_the_ingress_rule(
    lab: Lab, agents: AgentHarness, traffic, name: str, version: int
):
    source, destination, policy = ALLOWED[name]
    port = traffic[("allowed", name, version)]
    node = lab.node_of(destination)
    records = wait_flow(
        agents, node, lab.ip(source, version), port, TCP, version, f"a record from {node}"
    )
    for record in records:
        assert record["observationDomainId"] == observation_domain_id(node)
        assert record[address_key(version, "destination")] == lab.ip(destination, version)
        assert record["destinationTransportPort"] == HTTP
        assert record["destinationPodName"] == destination.split("/")[1]
        assert record["destinationNodeName"] == node
        assert_ingress(record, *policy, ALLOW)


# -- denied connections -----------------------------------------------------------------


@VERSIONS
def test_isolation_drop_record(lab: Lab, agents: AgentHarness, traffic, version: int):
    """db -> web-1: dropped by web-1's isolation on web-1's Node: a K8s drop without a
    policy name (as upstream), ended when the denied packets stop."""
    port = traffic[("dropped", DB, version)]
    (record,) = ended(
        agents, "node-1", lab.ip(DB, version), port, TCP, version, "a deny record from node-1"
    )
    assert_ingress(record, "", "", K8S, "", DROP)
    assert record["packetTotalCount"] >= 1  # the SYN, and any retransmission
    assert record["packetDeltaCount"] == record["packetTotalCount"]
    assert record[address_key(version, "destination")] == lab.ip(WEB_1, version)
    assert record["destinationPodName"] == "web-1"
    assert record["destinationPodNamespace"] == "backend"
    assert record["destinationNodeName"] == "node-1"


@VERSIONS
@pytest.mark.parametrize("source", REJECTED)
def test_reject_record(lab: Lab, agents: AgentHarness, traffic, source: str, version: int):
    port = traffic[("rejected", source, version)]
    (record,) = ended(
        agents, "node-2", lab.ip(source, version), port, TCP, version, "a deny record"
    )
    assert_ingress(record, "acnp-db-guard", "", ACNP, "reject-clients", REJECT)
    assert record["packetTotalCount"] == 1  # one SYN, answered by a RST
    assert record["destinationPodName"] == "db"


@VERSIONS
def test_deny_record_counts_every_denied_packet(
    lab: Lab, agents: AgentHarness, traffic, version: int
):
    """5 UDP datagrams client-2 -> db:8080 (rejected): one deny record of 5 packets."""
    port = traffic[("datagrams", CLIENT_2, version)]
    (record,) = ended(
        agents, "node-2", lab.ip(CLIENT_2, version), port, UDP, version, "one deny record"
    )
    header = 20 if version == 4 else 40
    assert record["packetTotalCount"] == record["packetDeltaCount"] == DATAGRAMS
    octets = DATAGRAMS * (header + 8 + DATAGRAM_SIZE)
    assert record["octetTotalCount"] == record["octetDeltaCount"] == octets
    assert_ingress(record, "acnp-db-guard", "", ACNP, "reject-clients", REJECT)
    assert record["sourcePodName"] == "client-2"
    assert record["destinationPodName"] == "db"
    assert record["destinationTransportPort"] == HTTP
    assert record["flowType"] == 1  # intra-node


def test_denied_connection_gauge_follows_the_deny_store(lab: Lab, agents: AgentHarness, traffic):
    """While denied packets keep coming the deny store holds their connection and the gauge
    says so; once they stop, the connection is exported and the gauge goes back to zero."""
    agent = agents.agents["node-2"]
    stop = threading.Event()
    sent: list[int] = []

    def keep_denying() -> None:
        with lab.socket(DB, 4, socket.SOCK_DGRAM) as s:
            s.bind(("0.0.0.0", 0))
            sent.append(s.getsockname()[1])
            while not stop.is_set():
                s.sendto(b"x", (lab.ip(WEB_2, 4), HTTP))  # isolation drop on node-2
                stop.wait(0.2)

    thread = threading.Thread(target=keep_denying, daemon=True)
    thread.start()
    try:
        wait_until(lambda: sent and len(agent.denied) >= 1, "a connection in the deny store")

        def steady_reading() -> tuple[int, float | None] | None:
            # Other deny connections may expire meanwhile: read the store on both sides.
            before = len(agent.denied)
            gauge = agents.denied_gauge("node-2")
            return (before, gauge) if len(agent.denied) == before else None

        held, gauge = wait_until(steady_reading, "a steady deny store")
        assert held >= 1
        assert gauge == held
    finally:
        stop.set()
        thread.join(5)
    wait_until(lambda: len(agent.denied) == 0, "the deny store emptied")
    assert agents.denied_gauge("node-2") == 0
    records = ended(agents, "node-2", lab.ip(DB, 4), sent[0], UDP, 4, "the deny record")
    for record in records:
        assert_ingress(record, "", "", K8S, "", DROP)
    assert sum(r["packetDeltaCount"] for r in records) == records[-1]["packetTotalCount"]
