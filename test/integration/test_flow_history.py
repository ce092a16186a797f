"""The flow API's history: records written by the ClickHouse sink's own conversion into
embedded ClickHouse (chDB), read back by the SQL `history` makes of a filter. For every
kind of filter the database must return exactly the records the filter matches in Python,
keyed as the aggregator exported them."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from antrea_flow.aggregator import history
from antrea_flow.aggregator.chschema import records_table
from antrea_flow.aggregator.clickhouse import Database, prepare
from antrea_flow.aggregator.config import ClickHouseConfig
from antrea_flow.flowfilter import parse_filter

NOW = int(time.time())
PODS = [("frontend", "client-1", "10.10.1.2", "node-1"),
        ("frontend", "client-2", "10.10.1.3", "node-1"),
        ("backend", "web-5d4f8c7b9-x2k4q", "10.10.2.3", "node-2"),
        ("backend", "db-0", "10.10.2.4", "node-2"),
        ("kube_system", "dns_1", "fd00:10::5", "node-1")]  # fmt: skip
EXTERNAL = ["192.168.77.254", "fd00:77::fe", "8.8.8.8"]
POLICIES = [("", "", "", 0), ("backend", "web-allow-frontend", "allow-http", 1),
            ("", "acnp-db-guard", "reject-clients", 3), ("", "", "", 2),
            ("backend", "deny_all%", "r_1", 2)]  # fmt: skip


def make_records(count: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        src = rng.choice(PODS)
        external = rng.random() < 0.25
        dst = None if external else rng.choice(PODS)
        v6 = ":" in src[2]
        dst_ip = (rng.choice([a for a in EXTERNAL if (":" in a) == v6])
                  if external else (dst[2] if (":" in dst[2]) == v6 else src[2]))  # fmt: skip
        family = "IPv6" if v6 else "IPv4"
        end_ms = (NOW - rng.randrange(0, 3600)) * 1000 + rng.randrange(1000)
        record = {
            "flowStartSeconds": end_ms // 1000 - 5, "flowEndSeconds": end_ms // 1000,
            "flowStartMilliseconds": end_ms - 5000, "flowEndMilliseconds": end_ms,
            "flowEndReason": rng.choice([1, 2, 3]),
            f"source{family}Address": src[2], f"destination{family}Address": dst_ip,
            "sourceTransportPort": rng.choice([40000 + i, 123, 53]),
            "destinationTransportPort": rng.choice([8080, 80, 53, 5201]),
            "protocolIdentifier": rng.choice([6, 17, 132, 1 if not v6 else 58]),
            "octetDeltaCount": i, "octetTotalCount": i * 2,
            "sourcePodNamespace": src[0], "sourcePodName": src[1], "sourceNodeName": src[3],
            "destinationPodNamespace": dst[0] if dst else "",
            "destinationPodName": dst[1] if dst else "",
            "destinationNodeName": dst[3] if dst else "",
            "flowType": 3 if external else rng.choice([1, 2]),
            "incomplete": rng.random() < 0.1,
        }  # fmt: skip
        if not external and rng.random() < 0.4:
            record[f"destinationClusterIP{'v6' if v6 else 'v4'}"] = (
                "fd00:96::1" if v6 else "10.96.0.10"
            )
            record["destinationServicePort"] = 80
            record["destinationServicePortName"] = rng.choice(
                ["backend/web:http", "kube_system/dns_1:dns"]
            )
        for direction in ("ingress", "egress"):
            ns, name, rule, action = rng.choice(POLICIES)
            record |= {f"{direction}NetworkPolicyNamespace": ns,
                       f"{direction}NetworkPolicyName": name,
                       f"{direction}NetworkPolicyRuleName": rule,
                       f"{direction}NetworkPolicyRuleAction": action}  # fmt: skip
        out.append(record)
    return out


RECORDS = make_records(600)

FILTERS = [
    {},
    {"pod": ["client"]},
    {"pod": ["web"], "namespace": ["backend"]},
    {"pod": ["backend/"]},
    {"from-pod": ["frontend/client-1"], "to-pod": ["db"]},
    {"namespace": ["kube_system"]},
    {"from-namespace": ["frontend"], "to-namespace": ["backend", "frontend"]},
    {"service": ["backend/web"]},
    {"service": ["dns_1"]},
    {"service": ["backend/web:http"]},
    {"node": ["node-2"]},
    {"ip": ["10.10.2.0/24"]},
    {"from-ip": ["fd00:10::/64"]},
    {"to-ip": ["10.96.0.10"]},
    {"to-ip": ["192.168.77.0/24", "fd00:77::/64"]},
    {"port": ["53"]},
    {"from-port": ["123"], "to-port": ["53", "80"]},
    {"protocol": ["udp", "sctp"]},
    {"protocol": ["icmpv6"]},
    {"verdict": ["DROPPED"]},
    {"verdict": ["REJECTED"]},
    {"verdict": ["ALLOWED"]},
    {"verdict": ["ALLOWED", "REJECTED"]},
    {"policy": ["backend/web-allow-frontend"]},
    {"policy": ["acnp-db-guard"]},
    {"policy": ["deny_all%"]},
    {"type": ["to-external"]},
    {"type": ["intra-node", "inter-node"], "verdict": ["DROPPED"], "namespace": ["backend"]},
    {"since": [str(NOW - 600)]},
    {"since": [str(NOW - 1800)], "until": [str(NOW - 900)]},
]


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory):
    config = ClickHouseConfig(url=Path(tmp_path_factory.mktemp("history"), "ch").as_uri())
    db = Database(config)
    db.connect()
    try:
        columns = prepare(db, 0)
        db.insert(records_table(RECORDS, columns), "history-test")
        yield db, columns
    finally:
        db.close()


def key(record: dict) -> tuple:
    return (record.get("sourceIPv4Address") or record["sourceIPv6Address"],
            record["sourceTransportPort"], record["flowEndMilliseconds"])  # fmt: skip


@pytest.mark.parametrize(
    "params", FILTERS, ids=lambda p: "&".join(f"{k}={v}" for k, v in p.items()) or "all"
)
def test_the_database_returns_what_the_filter_matches(database, params):
    db, columns = database
    flow_filter = parse_filter(params, NOW)
    expected = sorted(key(r) for r in RECORDS if flow_filter.matches(r))
    rows = db.rows(history.select(db.database, columns, flow_filter, len(RECORDS)))
    found = history.records(columns, rows)
    assert sorted(key(r) for r in found) == expected
    assert all(flow_filter.matches(r) for r in found)


def test_records_come_back_as_exported(database):
    db, columns = database
    rows = db.rows(history.select(db.database, columns, parse_filter({}, NOW), 3))
    found = history.records(columns, rows)
    newest = sorted(RECORDS, key=lambda r: r["flowEndMilliseconds"])[-3:][::-1]
    assert [r["flowEndMilliseconds"] for r in found] == [r["flowEndMilliseconds"] for r in newest]
    for got, sent in zip(found, newest, strict=True):
        for element, value in sent.items():
            if element.startswith("destinationClusterIP") or value in ("", 0, False):
                continue  # an unset cluster IP is stored as "", as Theia does
            assert got[element] == value, element


# -- the CLI ---------------------------------------------------------------------------------


def test_observe_reads_the_clickhouse_sink_by_url(tmp_path):
    directory = tmp_path / "ch"
    script = (
        "import sys; from antrea_flow.aggregator.clickhouse import Database, prepare;"
        "from antrea_flow.aggregator.chschema import records_table;"
        "from antrea_flow.aggregator.config import ClickHouseConfig;"
        "import json; records = json.load(sys.stdin);"
        f"db = Database(ClickHouseConfig(url={directory.as_uri()!r})); db.connect();"
        "db.insert(records_table(records, prepare(db, 0)), 'observe-test'); db.close()"
    )
    # Written by another process: chDB opens one directory per process, as the aggregator.
    subprocess.run([sys.executable, "-c", script], input=json.dumps(RECORDS), text=True,
                   check=True, timeout=120)  # fmt: skip
    observe = subprocess.run(
        [sys.executable, "-m", "antrea_flow.cli", "observe", "--clickhouse", directory.as_uri(),
         "--verdict", "REJECTED", "--namespace", "backend", "-o", "json", "--last", "5"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert observe.returncode == 0, observe.stderr
    flow_filter = parse_filter({"verdict": ["REJECTED"], "namespace": ["backend"]}, NOW)
    matching = sorted((r for r in RECORDS if flow_filter.matches(r)),
                      key=lambda r: r["flowEndMilliseconds"])  # fmt: skip
    printed = [json.loads(line) for line in observe.stdout.splitlines()]
    assert [key(r) for r in printed] == [key(r) for r in matching[-5:]]
    bad = subprocess.run(
        [sys.executable, "-m", "antrea_flow.cli", "observe", "--clickhouse", "tcp://db:9000"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "--clickhouse: 'tcp://db:9000' uses ClickHouse's native protocol" in bad.stderr
