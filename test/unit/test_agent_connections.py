"""Connection store behaviours beyond test_connection_store.py: re-examining skipped
connections after a metadata change, counting filtered entries once, and end-of-flow
exports of idle-exported, vanished and born-dying connections."""

import pytest
from agentkit import (
    ACTIVE,
    ESTABLISHED,
    IDLE,
    TIME_WAIT,
    ZONE,
    ct_id,
    deltas,
    metadata_store,
    node,
    pod,
    poll,
)
from agentkit import counted_entry as entry

from antrea_flow.codes import END_ACTIVE, END_IDLE, END_OF_FLOW, FLOW_TYPE_TO_EXTERNAL
from antrea_flow.conntrack.parser import IPS_DYING, TCP_STATES
from antrea_flow.exporter.connections import ConnectionStore
from antrea_flow.exporter.enrich import Enricher

CLOSE = TCP_STATES.index("CLOSE")
FIN_WAIT = TCP_STATES.index("FIN_WAIT")


class CountingEnrich:
    """Wraps an enrich function and records the conntrack ids it was asked about."""

    def __init__(self, inner):
        self.inner = inner
        self.asked = []

    def __call__(self, e):
        self.asked.append(e.id)
        return self.inner(e)


def make_store(enrich=lambda e: "meta", **kwargs):
    counting = CountingEnrich(enrich)
    store = ConnectionStore(counting, ACTIVE, IDLE, ZONE, **kwargs)
    return store, counting


def cluster():
    return metadata_store(
        [node("node-1", "10.10.1.0/24"), pod("default", "web", "node-1", "10.10.1.6")]
    )


def late_pod():
    return pod("default", "late", "node-1", "10.10.1.9")


# -- forget_skipped ----------------------------------------------------------------------


def test_forget_skipped_re_enriches_a_skipped_connection_on_the_next_poll():
    metadata = cluster()
    store, enrich = make_store(Enricher(metadata, "node-1"))
    unknown = entry(src="10.10.1.9", dst="93.184.216.34", dport=443, ct_id=5)
    poll(store, [unknown], now=0)
    assert len(store) == 0 and enrich.asked == [5]

    metadata.upsert(late_pod())
    poll(store, [unknown], now=5)  # the store does not know the metadata changed
    assert len(store) == 0 and enrich.asked == [5]

    store.forget_skipped()
    poll(store, [unknown], now=10)
    assert enrich.asked == [5, 5]
    (conn,) = list(store)
    assert conn.meta.source_pod.name == "late"
    assert conn.meta.flow_type == FLOW_TYPE_TO_EXTERNAL
    (export,) = store.expire(now=10 + IDLE)
    assert export.connection.handle == conn.handle  # a snapshot of the same connection
    assert deltas(export) == (1, 100, 1, 60)


def test_forget_skipped_does_not_re_enrich_tracked_or_filtered_entries():
    store, enrich = make_store(lambda e: None if e.id == 3 else "meta")
    entries = [
        entry(ct_id=1, sport=1),
        entry(ct_id=2, sport=2, zone=0),
        entry(ct_id=3, sport=3),  # skipped by enrichment
    ]
    poll(store, entries, now=0)
    assert sorted(enrich.asked) == [1, 3]
    store.forget_skipped()
    poll(store, entries, now=5)
    assert sorted(enrich.asked) == [1, 3, 3]  # only the skipped one again
    assert [ct_id(c) for c in store] == [1]
    assert store.stats.filtered["zone"] == 1


def test_forget_skipped_before_any_poll_is_harmless():
    store, enrich = make_store()
    store.forget_skipped()
    poll(store, [entry()], now=0)
    store.forget_skipped()
    poll(store, [entry()], now=5)
    assert enrich.asked == [1]
    assert len(store) == 1


# -- filtered counts ---------------------------------------------------------------------


def test_filtered_counts_count_each_entry_once_across_polls():
    store, enrich = make_store(lambda e: None if e.id == 5 else "meta", protocol_filter=("tcp",))
    entries = [
        entry(ct_id=1, sport=1),
        entry(ct_id=2, sport=2, zone=0),
        entry(ct_id=3, sport=3, proto=17),
        entry(ct_id=4, sport=4, mark=0x10),  # committed only to be denied: mark & 0xF == 0
        entry(ct_id=5, sport=5),  # no local Pod
    ]
    for t in range(0, 30, 5):
        poll(store, entries, now=t)
    assert dict(store.stats.filtered) == {
        "zone": 1,
        "protocol": 1,
        "uncommitted": 1,
        "no_local_pod": 1,
    }
    assert enrich.asked == [1, 5]

    # A new entry of each kind adds one each; the old ones still count once.
    more = [
        entry(ct_id=12, sport=12, zone=7),
        entry(ct_id=13, sport=13, proto=132),
        entry(ct_id=15, sport=15),
    ]
    enrich.inner = lambda e: None if e.id in (5, 15) else "meta"
    for t in range(30, 50, 5):
        poll(store, entries + more, now=t)
    assert dict(store.stats.filtered) == {
        "zone": 2,
        "protocol": 2,
        "uncommitted": 1,
        "no_local_pod": 2,
    }


def test_an_entry_that_leaves_and_a_new_one_that_comes_are_counted_separately():
    store, _ = make_store()
    poll(store, [entry(ct_id=2, zone=0)], now=0)
    poll(store, [], now=5)
    poll(store, [entry(ct_id=3, zone=0)], now=10)
    poll(store, [entry(ct_id=3, zone=0)], now=15)
    assert store.stats.filtered["zone"] == 2


def test_zone_zero_entries_are_not_filtered_as_uncommitted():
    # The uncommitted filter applies in non-zero zones only (upstream's rule).
    store = ConnectionStore(lambda e: "meta", ACTIVE, IDLE, 0)
    poll(store, [entry(zone=0, mark=0)], now=0)
    assert len(store) == 1
    assert "uncommitted" not in store.stats.filtered


def test_a_skipped_entry_rechecked_after_forget_skipped_is_still_counted_once():
    store, enrich = make_store(lambda e: None)
    poll(store, [entry(ct_id=9)], now=0)
    assert store.stats.filtered["no_local_pod"] == 1
    for t in (5, 10, 15):
        store.forget_skipped()  # the metadata changed, but not for this connection
        poll(store, [entry(ct_id=9)], now=t)
    assert enrich.asked == [9, 9, 9, 9]
    assert len(store) == 0
    # One connection without a local Pod, examined four times: counted once.
    assert store.stats.filtered["no_local_pod"] == 1


# -- end of flow -------------------------------------------------------------------------


def test_idle_exported_connection_that_disappears_is_exported_with_reason_3_and_zero_deltas():
    store, _ = make_store()
    poll(store, [entry(5, 500, 4, 400)], now=0)
    poll(store, [entry(5, 500, 4, 400)], now=5)
    (idle,) = store.expire(now=IDLE)
    assert idle.reason == END_IDLE
    assert deltas(idle) == (5, 500, 4, 400)
    assert store.next_expiry() is None

    poll(store, [entry(5, 500, 4, 400)], now=20)
    poll(store, [], now=25)  # gone from the table
    (end,) = store.expire(now=25)
    assert end.reason == END_OF_FLOW
    assert end.connection.handle == idle.connection.handle
    assert deltas(end) == (0, 0, 0, 0)
    assert (end.connection.packets, end.connection.octets) == (5, 500)  # totals kept
    assert len(store) == 0
    assert store.expire(now=10_000) == []
    assert store.stats.exported[END_OF_FLOW] == 1


def test_idle_exported_connection_that_closes_is_exported_with_reason_3_and_zero_deltas():
    store, _ = make_store()
    poll(store, [entry(5, 500, 4, 400)], now=0)
    (idle,) = store.expire(now=IDLE)
    assert idle.reason == END_IDLE
    poll(store, [entry(5, 500, 4, 400, tcp=TIME_WAIT)], now=30)  # state change, no packets
    (end,) = store.expire(now=30)
    assert end.reason == END_OF_FLOW
    assert deltas(end) == (0, 0, 0, 0)
    assert store.expire(now=10_000) == []


def test_active_exported_connection_that_disappears_reports_only_the_rest():
    store, _ = make_store()
    poll(store, [entry(5, 500)], now=0)
    for t in range(5, 60, 5):
        poll(store, [entry(5 + t, 500 + t)], now=t)
    (active,) = store.expire(now=ACTIVE)
    assert active.reason == END_ACTIVE
    poll(store, [entry(70, 600)], now=62)
    poll(store, [], now=65)
    (end,) = store.expire(now=65)
    assert end.reason == END_OF_FLOW
    assert deltas(end)[:2] == (70 - 60, 600 - 555)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tcp": TIME_WAIT},
        {"tcp": CLOSE},
        {"proto": 17, "status": IPS_DYING},
        {"proto": 1, "status": IPS_DYING},
        {"tcp": ESTABLISHED, "status": IPS_DYING},
    ],
    ids=["tcp-time-wait", "tcp-close", "udp-dying", "icmp-dying", "tcp-dying-bit"],
)
def test_dying_on_its_first_poll_is_exported_at_once_with_reason_3(kwargs):
    store, enrich = make_store()
    poll(store, [entry(6, 600, 5, 500, **kwargs)], now=100)
    assert store.next_expiry() == 100
    (end,) = store.expire(now=100)
    assert end.reason == END_OF_FLOW
    assert deltas(end) == (6, 600, 5, 500)  # the first export: the totals
    assert store.stats.created == 1 and store.stats.ended == 1

    # Still in the table: remembered, neither re-created nor exported again.
    poll(store, [entry(7, 700, 5, 500, **kwargs)], now=105)
    poll(store, [entry(7, 700, 5, 500, **kwargs)], now=200)
    assert store.expire(now=1_000) == []
    assert store.stats.created == 1
    assert enrich.asked == [1]
    assert len(store) == 1
    poll(store, [], now=1_005)
    assert len(store) == 0
    assert store.expire(now=2_000) == []


def test_dying_on_its_first_poll_ends_at_the_kernels_stop_time():
    store, _ = make_store()
    poll(store, [entry(2, 200, proto=17, status=IPS_DYING, stop_ns=98_250_000_000)], now=100)
    (end,) = store.expire(now=100)
    assert end.end_time == 98.25


def test_dying_on_its_first_poll_is_not_exported_when_enrichment_skips_it():
    store, _ = make_store(lambda e: None)
    poll(store, [entry(tcp=TIME_WAIT)], now=0)
    assert store.expire(now=1_000) == []
    assert store.stats.filtered["no_local_pod"] == 1


def test_dying_then_gone_before_the_export_round_is_exported_once():
    store, _ = make_store()
    poll(store, [entry(3, 300)], now=0)
    poll(store, [entry(4, 400, tcp=TIME_WAIT)], now=5)
    poll(store, [], now=10)
    (end,) = store.expire(now=10)
    assert end.reason == END_OF_FLOW
    assert deltas(end)[:2] == (4, 400)
    assert len(store) == 0
    assert store.expire(now=1_000) == []
    assert store.stats.ended == 1


def test_many_born_dying_connections_are_all_exported_in_one_round():
    store, _ = make_store()
    entries = [entry(1, 100, sport=i, ct_id=i, tcp=TIME_WAIT) for i in range(1, 51)]
    entries += [entry(1, 100, sport=i, ct_id=i) for i in range(51, 101)]
    poll(store, entries, now=0)
    ends = store.expire(now=0)
    assert sorted(ct_id(e.connection) for e in ends) == list(range(1, 51))
    assert {e.reason for e in ends} == {END_OF_FLOW}
    assert store.next_expiry() == IDLE
