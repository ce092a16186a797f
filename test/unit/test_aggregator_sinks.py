"""The aggregator's sinks: a JSON-lines file and an IPFIX collector (templates 256/257)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import pytest

from antrea_flow.aggregator import sinks
from antrea_flow.aggregator.aggregation import AggregationStore
from antrea_flow.aggregator.sinks import IPFIXSink, JSONLinesSink
from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.antrea import (
    AGGREGATOR_TEMPLATE_ID_IPV4,
    AGGREGATOR_TEMPLATE_ID_IPV6,
    aggregator_templates,
    exporter_templates,
)
from antrea_flow.ipfix.messages import SessionDecoder

COLLECTOR = TransportAddress("127.0.0.1", 4739, "tcp")  # never connected: the sink is not started


def aggregated(ipv6: bool = False, port: int = 40000, exporter=("192.168.77.101", 3)) -> dict:
    """A record as the store exports it, from a decoded intra-node agent record."""
    template = exporter_templates()[1 if ipv6 else 0]
    record = dict(zip(template.keys, template.values_from({}), strict=True))
    family = "IPv6" if ipv6 else "IPv4"
    record.update(
        {
            f"source{family}Address": "fd00::5" if ipv6 else "10.10.1.5",
            f"destination{family}Address": "fd00::7" if ipv6 else "10.10.1.7",
            "protocolIdentifier": 6,
            "sourceTransportPort": port,
            "destinationTransportPort": 8080,
            "flowStartSeconds": 1000,
            "flowEndSeconds": 1010,
            "packetTotalCount": 4,
            "packetDeltaCount": 4,
            "octetTotalCount": 400,
            "octetDeltaCount": 400,
            "sourcePodName": "client",
            "destinationPodName": "server",
            "flowType": 1,
        }
    )
    store = AggregationStore(60, 90, 60)
    store.add(record, exporter, now=0)
    (out,) = store.expire(0)
    return out


def run(coroutine):
    return asyncio.run(coroutine)


# -- JSON lines -------------------------------------------------------------------------------


def test_json_sink_writes_one_object_per_line_with_bytes_as_hex(tmp_path):
    path = tmp_path / "logs" / "flows.json"  # the directory is created on start
    sink = JSONLinesSink(str(path))
    sink.start()
    first = aggregated(port=1)
    second = {**aggregated(port=2), "raw": b"\x01\xab"}
    sink.send(first)
    sink.send(second)
    run(sink.stop())  # flushes
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    parsed = [json.loads(line) for line in lines]
    assert parsed[0]["sourceTransportPort"] == 1
    assert parsed[0]["packetDeltaCountFromSourceNode"] == 4
    assert parsed[0]["originalExporterIPv4Address"] == "192.168.77.101"
    assert parsed[0]["incomplete"] is False
    assert parsed[1]["raw"] == "01ab"
    assert sink.sent == 2
    assert not any(sink.dropped.values())


def test_json_sink_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "flows.json"
    path.write_text('{"earlier": 1}\n', encoding="utf-8")
    sink = JSONLinesSink(str(path))
    sink.start()
    sink.send(aggregated())
    run(sink.stop())
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == {"earlier": 1}


def test_json_sink_counts_drops_when_its_queue_is_full(tmp_path, monkeypatch):
    monkeypatch.setattr(sinks, "JSON_QUEUE_RECORDS", 3)
    path = tmp_path / "flows.json"
    sink = JSONLinesSink(str(path))
    for port in range(5):  # not started: nothing drains the queue
        sink.send(aggregated(port=port))
    assert sink.dropped["queue_full"] == 2
    sink.start()
    run(sink.stop())
    ports = [json.loads(line)["sourceTransportPort"] for line in path.read_text().splitlines()]
    assert ports == [0, 1, 2]
    assert sink.sent == 3
    assert sink.dropped["queue_full"] == 2


def test_json_sink_stop_writes_everything_sent_before_it(tmp_path):
    path = tmp_path / "flows.json"
    sink = JSONLinesSink(str(path))
    sink.start()
    for port in range(3000):  # more than one write batch
        sink.send({"sourceTransportPort": port})
    run(sink.stop())
    ports = [json.loads(line)["sourceTransportPort"] for line in path.read_text().splitlines()]
    assert ports == list(range(3000))
    assert sink.sent == 3000


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_json_sink_counts_write_errors():
    sink = JSONLinesSink("/dev/full")  # every write fails with ENOSPC
    sink.start()
    sink.send(aggregated(port=1))
    sink.send(aggregated(port=2))
    run(sink.stop())
    assert sink.dropped["write_error"] == 2
    assert sink.sent == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_json_sink_logs_a_persistent_write_error_once(caplog):
    sink = JSONLinesSink("/dev/full")
    sink.start()
    with caplog.at_level(logging.DEBUG, logger="antrea_flow.aggregator.sinks"):
        for failed in range(1, 4):  # one at a time: each is its own failed write
            sink.send(aggregated(port=failed))
            deadline = time.monotonic() + 5
            while sink.dropped["write_error"] < failed and time.monotonic() < deadline:
                time.sleep(0.001)
        run(sink.stop())
    assert sink.dropped["write_error"] == 3
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "/dev/full" in errors[0].getMessage()


# -- IPFIX ------------------------------------------------------------------------------------


def queued(sink: IPFIXSink) -> list[tuple[int, dict]]:
    """The records waiting in the sink's exporting process: the messages its delivery core
    hands a session (no socket needed: it is sans-IO), decoded by an independent session."""
    delivery = sink.exporter.delivery
    decoder = SessionDecoder()
    messages = delivery.open_session(0.0)
    while (message := delivery.next_message(0.0)) is not None:
        delivery.sent(0, 0.0)
        messages.append(message)
    return [
        (data_set.template.template_id, record)
        for message in messages
        for data_set in decoder.decode(message).data_sets
        for record in data_set.records
    ]


def test_ipfix_sink_picks_the_template_by_address_family():
    sink = IPFIXSink(COLLECTOR, observation_domain_id=9, template_refresh=600)
    sink.send(aggregated(ipv6=False))
    sink.send(aggregated(ipv6=True, exporter=("fd00:77::101", 4)))
    assert not any(sink.dropped.values())
    (v4_id, v4), (v6_id, v6) = queued(sink)
    assert v4_id == AGGREGATOR_TEMPLATE_ID_IPV4 == 256
    assert v6_id == AGGREGATOR_TEMPLATE_ID_IPV6 == 257
    assert v4["sourceIPv4Address"] == "10.10.1.5"
    assert v4["originalExporterIPv4Address"] == "192.168.77.101"
    assert v4["originalObservationDomainId"] == 3
    assert v4["packetDeltaCountFromSourceNode"] == 4
    assert v4["octetTotalCountFromDestinationNode"] == 400
    assert v6["sourceIPv6Address"] == "fd00::5"
    assert v6["destinationIPv6Address"] == "fd00::7"
    assert v6["originalExporterIPv6Address"] == "fd00:77::101"
    assert sink.exporter.delivery.observation_domain_id == 9
    assert sink.exporter.delivery.template_refresh == 600


def test_ipfix_sink_carries_pod_labels():
    sink = IPFIXSink(COLLECTOR, observation_domain_id=0, template_refresh=600)
    record = aggregated()
    record["sourcePodLabels"] = json.dumps({"app": "client"})
    sink.send(record)
    ((_, values),) = queued(sink)
    assert json.loads(values["sourcePodLabels"]) == {"app": "client"}


@pytest.mark.parametrize("ipv6", [False, True])
def test_ipfix_sink_templates_hold_every_field_the_store_exports(ipv6):
    record = aggregated(ipv6=ipv6)
    template = aggregator_templates()[1 if ipv6 else 0]
    missing = set(record) - set(template.keys) - {"incomplete"}
    assert not missing, f"exported by the store but not in template {template.template_id}"
