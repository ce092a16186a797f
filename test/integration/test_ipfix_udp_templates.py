"""UDP template refresh: a collector that missed the exporter's templates decodes its records
once the exporter has announced them again; data before that is counted, not decoded."""

from __future__ import annotations

import socket

from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.collecting import CollectingProcess

from .ipfixkit import (
    V4,
    V6,
    RecordSink,
    add_paced,
    assert_exactly_once,
    eventually,
    exporting,
    free_port,
    make_record,
    run,
    through_sentinel,
)

REFRESH = 0.5


def template_messages(sink: RecordSink) -> int:
    return sum(1 for _, m in sink.messages if {t.template_id for t in m.templates} >= {V4, V6})


def udp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_udp_collector_restarts_on_the_same_port():
    """Once `stop()` has returned the port is free, so a collector can be restarted in place
    (as the aggregator does when its certificates rotate)."""

    async def scenario():
        sink = RecordSink()
        first = CollectingProcess(TransportAddress("127.0.0.1", 0, "udp"), sink)
        await first.start()
        port = first.port
        await first.stop()
        second = CollectingProcess(TransportAddress("127.0.0.1", port, "udp"), sink)
        try:
            await second.start()
            assert second.port == port
        finally:
            await second.stop()

    run(scenario())


def test_collector_started_after_the_exporter_decodes_after_a_refresh():
    port = free_port(socket.SOCK_DGRAM)
    records = {i: make_record(i) for i in range(1, 101)}

    async def scenario():
        sink = RecordSink()
        address = TransportAddress("127.0.0.1", port, "udp")
        async with exporting(address, template_refresh_interval=REFRESH) as exporter:
            # The first templates go out while nothing listens.
            await eventually(lambda: exporter.stats.messages_sent >= 1, "first templates sent")
            collector = CollectingProcess(address, sink)
            await collector.start()
            try:
                await eventually(lambda: template_messages(sink) >= 1, "templates refreshed")
                await add_paced(exporter, records, lambda: len(sink.records))
                await through_sentinel(exporter, sink)  # a duplicate would be in by then
            finally:
                await collector.stop()
            return sink, collector.stats

    sink, stats = run(scenario())
    assert_exactly_once(sink, records)
    assert not stats.malformed


def test_data_before_any_template_is_counted_then_refresh_recovers():
    """Collector A has the templates; it is replaced by collector B on the same port right
    after a refresh, so B sees data for templates it does not know until the next one."""
    early = {i: make_record(i) for i in range(1, 11)}
    unknown = {i: make_record(i, ipv6=False) for i in range(11, 16)}
    late = {i: make_record(i) for i in range(16, 116)}

    async def scenario():
        sink_a, sink_b = RecordSink(), RecordSink()
        a = CollectingProcess(TransportAddress("127.0.0.1", 0, "udp"), sink_a)
        await a.start()
        port = a.port
        address = TransportAddress("127.0.0.1", port, "udp")
        b = CollectingProcess(address, sink_b)
        try:
            async with exporting(address, template_refresh_interval=REFRESH * 2) as exporter:
                await add_paced(exporter, early, lambda: len(sink_a.records))
                # Swap collectors just after a refresh: the next one is a second away.
                seen = template_messages(sink_a)
                await eventually(lambda: template_messages(sink_a) > seen, "a refresh")
                await a.stop()
                # (That `stop` returns before the port is free is checked on its own in
                # test_udp_collector_restarts_on_the_same_port; not this test's subject.)
                await eventually(lambda: udp_port_free(port), "A's port released")
                await b.start()
                for record in unknown.values():
                    assert exporter.add_mapping(V4, record)
                await eventually(lambda: b.stats.malformed["unknown_template"] >= 1, "counted")
                assert not sink_b.records
                # The next refresh teaches B the templates; later records decode.
                await eventually(lambda: template_messages(sink_b) >= 1, "templates refreshed")
                await add_paced(exporter, late, lambda: len(sink_b.records))
                await through_sentinel(exporter, sink_b)  # a duplicate would be in by then
        finally:
            await a.stop()
            await b.stop()
        return sink_a, sink_b, b.stats

    sink_a, sink_b, stats_b = run(scenario())
    assert_exactly_once(sink_a, early)
    assert_exactly_once(sink_b, late)
    assert set(stats_b.malformed) == {"unknown_template"}
    # The records sent before B knew the templates were dropped in their datagrams (UDP
    # has no way back); they were not decoded with a guessed template.
    assert not set(sink_b.counters()) & set(unknown)
