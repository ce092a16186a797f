"""The ClickHouse sink against the real engine: chDB embedded in this process (file://),
and a ClickHouse HTTP interface served by the engine in another process (chserver.py)
for the server path: the schema, every record stored once, a database that is down,
slow, refusing or of another schema, and the aggregator writing through it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from antrea_flow.aggregator.chschema import records_table
from antrea_flow.aggregator.clickhouse import WAKE_RECORDS, ClickHouseSink, Database
from antrea_flow.aggregator.config import ClickHouseConfig, load_aggregator_config
from antrea_flow.aggregator.service import Aggregator
from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.antrea import exporter_templates
from antrea_flow.ipfix.exporting import ExportingProcess

from .ipfixkit import eventually, free_port, make_record
from .nodenet import wait_until

CHSERVER = Path(__file__).with_name("chserver.py")
THEIA_V16_COLUMNS = """
    timeInserted DateTime DEFAULT now(), flowStartSeconds DateTime, flowEndSeconds DateTime,
    flowEndSecondsFromSourceNode DateTime, flowEndSecondsFromDestinationNode DateTime,
    flowEndReason UInt8, sourceIP String, destinationIP String, sourceTransportPort UInt16,
    destinationTransportPort UInt16, protocolIdentifier UInt8, packetTotalCount UInt64,
    octetTotalCount UInt64, packetDeltaCount UInt64, octetDeltaCount UInt64,
    reversePacketTotalCount UInt64, reverseOctetTotalCount UInt64,
    reversePacketDeltaCount UInt64, reverseOctetDeltaCount UInt64, sourcePodName String,
    sourcePodNamespace String, sourceNodeName String, destinationPodName String,
    destinationPodNamespace String, destinationNodeName String, destinationClusterIP String,
    destinationServicePort UInt16, destinationServicePortName String,
    ingressNetworkPolicyName String, ingressNetworkPolicyNamespace String,
    ingressNetworkPolicyRuleName String, ingressNetworkPolicyRuleAction UInt8,
    ingressNetworkPolicyType UInt8, egressNetworkPolicyName String,
    egressNetworkPolicyNamespace String, egressNetworkPolicyRuleName String,
    egressNetworkPolicyRuleAction UInt8, egressNetworkPolicyType UInt8, tcpState String,
    flowType UInt8, sourcePodLabels String, destinationPodLabels String, throughput UInt64,
    reverseThroughput UInt64, throughputFromSourceNode UInt64,
    throughputFromDestinationNode UInt64, reverseThroughputFromSourceNode UInt64,
    reverseThroughputFromDestinationNode UInt64, trusted UInt8 DEFAULT 0
"""


def embedded(path: Path, **changes) -> ClickHouseConfig:
    config = ClickHouseConfig(url=path.as_uri(), database="flows_test", commit_interval=0.1)
    return replace(config, **changes)


def query(config: ClickHouseConfig, sql: str) -> list[tuple]:
    """What the database holds, read through a connection of its own (closed again: chDB
    opens one directory per process)."""
    database = Database(config)
    database.connect()
    try:
        return database.rows(sql)
    finally:
        database.close()


def records(count: int, first: int = 0) -> list[dict]:
    """Records numbered by octetDeltaCount, both address families."""
    out = []
    for i in range(first, first + count):
        record = make_record(i)
        record["flowEndSeconds"] = int(time.time())
        out.append(record)
    return out


def stopped(sink: ClickHouseSink) -> None:
    asyncio.run(sink.stop())


def sink_of(config: ClickHouseConfig) -> ClickHouseSink:
    return ClickHouseSink(config, flush_timeout=1.0)  # stop() tries a refusing one for 1 s


@contextlib.contextmanager
def running(config: ClickHouseConfig) -> Iterator[ClickHouseSink]:
    sink = sink_of(config)
    sink.start()
    try:
        yield sink
    finally:
        stopped(sink)


@contextlib.contextmanager
def chserver(path: Path, port: int, user: str = "default", password: str = ""):
    """The engine serving ClickHouse's HTTP interface on `port`, until the block ends."""
    process = subprocess.Popen(
        [sys.executable, str(CHSERVER), "--port", str(port), "--path", str(path),
         "--user", user, "--password", password],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "listening"
        yield process
    finally:
        process.kill()
        process.wait()


def on_server(port: int, **changes) -> ClickHouseConfig:
    url = f"http://127.0.0.1:{port}"
    return replace(ClickHouseConfig(url, database="flows_test", commit_interval=0.1), **changes)


# -- embedded ---------------------------------------------------------------------------


def test_every_record_is_stored_once_with_its_values_and_the_views_fill(tmp_path):
    config = embedded(tmp_path / "ch")
    sent = records(3000)
    with running(config) as sink:
        for record in sent:
            sink.send(record)
        wait_until(lambda: sink.settled == 3000, "every record settled")
        assert sink.sent == 3000 and sink.dropped == {} and sink.connected
    ((count, octets, distinct),) = query(
        config,
        "SELECT count(), sum(octetDeltaCount), uniqExact(octetDeltaCount) FROM flows_test.flows",
    )
    assert (count, octets, distinct) == (3000, sum(range(3000)), 3000)
    v6 = [r for r in sent if "sourceIPv6Address" in r]
    assert query(
        config,
        f"SELECT count() FROM flows_test.flows WHERE sourceIP = '{v6[0]['sourceIPv6Address']}'",
    ) == [(1,)]
    # Theia's views see the same bytes.
    for view in ("flows_pod_view", "flows_node_view", "flows_policy_view"):
        assert query(config, f"SELECT sum(octetDeltaCount) FROM flows_test.{view}") == [
            (sum(range(3000)),)
        ]
    assert query(config, "SELECT version FROM flows_test.antrea_flow_schema") == [(1,)]


def test_stop_inserts_what_waits_for_the_next_commit(tmp_path):
    config = embedded(tmp_path / "ch", commit_interval=3600.0)
    with running(config) as sink:
        for record in records(100):
            sink.send(record)
    assert sink.settled == sink.sent == 100
    assert query(config, "SELECT count() FROM flows_test.flows") == [(100,)]


def test_what_waits_is_inserted_in_batches_of_at_most_65536_rows(tmp_path):
    config = embedded(tmp_path / "ch", commit_interval=3600.0)
    sent = records(70_000)
    with running(config) as sink:
        # In bursts the writer turns into columns as they come (WAKE_RECORDS each), so
        # that the backlog before it never fills; the rest waits for the stop.
        for start in range(0, 65_536, WAKE_RECORDS):
            for record in sent[start : start + WAKE_RECORDS]:
                sink.send(record)
            wait_until(lambda: sink.held_rows == sink.accepted, "turned into columns")
        for record in sent[65_536:]:
            sink.send(record)
    assert sink.dropped == {}
    assert (sink.sent, sink.inserts) == (70_000, 2)  # 65,536 and 4,464
    assert query(config, "SELECT count() FROM flows_test.flows") == [(70_000,)]


def test_an_existing_database_is_written_again_not_created_again(tmp_path, caplog):
    config = embedded(tmp_path / "ch")
    for first in (0, 100):
        with running(config) as sink:
            for record in records(100, first):
                sink.send(record)
    assert query(config, "SELECT count() FROM flows_test.flows") == [(200,)]
    assert query(config, "SELECT count() FROM flows_test.antrea_flow_schema") == [(1,)]


def test_a_schema_of_a_later_release_is_refused_and_the_records_are_not_settled(tmp_path, caplog):
    config = embedded(tmp_path / "ch")
    database = Database(config)
    database.connect()
    database.command("CREATE TABLE flows_test.antrea_flow_schema (version UInt32) "
                     "ENGINE = MergeTree ORDER BY version")  # fmt: skip
    database.command("INSERT INTO flows_test.antrea_flow_schema VALUES (99)")
    database.close()
    caplog.set_level(logging.ERROR, logger="antrea_flow.aggregator.clickhouse")
    with running(replace(config, commit_interval=3600.0)) as sink:
        for record in records(10):
            sink.send(record)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("version 99" in m and "this one writes version 1" in m for m in errors), errors
    # Kept for the agents' replays after a restart (the checkpoint counts on settled).
    assert sink.sent == 0 and sink.settled == 0 and sink.accepted == 10
    assert not sink.connected


def test_a_flows_table_another_tool_made_gets_the_columns_it_has(tmp_path, caplog):
    config = embedded(tmp_path / "ch")
    database = Database(config)
    database.connect()
    database.command(f"CREATE TABLE flows_test.flows ({THEIA_V16_COLUMNS}) ENGINE = MergeTree "
                     "ORDER BY (timeInserted, flowEndSeconds)")  # fmt: skip
    database.close()
    caplog.set_level(logging.WARNING, logger="antrea_flow.aggregator.clickhouse")
    with running(config) as sink:
        for record in records(50):
            sink.send(record)
        wait_until(lambda: sink.settled == 50, "settled")
    assert sink.sent == 50
    assert query(config, "SELECT count(), sum(octetDeltaCount) FROM flows_test.flows") == [
        (50, sum(range(50)))
    ]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "was not created by antrea-flow" in warning and "tcpControlBits" in warning
    assert "sourcePodName" not in warning  # it has that one
    # Its schema is left alone: no views, no version table.
    tables = {row[0] for row in query(config, "SHOW TABLES FROM flows_test")}
    assert tables == {"flows"}


# -- a server over HTTP ------------------------------------------------------------------


def test_a_server_with_credentials_stores_the_records(tmp_path):
    port = free_port()
    config = on_server(port, username="flows", password="s3cret")
    with chserver(tmp_path / "server", port, "flows", "s3cret"):
        with running(config) as sink:
            for record in records(500):
                sink.send(record)
            wait_until(lambda: sink.settled == 500, "settled")
        assert sink.sent == 500 and sink.inserts >= 1
        assert query(config, "SELECT count(), sum(octetDeltaCount) FROM flows_test.flows") == [
            (500, sum(range(500)))
        ]


def test_wrong_credentials_are_said_once_naming_the_server(tmp_path, caplog):
    port = free_port()
    with chserver(tmp_path / "server", port, "flows", "s3cret"):
        config = on_server(port, username="flows", password="wrong")
        with caplog.at_level(logging.ERROR, logger="antrea_flow.aggregator.clickhouse"):
            sink = sink_of(config)
            sink.start()
            sink.send(make_record(1))
            wait_until(lambda: sink.insert_failures >= 2, "two attempts", timeout=10)
            stopped(sink)
    errors = [r.getMessage() for r in caplog.records if "Authentication failed" in r.getMessage()]
    assert len(errors) == 1, errors
    assert f"http://127.0.0.1:{port}" in errors[0]
    assert sink.settled == 0


def test_a_database_down_at_start_gets_the_records_once_it_is_up(tmp_path, caplog):
    port = free_port()
    config = on_server(port)
    caplog.set_level(logging.INFO, logger="antrea_flow.aggregator.clickhouse")
    sink = sink_of(config)
    sink.start()
    try:
        for record in records(300):
            sink.send(record)
        wait_until(lambda: sink.insert_failures >= 1, "a failed attempt")
        assert sink.sent == 0 and sink.pending == 300
        with chserver(tmp_path / "server", port):
            # Backoff doubles from 1 s: the next attempts come within seconds.
            wait_until(lambda: sink.settled == 300, "inserted after the outage", timeout=20)
            assert query(config, "SELECT count() FROM flows_test.flows") == [(300,)]
    finally:
        stopped(sink)
    messages = [r.getMessage() for r in caplog.records]
    assert any("takes records again" in m for m in messages), messages


def test_beyond_queue_size_the_oldest_records_are_dropped_and_counted(tmp_path):
    port = free_port()
    config = on_server(port, queue_size=100)
    sink = sink_of(config)
    sink.start()
    try:
        for record in records(300):
            sink.send(record)
        wait_until(lambda: sink.dropped.get("queue_full") == 200, "the oldest 200 dropped")
        assert sink.pending == 100
        with chserver(tmp_path / "server", port):
            wait_until(lambda: sink.settled == 300, "the newest inserted", timeout=20)
            kept = query(config, "SELECT min(octetDeltaCount), max(octetDeltaCount), count() "
                                 "FROM flows_test.flows")  # fmt: skip
    finally:
        stopped(sink)
    assert kept == [(200, 299, 100)]
    assert sink.sent == 100


def test_a_batch_sent_again_with_its_token_is_stored_once(tmp_path):
    """What a retry after a lost answer does: the server stored the batch, the sink sends it
    again with the same token."""
    port = free_port()
    config = on_server(port)
    with chserver(tmp_path / "server", port):
        with running(config) as sink:  # creates the schema
            pass
        assert sink.connected is False  # closed at stop
        table = records_table(records(10))
        database = Database(config)
        database.connect()
        try:
            database.insert(table, "batch-1")
            database.insert(table, "batch-1")
            assert database.rows("SELECT count() FROM flows_test.flows") == [(10,)]
            database.insert(table, "batch-2")
            assert database.rows("SELECT count() FROM flows_test.flows") == [(20,)]
        finally:
            database.close()


# -- the aggregator --------------------------------------------------------------------


def _conf(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "flow-aggregator.conf"
    path.write_text(
        f"""
listenAddress: "127.0.0.1:{port}"
aggregatorTransportProtocol: tcp
flowExportInterval: 1s
jsonLogPath: {tmp_path / "flows.jsonl"}
stateDir: {tmp_path / "state"}
metricsBindAddress: ""
clickHouse:
  enable: true
  database: flows_test
  commitInterval: 0.2s
"""
    )
    return path


def test_the_aggregator_stores_what_it_exports_in_the_embedded_database(tmp_path):
    port = free_port()
    config = load_aggregator_config(_conf(tmp_path, port))
    assert config.clickhouse is not None
    assert config.clickhouse.url == (tmp_path / "state" / "clickhouse").as_uri()
    aggregator = Aggregator(config)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(aggregator.run(stop))
        exporter = ExportingProcess(
            TransportAddress("127.0.0.1", port, "tcp"), exporter_templates(), 7
        )
        try:
            await eventually(lambda: aggregator.listening, "listening")
            exporter.start()
            for i in range(200):
                record = make_record(i)
                record["flowType"] = 1  # intra-node: exported without a peer
                exporter.add_mapping(256 + i % 2, record)
            await eventually(
                lambda: aggregator.clickhouse is not None and aggregator.clickhouse.sent == 200,
                "200 records in ClickHouse",
                timeout=30,
            )
            metrics = dict(
                (sample.name, sample.value)
                for family in aggregator.metrics.collect()
                for sample in family.samples
            )
            assert metrics["antrea_flow_aggregator_clickhouse_connected"] == 1
            assert metrics["antrea_flow_aggregator_clickhouse_pending_records"] == 0
        finally:
            await exporter.stop()
            stop.set()
            await task

    asyncio.run(asyncio.wait_for(scenario(), 60))
    logged = (tmp_path / "flows.jsonl").read_text().splitlines()
    assert len(logged) == 200
    stored = query(
        config.clickhouse,
        "SELECT sourceIP, destinationIP, sourcePodName, octetDeltaCount FROM flows_test.flows",
    )
    expected = set()
    for line in logged:
        record = json.loads(line)
        source = record.get("sourceIPv4Address") or record.get("sourceIPv6Address")
        destination = record.get("destinationIPv4Address") or record.get("destinationIPv6Address")
        expected.add((source, destination, record["sourcePodName"], record["octetDeltaCount"]))
    assert set(stored) == expected and len(stored) == 200


def test_without_chdb_the_embedded_database_says_what_is_missing(tmp_path):
    script = (
        "import sys; sys.modules['chdb'] = None\n"  # as if the package were not installed
        "from antrea_flow.aggregator.clickhouse import Database, DatabaseError\n"
        "from antrea_flow.aggregator.config import ClickHouseConfig\n"
        f"database = Database(ClickHouseConfig(url={(tmp_path / 'ch').as_uri()!r}))\n"
        "try:\n    database.connect()\nexcept DatabaseError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=120).stdout  # fmt: skip
    assert "chDB, the embedded engine, cannot be loaded" in out
    assert "install the chdb package, or give an http(s):// databaseURL" in out
