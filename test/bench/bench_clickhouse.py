"""Benchmark: the ClickHouse sink into embedded ClickHouse (chDB), beside the JSON sink.

Records shaped as the aggregator exports them (both address families, Pods of a few
hundred workloads across Nodes and namespaces, Services, policies, times over the last hour)
go through:
- records to Arrow columns (`chschema.records_table`), CPU only;
- columnar batches inserted into the embedded `flows` table (with Theia's three views);
- the whole sink: `send` for every record until the writer has inserted them all;
- the JSON-lines sink on the same records, in the same run (the peer);
then the table is filled to --rows rows and every ClickHouse query of the Grafana
dashboards (build/yamls/flow-visibility/dashboards/, macros expanded as the plugin does,
over the last hour) is timed over it. Rates are per wall second and per CPU second of
this process (chDB's threads included). Timings are printed, never asserted; the last
line is a JSON object.

    test/bench/bench_clickhouse.py [--records N] [--rows N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchkit

from antrea_flow.aggregator.chschema import records_table
from antrea_flow.aggregator.clickhouse import BACKLOG_RECORDS, ClickHouseSink, Database, prepare
from antrea_flow.aggregator.config import ClickHouseConfig
from antrea_flow.aggregator.sinks import JSON_QUEUE_RECORDS, JSONLinesSink

ROOT = Path(__file__).resolve().parents[2]
GOAL_INSERT = 200_000  # records/s on one core, columnar batches (the goal)
BATCH = 65_536
SEND_CHUNK = 4096
QUEUE_BOUND = min(BACKLOG_RECORDS, JSON_QUEUE_RECORDS)  # records each sink queues, at most
NAMESPACES = ("frontend", "backend", "payments", "monitoring", "kube-system")


def pod_ip(index: int, ipv6: bool) -> str:
    return f"fd00:10::{index:x}" if ipv6 else f"10.10.{index // 200}.{index % 200}"


def make_records(count: int, now: int) -> list[dict[str, Any]]:
    """Aggregated records of a busy cluster: 20 Nodes, 400 Pods, 40 Services, a tenth of
    the connections denied, an eighth over IPv6, times over the last hour."""
    rng = random.Random(7)
    pods = [
        (NAMESPACES[i % len(NAMESPACES)], f"app-{i % 40}-{i:03d}", f"node-{i % 20}", i)
        for i in range(400)
    ]
    out = []
    for i in range(count):
        src, dst = rng.choice(pods), rng.choice(pods)
        ipv6 = i % 8 == 0
        # A tenth to addresses outside the cluster, a twentieth from them.
        flow_type = 3 if i % 10 == 5 else 4 if i % 20 == 7 else 1 if src[2] == dst[2] else 2
        family = "IPv6" if ipv6 else "IPv4"
        end = now - rng.randrange(3600)
        octets = rng.randrange(60, 1_000_000)
        denied = i % 10 == 0
        record: dict[str, Any] = {
            "flowStartSeconds": end - rng.randrange(600),
            "flowEndSeconds": end,
            "flowEndSecondsFromSourceNode": end,
            "flowEndSecondsFromDestinationNode": end,
            "flowStartMilliseconds": (end - 600) * 1000,
            "flowEndMilliseconds": end * 1000 + 250,
            "flowEndReason": rng.choice((1, 2, 3)),
            f"source{family}Address": pod_ip(src[3], ipv6),
            f"destination{family}Address": pod_ip(dst[3], ipv6),
            "sourceTransportPort": rng.randrange(32768, 61000),
            "destinationTransportPort": rng.choice((80, 443, 5432, 8080)),
            "protocolIdentifier": 6,
            "packetTotalCount": octets // 500 + 1,
            "octetTotalCount": octets,
            "packetDeltaCount": octets // 1000 + 1,
            "octetDeltaCount": octets // 2,
            "reversePacketTotalCount": octets // 700 + 1,
            "reverseOctetTotalCount": octets * 3,
            "reversePacketDeltaCount": octets // 1400 + 1,
            "reverseOctetDeltaCount": octets,
            "sourcePodNamespace": src[0],
            "sourcePodName": src[1],
            "sourceNodeName": src[2],
            "destinationPodNamespace": dst[0],
            "destinationPodName": dst[1],
            "destinationNodeName": dst[2],
            f"destinationCluster{family}": "fd00:96::10" if ipv6 else f"10.96.0.{dst[3] % 40}",
            "destinationServicePort": 80,
            "destinationServicePortName": f"{dst[0]}/svc-{dst[3] % 40}:http",
            "ingressNetworkPolicyName": f"{dst[0]}-ingress",
            "ingressNetworkPolicyNamespace": dst[0],
            "ingressNetworkPolicyType": 1,
            "ingressNetworkPolicyRuleName": "",
            "ingressNetworkPolicyRuleAction": 2 if denied else 1,
            "egressNetworkPolicyName": "acnp-egress" if i % 3 == 0 else "",
            "egressNetworkPolicyNamespace": "",
            "egressNetworkPolicyType": 3 if i % 3 == 0 else 0,
            "egressNetworkPolicyRuleName": "allow-dns" if i % 3 == 0 else "",
            "egressNetworkPolicyRuleAction": 1 if i % 3 == 0 else 0,
            "tcpState": "ESTABLISHED",
            "flowType": flow_type,
            "sourcePodLabels": f'{{"app": "app-{src[3] % 40}"}}',
            "destinationPodLabels": f'{{"app": "app-{dst[3] % 40}"}}',
            "throughput": octets * 8 // 60,
            "reverseThroughput": octets * 24 // 60,
            "throughputFromSourceNode": octets * 8 // 60,
            "throughputFromDestinationNode": octets * 8 // 60,
            "reverseThroughputFromSourceNode": octets * 24 // 60,
            "reverseThroughputFromDestinationNode": octets * 24 // 60,
            "tcpControlBits": 0x1B,
            "originalExporterIPv4Address": f"192.168.77.{100 + int(dst[2][5:])}",
            "originalObservationDomainId": 1,
        }
        for counter in (
            "packetTotalCount",
            "octetTotalCount",
            "packetDeltaCount",
            "octetDeltaCount",
        ):
            for prefix in ("", "reverse"):
                name = prefix + (counter[0].upper() + counter[1:] if prefix else counter)
                for side in ("SourceNode", "DestinationNode"):
                    record[f"{name}From{side}"] = record[name]
        out.append(record)
    return out


def timed(work) -> tuple[float, float]:
    """Wall and CPU seconds of `work()` (CPU of this process, every thread)."""
    gc.collect()
    wall, cpu = time.perf_counter(), benchkit.cpu_seconds()
    work()
    return time.perf_counter() - wall, benchkit.cpu_seconds() - cpu


def bench_convert(records: list[dict]) -> dict[str, float]:
    wall, cpu = timed(
        lambda: [records_table(records[i : i + BATCH]) for i in range(0, len(records), BATCH)]
    )
    return {"records_per_s": len(records) / wall, "records_per_cpu_s": len(records) / cpu}


def bench_insert(database: Database, tables: list, rows: int) -> dict[str, float]:
    def insert() -> None:
        for i, table in enumerate(tables):
            database.insert(table, f"bench-{time.monotonic_ns()}-{i}")

    wall, cpu = timed(insert)
    return {"records_per_s": rows / wall, "records_per_cpu_s": rows / cpu}


def bench_sink(sink: ClickHouseSink | JSONLinesSink, records: list[dict]) -> dict[str, float]:
    """`send` of every record until the sink's thread has settled them all, offered as fast
    as the sink takes them: a chunk at a time, while its queue is less than half full (both
    sinks drop the oldest from a full queue, and a rate with drops would mean nothing)."""
    sink.start()

    def queued() -> int:  # records the writer has not taken up yet
        if isinstance(sink, ClickHouseSink):
            return sink.pending - sink.held_rows
        return sink.accepted - sink.settled

    def send_all() -> None:
        for start in range(0, len(records), SEND_CHUNK):
            while queued() > QUEUE_BOUND // 2:
                time.sleep(0.001)
            for record in records[start : start + SEND_CHUNK]:
                sink.send(record)
        while sink.settled < sink.accepted:
            time.sleep(0.001)

    wall, cpu = timed(send_all)
    asyncio.run(sink.stop())
    return {
        "records_per_s": len(records) / wall,
        "records_per_cpu_s": len(records) / cpu,
        "dropped": sum(sink.dropped.values()),
    }


def fill(database: Database, tables: list, rows: int, now: int) -> int:
    """The table to `rows` rows: the benchmark's batches again and again."""
    held = database.rows("SELECT count() FROM default.flows")[0][0]
    i = 0
    while held < rows:
        table = tables[i % len(tables)]
        database.insert(table, f"fill-{i}")
        held += table.num_rows
        i += 1
    return held


def bench_panels(database: Database, now: int, repeats: int) -> list[dict[str, Any]]:
    """Every ClickHouse query of the Grafana dashboards, over the last hour."""
    sys.path.insert(0, str(ROOT / "test" / "unit"))
    from grafanakit import panel_queries  # the tests' expansion, as Grafana and the plugin do

    out = []
    for dashboard, panel, sql in panel_queries(database, now - 3600, now):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rows = database.rows(sql)
            times.append(time.perf_counter() - t0)
        out.append({"dashboard": dashboard, "panel": panel, "ms": statistics.median(times) * 1000,
                    "rows": len(rows)})  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, help="records through each sink (400,000)")
    parser.add_argument("--rows", type=int, help="rows the dashboards' queries run over (10M)")
    parser.add_argument("--repeats", type=int, help="runs of each query (3)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    args = parser.parse_args()
    benchkit.fill_sizes(args, records=(50_000, 400_000), rows=(500_000, 10_000_000),
                        repeats=(1, 3))  # fmt: skip
    benchkit.log_warnings()
    now = int(time.time())
    records = make_records(args.records, now)
    print(f"ClickHouse sink, {args.records:,} records ({benchkit.machine()})")
    result: dict[str, Any] = {"records": args.records}
    with tempfile.TemporaryDirectory(prefix="bench-clickhouse-") as tmp:
        directory = Path(tmp)
        config = ClickHouseConfig(url=(directory / "ch").as_uri(), commit_interval=1.0)
        result["convert"] = bench_convert(records)
        tables = [records_table(records[i : i + BATCH]) for i in range(0, len(records), BATCH)]
        database = Database(config)
        database.connect()
        prepare(database, int(config.ttl))
        bench_insert(database, tables[:1], tables[0].num_rows)  # warm the engine up
        result["insert"] = bench_insert(database, tables, len(records))
        database.close()
        # The schema exists by now: the sink's connection at start is quick.
        result["sink"] = bench_sink(ClickHouseSink(config), records)
        result["json"] = bench_sink(JSONLinesSink(str(directory / "flows.jsonl")), records)
        database.connect()
        try:
            result["rows"] = fill(database, tables, args.rows, now)
            result["panels"] = bench_panels(database, now, args.repeats)
        finally:
            database.close()
    stages = {
        "convert": "records to Arrow columns",
        "insert": "columnar batches into chDB (3 views)",
        "sink": "the whole ClickHouse sink",
        "json": "the JSON-lines sink (peer)",
    }
    for name, what in stages.items():
        r = result[name]
        dropped = f"  ({r['dropped']:,} dropped)" if r.get("dropped") else ""
        print(f"  {what:<40} {benchkit.fmt_rate(r['records_per_s'])}  "
              f"{benchkit.fmt_rate(r['records_per_cpu_s'])} per CPU-s{dropped}")  # fmt: skip
    print(f"  goal: {GOAL_INSERT:,} records/s on one core into the embedded database")
    print(f"  Grafana panels over {result['rows']:,} rows, last hour, median of {args.repeats}:")
    for panel in result["panels"]:
        where = f"{panel['dashboard']}: {panel['panel']}"
        print(f"    {panel['ms']:>8.1f} ms  {panel['rows']:>6} rows  {where}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
