"""Aggregation over time in the aggregation store: repeats, per-Node counters, throughput,
the export schedule, end of flow, inactivity, drain and next_event. Time is the `now`
passed in; records are built as the collecting process decodes them."""

from __future__ import annotations

from typing import Any

import pytest

from antrea_flow.aggregator.aggregation import AggregationStore
from antrea_flow.ipfix.antrea import aggregator_templates, exporter_templates

TEMPLATE_V4 = exporter_templates()[0]
AGGREGATOR_V4 = aggregator_templates()[0]
NODE1 = ("192.168.77.101", 1)
NODE2 = ("192.168.77.102", 2)
COUNTERS = ("packet", "octet", "reversePacket", "reverseOctet")
START = 1000


def record(
    side: str, end: int, total, delta=None, reason: int = 2, port: int = 40000, **over
) -> dict[str, Any]:
    """A decoded agent record: side is "source" (node-1 half), "destination" (node-2 half)
    or "intra" (both Pods on node-1)."""
    delta = total if delta is None else delta
    out = dict(zip(TEMPLATE_V4.keys, TEMPLATE_V4.values_from({}), strict=True))
    out.update(
        sourceIPv4Address="10.10.1.5",
        destinationIPv4Address="10.10.2.7",
        protocolIdentifier=6,
        sourceTransportPort=port,
        destinationTransportPort=8080,
        flowStartSeconds=START,
        flowEndSeconds=end,
        flowEndReason=reason,
        tcpState="ESTABLISHED",
        flowType=1 if side == "intra" else 2,
    )
    for name, t, d in zip(COUNTERS, total, delta, strict=True):
        out[f"{name}TotalCount"] = t
        out[f"{name}DeltaCount"] = d
    if side in ("source", "intra"):
        out.update(sourcePodName="client", sourcePodNamespace="frontend", sourceNodeName="node-1")
    if side in ("destination", "intra"):
        out.update(
            destinationPodName="server",
            destinationPodNamespace="backend",
            destinationNodeName="node-2" if side == "destination" else "node-1",
        )
    unknown = set(over) - set(out)
    assert not unknown, unknown
    out.update(over)
    return out


def new_store(export_interval=60.0, inactive_timeout=90.0, correlation_timeout=60.0):
    return AggregationStore(export_interval, inactive_timeout, correlation_timeout)


def per_side(exported: dict, side: str, kind: str) -> tuple[int, ...]:
    return tuple(exported[f"{name}{kind}CountFrom{side}"] for name in COUNTERS)


def common(exported: dict, kind: str) -> tuple[int, ...]:
    return tuple(exported[f"{name}{kind}Count"] for name in COUNTERS)


def run(store: AggregationStore, times) -> list[dict]:
    out = []
    for now in times:
        out += store.expire(now)
    return out


# -- 3. repeats, stale records, same-second records -------------------------------------------


def test_the_same_record_twice_is_ignored_and_counted():
    store = new_store()
    r = record("intra", 1010, (4, 400, 3, 300))
    store.add(r, NODE1, now=0)
    store.add(dict(r), NODE1, now=1)
    assert store.stats.ignored["repeated_or_stale"] == 1
    assert store.stats.received == 2
    (out,) = store.expire(1)
    assert common(out, "Delta") == (4, 400, 3, 300)
    assert per_side(out, "SourceNode", "Delta") == (4, 400, 3, 300)


def test_a_repeated_half_is_not_counted_twice_in_the_merge():
    store = new_store()
    src = record("source", 1010, (10, 1000, 8, 800))
    store.add(src, NODE1, now=0)
    store.add(dict(src), NODE1, now=1)
    store.add(record("destination", 1011, (10, 1000, 8, 800)), NODE2, now=2)
    (out,) = store.expire(2)
    assert per_side(out, "SourceNode", "Delta") == (10, 1000, 8, 800)
    assert store.stats.ignored["repeated_or_stale"] == 1


def test_a_record_delivered_again_after_its_export_is_not_exported_again():
    store = new_store(export_interval=60)
    r = record("intra", 1010, (4, 400, 3, 300))
    store.add(r, NODE1, now=0)
    assert len(store.expire(0)) == 1
    store.add(dict(r), NODE1, now=10)
    assert run(store, (10, 60, 61, 120)) == []
    assert store.stats.ignored["repeated_or_stale"] == 1


def test_an_older_record_of_a_side_is_ignored():
    store = new_store()
    store.add(record("intra", 1020, (20, 2000, 10, 1000)), NODE1, now=0)
    store.add(record("intra", 1015, (15, 1500, 8, 800), (5, 500, 2, 200)), NODE1, now=1)
    assert store.stats.ignored["repeated_or_stale"] == 1
    (out,) = store.expire(1)
    assert per_side(out, "SourceNode", "Total") == (20, 2000, 10, 1000)
    assert per_side(out, "SourceNode", "Delta") == (20, 2000, 10, 1000)
    assert out["flowEndSeconds"] == 1020


def test_two_different_records_of_the_same_second_both_count():
    store = new_store()
    store.add(record("intra", 1020, (5, 500, 5, 500)), NODE1, now=0)
    store.add(record("intra", 1020, (8, 800, 7, 700), (3, 300, 2, 200)), NODE1, now=0.5)
    assert store.stats.ignored["repeated_or_stale"] == 0
    (out,) = store.expire(1)
    assert per_side(out, "SourceNode", "Delta") == (8, 800, 7, 700)
    assert per_side(out, "SourceNode", "Total") == (8, 800, 7, 700)
    assert common(out, "Total") == (8, 800, 7, 700)


# -- 6. aggregation over time -----------------------------------------------------------------


def test_per_node_deltas_totals_and_throughput_across_exports():
    store = new_store(export_interval=60, inactive_timeout=90, correlation_timeout=60)
    store.add(record("source", 1005, (10, 10000, 8, 4000)), NODE1, now=5)
    store.add(record("destination", 1006, (10, 10000, 8, 4000)), NODE2, now=6)
    (e1,) = store.expire(6)
    # first record of a side: its totals over its whole life
    assert e1["throughputFromSourceNode"] == 10000 * 8 // 5
    assert e1["reverseThroughputFromSourceNode"] == 4000 * 8 // 5
    assert e1["throughputFromDestinationNode"] == 10000 * 8 // 6
    assert e1["reverseThroughputFromDestinationNode"] == 4000 * 8 // 6
    assert e1["throughput"] == e1["throughputFromDestinationNode"]  # the latest record's

    store.add(record("source", 1035, (30, 40000, 20, 10000), (20, 30000, 12, 6000)), NODE1, 35)
    store.add(record("source", 1065, (50, 70000, 30, 16000), (20, 30000, 10, 6000)), NODE1, 65)
    assert store.expire(65) == []  # the next export is due at 66
    store.add(
        record("destination", 1066, (48, 69000, 30, 16000), (38, 59000, 22, 12000)), NODE2, 66
    )
    (e2,) = store.expire(66)
    # deltas summed per side since the previous export, totals as last reported
    assert per_side(e2, "SourceNode", "Delta") == (40, 60000, 22, 12000)
    assert per_side(e2, "SourceNode", "Total") == (50, 70000, 30, 16000)
    assert per_side(e2, "DestinationNode", "Delta") == (38, 59000, 22, 12000)
    assert per_side(e2, "DestinationNode", "Total") == (48, 69000, 30, 16000)
    assert e2["flowEndSecondsFromSourceNode"] == 1065
    assert e2["flowEndSecondsFromDestinationNode"] == 1066
    assert e2["flowEndSeconds"] == 1066
    # throughput between the side's two latest records
    assert e2["throughputFromSourceNode"] == (70000 - 40000) * 8 // 30
    assert e2["reverseThroughputFromSourceNode"] == (16000 - 10000) * 8 // 30
    assert e2["throughputFromDestinationNode"] == (69000 - 10000) * 8 // 60
    assert e2["reverseThroughputFromDestinationNode"] == (16000 - 4000) * 8 // 60
    # common: totals the larger of both sides; deltas what those totals grew since the
    # previous export (so they add up to the totals); throughput the latest record's side
    assert common(e2, "Total") == (50, 70000, 30, 16000)
    e1_totals = common(e1, "Total")
    assert common(e2, "Delta") == tuple(
        a - b for a, b in zip(common(e2, "Total"), e1_totals, strict=True)
    )
    assert common(e2, "Delta") == (40, 60000, 22, 12000)
    assert e2["throughput"] == e2["throughputFromDestinationNode"]
    assert e2["reverseThroughput"] == e2["reverseThroughputFromDestinationNode"]

    assert store.expire(126) == []  # nothing new: no empty duplicate record

    store.add(record("source", 1130, (60, 80000, 35, 18000), (10, 10000, 5, 2000)), NODE1, 130)
    (e3,) = store.expire(130)
    assert per_side(e3, "SourceNode", "Delta") == (10, 10000, 5, 2000)
    assert per_side(e3, "DestinationNode", "Delta") == (0, 0, 0, 0)  # reset by the export
    assert per_side(e3, "DestinationNode", "Total") == (48, 69000, 30, 16000)  # kept
    assert e3["throughputFromDestinationNode"] == 0
    assert e3["reverseThroughputFromDestinationNode"] == 0
    assert e3["throughputFromSourceNode"] == 10000 * 8 // 65
    assert e3["throughput"] == e3["throughputFromSourceNode"]
    assert common(e3, "Total") == (60, 80000, 35, 18000)
    assert common(e3, "Delta") == (10, 10000, 5, 2000)


@pytest.mark.parametrize("source_first", [True, False], ids=["source_first", "dest_first"])
def test_common_totals_are_the_larger_of_both_nodes_in_either_order(source_first):
    """Each Node counts the same connection; the common total is the larger count whichever
    Node's record arrived (or ended) last."""
    store = new_store()
    src = (record("source", 1010, (10, 1000, 3, 300)), NODE1)
    dst = (record("destination", 1011, (9, 900, 4, 400)), NODE2)
    for r, exporter in (src, dst) if source_first else (dst, src):
        store.add(r, exporter, now=1)
    (out,) = store.expire(1)
    assert common(out, "Total") == (10, 1000, 4, 400)


def test_export_only_every_interval_and_only_when_updated():
    store = new_store(export_interval=60, inactive_timeout=1000)
    store.add(record("intra", 1000, (1, 100, 1, 100)), NODE1, now=0)
    assert len(store.expire(0)) == 1
    exported_at = []
    for now in range(1, 300):
        if now % 10 == 0 and now < 150:  # a record every 10 s until 150 s
            end = 1000 + now
            total = (1 + now, 100 + now * 10, 1, 100)
            delta = (10, 100, 0, 0)
            store.add(record("intra", end, total, delta), NODE1, now=now)
        exported_at += [now] * len(store.expire(now))
    assert exported_at == [60, 120, 180]  # the last one carries 150's record; then silence


def test_exported_deltas_add_up_to_the_totals():
    store = new_store(export_interval=60, inactive_timeout=1000)
    total_packets = 0
    exported = 0
    for i, now in enumerate(range(0, 600, 7)):
        total_packets += i + 1
        store.add(
            record("intra", 1000 + now, (total_packets, 0, 0, 0), (i + 1, 0, 0, 0)), NODE1, now
        )
        exported += sum(r["packetDeltaCountFromSourceNode"] for r in store.expire(now))
    exported += sum(r["packetDeltaCountFromSourceNode"] for r in store.expire(10_000))
    assert exported == total_packets


def test_end_of_flow_is_exported_at_once_and_sticks():
    store = new_store(export_interval=60, inactive_timeout=90)
    store.add(record("source", 1005, (10, 1000, 8, 800)), NODE1, now=5)
    store.add(record("destination", 1006, (10, 1000, 8, 800)), NODE2, now=6)
    assert len(store.expire(6)) == 1  # next export due at 66
    store.add(
        record("destination", 1020, (12, 1200, 9, 900), (2, 200, 1, 100), reason=3), NODE2, 20
    )
    (final,) = store.expire(20)
    assert final["flowEndReason"] == 3
    # the source Node's later record still says "active timeout"
    store.add(record("source", 1025, (12, 1200, 9, 900), (2, 200, 1, 100), reason=2), NODE1, 25)
    out = run(store, (25, 60, 80, 100))
    assert len(out) == 1
    assert out[0]["flowEndReason"] == 3
    assert out[0]["packetDeltaCountFromSourceNode"] == 2


def test_end_of_flow_in_the_first_record_is_exported_at_once():
    store = new_store()
    store.add(record("intra", 1005, (3, 300, 3, 300), reason=3), NODE1, now=5)
    (out,) = store.expire(5)
    assert out["flowEndReason"] == 3


def test_inactive_flow_is_removed_after_its_last_export():
    store = new_store(export_interval=60, inactive_timeout=90)
    store.add(record("intra", 1000, (1, 100, 1, 100)), NODE1, now=0)
    assert len(store.expire(0)) == 1
    assert store.expire(89) == []
    assert len(store) == 1
    assert store.expire(90) == []
    assert len(store) == 0
    assert store.stats.removed == 1
    assert store.next_event() is None


def test_an_update_not_yet_exported_is_exported_before_removal():
    store = new_store(export_interval=60, inactive_timeout=30)
    store.add(record("intra", 1000, (1, 100, 1, 100)), NODE1, now=0)
    assert len(store.expire(0)) == 1
    store.add(record("intra", 1010, (5, 500, 1, 100), (4, 400, 0, 0)), NODE1, now=10)
    assert store.expire(40) == []  # inactive for 30 s, but its update is not exported yet
    assert len(store) == 1
    out = run(store, (60, 100, 200))
    assert len(out) == 1
    assert out[0]["packetDeltaCountFromSourceNode"] == 4
    assert len(store) == 0
    assert store.stats.removed == 1


def test_a_flow_that_keeps_reporting_is_not_removed():
    store = new_store(export_interval=60, inactive_timeout=90)
    for now in range(0, 600, 30):
        store.add(record("intra", 1000 + now, (now + 1, 0, 0, 0), (30, 0, 0, 0)), NODE1, now)
        store.expire(now)
        assert len(store) == 1
    assert store.stats.removed == 0


# -- 8. drain ---------------------------------------------------------------------------------


def test_drain_exports_every_updated_flow_including_waiting_ones():
    store = new_store(export_interval=60, inactive_timeout=1000, correlation_timeout=60)
    store.add(record("source", 1000, (1, 100, 1, 100), port=1), NODE1, now=0)  # waiting
    store.add(record("intra", 1000, (1, 100, 1, 100), port=2), NODE1, now=0)
    store.add(record("intra", 1000, (1, 100, 1, 100), port=3), NODE1, now=0)
    assert len(store.expire(0)) == 2  # both intra-node flows
    store.add(record("intra", 1010, (3, 300, 1, 100), (2, 200, 0, 0), port=2), NODE1, now=10)

    out = {r["sourceTransportPort"]: r for r in store.drain(20)}
    assert set(out) == {1, 2}  # port 3 has nothing new
    assert out[1]["incomplete"] is True
    assert out[1]["sourcePodName"] == "client"
    assert out[1]["packetDeltaCountFromSourceNode"] == 1
    assert out[2]["incomplete"] is False
    assert out[2]["packetDeltaCountFromSourceNode"] == 2
    # nothing is sent twice
    assert store.drain(21) == []
    assert run(store, (60, 80, 2000)) == []


# -- 9. next_event ----------------------------------------------------------------------------


def test_next_event_tells_when_expire_must_run():
    store = new_store(export_interval=60, inactive_timeout=90, correlation_timeout=60)
    assert store.next_event() is None
    store.add(record("source", 1000, (1, 100, 1, 100), port=1), NODE1, now=100)
    assert store.next_event() == 160  # first_seen + correlation_timeout
    store.add(record("source", 1010, (2, 200, 1, 100), (1, 100, 0, 0), port=1), NODE1, now=110)
    assert store.next_event() == 160  # more of the same side does not move it
    store.add(record("intra", 1000, (1, 100, 1, 100), port=2), NODE1, now=110)
    assert store.next_event() == 110  # ready: its first export is due now
    assert store.expire(109.5) == []
    assert len(store.expire(110)) == 1
    assert store.next_event() == 160
    store.add(record("destination", 1011, (2, 200, 1, 100), port=1), NODE2, now=120)
    assert store.next_event() == 120  # correlated: due now
    assert len(store.expire(120)) == 1
    store.add(record("intra", 1030, (2, 200, 1, 100), (1, 100, 0, 0), port=2), NODE1, now=130)
    assert store.next_event() == 170  # its next export (110 + 60)
    assert store.expire(169.9) == []
    assert len(store.expire(170)) == 1
    following = store.next_event()
    assert following is not None and following > 170


# -- 10. a new connection on the 5-tuple of an ended one ---------------------------------------
# Fixed-port UDP (NTP 123 to 123, DNS) and fast reconnects reuse a 5-tuple every day: the
# new connection is a new flow, never merged into the one that ended.

NEW_START = 2000


def test_a_new_connection_after_end_of_flow_is_a_new_flow():
    store = new_store()
    store.add(record("intra", 1060, (10, 10000, 10, 10000), reason=3), NODE1, 1060.0)
    (ended,) = store.expire(1060.0)
    assert ended["flowEndReason"] == 3
    # The same 5-tuple again, a new connection: its own start, small counts, still active.
    store.add(
        record("intra", 2005, (1, 500, 1, 500), reason=2, flowStartSeconds=NEW_START),
        NODE1,
        2005.0,
    )
    (new,) = store.expire(2005.0)
    assert new["flowStartSeconds"] == NEW_START
    assert new["flowEndReason"] == 2, "the end of the old connection stuck to the new one"
    assert common(new, "Total") == (1, 500, 1, 500)
    assert common(new, "Delta") == (1, 500, 1, 500)
    assert per_side(new, "SourceNode", "Delta") == (1, 500, 1, 500)
    assert new["throughput"] == 500 * 8 // 5 and new["reverseThroughput"] == 500 * 8 // 5
    assert new["throughputFromSourceNode"] >= 0


def test_a_new_connection_in_the_same_second_is_told_apart_by_its_lower_counts():
    store = new_store()
    store.add(record("intra", 1060, (10, 10000, 10, 10000), reason=3), NODE1, 1060.0)
    store.expire(1060.0)
    # Same start second as the old one (a fast reconnect), counts lower than the old totals.
    store.add(record("intra", 1060, (1, 500, 1, 500), reason=2), NODE1, 1061.0)
    (new,) = store.expire(1061.0)
    assert new["flowEndReason"] == 2
    assert common(new, "Total") == (1, 500, 1, 500)
    assert common(new, "Delta") == (1, 500, 1, 500)


def test_a_new_connection_of_an_inter_node_flow_waits_for_its_own_peer():
    store = new_store()
    store.add(record("source", 1060, (10, 10000, 10, 10000), reason=3), NODE1, 1060.0)
    store.add(record("destination", 1060, (10, 10000, 10, 10000), reason=3), NODE2, 1060.0)
    (ended,) = store.expire(1060.0)
    assert not ended["incomplete"]
    new_source = record("source", 2005, (1, 500, 1, 500), flowStartSeconds=NEW_START)
    store.add(new_source, NODE1, 2005.0)
    assert store.expire(2005.0) == [], "the new half was merged into the ended flow"
    store.add(
        record("destination", 2006, (1, 500, 1, 500), flowStartSeconds=NEW_START), NODE2, 2006.0
    )
    (new,) = store.expire(2006.0)
    assert not new["incomplete"]
    assert new["flowStartSeconds"] == NEW_START and new["flowEndReason"] == 2
    assert common(new, "Delta") == (1, 500, 1, 500)
    for side in ("SourceNode", "DestinationNode"):
        assert per_side(new, side, "Total") == (1, 500, 1, 500)


def test_the_other_nodes_first_half_of_a_new_connection_is_not_merged_into_the_ended_flow():
    # The old connection was only ever seen from node-1 (its node-2 half never came).
    store = new_store()
    store.add(record("source", 1060, (10, 10000, 10, 10000), reason=3), NODE1, 1060.0)
    assert store.expire(1061.0) == []
    # Node-2's first half of a connection that started after the old one ended.
    store.add(record("destination", 1075, (1, 500, 1, 500), flowStartSeconds=1070), NODE2, 1075.0)
    (old,) = store.expire(1075.0)
    assert old["flowStartSeconds"] == START and old["incomplete"]
    assert old["destinationPodName"] == "", "the new connection's half completed the old one"
    assert store.waiting == 1, "the new connection's half does not wait for its own peer"


def test_an_ended_flow_not_yet_exported_is_exported_before_the_new_one_replaces_it():
    store = new_store()
    # The old connection's source half ended, its peer never came: still waiting.
    store.add(record("source", 1060, (10, 10000, 10, 10000), reason=3), NODE1, 1060.0)
    assert store.expire(1060.0) == []
    store.add(record("source", 2005, (1, 500, 1, 500), flowStartSeconds=NEW_START), NODE1, 1070.0)
    out = store.expire(1070.0)
    assert [r["flowStartSeconds"] for r in out] == [START], "the old half was lost"
    assert out[0]["incomplete"] and out[0]["flowEndReason"] == 3
    assert common(out[0], "Total") == (10, 10000, 10, 10000)


def test_a_throughput_that_does_not_fit_its_element_is_clamped_and_counted():
    store = new_store()
    store.add(record("intra", 1010, (10, 10000, 10, 10000)), NODE1, 1010.0)
    store.expire(1010.0)
    # Totals that went down without a new start: no flow does this, but a record that says
    # so must still be exported, with a throughput an unsigned64 can carry.
    store.add(record("intra", 1075, (11, 500, 11, 20000)), NODE1, 1075.0)
    (out,) = store.expire(1075.0)
    assert out["throughput"] == 0 and out["throughputFromSourceNode"] == 0
    assert out["reverseThroughput"] == 10000 * 8 // 65
    assert store.stats.clamped["throughput"] == 1
    assert store.stats.clamped["throughputFromSourceNode"] == 1
    AGGREGATOR_V4.encode_mapping(out)  # the IPFIX sink can send it


def test_every_record_of_a_reused_5_tuple_can_be_sent_over_ipfix():
    store = new_store()
    store.add(record("intra", 1060, (10, 10000, 10, 10000), reason=3), NODE1, 1060.0)
    store.add(record("intra", 1062, (1, 500, 1, 500)), NODE1, 1062.0)
    store.add(record("intra", 1070, (2, 900, 2, 900)), NODE1, 1070.0)
    out = store.drain(1070.0)
    assert [r["flowEndReason"] for r in out] == [3, 2]
    for exported in out:
        assert all(exported[name] >= 0 for name in exported if "hroughput" in name)
        AGGREGATOR_V4.encode_mapping(exported)


# -- what agents with the counter path add -----------------------------------------------------

DETAILED_V4 = exporter_templates(packet_details=True)[0]


def detailed(side: str, end: int, total, flags: int, start_ms: int, end_ms: int) -> dict:
    out = dict(zip(DETAILED_V4.keys, DETAILED_V4.values_from({}), strict=True))
    out.update(record(side, end, total))
    out.update(tcpControlBits=flags, flowStartMilliseconds=start_ms, flowEndMilliseconds=end_ms)
    return out


def test_flags_are_or_ed_and_packet_times_span_both_nodes():
    store = new_store()
    store.add(detailed("source", 1005, (5, 500, 4, 400), 0x02, 1_000_250, 1_004_900), NODE1, 1006)
    store.add(detailed("destination", 1005, (5, 500, 4, 400), 0x11, 1_000_200, 1_005_100), NODE2,
              1006)  # fmt: skip
    (exported,) = store.expire(1007)
    assert exported["tcpControlBits"] == 0x13
    assert exported["flowStartMilliseconds"] == 1_000_200
    assert exported["flowEndMilliseconds"] == 1_005_100
    assert set(AGGREGATOR_V4.keys) >= {"tcpControlBits", "flowStartMilliseconds"}


def test_without_the_counter_the_times_are_the_seconds_and_the_flags_zero():
    store = new_store()
    store.add(record("intra", 1007, (5, 500, 4, 400)), NODE1, 1008)
    (exported,) = store.expire(1009)
    assert exported["flowStartMilliseconds"] == START * 1000
    assert exported["flowEndMilliseconds"] == 1007 * 1000
    assert exported.get("tcpControlBits", 0) == 0
