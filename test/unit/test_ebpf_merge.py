"""The counter path without a kernel: per-CPU values merged into flows (stale slots, empty
CPUs, large counters), ring-buffer records as flows, and the connection store's merge of
counted flows with conntrack's connections (recorded inputs, an injected clock)."""

from __future__ import annotations

import numpy as np
import pytest
from agentkit import ZONE, conntrack_entry, ip, metadata_store, node, pod

from antrea_flow.codes import END_ACTIVE, END_IDLE, END_OF_FLOW
from antrea_flow.conntrack.parser import Dump
from antrea_flow.ebpf.drain import FLOW_DTYPE, fallback_flows, merge_cpus
from antrea_flow.ebpf.program import COUNTS_DTYPE, FALLBACK_DTYPE, KEY_DTYPE
from antrea_flow.exporter.connections import ConnectionStore
from antrea_flow.exporter.enrich import Enricher
from antrea_flow.flowkey import FlowKey

SECOND = 1_000_000_000


def key(src: str, dst: str, proto: int, sport: int, dport: int, fragment: int = 0) -> np.void:
    out = np.zeros(1, KEY_DTYPE)
    a, b = ip(src), ip(dst)
    out["src"][0, : len(a)] = list(a)
    out["dst"][0, : len(b)] = list(b)
    out["sport"], out["dport"], out["proto"] = sport, dport, proto
    out["version"], out["fragment"] = (6 if len(a) == 16 else 4), fragment
    return out[0]


def slots(*values: tuple[int, int, int, int, int, int, int]) -> np.ndarray:
    """One entry's per-CPU values: (packets, bytes, rev_packets, rev_bytes, first, last, flags)."""
    out = np.zeros(len(values), COUNTS_DTYPE)
    for cpu, v in enumerate(values):
        out[cpu] = (*v, 0)
    return out


# -- merging CPUs --------------------------------------------------------------------------


def test_cpus_are_summed_times_spanned_and_flags_or_ed():
    keys = np.array([key("10.0.0.1", "10.0.0.2", 6, 1000, 80)])
    values = np.array([slots((3, 300, 1, 60, 5 * SECOND, 9 * SECOND, 0x02),
                             (2, 200, 4, 240, 4 * SECOND, 7 * SECOND, 0x10))])  # fmt: skip
    merged = merge_cpus(keys, values, stale_before_ns=0)
    (flow,) = merged.flows
    assert (flow["packets"], flow["bytes"], flow["rev_packets"], flow["rev_bytes"]) == (
        5, 500, 5, 300)  # fmt: skip
    assert (flow["first_ns"], flow["last_ns"], flow["flags"]) == (4 * SECOND, 9 * SECOND, 0x12)
    assert merged.stale_slots == 0


def test_an_empty_cpu_does_not_make_the_first_packet_zero():
    keys = np.array([key("10.0.0.1", "10.0.0.2", 17, 1, 2)])
    values = np.array([slots((0, 0, 0, 0, 0, 0, 0), (1, 50, 0, 0, 8 * SECOND, 8 * SECOND, 0))])
    (flow,) = merge_cpus(keys, values, 0).flows
    assert flow["first_ns"] == 8 * SECOND and flow["packets"] == 1


def test_a_stale_slot_from_before_the_last_eviction_is_discarded():
    """Kernels before 5.10 may reuse a deleted entry with the old values in other CPUs'
    slots: those last saw a packet before the previous eviction began."""
    keys = np.array([key("10.0.0.1", "10.0.0.2", 17, 1, 2), key("10.0.0.3", "10.0.0.4", 17, 1, 2)])
    values = np.array([
        slots((5, 500, 0, 0, 1 * SECOND, 2 * SECOND, 0),
              (1, 100, 0, 0, 20 * SECOND, 20 * SECOND, 0)),
        slots((7, 700, 0, 0, 1 * SECOND, 3 * SECOND, 0), (0, 0, 0, 0, 0, 0, 0)),
    ])  # fmt: skip
    merged = merge_cpus(keys, values, stale_before_ns=10 * SECOND)
    assert merged.stale_slots == 2
    (flow,) = merged.flows  # the second entry had nothing but a stale slot
    assert (flow["packets"], flow["bytes"], flow["first_ns"]) == (1, 100, 20 * SECOND)


def test_a_slot_written_just_as_the_last_eviction_began_is_kept():
    keys = np.array([key("10.0.0.1", "10.0.0.2", 17, 1, 2)])
    values = np.array([slots((1, 100, 0, 0, 9_900_000_000, 9_900_000_000, 0))])
    assert merge_cpus(keys, values, stale_before_ns=10 * SECOND).flows["packets"][0] == 1


def test_large_counters_are_summed_as_unsigned_64_bit_integers():
    big = (1 << 62) + 3
    keys = np.array([key("10.0.0.1", "10.0.0.2", 17, 1, 2)])
    values = np.array(
        [slots((big, big, 0, 0, SECOND, SECOND, 0), (big, 5, 0, 0, SECOND, SECOND, 0))]
    )
    (flow,) = merge_cpus(keys, values, 0).flows
    assert int(flow["packets"]) == 2 * big and int(flow["bytes"]) == big + 5


def test_no_entries_no_flows():
    merged = merge_cpus(np.zeros(0, KEY_DTYPE), np.zeros((0, 2), COUNTS_DTYPE), 0)
    assert len(merged.flows) == 0 and merged.flows.dtype == FLOW_DTYPE


def test_ring_buffer_records_become_flows_by_key_and_direction():
    records = np.zeros(5, FALLBACK_DTYPE)
    k1, k2 = key("10.0.0.1", "10.0.0.2", 17, 1, 2), key("10.0.0.5", "10.0.0.6", 6, 3, 4)
    for i, (k, reverse, size, ns, flags) in enumerate(
        [(k1, 0, 100, 3, 0), (k1, 1, 60, 1, 0), (k1, 0, 100, 9, 0), (k2, 0, 40, 5, 2),
         (k2, 1, 40, 6, 16)]
    ):  # fmt: skip
        records[i]["key"], records[i]["reverse"] = k, reverse
        records[i]["bytes"], records[i]["ns"], records[i]["flags"] = size, ns, flags
    flows = {bytes(f["key"]["src"][:4]): f for f in fallback_flows(records)}
    one, two = flows[ip("10.0.0.1")], flows[ip("10.0.0.5")]
    assert (one["packets"], one["bytes"], one["rev_packets"], one["rev_bytes"]) == (2, 200, 1, 60)
    assert (one["first_ns"], one["last_ns"]) == (1, 9)
    assert (two["packets"], two["rev_packets"], two["flags"]) == (1, 1, 0x12)


# -- the store -----------------------------------------------------------------------------

NODE_OBJECTS = [
    node("node-1", "10.10.1.0/24"),
    node("node-2", "10.10.2.0/24"),
    pod("frontend", "client", "node-1", "10.10.1.5"),
    pod("backend", "web", "node-1", "10.10.1.6"),
    pod("backend", "remote", "node-2", "10.10.2.7"),
]
OFFSET = 1_700_000_000.0  # the wall clock's lead over the packets' monotonic times


@pytest.fixture
def store() -> ConnectionStore:
    return ConnectionStore(
        Enricher(metadata_store(NODE_OBJECTS), "node-1"), 60.0, 15.0, ZONE, counted=True
    )


def flows(*rows) -> np.ndarray:
    """Rows of (key, packets, bytes, rev_packets, rev_bytes, first_s, last_s, flags)."""
    out = np.zeros(len(rows), FLOW_DTYPE)
    for i, (k, p, b, rp, rb, first, last, flags) in enumerate(rows):
        out[i] = (k, p, b, rp, rb, int(first * SECOND), int(last * SECOND), flags)
    return out


def wall(seconds: float) -> float:
    return OFFSET + seconds


def test_a_tracked_connection_gets_flags_and_packet_times_and_keeps_its_counters(store):
    entry = conntrack_entry("10.10.1.5", "10.10.1.6", (10, 1000, 8, 800), sport=40000, dport=8080)
    store.update(Dump.of([entry]), wall(100))
    # The counter saw it from the server's side first: the reverse orientation.
    counted = flows(
        (key("10.10.1.6", "10.10.1.5", 6, 8080, 40000), 8, 800, 10, 1000, 97.5, 99.25, 0x1B)
    )
    store.merge_counted(counted, OFFSET, wall(100))
    (conn,) = list(store)
    assert conn.tcp_flags == 0x1B and conn.counted_packets == 18
    assert (conn.first_packet, conn.last_packet) == (wall(97.5), wall(99.25))
    assert (conn.packets, conn.octets) == (10, 1000)  # conntrack's
    assert store.counts.counted_flows == {"matched": 1}


def test_a_service_connection_is_found_by_the_address_the_client_dialled(store):
    entry = conntrack_entry("10.10.1.5", "10.10.1.6", service=("10.96.0.10", 80), mark=0x12,
                            sport=40001, dport=8080)  # fmt: skip
    store.update(Dump.of([entry]), wall(100))
    store.merge_counted(
        flows((key("10.10.1.5", "10.96.0.10", 6, 40001, 80), 3, 180, 2, 120, 99, 99.5, 0x02)),
        OFFSET, wall(100),
    )  # fmt: skip
    (conn,) = list(store)
    assert conn.tcp_flags == 0x02 and conn.counted_packets == 5
    assert not [c for c in store if c.untracked]


def test_traffic_conntrack_does_not_have_becomes_a_connection_of_its_own(store):
    store.update(Dump.of([]), wall(100))
    untracked = key("10.10.1.5", "10.10.2.7", 17, 5000, 9000)
    store.merge_counted(flows((untracked, 50, 5000, 0, 0, 95, 99, 0)), OFFSET, wall(100))
    (conn,) = list(store)
    assert conn.untracked and conn.key == FlowKey(ip("10.10.1.5"), ip("10.10.2.7"), 17, 5000, 9000)
    assert conn.meta.source_pod.name == "client" and conn.meta.flow_type == 2  # inter-node
    assert (conn.start_time, conn.stop_time) == (wall(95), wall(99))
    # More of it, some the other way round, in the next eviction: one connection still.
    back = key("10.10.2.7", "10.10.1.5", 17, 9000, 5000)
    later = flows((back, 4, 400, 0, 0, 101, 102, 0), (untracked, 10, 1000, 0, 0, 100, 104, 0))
    store.merge_counted(later, OFFSET, wall(105))
    (conn,) = list(store)
    assert (conn.packets, conn.octets, conn.reverse_packets, conn.reverse_octets) == (
        60,
        6000,
        4,
        400,
    )
    # Exported like the others: at its active timeout while packets come, with deltas...
    for seconds in (115, 130, 150):
        store.merge_counted(flows((untracked, 1, 100, 0, 0, seconds - 1, seconds - 1, 0)),
                            OFFSET, wall(seconds))  # fmt: skip
    (export,) = store.expire(wall(160))
    assert export.reason == END_ACTIVE and export.packet_delta == 63
    # ... and once idle, ended.
    assert store.expire(wall(164)) == []
    exports = store.expire(wall(165))
    assert [(e.reason, e.packet_delta) for e in exports] == [(END_IDLE, 0)]
    assert list(store) == []


def test_an_eviction_of_more_untracked_flows_than_the_store_has_rows_counts_them_all(store):
    # The store grows its rows while it merges: every flow's counts land in the new rows.
    store.update(Dump.of([]), wall(100))
    many = [(key("10.10.1.5", "10.10.2.7", 17, 1024 + i, 9000), 1 + i % 7, 100, 0, 0, 95, 99, 0)
            for i in range(3000)]  # fmt: skip
    store.merge_counted(flows(*many), OFFSET, wall(100))
    held = {c.key.source_port: c.packets for c in store}
    assert held == {1024 + i: 1 + i % 7 for i in range(3000)}


def test_nothing_is_counted_twice(store):
    """A packet is in exactly one record: the tracked connection's (conntrack's counts) or
    the untracked one's (the counter's), never both."""
    tracked = conntrack_entry("10.10.1.5", "10.10.1.6", (4, 400, 4, 400), sport=41000, dport=8080)
    store.update(Dump.of([tracked]), wall(100))
    store.merge_counted(
        flows((key("10.10.1.5", "10.10.1.6", 6, 41000, 8080), 4, 400, 4, 400, 99, 99.9, 0x18),
              (key("10.10.1.5", "10.10.1.6", 17, 7000, 7001), 9, 900, 0, 0, 99, 99.9, 0)),
        OFFSET, wall(100),
    )  # fmt: skip
    exports = store.drain()
    total = sum(e.packet_delta + e.reverse_packet_delta for e in exports)
    assert total == 8 + 9 and len(exports) == 2


@pytest.mark.parametrize(
    ("flow_key", "outcome"),
    [
        (key("10.10.1.5", "10.10.1.6", 17, 0, 0, fragment=1), "fragment"),
        (key("192.168.9.9", "93.184.216.34", 17, 1, 2), "no_local_pod"),
        (key("10.10.1.5", "10.10.1.6", 132, 1, 2), "protocol"),
        (key("10.10.1.5", "10.10.1.6", 6, 42000, 5432), "denied"),
    ],
)
def test_flows_that_are_no_record_of_their_own(flow_key, outcome):
    store = ConnectionStore(
        Enricher(metadata_store(NODE_OBJECTS), "node-1"), 60.0, 15.0, ZONE,
        protocol_filter=("tcp", "udp"), counted=True,
    )  # fmt: skip
    store.update(Dump.of([]), wall(100))
    denied = {FlowKey(ip("10.10.1.6"), ip("10.10.1.5"), 6, 5432, 42000)}  # the deny path's
    store.merge_counted(
        flows((flow_key, 3, 300, 0, 0, 99, 99, 0)), OFFSET, wall(100), denied.__contains__
    )
    assert list(store) == [] and store.counts.counted_flows == {outcome: 1}


def test_an_ended_connection_whose_counts_disagree_is_counted(store):
    ok = conntrack_entry("10.10.1.5", "10.10.1.6", (10, 1000, 10, 1000), sport=43000,
                         start_ns=99 * SECOND)  # fmt: skip
    off = conntrack_entry("10.10.1.5", "10.10.1.6", (100, 10_000, 100, 10_000), sport=43001,
                          start_ns=99 * SECOND, ct_id=2)  # fmt: skip
    store.update(Dump.of([ok, off]), 100.0)
    store.merge_counted(
        flows((key("10.10.1.5", "10.10.1.6", 6, 43000, 8080), 9, 900, 10, 1000, 99.1, 99.9, 0),
              (key("10.10.1.5", "10.10.1.6", 6, 43001, 8080), 60, 6000, 60, 6000, 99.1, 99.9, 0)),
        0.0, 100.0,
    )  # fmt: skip
    store.update(Dump.of([]), 101.0)  # both gone: ended
    assert {e.reason for e in store.expire(101.0)} == {END_OF_FLOW}
    assert store.counts.disagreements == 1  # 19 of 20 is a packet in flight; 120 of 200 is not
