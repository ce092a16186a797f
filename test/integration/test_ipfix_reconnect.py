"""Collector outages: the exporter queues while the collector is down, reconnects to a new
collector on the same port, announces its templates again, and delivers every record exactly
once across both collectors; a full queue drops the oldest records and counts them."""

from __future__ import annotations

import asyncio

import pytest

from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.collecting import CollectingProcess

from .ipfixkit import (
    V4,
    V6,
    RecordSink,
    add_all,
    assert_exactly_once,
    collecting,
    eventually,
    exporting,
    free_port,
    make_record,
    run,
    server_ssl,
    stop_and_drain,
    template_id_of,
)


async def start_collector(protocol: str, port: int, sink: RecordSink, tls) -> CollectingProcess:
    collector = CollectingProcess(
        TransportAddress("127.0.0.1", port, protocol),
        sink,
        ssl_context=server_ssl(tls) if protocol == "tls" else None,
    )
    await collector.start()
    return collector


@pytest.mark.parametrize("protocol", ["tcp", "tls"])
def test_records_queue_through_an_outage_and_arrive_once(protocol, tls_material):
    before = {i: make_record(i) for i in range(1, 101)}
    during = {i: make_record(i) for i in range(101, 301)}
    after = {i: make_record(i) for i in range(301, 351)}

    async def scenario():
        sink1, sink2 = RecordSink(), RecordSink()
        first = await start_collector(protocol, 0, sink1, tls_material)
        port = first.port
        second = None
        try:
            address = TransportAddress("127.0.0.1", port, protocol)
            async with exporting(address, tls=tls_material) as exporter:
                add_all(exporter, before)
                await eventually(lambda: len(sink1.records) >= len(before), "first records")
                assert await exporter.wait_idle(5.0)

                await first.stop()
                await eventually(lambda: not exporter.stats.connected, "outage noticed")
                failures = exporter.stats.connect_failures
                items = list(during.values())
                for record in items[:100]:
                    assert exporter.add_mapping(template_id_of(record), record)
                # It keeps trying while the collector is down, and keeps every record.
                await eventually(lambda: exporter.stats.connect_failures >= failures + 2, "retries")
                for record in items[100:]:
                    assert exporter.add_mapping(template_id_of(record), record)
                assert exporter.queued == len(during)
                assert exporter.stats.records_sent == len(before)
                assert not exporter.stats.records_dropped

                # A new collector on the same port, which has never seen the templates.
                second = await start_collector(protocol, port, sink2, tls_material)
                await eventually(lambda: len(sink2.records) >= len(during), "queued records")
                add_all(exporter, after)
                await eventually(
                    lambda: len(sink2.records) >= len(during) + len(after), "later records"
                )
                assert await exporter.wait_idle(5.0)
                await stop_and_drain(exporter, second)  # a duplicate would be in by then
                stats = exporter.stats
        finally:
            await first.stop()
            if second is not None:
                await second.stop()
        return sink1, sink2, stats, first.stats, second.stats

    sink1, sink2, stats, stats1, stats2 = run(scenario())
    both = RecordSink(records=sink1.records + sink2.records)
    assert_exactly_once(both, before | during | after)
    # Each collector got a contiguous part of the stream, in order.
    assert sink1.counters() == list(before)
    assert sink2.counters() == list(during) + list(after)
    # The second collector learned the templates from the exporter's new session.
    announced = [t.template_id for _, m in sink2.messages for t in m.templates]
    assert sorted(announced) == [V4, V6]
    first_data = next(i for i, (_, m) in enumerate(sink2.messages) if m.data_sets)
    before_data = {t.template_id for _, m in sink2.messages[: first_data + 1] for t in m.templates}
    assert before_data == {V4, V6}
    assert not stats2.malformed and not stats1.malformed
    assert stats.connections == 2
    assert stats.records_sent == len(before) + len(during) + len(after)
    assert not stats.records_dropped
    assert stats1.sessions_total == stats2.sessions_total == 1


def test_full_queue_drops_the_oldest_and_counts_them():
    port = free_port()
    records = {i: make_record(i) for i in range(1, 26)}

    async def scenario():
        sink = RecordSink()
        address = TransportAddress("127.0.0.1", port, "tcp")
        async with exporting(address, max_queue_records=10) as exporter:
            add_all(exporter, records)  # nothing listens on the port: all of it queues
            assert exporter.queued == 10
            assert exporter.stats.records_dropped["queue_full"] == 15
            collector = CollectingProcess(address, sink)
            await collector.start()
            try:
                await eventually(lambda: len(sink.records) >= 10, "the queued records")
                assert await exporter.wait_idle(5.0)
                await stop_and_drain(exporter, collector)  # nothing more can come
            finally:
                await collector.stop()
            return sink, exporter.stats

    sink, stats = run(scenario())
    # The newest ten survive, in order; the oldest fifteen were dropped and counted.
    assert sink.counters() == list(range(16, 26))
    assert stats.records_dropped == {"queue_full": 15}
    assert stats.records_sent == 10
    for _, _, record in sink.records:
        assert record == records[record["octetDeltaCount"]]


def test_exporter_stopped_during_an_outage_counts_what_it_could_not_send():
    port = free_port()

    async def scenario():
        address = TransportAddress("127.0.0.1", port, "tcp")
        async with exporting(address) as exporter:
            for i in range(1, 8):
                exporter.add_mapping(V4, make_record(i, ipv6=False))
            await eventually(lambda: exporter.stats.connect_failures >= 1, "a failed attempt")
        return exporter.stats, exporter.queued

    stats, queued = run(scenario())
    assert queued == 0
    assert stats.records_dropped == {"shutdown": 7}
    assert stats.records_sent == 0


def test_backoff_holds_while_records_keep_coming():
    """While the collector is down, records keep arriving (an agent exports every round);
    each must not cut the backoff short, or the exporter reconnects at the rate of records.

    With a constant backoff of 0.5 s there is at most one attempt per 0.5 s of the measured
    time (a slow machine only makes fewer): an upper bound on attempts, not on speed."""
    port = free_port()

    async def scenario():
        loop = asyncio.get_running_loop()
        address = TransportAddress("127.0.0.1", port, "tcp")
        async with exporting(address, backoff_initial=0.5, backoff_max=0.5) as exporter:
            await eventually(lambda: exporter.stats.connect_failures >= 1, "a failed attempt")
            first = exporter.stats.connect_failures
            started = loop.time()
            for i in range(150):
                exporter.add_mapping(V4, make_record(i, ipv6=False))
                await asyncio.sleep(0.01)
            attempts = exporter.stats.connect_failures - first
            elapsed = loop.time() - started
            queued = exporter.queued
        return attempts, elapsed, queued

    attempts, elapsed, queued = run(scenario())
    assert queued == 150
    allowed = int(elapsed / 0.5) + 2
    assert attempts <= allowed, f"{attempts} connection attempts in {elapsed:.1f} s, 0.5 s backoff"


@pytest.mark.parametrize("protocol", ["tcp", "tls"])
def test_stop_sends_what_is_queued(protocol, tls_material):
    records = {i: make_record(i) for i in range(1, 301)}

    async def scenario():
        sink = RecordSink()
        async with collecting(protocol, sink, tls=tls_material) as collector:
            async with exporting(collector, tls=tls_material) as exporter:
                add_all(exporter, records)
                await exporter.stop(drain_timeout=10.0)
                assert exporter.queued == 0
            await eventually(lambda: len(sink.records) >= len(records), "every record")
            # The exporter has stopped: once its session ended, the sink has all it sent.
            await eventually(lambda: collector.stats.sessions_open == 0, "the session ended")
            return sink, exporter.stats

    sink, stats = run(scenario())
    assert_exactly_once(sink, records)
    assert not stats.records_dropped
    assert stats.records_sent == len(records)
