"""Correlation of the two Nodes' halves of a connection in the aggregation store.

Records are built as the collecting process decodes them: every IE of the agent's template,
absent ones at their zero values ("", 0, 0.0.0.0, ::). Time is the `now` passed in.
"""

from __future__ import annotations

from typing import Any

import pytest

from antrea_flow.aggregator.aggregation import AggregationStore
from antrea_flow.ipfix.antrea import exporter_templates

TEMPLATE_V4, TEMPLATE_V6 = exporter_templates()

CLIENT_IP, SERVER_IP = "10.10.1.5", "10.10.2.7"
CLIENT_IP6, SERVER_IP6 = "fd00:10:10:1::5", "fd00:10:10:2::7"
NODE1 = ("192.168.77.101", 1)  # (exporter address, observation domain id) of node-1
NODE2 = ("192.168.77.102", 2)
NODE2_V6 = ("fd00:77::102", 7)

COUNTERS = ("packet", "octet", "reversePacket", "reverseOctet")
FLOW_INTRA, FLOW_INTER, FLOW_EXTERNAL = 1, 2, 3
ALLOW, DROP, REJECT = 1, 2, 3
K8S_POLICY, ANP = 1, 2


def decoded(ipv6: bool = False, **fields: Any) -> dict[str, Any]:
    """A record as decoded from the agent's template: all IEs, zero unless given."""
    template = TEMPLATE_V6 if ipv6 else TEMPLATE_V4
    record = dict(zip(template.keys, template.values_from({}), strict=True))
    unknown = set(fields) - set(record)
    assert not unknown, f"not in the agent's template: {unknown}"
    record.update(fields)
    return record


def counters(total: tuple[int, int, int, int], delta: tuple[int, int, int, int] | None = None):
    delta = total if delta is None else delta
    out = {}
    for name, t, d in zip(COUNTERS, total, delta, strict=True):
        out[f"{name}TotalCount"] = t
        out[f"{name}DeltaCount"] = d
    return out


def five_tuple(ipv6: bool = False) -> dict[str, Any]:
    if ipv6:
        addresses = {"sourceIPv6Address": CLIENT_IP6, "destinationIPv6Address": SERVER_IP6}
    else:
        addresses = {"sourceIPv4Address": CLIENT_IP, "destinationIPv4Address": SERVER_IP}
    return {
        **addresses,
        "protocolIdentifier": 6,
        "sourceTransportPort": 40000,
        "destinationTransportPort": 8080,
    }


def source_half(end: int, total=(10, 1000, 8, 800), delta=None, ipv6=False, **over) -> dict:
    """node-1's record: the client Pod, the Service it dialled, the egress policy."""
    fields = {
        **five_tuple(ipv6),
        "flowStartSeconds": 1000,
        "flowEndSeconds": end,
        "flowEndReason": 2,
        **counters(total, delta),
        "sourcePodName": "client",
        "sourcePodNamespace": "frontend",
        "sourceNodeName": "node-1",
        "destinationServicePort": 80,
        "destinationServicePortName": "backend/web:http",
        "egressNetworkPolicyName": "allow-out",
        "egressNetworkPolicyNamespace": "frontend",
        "egressNetworkPolicyType": ANP,
        "egressNetworkPolicyRuleName": "to-web",
        "egressNetworkPolicyRuleAction": ALLOW,
        "tcpState": "ESTABLISHED",
        "flowType": FLOW_INTER,
    }
    fields["destinationClusterIPv6" if ipv6 else "destinationClusterIPv4"] = (
        "fd00:96::10" if ipv6 else "10.96.0.10"
    )
    fields.update(over)
    return decoded(ipv6, **fields)


def destination_half(end: int, total=(9, 900, 8, 800), delta=None, ipv6=False, **over) -> dict:
    """node-2's record: the server Pod and the ingress policy (no Service: no DNAT there)."""
    fields = {
        **five_tuple(ipv6),
        "flowStartSeconds": 1000,
        "flowEndSeconds": end,
        "flowEndReason": 2,
        **counters(total, delta),
        "destinationPodName": "server",
        "destinationPodNamespace": "backend",
        "destinationNodeName": "node-2",
        "ingressNetworkPolicyName": "allow-web",
        "ingressNetworkPolicyNamespace": "backend",
        "ingressNetworkPolicyType": K8S_POLICY,
        "ingressNetworkPolicyRuleName": "",
        "ingressNetworkPolicyRuleAction": ALLOW,
        "tcpState": "ESTABLISHED",
        "flowType": FLOW_INTER,
    }
    fields.update(over)
    return decoded(ipv6, **fields)


def new_store(export_interval=60.0, inactive_timeout=90.0, correlation_timeout=60.0):
    return AggregationStore(export_interval, inactive_timeout, correlation_timeout)


def side_counters(record: dict, side: str) -> dict[str, int]:
    return {
        f"{name}{kind}": record[f"{name}{kind}CountFrom{side}"]
        for name in COUNTERS
        for kind in ("Total", "Delta")
    }


def expected_side(total, delta=None) -> dict[str, int]:
    delta = total if delta is None else delta
    out = {}
    for name, t, d in zip(COUNTERS, total, delta, strict=True):
        out[f"{name}Total"] = t
        out[f"{name}Delta"] = d
    return out


# -- 1. correlation of inter-node halves ------------------------------------------------------


@pytest.mark.parametrize("source_first", [True, False], ids=["source_first", "dest_first"])
def test_halves_are_merged_into_one_record_in_either_order(source_first):
    store = new_store(correlation_timeout=60)
    src = source_half(end=1010, total=(10, 1000, 8, 800))
    dst = destination_half(end=1011, total=(9, 900, 7, 700))
    first, second = ((src, NODE1), (dst, NODE2)) if source_first else ((dst, NODE2), (src, NODE1))

    store.add(first[0], first[1], now=100)
    assert store.expire(100) == []
    assert store.waiting == 1
    assert store.expire(159) == []  # still before the correlation timeout: nothing yet

    store.add(second[0], second[1], now=120)
    assert store.waiting == 0
    out = store.expire(159)
    assert len(out) == 1
    merged = out[0]

    assert merged["incomplete"] is False
    assert store.stats.correlated == 1
    assert store.stats.correlation_timeouts == 0
    # both Pods, namespaces and Nodes
    assert (merged["sourcePodName"], merged["sourcePodNamespace"], merged["sourceNodeName"]) == (
        "client",
        "frontend",
        "node-1",
    )
    assert (
        merged["destinationPodName"],
        merged["destinationPodNamespace"],
        merged["destinationNodeName"],
    ) == ("server", "backend", "node-2")
    # the Service, known only to the source Node
    assert merged["destinationClusterIPv4"] == "10.96.0.10"
    assert merged["destinationServicePort"] == 80
    assert merged["destinationServicePortName"] == "backend/web:http"
    # egress policy from the source half, ingress policy from the destination half
    assert merged["egressNetworkPolicyName"] == "allow-out"
    assert merged["egressNetworkPolicyNamespace"] == "frontend"
    assert merged["egressNetworkPolicyType"] == ANP
    assert merged["egressNetworkPolicyRuleName"] == "to-web"
    assert merged["egressNetworkPolicyRuleAction"] == ALLOW
    assert merged["ingressNetworkPolicyName"] == "allow-web"
    assert merged["ingressNetworkPolicyNamespace"] == "backend"
    assert merged["ingressNetworkPolicyType"] == K8S_POLICY
    assert merged["ingressNetworkPolicyRuleAction"] == ALLOW
    # the 16 per-Node counters and each Node's end time
    assert side_counters(merged, "SourceNode") == expected_side((10, 1000, 8, 800))
    assert side_counters(merged, "DestinationNode") == expected_side((9, 900, 7, 700))
    assert merged["flowEndSecondsFromSourceNode"] == 1010
    assert merged["flowEndSecondsFromDestinationNode"] == 1011
    # provenance: the latest record's exporter
    address, domain = second[1]
    assert merged["originalExporterIPv4Address"] == address
    assert merged["originalObservationDomainId"] == domain
    assert "originalExporterIPv6Address" not in merged
    # the five-tuple is the connection's
    assert merged["sourceIPv4Address"] == CLIENT_IP
    assert merged["destinationIPv4Address"] == SERVER_IP
    assert merged["flowType"] == FLOW_INTER

    assert store.expire(159) == []  # exported once
    assert len(store) == 1


def test_original_exporter_ipv6_address_when_the_exporter_is_ipv6():
    store = new_store()
    store.add(source_half(end=1010), NODE1, now=0)
    store.add(destination_half(end=1011), NODE2_V6, now=1)
    (merged,) = store.expire(1)
    assert merged["originalExporterIPv6Address"] == "fd00:77::102"
    assert merged["originalObservationDomainId"] == 7
    assert merged.get("originalExporterIPv4Address") in (None, "0.0.0.0")


def test_the_merged_record_does_not_leak_into_later_exports_of_the_input_dicts():
    """The store keeps its own copy: changing a record after add() changes nothing."""
    store = new_store()
    src = source_half(end=1010)
    store.add(src, NODE1, now=0)
    src["sourcePodName"] = "mutated"
    store.add(destination_half(end=1011), NODE2, now=1)
    (merged,) = store.expire(1)
    assert merged["sourcePodName"] == "client"


# -- 2. records that need no peer -------------------------------------------------------------


def _intra() -> dict:
    return decoded(
        **five_tuple(),
        flowStartSeconds=1000,
        flowEndSeconds=1010,
        flowEndReason=2,
        **counters((4, 400, 3, 300)),
        sourcePodName="client",
        sourcePodNamespace="frontend",
        sourceNodeName="node-1",
        destinationPodName="server",
        destinationPodNamespace="backend",
        destinationNodeName="node-1",
        flowType=FLOW_INTRA,
    )


def _to_external() -> dict:
    return source_half(
        end=1010,
        destinationIPv4Address="93.184.216.34",
        destinationClusterIPv4="0.0.0.0",
        destinationServicePort=0,
        destinationServicePortName="",
        flowType=FLOW_EXTERNAL,
    )


NO_PEER_CASES = {
    "intra_node": (_intra, NODE1),
    "to_external": (_to_external, NODE1),
    "egress_drop": (lambda: source_half(end=1010, egressNetworkPolicyRuleAction=DROP), NODE1),
    "egress_reject": (lambda: source_half(end=1010, egressNetworkPolicyRuleAction=REJECT), NODE1),
    "ingress_reject": (
        lambda: destination_half(end=1010, ingressNetworkPolicyRuleAction=REJECT),
        NODE2,
    ),
}


@pytest.mark.parametrize("case", list(NO_PEER_CASES))
def test_records_that_need_no_peer_are_exported_at_once(case):
    make, exporter = NO_PEER_CASES[case]
    record = make()
    store = new_store(correlation_timeout=60)
    store.add(record, exporter, now=500)
    assert store.waiting == 0
    out = store.expire(500)
    assert len(out) == 1
    assert out[0]["incomplete"] is False
    assert out[0]["flowType"] == record["flowType"]
    assert out[0]["egressNetworkPolicyRuleAction"] == record["egressNetworkPolicyRuleAction"]
    assert out[0]["ingressNetworkPolicyRuleAction"] == record["ingressNetworkPolicyRuleAction"]
    assert store.stats.correlation_timeouts == 0


def test_intra_node_record_speaks_for_both_nodes():
    store = new_store()
    store.add(_intra(), NODE1, now=0)
    (out,) = store.expire(0)
    assert side_counters(out, "SourceNode") == expected_side((4, 400, 3, 300))
    assert side_counters(out, "DestinationNode") == expected_side((4, 400, 3, 300))
    assert out["flowEndSecondsFromSourceNode"] == out["flowEndSecondsFromDestinationNode"] == 1010
    assert out["sourcePodName"] == "client" and out["destinationPodName"] == "server"


def test_ingress_drop_still_waits_for_the_source_half():
    """As upstream, only an ingress Reject is exempt; an ingress Drop's source half exists."""
    store = new_store(correlation_timeout=60)
    store.add(destination_half(end=1010, ingressNetworkPolicyRuleAction=DROP), NODE2, now=0)
    assert store.waiting == 1
    assert store.expire(30) == []


def test_inter_node_allowed_half_waits():
    store = new_store(correlation_timeout=60)
    store.add(source_half(end=1010), NODE1, now=0)
    assert store.waiting == 1
    assert store.next_event() == 60
    assert store.expire(59.999) == []


# -- 4. late halves ---------------------------------------------------------------------------


@pytest.mark.parametrize("late", ["destination", "source"])
def test_late_half_completes_a_record_exported_incomplete(late):
    store = new_store(export_interval=60, inactive_timeout=90, correlation_timeout=30)
    if late == "destination":
        early, early_exporter = source_half(end=1010), NODE1
        late_record, late_exporter = destination_half(end=1035), NODE2
    else:
        early, early_exporter = destination_half(end=1010), NODE2
        late_record, late_exporter = source_half(end=1035), NODE1
    store.add(early, early_exporter, now=0)
    (first,) = store.expire(30)
    assert first["incomplete"] is True
    assert store.stats.correlation_timeouts == 1

    store.add(late_record, late_exporter, now=40)
    out = store.expire(40) + store.expire(90)  # by its next export at the latest
    assert len(out) == 1
    (second,) = out
    assert second["incomplete"] is False
    for name in ("sourcePodName", "destinationPodName", "sourceNodeName", "destinationNodeName"):
        assert second[name], name
    assert second["destinationServicePortName"] == "backend/web:http"
    assert second["egressNetworkPolicyName"] == "allow-out"
    assert second["ingressNetworkPolicyName"] == "allow-web"
    late_side = "DestinationNode" if late == "destination" else "SourceNode"
    early_side = "SourceNode" if late == "destination" else "DestinationNode"
    assert second[f"flowEndSecondsFrom{late_side}"] == 1035
    # the late side's counters are new; the early side reported nothing since its export
    assert second[f"octetDeltaCountFrom{late_side}"] == late_record["octetDeltaCount"]
    assert second[f"octetDeltaCountFrom{early_side}"] == 0
    assert second[f"octetTotalCountFrom{early_side}"] == early["octetTotalCount"]
    assert second["originalExporterIPv4Address"] == late_exporter[0]
    assert store.stats.correlation_timeouts == 1
    assert store.expire(1000) == []


# -- 5. correlation timeout -------------------------------------------------------------------


def test_half_without_peer_is_exported_once_incomplete_after_correlation_timeout():
    store = new_store(export_interval=60, inactive_timeout=90, correlation_timeout=60)
    store.add(source_half(end=1010), NODE1, now=100)
    assert store.expire(159.5) == []
    out = store.expire(160)
    assert len(out) == 1
    record = out[0]
    assert record["incomplete"] is True
    assert record["sourcePodName"] == "client"
    assert record["destinationPodName"] == ""
    assert side_counters(record, "SourceNode") == expected_side((10, 1000, 8, 800))
    assert side_counters(record, "DestinationNode") == expected_side((0, 0, 0, 0))
    assert store.stats.correlation_timeouts == 1
    assert store.waiting == 0
    # never again, and gone once inactive
    later = []
    for now in (161, 220, 300, 400):
        later += store.expire(now)
    assert later == []
    assert len(store) == 0
    assert store.stats.removed == 1
    assert store.stats.correlation_timeouts == 1


def test_correlation_timeout_counts_only_unmatched_flows():
    store = new_store(correlation_timeout=60)
    store.add(source_half(end=1010), NODE1, now=0)
    store.add(destination_half(end=1010), NODE2, now=10)
    assert len(store.expire(10)) == 1
    store.expire(60)
    store.expire(200)
    assert store.stats.correlation_timeouts == 0


def test_more_records_of_the_same_side_do_not_end_the_wait():
    store = new_store(correlation_timeout=60)
    store.add(source_half(end=1010, total=(1, 100, 1, 100)), NODE1, now=0)
    store.add(source_half(end=1040, total=(5, 500, 5, 500), delta=(4, 400, 4, 400)), NODE1, 30)
    assert store.waiting == 1
    assert store.expire(59) == []
    (record,) = store.expire(60)
    assert record["incomplete"] is True
    assert record["octetDeltaCountFromSourceNode"] == 500  # both records' deltas


# -- 7. deny records and IPv6 -----------------------------------------------------------------


def test_ingress_isolation_drop_keeps_both_actions_through_merges():
    store = new_store(export_interval=60)
    store.add(source_half(end=1010), NODE1, now=0)
    isolation = dict(
        ingressNetworkPolicyName="",
        ingressNetworkPolicyNamespace="",
        ingressNetworkPolicyType=K8S_POLICY,
        ingressNetworkPolicyRuleName="",
        ingressNetworkPolicyRuleAction=DROP,
    )
    store.add(destination_half(end=1011, total=(0, 0, 0, 0), **isolation), NODE2, now=1)
    (first,) = store.expire(1)
    # more of the source half (it keeps retrying); it knows nothing about ingress
    store.add(source_half(end=1070, total=(14, 1400, 8, 800), delta=(4, 400, 0, 0)), NODE1, now=61)
    (second,) = store.expire(61)
    for record in (first, second):
        assert record["ingressNetworkPolicyRuleAction"] == DROP
        assert record["ingressNetworkPolicyType"] == K8S_POLICY
        assert record["ingressNetworkPolicyName"] == ""
        assert record["egressNetworkPolicyRuleAction"] == ALLOW
        assert record["egressNetworkPolicyName"] == "allow-out"
        assert record["incomplete"] is False


def test_egress_isolation_drop_keeps_its_action_through_later_records():
    store = new_store(export_interval=60)
    deny = dict(
        egressNetworkPolicyName="",
        egressNetworkPolicyNamespace="",
        egressNetworkPolicyType=K8S_POLICY,
        egressNetworkPolicyRuleName="",
        egressNetworkPolicyRuleAction=DROP,
        reversePacketTotalCount=0,
    )
    store.add(source_half(end=1010, total=(3, 180, 0, 0), **deny), NODE1, now=0)
    (first,) = store.expire(0)
    store.add(source_half(end=1070, total=(5, 300, 0, 0), delta=(2, 120, 0, 0), **deny), NODE1, 60)
    (second,) = store.expire(60)
    for record in (first, second):
        assert record["egressNetworkPolicyRuleAction"] == DROP
        assert record["egressNetworkPolicyType"] == K8S_POLICY
        assert record["egressNetworkPolicyName"] == ""
        assert record["incomplete"] is False
    assert second["packetDeltaCountFromSourceNode"] == 2
    assert second["packetTotalCountFromSourceNode"] == 5


def test_ingress_reject_exported_at_once_then_merged_with_the_source_half():
    store = new_store(export_interval=60)
    reject = dict(
        ingressNetworkPolicyName="deny-web",
        ingressNetworkPolicyNamespace="backend",
        ingressNetworkPolicyType=ANP,
        ingressNetworkPolicyRuleName="reject-all",
        ingressNetworkPolicyRuleAction=REJECT,
    )
    store.add(destination_half(end=1010, total=(1, 60, 1, 40), **reject), NODE2, now=0)
    (first,) = store.expire(0)
    assert first["ingressNetworkPolicyRuleAction"] == REJECT
    store.add(source_half(end=1011, total=(1, 60, 1, 40)), NODE1, now=5)
    (second,) = store.expire(60)
    assert second["ingressNetworkPolicyRuleAction"] == REJECT
    assert second["ingressNetworkPolicyName"] == "deny-web"
    assert second["egressNetworkPolicyRuleAction"] == ALLOW
    assert second["sourcePodName"] == "client"
    assert second["destinationPodName"] == "server"


def test_a_later_empty_action_does_not_clear_a_known_one():
    store = new_store(export_interval=60)
    store.add(source_half(end=1010), NODE1, now=0)
    store.add(
        destination_half(end=1011, ingressNetworkPolicyRuleAction=DROP, ingressNetworkPolicyType=1),
        NODE2,
        now=1,
    )
    store.expire(1)
    # the destination half reports again without policy information (e.g. policy unknown yet)
    store.add(
        destination_half(
            end=1071,
            total=(12, 1200, 8, 800),
            delta=(3, 300, 0, 0),
            ingressNetworkPolicyName="",
            ingressNetworkPolicyNamespace="",
            ingressNetworkPolicyType=0,
            ingressNetworkPolicyRuleAction=0,
        ),
        NODE2,
        now=61,
    )
    (record,) = store.expire(61)
    assert record["ingressNetworkPolicyRuleAction"] == DROP
    assert record["ingressNetworkPolicyType"] == 1
    assert record["ingressNetworkPolicyName"] == "allow-web"


@pytest.mark.parametrize("source_first", [True, False], ids=["source_first", "dest_first"])
def test_ipv6_halves_are_keyed_and_merged_like_ipv4(source_first):
    store = new_store(correlation_timeout=60)
    src = source_half(end=1010, ipv6=True)
    dst = destination_half(end=1011, ipv6=True)
    first, second = ((src, NODE1), (dst, NODE2)) if source_first else ((dst, NODE2), (src, NODE1))
    # an IPv4 flow with the same ports is another flow
    store.add(source_half(end=1010), NODE1, now=0)
    store.add(first[0], first[1], now=0)
    assert len(store) == 2
    assert store.waiting == 2
    store.add(second[0], second[1], now=5)
    assert len(store) == 2
    assert store.waiting == 1
    (merged,) = store.expire(5)
    assert merged["sourceIPv6Address"] == CLIENT_IP6
    assert merged["destinationIPv6Address"] == SERVER_IP6
    assert "sourceIPv4Address" not in merged
    assert merged["destinationClusterIPv6"] == "fd00:96::10"
    assert merged["sourcePodName"] == "client"
    assert merged["destinationPodName"] == "server"
    assert merged["egressNetworkPolicyName"] == "allow-out"
    assert merged["ingressNetworkPolicyName"] == "allow-web"
    assert side_counters(merged, "SourceNode") == expected_side((10, 1000, 8, 800))
    assert side_counters(merged, "DestinationNode") == expected_side((9, 900, 8, 800))
    assert merged["incomplete"] is False


def test_records_without_addresses_are_ignored_and_counted():
    store = new_store()
    record = decoded(sourcePodName="client", flowType=FLOW_INTRA, destinationPodName="server")
    del record["sourceIPv4Address"]
    store.add(record, NODE1, now=0)
    assert len(store) == 0
    assert store.stats.ignored["no_addresses"] == 1
    assert store.stats.received == 1


# -- the bound on flows held -------------------------------------------------------------


def intra_node(port: int, end: int, total=(2, 200, 2, 200), delta=None) -> dict:
    """An intra-node record (ready at once) of the connection from source port `port`."""
    return source_half(end, total, delta, sourceTransportPort=port, flowType=1,
                       destinationPodName="server", destinationPodNamespace="backend")  # fmt: skip


def ports(records: list[dict]) -> list[int]:
    return sorted(r["sourceTransportPort"] for r in records)


def test_a_flow_beyond_max_flows_lets_the_oldest_go_and_exports_what_it_held():
    store = AggregationStore(60.0, 90.0, 60.0, max_flows=3)
    for port in (1, 2, 3):
        store.add(intra_node(port, 1010), NODE1, 1010)
    assert ports(store.expire(1010)) == [1, 2, 3]  # every flow exported once: idle now
    store.add(intra_node(2, 1020, (4, 400, 4, 400), (2, 200, 2, 200)), NODE1, 1020)
    store.add(intra_node(4, 1021), NODE1, 1021)  # the oldest, 1, had nothing to send
    assert len(store) == 3 and store.stats.evicted == {"idle": 1}
    store.add(intra_node(5, 1022), NODE1, 1022)  # then 2, which had new records
    assert len(store) == 3 and store.stats.evicted == {"idle": 1, "exported": 1}
    early = store.expire(1022)
    assert ports(early) == [2, 4, 5]  # 2 at once, early; 4 and 5 their first export
    (two,) = [r for r in early if r["sourceTransportPort"] == 2]
    assert (two["octetTotalCount"], two["octetDeltaCount"]) == (400, 200)
    # The connection's next record makes a new flow: deltas go on from what was exported.
    store.add(intra_node(2, 1030, (6, 600, 6, 600), (2, 200, 2, 200)), NODE1, 1030)
    (again,) = [r for r in store.expire(1030) if r["sourceTransportPort"] == 2]
    assert (again["octetTotalCount"], again["octetDeltaCount"]) == (600, 200)


def test_a_waiting_half_let_go_is_exported_incomplete_and_is_no_correlation_timeout():
    store = AggregationStore(60.0, 90.0, 60.0, max_flows=1000)
    store.add(source_half(1010), NODE1, 1010)
    for port in range(1000):
        store.add(intra_node(20000 + port, 1011), NODE1, 1011)
    assert store.waiting == 0 and len(store) == 1000
    out = store.expire(1011)
    (half,) = [r for r in out if r["sourcePodName"] == "client" and r["flowType"] == FLOW_INTER]
    assert half["incomplete"] is True
    assert store.stats.correlation_timeouts == 0
    assert store.stats.evicted == {"exported": 1}


def test_the_creation_order_is_rebuilt_when_gone_flows_outnumber_the_held():
    store = AggregationStore(1.0, 1.0, 60.0, max_flows=1000)
    for round_ in range(5):  # flows come and go by the inactive timeout, none evicted
        now = 1000 + 10 * round_
        for port in range(1000):
            store.add(intra_node(port + 1000 * round_, now), NODE1, now)
        store.expire(now)
        store.expire(now + 5)
    assert len(store) == 0 and not store.stats.evicted
    assert len(store._age) <= 2 * 1000 + 1024
