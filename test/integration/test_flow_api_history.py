"""The flow API of a running aggregator with the ClickHouse sink: what its window no longer
holds comes from the embedded database (a module of its own: chDB opens one directory per
process, and test_flow_history keeps one open for its module)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

from antrea_flow.aggregator.config import load_aggregator_config
from antrea_flow.aggregator.service import Aggregator
from antrea_flow.ipfix.antrea import exporter_templates
from antrea_flow.ipfix.collecting import Peer
from antrea_flow.ipfix.messages import DataSet, Message

from .ipfixkit import api_aggregator_conf, eventually, free_port

NOW = int(time.time())


def exported(i: int) -> dict:
    """An intra-node record of connection `i` as an agent sends it (exported at once)."""
    template = exporter_templates()[0]
    record = dict(zip(template.keys, template.values_from({}), strict=True))
    record.update(
        sourceIPv4Address="10.10.1.5", destinationIPv4Address="10.10.1.6",
        protocolIdentifier=6, sourceTransportPort=40000 + i, destinationTransportPort=8080,
        flowStartSeconds=NOW - 100, flowEndSeconds=NOW - 50 + i, flowEndReason=3,
        octetTotalCount=100 + i, octetDeltaCount=100 + i, flowType=1,
        sourcePodName="client", sourcePodNamespace="frontend", sourceNodeName="node-1",
        destinationPodName="server", destinationPodNamespace="frontend",
        destinationNodeName="node-1",
    )  # fmt: skip
    return record


def get(port: int, query: str) -> tuple[str, list[dict]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/flows?{query}") as answer:
        lines = answer.read().splitlines()
        return answer.headers["X-Flow-Source"], [json.loads(line)["flow"] for line in lines]


def test_the_api_answers_from_clickhouse_what_its_window_no_longer_holds(tmp_path):
    api_port = free_port()
    database = (tmp_path / "ch").as_uri()
    extra = f"""\
        apiWindowRecords: 3
        clickHouse: {{enable: true, databaseURL: "{database}", commitInterval: 100ms}}
        """
    conf = api_aggregator_conf(tmp_path, api_port, extra)
    aggregator = Aggregator(load_aggregator_config(conf))
    peer = Peer("192.168.77.101", 50001, "tcp", 1)
    template = exporter_templates()[0]

    async def scenario() -> dict[str, tuple[str, list[dict]]]:
        stop = asyncio.Event()
        task = asyncio.create_task(aggregator.run(stop))
        try:
            await eventually(lambda: aggregator.listening, "the aggregator listening")
            records = [exported(i) for i in range(8)]
            message = Message(export_time=0, sequence_number=0, observation_domain_id=11,
                              data_sets=[DataSet(template, records)])  # fmt: skip
            aggregator._intake(peer, message)
            assert aggregator.export_due() == 8
            sink = aggregator.clickhouse
            assert sink is not None
            await eventually(lambda: sink.settled == 8, "the sink storing all 8")
            return {
                query: await asyncio.to_thread(get, api_port, query)
                for query in ("last=2", "last=6", "last=100&from-port=40001&from-port=40006")
            }
        finally:
            stop.set()
            await task

    answers = asyncio.run(asyncio.wait_for(scenario(), 120))
    ports = {q: (source, [r["sourceTransportPort"] - 40000 for r in found])
             for q, (source, found) in answers.items()}  # fmt: skip
    assert ports == {
        "last=2": ("window", [6, 7]),
        "last=6": ("clickhouse", [2, 3, 4, 5, 6, 7]),
        "last=100&from-port=40001&from-port=40006": ("clickhouse", [1, 6]),
    }
    (_, stored) = answers["last=6"]
    assert stored[0]["sourcePodName"] == "client" and stored[0]["octetTotalCount"] == 102
