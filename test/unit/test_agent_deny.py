"""The deny store: denied packets (as NFQUEUE hands them over) become denied connections,
deduplicated by 5-tuple, with the denying rule from the packet mark, idle and active expiry,
a token bucket, and records that carry the denying rule's action."""

import dataclasses
import struct
import threading

import pytest
from agentkit import ip, metadata_store

from antrea_flow.codes import END_ACTIVE, END_OF_FLOW, FLOW_TYPE_INTER_NODE, FLOW_TYPE_INTRA_NODE
from antrea_flow.exporter.deny import BadPacket, DenyStore, packet_key
from antrea_flow.exporter.enrich import Enricher
from antrea_flow.exporter.records import flow_record
from antrea_flow.ipfix.antrea import EXPORTER_TEMPLATE_ID_IPV4, EXPORTER_TEMPLATE_ID_IPV6
from antrea_flow.lab.cluster import ISOLATION_INGRESS_ID, build_cluster, default_objects

# -- packets ------------------------------------------------------------------------------


def tcp(sport, dport, data=b""):
    return struct.pack(">HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0) + data


def udp(sport, dport, data=b""):
    return struct.pack(">HHHH", sport, dport, 8 + len(data), 0) + data


def icmp(kind, code, data=b"\x00\x01\x00\x01"):
    return struct.pack(">BBH", kind, code, 0) + data


def ipv4(src, dst, proto, payload, options=b""):
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        ihl * 4 + len(payload),
        0,
        0x4000,
        64,
        proto,
        0,
        ip(src),
        ip(dst),
    )
    return header + options + payload


def ipv6(src, dst, proto, payload, extensions=()):
    """`extensions`: (header type, body) pairs in order; `proto` follows the last one."""
    chain = b""
    types = [t for t, _ in extensions] + [proto]
    for (_, body), following in zip(extensions, types[1:], strict=True):
        chain += bytes([following]) + body
    first = types[0]
    return (
        struct.pack(">IHBB16s16s", 6 << 28, len(chain) + len(payload), first, 64, ip(src), ip(dst))
        + chain
        + payload
    )


def hop_by_hop(units=0):
    """Hop-by-hop options of (units + 1) * 8 bytes (the next-header byte is added)."""
    return bytes([units, 1, 4]) + bytes(4) + bytes(8 * units)  # PadN, then zeros


FRAGMENT = b"\x00" + struct.pack(">HI", 0x0001, 0xABCDEF)  # offset 0, more fragments


# -- packet_key ---------------------------------------------------------------------------


def test_ipv4_tcp():
    packet = ipv4("10.10.1.2", "10.10.2.4", 6, tcp(40000, 5432))
    assert packet_key(packet) == ((ip("10.10.1.2"), ip("10.10.2.4"), 6, 40000, 5432), 40)


def test_ipv4_with_options_reads_ports_after_them():
    packet = ipv4("10.0.0.1", "10.0.0.2", 17, udp(53, 33000, b"xyz"), options=b"\x01" * 8)
    assert packet_key(packet) == ((ip("10.0.0.1"), ip("10.0.0.2"), 17, 53, 33000), 39)


def test_ipv4_udp_and_sctp():
    assert packet_key(ipv4("1.2.3.4", "5.6.7.8", 17, udp(1, 2, b"a" * 100))) == (
        (ip("1.2.3.4"), ip("5.6.7.8"), 17, 1, 2),
        128,
    )
    sctp = struct.pack(">HHII", 5000, 5001, 0, 0)
    assert packet_key(ipv4("1.2.3.4", "5.6.7.8", 132, sctp))[0][3:] == (5000, 5001)


@pytest.mark.parametrize("kind, code", [(8, 0), (3, 3), (0, 0), (11, 1)])
def test_ipv4_icmp_port_is_type_and_code(kind, code):
    key, length = packet_key(ipv4("10.0.0.1", "10.0.0.2", 1, icmp(kind, code)))
    assert key == (ip("10.0.0.1"), ip("10.0.0.2"), 1, 0, kind * 256 + code)
    assert length == 28


def test_ipv4_truncated_transport_header_gives_zero_ports():
    packet = ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 2))[:22]
    assert packet_key(packet)[0][3:] == (0, 0)


def test_ipv4_other_protocol_has_no_ports():
    packet = ipv4("10.0.0.1", "10.0.0.2", 47, b"\x00" * 8)  # GRE
    assert packet_key(packet)[0] == (ip("10.0.0.1"), ip("10.0.0.2"), 47, 0, 0)


def test_ipv6_tcp_and_udp():
    packet = ipv6("fd00:10:10:1::2", "fd00:10:10:2::4", 6, tcp(40000, 5432))
    assert packet_key(packet) == (
        (ip("fd00:10:10:1::2"), ip("fd00:10:10:2::4"), 6, 40000, 5432),
        60,
    )
    packet = ipv6("fd00::1", "fd00::2", 17, udp(5353, 53, b"q" * 12))
    assert packet_key(packet) == ((ip("fd00::1"), ip("fd00::2"), 17, 5353, 53), 60)


@pytest.mark.parametrize("kind, code", [(128, 0), (1, 4), (135, 0)])
def test_ipv6_icmpv6_port_is_type_and_code(kind, code):
    key, length = packet_key(ipv6("fd00::1", "fd00::2", 58, icmp(kind, code)))
    assert key == (ip("fd00::1"), ip("fd00::2"), 58, 0, kind * 256 + code)
    assert length == 48


@pytest.mark.parametrize(
    "extensions",
    [
        [(0, hop_by_hop())],
        [(0, hop_by_hop(2))],
        [(44, FRAGMENT)],
        [(0, hop_by_hop(1)), (44, FRAGMENT)],
        [(0, hop_by_hop()), (60, hop_by_hop(1)), (43, hop_by_hop())],
    ],
)
@pytest.mark.parametrize("proto, transport", [(6, tcp(1234, 80)), (17, udp(1234, 80))])
def test_ipv6_extension_headers_are_skipped(extensions, proto, transport):
    packet = ipv6("fd00::1", "fd00::2", proto, transport, extensions)
    key, length = packet_key(packet)
    assert key == (ip("fd00::1"), ip("fd00::2"), proto, 1234, 80)
    assert length == len(packet)


def test_ipv6_icmpv6_after_a_fragment_header():
    packet = ipv6("fd00::1", "fd00::2", 58, icmp(128, 0), [(44, FRAGMENT)])
    assert packet_key(packet)[0][2:] == (58, 0, 128 * 256)


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x45" + bytes(18),  # 19 bytes
        bytes([0x50]) + bytes(39),  # version 5
        bytes([0x00]) + bytes(39),  # version 0
        bytes([0xF0]) + bytes(39),
        ipv6("fd00::1", "fd00::2", 6, tcp(1, 2))[:39],  # truncated IPv6 header
        ipv6("fd00::1", "fd00::2", 6, tcp(1, 2))[:20],
    ],
)
def test_bad_packets_raise_bad_packet(packet):
    with pytest.raises(BadPacket):
        packet_key(packet)


def test_bad_packet_is_a_value_error():
    assert issubclass(BadPacket, ValueError)


# -- the store ----------------------------------------------------------------------------


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


EGRESS_GUARD = {
    "apiVersion": "crd.antrea.io/v1beta1",
    "kind": "ClusterNetworkPolicy",
    "metadata": {"name": "egress-guard"},
    "spec": {
        "priority": 2,
        "appliedTo": [{"podSelector": {"matchLabels": {"app": "client"}}}],
        "egress": [
            {"name": "no-node-2", "action": "Drop",
             "to": [{"ipBlock": {"cidr": "10.10.2.0/24", "except": ["10.10.2.3/32"]}}]},
        ],
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    return build_cluster(default_objects() + [EGRESS_GUARD])


@pytest.fixture(scope="module")
def metadata(cluster):
    return metadata_store(cluster.inventory()["items"])


def rule_id_of(cluster, policy, name):
    for rule in cluster.antrea_rules:
        if (rule.policy_name, rule.name) == (policy, name):
            return rule.rule_id
    raise AssertionError(name)


@pytest.fixture
def ids(cluster):
    return {
        "reject": rule_id_of(cluster, "acnp-db-guard", "reject-clients"),
        "egress-drop": rule_id_of(cluster, "egress-guard", "no-node-2"),
        "isolation": ISOLATION_INGRESS_ID,
    }


@pytest.fixture
def clock():
    return Clock()


def make_store(metadata, clock, node="node-2", active=60.0, idle=15.0, rate=1000.0):
    return DenyStore(metadata.rule, Enricher(metadata, node), active, idle, rate, clock)


CLIENT1, CLIENT2, WEB2, DB = "10.10.1.2", "10.10.2.2", "10.10.2.3", "10.10.2.4"


def syn(src, dst, sport=40000, dport=5432, data=b""):
    return ipv4(src, dst, 6, tcp(sport, dport, data))


def test_packets_of_one_connection_are_deduplicated(metadata, clock, ids):
    store = make_store(metadata, clock)
    assert store.observe(syn(CLIENT1, DB), ids["reject"])
    clock.now += 1
    assert store.observe(syn(CLIENT1, DB), ids["reject"])
    clock.now += 2
    assert store.observe(syn(CLIENT1, DB, data=b"x" * 12), ids["reject"])
    assert len(store) == 1
    assert store.stats.recorded == 3
    (conn,) = store._connections.values()
    assert conn.key == (ip(CLIENT1), ip(DB), 6, 40000, 5432)
    assert (conn.packets, conn.octets) == (3, 40 + 40 + 52)
    assert (conn.start_time, conn.stop_time) == (1000.0, 1003.0)
    # another source port is another connection
    assert store.observe(syn(CLIENT1, DB, sport=40001), ids["reject"])
    assert len(store) == 2


def test_unknown_mark_is_counted_and_makes_no_connection(metadata, clock):
    store = make_store(metadata, clock)
    assert store.observe(syn(CLIENT1, DB), 12345) is False
    assert store.observe(syn(CLIENT1, DB), 0) is False
    assert store.stats.not_recorded["unknown_rule"] == 2
    assert store.stats.recorded == 0
    assert len(store) == 0
    assert store.next_expiry() is None


def test_no_local_pod_is_counted(metadata, clock, ids):
    store = make_store(metadata, clock, node="node-2")
    # node-1's Pods only: enrichment on node-2 says no
    assert store.observe(syn(CLIENT1, "10.10.1.3", dport=80), ids["isolation"]) is False
    assert store.stats.not_recorded["no_local_pod"] == 1
    assert len(store) == 0


def test_unparsable_packet_is_counted(metadata, clock, ids):
    store = make_store(metadata, clock)
    assert store.observe(b"\x50" + bytes(40), ids["reject"]) is False
    assert store.stats.not_recorded["unparsable"] == 1
    assert len(store) == 0


def test_idle_expiry_exports_end_of_flow_and_removes(metadata, clock, ids):
    store = make_store(metadata, clock, active=60, idle=15)
    store.observe(syn(CLIENT1, DB), ids["reject"])
    assert store.next_expiry() == 1015.0
    clock.now = 1010.0
    store.observe(syn(CLIENT1, DB), ids["reject"])
    assert store.next_expiry() == 1025.0
    assert store.expire(1024.9) == []
    (export,) = store.expire(1025.0)
    assert export.reason == END_OF_FLOW == 3
    assert (export.packet_delta, export.octet_delta) == (2, 80)
    assert (export.reverse_packet_delta, export.reverse_octet_delta) == (0, 0)
    assert export.end_time == 1010.0
    assert len(store) == 0
    assert store.next_expiry() is None
    assert store.expire(2000.0) == []
    # a later packet of the same 5-tuple is a new connection
    clock.now = 1100.0
    store.observe(syn(CLIENT1, DB), ids["reject"])
    (conn,) = store._connections.values()
    assert (conn.start_time, conn.packets) == (1100.0, 1)


def test_active_expiry_exports_deltas_and_keeps_the_connection(metadata, clock, ids):
    store = make_store(metadata, clock, active=60, idle=15)
    for t in range(0, 61, 10):  # 7 packets, 1000..1060
        clock.now = 1000.0 + t
        store.observe(syn(CLIENT1, DB), ids["reject"])
    assert store.next_expiry() == 1060.0
    (export,) = store.expire(1060.0)
    assert export.reason == END_ACTIVE == 2
    assert (export.packet_delta, export.octet_delta) == (7, 280)
    assert export.end_time == 1060.0
    assert len(store) == 1
    assert store.next_expiry() == 1075.0  # idle now comes before the next active timeout
    for t in (70, 80):
        clock.now = 1000.0 + t
        store.observe(syn(CLIENT1, DB), ids["reject"])
    assert store.expire(1094.0) == []
    (export,) = store.expire(1095.0)
    assert export.reason == END_OF_FLOW
    assert (export.packet_delta, export.octet_delta) == (2, 80)
    assert (export.connection.packets, export.connection.octets) == (9, 360)
    assert len(store) == 0


def test_active_then_idle_with_nothing_new_exports_zero_deltas(metadata, clock, ids):
    store = make_store(metadata, clock, active=10, idle=15)
    store.observe(syn(CLIENT1, DB), ids["reject"])
    (first,) = store.expire(1010.0)
    assert (first.reason, first.packet_delta) == (END_ACTIVE, 1)
    (last,) = store.expire(1015.0)
    assert (last.reason, last.packet_delta, last.octet_delta) == (END_OF_FLOW, 0, 0)


def test_next_expiry_is_the_earliest_over_connections(metadata, clock, ids):
    store = make_store(metadata, clock, active=60, idle=15)
    store.observe(syn(CLIENT1, DB, sport=1), ids["reject"])
    clock.now = 1005.0
    store.observe(syn(CLIENT1, DB, sport=2), ids["reject"])
    assert store.next_expiry() == 1015.0
    exports = store.expire(1015.0)
    assert [e.connection.key[3] for e in exports] == [1]
    assert store.next_expiry() == 1020.0


def test_token_bucket(metadata, clock, ids):
    store = make_store(metadata, clock, rate=10)
    results = [store.observe(syn(CLIENT1, DB), ids["reject"]) for _ in range(15)]
    assert results == [True] * 10 + [False] * 5  # burst: one second's worth
    assert store.stats.recorded == 10
    assert store.stats.not_recorded["rate_limited"] == 5
    clock.now += 0.5  # refills 5 tokens
    results = [store.observe(syn(CLIENT1, DB), ids["reject"]) for _ in range(6)]
    assert results == [True] * 5 + [False]
    clock.now += 100  # the bucket holds one second's worth, no more
    results = [store.observe(syn(CLIENT1, DB), ids["reject"]) for _ in range(11)]
    assert results == [True] * 10 + [False]
    assert store.stats.recorded == 25
    assert store.stats.not_recorded["rate_limited"] == 7
    (conn,) = store._connections.values()
    assert conn.packets == 25  # rate-limited packets are not in the counts


def test_steady_rate_is_admitted(metadata, clock, ids):
    store = make_store(metadata, clock, rate=100)
    for _ in range(100):  # drain the burst
        store.observe(syn(CLIENT1, DB), ids["reject"])
    admitted = 0
    for _ in range(1000):  # 10 s at 100/s
        clock.now += 0.01
        admitted += store.observe(syn(CLIENT1, DB), ids["reject"])
    assert admitted >= 999
    assert store.stats.not_recorded["rate_limited"] <= 1


# -- records ------------------------------------------------------------------------------


def only_export(store, now):
    (export,) = store.expire(now)
    return export


def test_reject_record(metadata, clock, ids):
    store = make_store(metadata, clock)
    store.observe(syn(CLIENT1, DB), ids["reject"])
    template, record = flow_record(only_export(store, 1015.0), "node-2")
    assert template == EXPORTER_TEMPLATE_ID_IPV4
    assert record["flowEndReason"] == 3
    assert record["flowStartSeconds"] == record["flowEndSeconds"] == 1000
    assert (record["sourceIPv4Address"], record["destinationIPv4Address"]) == (CLIENT1, DB)
    assert (record["sourceTransportPort"], record["destinationTransportPort"]) == (40000, 5432)
    assert record["protocolIdentifier"] == 6
    assert (record["packetTotalCount"], record["octetTotalCount"]) == (1, 40)
    assert (record["packetDeltaCount"], record["octetDeltaCount"]) == (1, 40)
    assert record["reversePacketTotalCount"] == 0
    assert record["tcpState"] == ""
    assert record["flowType"] == FLOW_TYPE_INTER_NODE
    assert "sourcePodName" not in record  # client-1 is not on node-2
    assert (record["destinationPodNamespace"], record["destinationPodName"]) == ("backend", "db")
    assert record["destinationNodeName"] == "node-2"
    assert record["ingressNetworkPolicyRuleAction"] == 3
    assert record["ingressNetworkPolicyName"] == "acnp-db-guard"
    assert record["ingressNetworkPolicyNamespace"] == ""
    assert record["ingressNetworkPolicyType"] == 3
    assert record["ingressNetworkPolicyRuleName"] == "reject-clients"
    assert not any(k.startswith("egressNetworkPolicy") for k in record)
    assert not any(k.startswith("destinationCluster") for k in record)
    assert "destinationServicePort" not in record
    assert "destinationServicePortName" not in record


def test_isolation_drop_record(metadata, clock, ids):
    store = make_store(metadata, clock)
    store.observe(syn(DB, WEB2, dport=80), ids["isolation"])
    _, record = flow_record(only_export(store, 1015.0), "node-2")
    assert record["flowType"] == FLOW_TYPE_INTRA_NODE
    assert (record["sourcePodName"], record["destinationPodName"]) == ("db", "web-2")
    assert record["ingressNetworkPolicyRuleAction"] == 2
    assert record["ingressNetworkPolicyType"] == 1
    assert record["ingressNetworkPolicyName"] == ""
    assert record["ingressNetworkPolicyNamespace"] == ""
    assert record["ingressNetworkPolicyRuleName"] == ""
    assert not any(k.startswith("egressNetworkPolicy") for k in record)


def test_egress_drop_record(metadata, clock, ids):
    store = make_store(metadata, clock)
    store.observe(ipv4(CLIENT2, DB, 17, udp(5000, 53)), ids["egress-drop"])
    _, record = flow_record(only_export(store, 1015.0), "node-2")
    assert record["protocolIdentifier"] == 17
    assert record["sourcePodName"] == "client-2"
    assert record["egressNetworkPolicyRuleAction"] == 2
    assert record["egressNetworkPolicyName"] == "egress-guard"
    assert record["egressNetworkPolicyNamespace"] == ""
    assert record["egressNetworkPolicyType"] == 3
    assert record["egressNetworkPolicyRuleName"] == "no-node-2"
    assert not any(k.startswith("ingressNetworkPolicy") for k in record)


def test_ipv6_and_icmp_records(metadata, clock, ids, cluster):
    store = make_store(metadata, clock)
    client1 = cluster.pod("frontend/client-1").addresses[6]
    db = cluster.pod("backend/db").addresses[6]
    store.observe(ipv6(client1, db, 58, icmp(128, 0)), ids["reject"])
    store.observe(ipv4(CLIENT1, DB, 1, icmp(8, 0)), ids["reject"])
    exports = sorted(store.expire(1015.0), key=lambda e: len(e.connection.key[0]))
    (t4, r4), (t6, r6) = (flow_record(e, "node-2") for e in exports)
    assert (t4, t6) == (EXPORTER_TEMPLATE_ID_IPV4, EXPORTER_TEMPLATE_ID_IPV6)
    assert (r6["sourceIPv6Address"], r6["destinationIPv6Address"]) == (client1, db)
    assert (r6["protocolIdentifier"], r6["destinationTransportPort"]) == (58, 128 * 256)
    assert (r4["protocolIdentifier"], r4["destinationTransportPort"]) == (1, 8 * 256)
    for record in (r4, r6):
        assert record["ingressNetworkPolicyRuleAction"] == 3
        assert record["destinationPodName"] == "db"
        assert "destinationServicePortName" not in record


def test_a_service_connection_has_no_service_fields(metadata, clock, ids):
    """The denied packet is seen after DNAT; even when enrichment knows a Service for the
    address pair the deny record must carry none."""

    def enrich_with_service(entry):
        meta = Enricher(metadata, "node-2")(entry)
        return dataclasses.replace(
            meta, cluster_ip="10.96.0.10", service_port=80, service_port_name="backend/web:http"
        )

    store = DenyStore(metadata.rule, enrich_with_service, 60, 15, 1000, clock)
    store.observe(syn(DB, WEB2, dport=8080), ids["isolation"])
    _, record = flow_record(only_export(store, 1015.0), "node-2")
    assert "destinationClusterIPv4" not in record
    assert "destinationServicePort" not in record
    assert "destinationServicePortName" not in record
    assert len(store) == 0


# -- threads ------------------------------------------------------------------------------


def run_concurrently(metadata, ids, observers, packets_per_thread=4000):
    """`observers` threads hammer observe while this thread advances the clock and expires;
    returns (store, exports, expected octets)."""
    clock = Clock()
    store = make_store(metadata, clock, active=1.0, idle=2.0, rate=1e12)
    failures = []

    def hammer(offset):
        for i in range(packets_per_thread):
            sport = 1000 + offset * 100 + i % 50
            if not store.observe(syn(CLIENT1, DB, sport=sport, data=bytes(i % 3)), ids["reject"]):
                failures.append(i)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(observers)]
    exports = []
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        clock.now += 0.5
        exports += store.expire(clock.now)
    for thread in threads:
        thread.join()
    exports += store.expire(clock.now + 1e6)
    assert len(store) == 0
    expected_octets = observers * sum(40 + i % 3 for i in range(packets_per_thread))
    return store, exports, expected_octets, failures


def check_totals(store, exports, expected_octets, failures, total):
    assert failures == [], f"{len(failures)} packets not recorded: {dict(store.stats.not_recorded)}"
    assert store.stats.recorded == total
    assert sum(e.packet_delta for e in exports) == total
    assert sum(e.octet_delta for e in exports) == expected_octets
    assert all(e.packet_delta >= 0 and e.octet_delta >= 0 for e in exports)
    assert sum(1 for e in exports if e.reason == END_OF_FLOW) >= 50


def test_observe_on_one_thread_while_expire_runs_adds_up(metadata, ids):
    store, exports, octets, failures = run_concurrently(metadata, ids, observers=1)
    check_totals(store, exports, octets, failures, 4000)


def test_concurrent_observers_add_up(metadata, ids):
    # The clock must be read under the lock: a thread that read it before another thread
    # refilled the bucket would otherwise see time go backwards and lose tokens.
    store, exports, octets, failures = run_concurrently(metadata, ids, observers=3)
    check_totals(store, exports, octets, failures, 12000)
