"""The aggregator's checkpoint: written from the store and the sequence tracker, read back by
a restarted aggregator, which then takes from a replay exactly the records it lacks."""

from __future__ import annotations

import asyncio
import json

import pytest

from antrea_flow.aggregator.aggregation import AggregationStore
from antrea_flow.aggregator.checkpoint import (
    Checkpointer,
    CheckpointError,
    ExporterState,
    read,
    write,
)
from antrea_flow.aggregator.sinks import JSONLinesSink
from antrea_flow.ipfix.antrea import exporter_templates
from antrea_flow.ipfix.sequences import Seen, SequenceTracker

TEMPLATE = exporter_templates()[0]
NODE = ("192.168.77.11", 7)


def record(port: int) -> dict:
    out = dict(zip(TEMPLATE.keys, TEMPLATE.values_from({}), strict=True))
    out.update(
        sourceIPv4Address="10.10.1.5",
        destinationIPv4Address="10.10.1.6",
        protocolIdentifier=6,
        sourceTransportPort=port,
        destinationTransportPort=80,
        flowStartSeconds=1000,
        flowEndSeconds=1010,
        packetTotalCount=5,
        packetDeltaCount=5,
        sourcePodName="a",
        destinationPodName="b",
        flowType=1,
    )
    return out


def test_a_checkpoint_round_trips_and_a_bad_one_is_named(tmp_path):
    path = tmp_path / "exporters.checkpoint"
    states = [ExporterState("10.0.0.1", 7, 2**32 - 1, 1234, (5, 2**32 - 2, 9))]
    write(path, states, 99.0)
    assert read(path) == [ExporterState("10.0.0.1", 7, 2**32 - 1, 1234, (5, 9, 2**32 - 2))]
    path.write_text(json.dumps({"version": 99}))
    with pytest.raises(CheckpointError, match="not a version 1 checkpoint"):
        read(path)
    path.write_text("{")
    with pytest.raises(CheckpointError, match=str(path)):
        read(path)


def test_a_restarted_aggregator_takes_back_only_what_it_had_not_exported(tmp_path):
    path = tmp_path / "exporters.checkpoint"
    tracker = SequenceTracker(replays=True)
    store = AggregationStore(60.0, 90.0, 60.0)
    # Records 100..109 of NODE: 100..104 arrive and are exported, 105..109 then arrive.
    tracker.observe(NODE, 100, 5, export_time=1000)
    for seq in range(100, 105):
        store.add(record(40000 + seq), NODE, 1000.0, seq)
    assert len(store.expire(1000.0)) == 5
    tracker.observe(NODE, 105, 5, export_time=1001)
    for seq in range(105, 110):
        store.add(record(40000 + seq), NODE, 1001.0, seq)
    asyncio.run(Checkpointer(path, tracker, store, []).save(1001.5))
    assert read(path)[0].pending == tuple(range(105, 110))
    # Killed here. The restarted aggregator resumes, and the agent replays 100..109.
    restarted = SequenceTracker(replays=True)
    checkpointer = Checkpointer(path, restarted, AggregationStore(60.0, 90.0, 60.0), [])
    assert checkpointer.restore(2000.0) == (1, 5)
    assert restarted.observe(NODE, 100, 10, export_time=1001) == Seen(10, (5, 6, 7, 8, 9))
    counts = restarted.counts
    assert (counts.recovered, counts.repeated, counts.lost) == (5, 5, 0)


def test_records_a_restored_exporter_never_replays_are_lost_after_the_grace(tmp_path):
    path = tmp_path / "exporters.checkpoint"
    write(path, [ExporterState(NODE[0], NODE[1], 110, 1001, (105, 106))], 1001.0)
    tracker = SequenceTracker(replays=True)
    checkpointer = Checkpointer(path, tracker, AggregationStore(60.0, 90.0, 60.0), [], grace=600.0)
    checkpointer.restore(2000.0)
    asyncio.run(checkpointer.tick(2599.0))
    assert tracker.counts.lost == 0
    asyncio.run(checkpointer.tick(2600.0))
    assert tracker.counts.lost == 2


def test_a_checkpoint_is_written_only_when_something_happened(tmp_path):
    path = tmp_path / "exporters.checkpoint"
    tracker = SequenceTracker(replays=True)
    store = AggregationStore(60.0, 90.0, 60.0)
    checkpointer = Checkpointer(path, tracker, store, [], interval=1.0)
    asyncio.run(checkpointer.tick(0.0))
    assert checkpointer.writes == 1
    asyncio.run(checkpointer.tick(5.0))
    assert checkpointer.writes == 1, "written again with nothing new"
    tracker.observe(NODE, 0, 1, export_time=5)
    store.add(record(1), NODE, 5.0, 0)
    asyncio.run(checkpointer.tick(5.5))
    assert checkpointer.writes == 2 and read(path)[0].pending == (0,)
    store.add(record(2), NODE, 5.6, 1)
    asyncio.run(checkpointer.tick(6.0))
    assert checkpointer.writes == 2, "written again within the interval"
    asyncio.run(checkpointer.tick(6.5))
    assert checkpointer.writes == 3 and read(path)[0].pending == (0, 1)


def test_an_export_is_pending_until_the_sink_has_written_it(tmp_path):
    """Before, a record counted as exported once handed to a sink: killed with records in the
    JSON sink's queue, the aggregator never took them back from the replay (776 of 8,000
    under load)."""
    path = tmp_path / "exporters.checkpoint"
    tracker = SequenceTracker(replays=True)
    store = AggregationStore(60.0, 90.0, 60.0)
    sink = JSONLinesSink(str(tmp_path / "flows.jsonl"))  # its writer not started yet
    checkpointer = Checkpointer(path, tracker, store, [sink], interval=1.0)
    tracker.observe(NODE, 0, 3, export_time=5)
    for seq in range(3):
        store.add(record(seq + 1), NODE, 5.0, seq)
    for exported in store.expire(5.0):
        sink.send(exported)
    asyncio.run(checkpointer.save(5.5))
    assert read(path)[0].pending == (0, 1, 2), "counted as exported while in the sink's queue"
    asyncio.run(checkpointer.tick(6.0))
    assert checkpointer.writes == 1, "written again within the interval"

    sink.start()
    asyncio.run(sink.stop())  # written and flushed
    assert sink.settled == 3
    asyncio.run(checkpointer.tick(6.6))
    assert checkpointer.writes == 2, "not written again once the sink settled"
    assert read(path)[0].pending == ()
