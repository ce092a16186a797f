"""Connection store rules, with explicit times instead of sleeping."""

import pytest
from agentkit import ACTIVE, ESTABLISHED, IDLE, TIME_WAIT, ZONE, ct_id, deltas, ip
from agentkit import counted_entry as entry

from antrea_flow.codes import END_ACTIVE, END_IDLE, END_OF_FLOW
from antrea_flow.conntrack.parser import IPS_DYING, TCP_STATES, Dump
from antrea_flow.exporter.connections import ConnectionStore


def make_store(**kwargs):
    seen = []

    def enrich(e):
        seen.append(e)
        return "meta"

    return TestStore(enrich, seen, **kwargs)


class TestStore(ConnectionStore):
    """The store fed from lists of entries, as if each list were a complete dump."""

    __test__ = False

    def __init__(self, enrich, seen, **kwargs):
        super().__init__(enrich, ACTIVE, IDLE, ZONE, **kwargs)
        self.enriched = seen

    def update(self, entries, now):
        super().update(Dump.of(entries), now)

    def by_key(self, key):
        return next((c for c in self if c.key == key), None)


def test_key_is_the_five_tuple_after_dnat_and_enrichment_sees_the_service_address():
    store = make_store()
    store.update([entry(service=("10.96.0.10", 80))], now=0)
    conn = store.by_key((ip("10.10.1.5"), ip("10.10.1.6"), 6, 40000, 8080))
    assert conn is not None
    (seen,) = store.enriched
    assert (seen.orig_dst, seen.orig_dport) == (ip("10.96.0.10"), 80)


def test_nothing_is_due_before_a_timeout():
    store = make_store()
    store.update([entry()], now=0)
    assert store.expire(now=IDLE - 0.001) == []
    assert store.next_expiry() == IDLE


def test_active_timeout_exports_deltas_and_first_delta_equals_total():
    store = make_store()
    store.update([entry(10, 1000, 8, 800)], now=0)
    for t in range(5, 60, 5):  # traffic keeps the connection active
        store.update([entry(10 + t, 1000 + t * 100, 8 + t, 800 + t * 10)], now=t)
    store.update([entry(70, 7000, 68, 1400)], now=59)
    (first,) = store.expire(now=ACTIVE)
    assert first.reason == END_ACTIVE
    assert deltas(first) == (70, 7000, 68, 1400)  # first export: delta == total
    store.update([entry(100, 9000, 90, 2000)], now=61)
    assert store.expire(now=ACTIVE + 1) == []
    for t in range(65, 120, 5):
        store.update([entry(100 + t, 9000 + t, 90, 2000)], now=t)
    (second,) = store.expire(now=2 * ACTIVE)
    assert second.reason == END_ACTIVE
    last = 115  # the final update of the loop above
    assert deltas(second) == (100 + last - 70, 9000 + last - 7000, 90 - 68, 2000 - 1400)


def test_deltas_add_up_to_totals():
    store = make_store()
    exported = [0, 0, 0, 0]
    packets = 0
    for t in range(0, 600, 5):
        packets += 7
        store.update([entry(packets, packets * 100, packets // 2, packets * 30)], now=t)
        for export in store.expire(now=t):
            exported = [a + b for a, b in zip(exported, deltas(export), strict=True)]
    store.update([], now=600)  # the connection leaves the table
    (last,) = store.expire(now=600)
    assert last.reason == END_OF_FLOW
    exported = [a + b for a, b in zip(exported, deltas(last), strict=True)]
    assert exported == [packets, packets * 100, packets // 2, packets * 30]


def test_idle_timeout_then_new_activity_starts_a_new_active_period():
    store = make_store()
    store.update([entry(5, 500)], now=0)
    store.update([entry(5, 500)], now=5)  # no new packets
    (idle,) = store.expire(now=IDLE)
    assert idle.reason == END_IDLE
    assert deltas(idle) == (5, 500, 1, 60)
    assert store.next_expiry() is None  # out of the heap until it is active again
    store.update([entry(5, 500)], now=20)
    assert store.expire(now=100) == []
    store.update([entry(9, 900)], now=100)
    assert store.next_expiry() == 100 + IDLE
    (again,) = store.expire(now=100 + IDLE)
    assert again.reason == END_IDLE
    assert deltas(again) == (4, 400, 0, 0)  # since the previous export, not since start


def test_tcp_state_change_counts_as_activity():
    store = make_store()
    store.update([entry(5, 500, tcp=ESTABLISHED)], now=0)
    store.update([entry(5, 500, tcp=TCP_STATES.index("FIN_WAIT"))], now=10)
    assert store.expire(now=IDLE) == []
    assert store.next_expiry() == 10 + IDLE


def test_time_wait_is_exported_once_promptly_then_remembered_until_gone():
    store = make_store()
    store.update([entry(5, 500)], now=0)
    store.update([entry(8, 800, tcp=TIME_WAIT)], now=5)
    (end,) = store.expire(now=5)
    assert end.reason == END_OF_FLOW
    assert deltas(end) == (8, 800, 1, 60)
    # Still in the table: not re-created as a new connection, not exported again.
    created = store.stats.created
    store.update([entry(8, 800, tcp=TIME_WAIT)], now=10)
    store.update([entry(8, 800, tcp=TIME_WAIT)], now=125)
    assert store.expire(now=1000) == []
    assert store.stats.created == created
    assert len(store) == 1
    store.update([], now=130)
    assert len(store) == 0


def test_dying_bit_ends_non_tcp_connections_with_the_stop_timestamp():
    store = make_store()
    store.update([entry(3, 300, proto=17)], now=0)
    store.update([entry(4, 400, proto=17, status=IPS_DYING, stop_ns=7_500_000_000)], now=10)
    (end,) = store.expire(now=10)
    assert end.reason == END_OF_FLOW
    assert end.end_time == 7.5


def test_connection_gone_from_the_table_is_exported_and_removed():
    store = make_store()
    store.update([entry(5, 500)], now=0)
    store.update([], now=5)
    (end,) = store.expire(now=5)
    assert end.reason == END_OF_FLOW
    assert len(store) == 0
    assert store.expire(now=1000) == []


def test_negative_deltas_are_clamped_to_zero():
    store = make_store()
    store.update([entry(50, 5000)], now=0)
    store.expire(now=ACTIVE)  # idle export at 15 with delta == total
    store.update([entry(40, 4000, 2, 90)], now=70)  # counters went down (zeroed)
    (export,) = store.expire(now=70 + IDLE)
    assert deltas(export) == (0, 0, 1, 30)


def test_reused_five_tuple_ends_the_old_connection_first():
    store = make_store()
    store.update([entry(5, 500, ct_id=1)], now=0)
    store.update([entry(2, 200, ct_id=2)], now=5)
    exports = store.expire(now=5)
    assert [(e.reason, deltas(e)[:2]) for e in exports] == [(END_OF_FLOW, (5, 500))]
    (fresh,) = store.expire(now=5 + IDLE)
    assert ct_id(fresh.connection) == 2
    assert deltas(fresh)[:2] == (2, 200)  # its own first delta, not against the old one


def test_live_entries_sharing_a_conntrack_id_stay_two_connections():
    # The kernel's id is a 32-bit hash: in a full table some live entries share one.
    store = make_store()
    store.update([entry(1, 100, sport=1000), entry(5, 500, sport=2000)], now=0)
    store.update([entry(2, 200, sport=1000), entry(5, 500, sport=2000)], now=5)
    assert len(store) == 2
    exports = store.expire(now=5 + IDLE)
    by_port = {e.connection.key[3]: deltas(e)[:2] for e in exports}
    assert by_port == {1000: (2, 200), 2000: (5, 500)}
    assert all(e.reason == END_IDLE for e in exports)


def test_an_entry_reallocated_with_the_same_id_and_tuple_is_a_new_connection():
    # Same slab slot and tuple give the same id; the start timestamp tells them apart.
    store = make_store()
    store.update([entry(50, 5000, start_ns=1_000_000_000)], now=0)
    store.update([entry(2, 200, start_ns=6_000_000_000)], now=6)
    (ended,) = store.expire(now=6)
    assert (ended.reason, deltas(ended)[:2]) == (END_OF_FLOW, (50, 5000))
    (fresh,) = store.expire(now=6 + IDLE)
    assert deltas(fresh)[:2] == (2, 200)


def test_min_heap_orders_exports_by_earliest_expiry():
    store = make_store()
    store.update([entry(1, 100, sport=1000 + i, ct_id=i) for i in range(5)], now=0)
    for t in (3, 6, 9, 12):  # connections 3 and 4 stay active longer
        store.update(
            [entry(1 + (t if i >= 3 else 0), 100, sport=1000 + i, ct_id=i) for i in range(5)],
            now=t,
        )
    assert store.next_expiry() == IDLE
    first = store.expire(now=IDLE)
    assert sorted(ct_id(e.connection) for e in first) == [0, 1, 2]
    assert store.next_expiry() == 12 + IDLE


def test_connections_created_by_one_poll_share_a_deadline_until_each_moves_on():
    store = make_store()
    store.update([entry(1, 100, sport=1000 + i, ct_id=i) for i in range(3)], now=0)
    store.update([entry(1, 100, sport=1002, ct_id=2)], now=5)  # 0 and 1 left the table
    ended = store.expire(now=5)
    assert sorted(ct_id(e.connection) for e in ended) == [0, 1]
    assert store.next_expiry() == IDLE  # connection 2 is still due at the shared deadline
    store.update([entry(2, 200, sport=1002, ct_id=2)], now=6)  # active again: moves on
    assert store.expire(now=IDLE) == []
    assert store.next_expiry() == 6 + IDLE
    (idle,) = store.expire(now=6 + IDLE)
    assert (ct_id(idle.connection), idle.reason) == (2, END_IDLE)
    store.update([], now=30)
    (end,) = store.expire(now=30)
    assert (ct_id(end.connection), end.reason) == (2, END_OF_FLOW)
    assert store.next_expiry() is None


def test_filters_zone_protocol_uncommitted_and_enrichment_runs_once():
    store = make_store(protocol_filter=("tcp",))
    entries = [
        entry(sport=1, ct_id=1),
        entry(sport=2, ct_id=2, zone=0),
        entry(sport=3, ct_id=3, proto=17),
        entry(sport=4, ct_id=4, mark=0),
    ]
    store.update(entries, now=0)
    store.update(entries, now=5)
    assert len(store) == 1
    assert dict(store.stats.filtered) == {"zone": 1, "protocol": 1, "uncommitted": 1}
    assert len(store.enriched) == 1


def test_empty_protocol_filter_exports_nothing():
    store = make_store(protocol_filter=())
    store.update([entry()], now=0)
    assert len(store) == 0


def test_connections_without_local_pods_are_counted_and_rechecked_after_metadata_change():
    calls = []

    def enrich(e):
        calls.append(e)
        return None if len(calls) < 3 else "meta"

    store = TestStore(enrich, [])
    store.update([entry()], now=0)
    store.update([entry()], now=5)
    assert len(calls) == 1 and len(store) == 0
    assert store.stats.filtered["no_local_pod"] == 1
    store.forget_skipped()
    store.update([entry()], now=10)
    store.forget_skipped()
    store.update([entry()], now=15)
    assert len(store) == 1


def test_ipv6_connections_are_keyed_and_exported_like_ipv4():
    store = make_store()
    store.update([entry(3, 300, src="fd00:10:10:1::5", dst="fd00:10:10:1::6")], now=0)
    (export,) = store.expire(now=IDLE)
    assert export.connection.key[0] == ip("fd00:10:10:1::5")
    assert deltas(export)[:2] == (3, 300)


@pytest.mark.parametrize("n", [1000])
def test_many_connections_each_export_once_per_timeout(n):
    store = make_store()
    store.update([entry(1, 100, sport=i, ct_id=i) for i in range(n)], now=0)
    assert len(store.expire(now=IDLE)) == n
    assert store.expire(now=IDLE * 10) == []
