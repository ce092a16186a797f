"""Many exporters at once against one collector: each its own session, every record once."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from .ipfixkit import (
    WAIT,
    RecordSink,
    assert_exactly_once,
    client_ssl,
    collecting,
    eventually,
    exporting,
    make_record,
    run,
    template_id_of,
)

EXPORTERS = 50
RECORDS_EACH = 40


@pytest.mark.parametrize("protocol", ["tls", "tcp"])
def test_fifty_exporters_at_once(protocol, tls_material):
    # Exporter k sends counters k*1000+1 .. k*1000+RECORDS_EACH in observation domain k.
    sent = {
        k * 1000 + j: make_record(k * 1000 + j)
        for k in range(1, EXPORTERS + 1)
        for j in range(1, RECORDS_EACH + 1)
    }

    async def scenario():
        sink = RecordSink()
        async with collecting(protocol, sink, tls=tls_material) as collector:
            async with contextlib.AsyncExitStack() as stack:
                context = client_ssl(tls_material) if protocol == "tls" else None
                exporters = [
                    await stack.enter_async_context(
                        exporting(collector, ssl_context=context, domain=k)
                    )
                    for k in range(1, EXPORTERS + 1)
                ]

                async def produce(k: int) -> None:
                    exporter = exporters[k - 1]
                    for j in range(1, RECORDS_EACH + 1):
                        record = sent[k * 1000 + j]
                        assert exporter.add_mapping(template_id_of(record), record)
                        if j % 10 == 0:
                            await asyncio.sleep(0)

                await asyncio.gather(*(produce(k) for k in range(1, EXPORTERS + 1)))
                await eventually(lambda: len(sink.records) >= len(sent), "every record")
                assert collector.stats.sessions_open == EXPORTERS
                # Once every session has ended the collector has read all they carried: a
                # duplicate would be in the sink by then.
                for exporter in exporters:
                    await exporter.stop(drain_timeout=WAIT)
                await eventually(lambda: collector.stats.sessions_open == 0, "sessions ended")
                stats = [e.stats for e in exporters]
            return sink, collector.stats, stats

    sink, cstats, estats = run(scenario())
    assert_exactly_once(sink, sent)
    assert cstats.sessions_total == EXPORTERS
    assert not cstats.refused and not cstats.malformed
    assert cstats.lost_records == 0
    assert all(s.connections == 1 and s.records_sent == RECORDS_EACH for s in estats)
    # Each exporter's records came in its own session, under its own observation domain.
    sessions: dict[int, set[int]] = {}
    for peer, message in sink.messages:
        sessions.setdefault(message.observation_domain_id, set()).add(peer.session_id)
        for data_set in message.data_sets:
            for record in data_set.records:
                assert record["octetDeltaCount"] // 1000 == message.observation_domain_id
    assert sorted(sessions) == list(range(1, EXPORTERS + 1))
    assert all(len(ids) == 1 for ids in sessions.values())
    assert len({next(iter(ids)) for ids in sessions.values()}) == EXPORTERS
