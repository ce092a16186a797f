"""The Grafana dashboards and the flow-visibility manifest (build/grafana.py).

Every ClickHouse query of every dashboard runs in chDB against the real schema after a
quickstart-sized load, expanded as Grafana and the ClickHouse plugin expand it: the
template variables as Grafana's template service does, ad-hoc filters and
$__conditionalAll as the plugin's frontend does (src/data/adHocFilter.ts, CHDatasource.ts
applyTemplateVariables), and the macros as its backend does (pkg/macros/macros.go, through
sqlds' interpolate: `\\$__name\\b(?:\\((.*?)\\))?`, arguments split on commas). Every
Prometheus query names only metrics that the agent's and the aggregator's registries
export. The manifest validates against the Kubernetes schemas.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from grafanakit import (
    DASHBOARD_DIR,
    Request,
    adhoc_table,
    call_end,
    clickhouse_queries,
    dashboards,
    interpolate,
    is_clickhouse,
    request_for,
)
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from antrea_flow.aggregator.chschema import VIEWS, records_table
from antrea_flow.aggregator.clickhouse import Database, prepare
from antrea_flow.aggregator.config import ClickHouseConfig, load_aggregator_config
from antrea_flow.aggregator.service import Aggregator
from antrea_flow.ebpf.counter import PacketCounter
from antrea_flow.exporter.agent import Agent
from antrea_flow.exporter.config import load_agent_config

ROOT = Path(__file__).resolve().parents[2]
YAMLS = ROOT / "build" / "yamls"
MANIFEST = YAMLS / "flow-visibility" / "flow-visibility.yml"
BUILT_IN_PANELS = {"table", "timeseries", "barchart", "piechart", "stat", "bargauge",
                   "nodeGraph", "text", "dashlist"}  # fmt: skip
SYSTEM_NAMESPACES = ("kube-system", "flow-visibility", "flow-aggregator")


def generator():
    spec = importlib.util.spec_from_file_location("grafana", ROOT / "build" / "grafana.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def find(kind: str, name: str, namespace: str = "flow-visibility") -> dict[str, Any]:
    found = [
        d
        for d in documents()
        if d["kind"] == kind
        and d["metadata"]["name"] == name
        and d["metadata"].get("namespace") == namespace
    ]
    assert len(found) == 1, f"{kind} {namespace}/{name}: {len(found)} found"
    return found[0]


DASHBOARDS = dashboards()


QUERIES = clickhouse_queries(DASHBOARDS)
QUERY_IDS = [f"{name}: {what}" for name, what, _ in QUERIES]


# -- a quickstart's flows, on the lab's cluster ---------------------------------------------

NOW = int(time.time())
START, END = NOW - 3600, NOW + 60  # the dashboards' default range, now-1h to now
LAB = yaml.safe_load((ROOT / "antrea_flow" / "lab" / "default_cluster.yaml").read_text())["items"]


def _lab(kind: str) -> list[dict[str, Any]]:
    return [item for item in LAB if item["kind"] == kind]


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    node: str
    ipv4: str
    ipv6: str
    labels: str


def _pods() -> dict[str, Pod]:
    """The lab's Pods with addresses from their Node's CIDRs, and a CoreDNS Pod (a system
    namespace, which most dashboards leave out)."""
    cidrs = {n["metadata"]["name"]: n["spec"]["podCIDRs"] for n in _lab("Node")}
    items = [*_lab("Pod"), {"metadata": {"name": "coredns-7db6d8ff4d-k2x9p",
             "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
             "spec": {"nodeName": "node-1"}}]  # fmt: skip
    pods, used = {}, dict.fromkeys(cidrs, 0)
    for item in items:
        node = item["spec"]["nodeName"]
        used[node] += 1
        v4, v6 = (str(ipaddress.ip_network(c)[used[node] + 1]) for c in cidrs[node])
        meta = item["metadata"]
        labels = json.dumps(meta.get("labels", {}), separators=(",", ":"))
        pods[f"{meta['namespace']}/{meta['name']}"] = Pod(
            meta["namespace"], meta["name"], node, v4, v6, labels
        )
    return pods


PODS = _pods()
(WEB_SERVICE,) = _lab("Service")
(K8S_POLICY,) = [p for p in _lab("NetworkPolicy")]
(ACNP,) = _lab("ClusterNetworkPolicy")
ACNP_RULES = {rule["name"]: rule["action"] for rule in ACNP["spec"]["ingress"]}
ALLOW, DROP, REJECT = 1, 2, 3
K8S_NP, ANP, CLUSTER_NP = 1, 2, 3
ACTIONS = {"Allow": ALLOW, "Drop": DROP, "Reject": REJECT}
# (name, namespace, rule, action, type): the lab's policies, and Antrea NetworkPolicies and
# a ClusterNetworkPolicy egress rule the lab does not have.
WEB_ALLOW = (K8S_POLICY["metadata"]["name"], K8S_POLICY["metadata"]["namespace"], "",
             ALLOW, K8S_NP)  # fmt: skip
DB_ALLOW_WEB = (ACNP["metadata"]["name"], "", "allow-web", ACTIONS[ACNP_RULES["allow-web"]],
                CLUSTER_NP)  # fmt: skip
DB_REJECT_CLIENTS = (ACNP["metadata"]["name"], "", "reject-clients",
                     ACTIONS[ACNP_RULES["reject-clients"]], CLUSTER_NP)  # fmt: skip
CLIENT_EGRESS = ("anp-client-egress", "frontend", "allow-web", ALLOW, ANP)
WEB_EGRESS = ("anp-web-egress", "backend", "allow-https", ALLOW, ANP)
DB_EGRESS = ("anp-db-egress", "backend", "drop-external", DROP, ANP)
NO_METADATA = ("acnp-deny-metadata", "", "drop-metadata", DROP, CLUSTER_NP)


@dataclass(frozen=True)
class Connection:
    source: str  # "namespace/pod" or an address outside the cluster
    destination: str
    port: int
    bytes_per_minute: int
    protocol: int = 6
    service: bool = False  # dialled through the lab's Service web
    ingress: tuple | None = None
    egress: tuple | None = None
    ipv6: bool = False
    minutes: int = 58  # exported every minute for this long, up to a minute ago
    steady: bool = False  # the same bytes every minute

    @property
    def denied(self) -> bool:
        return any(rule and rule[3] in (DROP, REJECT) for rule in (self.ingress, self.egress))


CONNECTIONS = [
    # Through the Service: intra-Node and inter-Node, allowed on both sides.
    Connection("frontend/client-1", "backend/web-1", 8080, 240_000, service=True,
               ingress=WEB_ALLOW, egress=CLIENT_EGRESS),
    Connection("frontend/client-2", "backend/web-1", 8080, 180_000, service=True,
               ingress=WEB_ALLOW),
    Connection("frontend/client-1", "backend/web-2", 8080, 150_000, service=True,
               ingress=WEB_ALLOW),
    Connection("frontend/client-2", "backend/web-2", 8080, 90_000, service=True,
               ingress=WEB_ALLOW, minutes=30),
    # Pod to Pod over IPv6, steady.
    Connection("frontend/client-1", "backend/web-2", 5201, 12_000_000, ingress=WEB_ALLOW,
               ipv6=True, steady=True),
    # The database: allowed from web, rejected from the clients.
    Connection("backend/web-1", "backend/db", 5432, 60_000, ingress=DB_ALLOW_WEB),
    Connection("backend/web-2", "backend/db", 5432, 75_000, ingress=DB_ALLOW_WEB),
    Connection("frontend/client-1", "backend/db", 5432, 300, ingress=DB_REJECT_CLIENTS),
    Connection("frontend/client-2", "backend/db", 5432, 240, ingress=DB_REJECT_CLIENTS,
               minutes=20),
    # Outside the cluster: allowed, dropped by egress rules, no policy; and from outside.
    Connection("backend/web-1", "93.184.216.34", 443, 45_000, egress=WEB_EGRESS),
    Connection("backend/db", "203.0.113.50", 443, 180, egress=DB_EGRESS),
    Connection("frontend/client-2", "169.254.169.254", 80, 120, egress=NO_METADATA,
               minutes=12),
    Connection("frontend/client-2", "142.250.180.14", 443, 30_000),
    Connection("198.51.100.7", "backend/web-1", 8080, 20_000),
    # DNS in kube-system.
    Connection("frontend/client-1", "kube-system/coredns-7db6d8ff4d-k2x9p", 53, 2_000,
               protocol=17),
    Connection("backend/web-2", "kube-system/coredns-7db6d8ff4d-k2x9p", 53, 1_500,
               protocol=17),
]  # fmt: skip


def _record(index: int, connection: Connection, minute: int) -> dict[str, Any]:
    """The aggregated record the aggregator exports for `connection` `minute` minutes ago."""
    src, dst = PODS.get(connection.source), PODS.get(connection.destination)
    end = NOW - 60 * minute - index  # spread over each minute, one record per minute
    start = NOW - 60 * (connection.minutes + 1) - index
    octets = connection.bytes_per_minute * (1 if connection.steady else 1 + minute % 5 / 10)
    octets = int(octets)
    reverse = 0 if connection.denied else octets // 4
    family = 6 if connection.ipv6 else 4
    address = {
        None: lambda name: name,
        4: lambda name: PODS[name].ipv4,
        6: lambda name: PODS[name].ipv6,
    }
    flow_type = (1 if src.node == dst.node else 2) if src and dst else (3 if src else 4)
    record: dict[str, Any] = {
        "flowStartSeconds": start,
        "flowEndSeconds": end,
        "flowEndSecondsFromSourceNode": end if src else 0,
        "flowEndSecondsFromDestinationNode": end if dst else 0,
        "flowEndReason": 2,
        f"sourceIPv{family}Address": address[family if src else None](connection.source),
        f"destinationIPv{family}Address": address[family if dst else None](connection.destination),
        "sourceTransportPort": 40000 + index * 7,
        "destinationTransportPort": connection.port,
        "protocolIdentifier": connection.protocol,
        "packetDeltaCount": max(1, octets // 1200),
        "octetDeltaCount": octets,
        "packetTotalCount": max(1, octets // 1200) * (connection.minutes - minute + 1),
        "octetTotalCount": octets * (connection.minutes - minute + 1),
        "reversePacketDeltaCount": reverse // 1200,
        "reverseOctetDeltaCount": reverse,
        "reversePacketTotalCount": reverse // 1200 * (connection.minutes - minute + 1),
        "reverseOctetTotalCount": reverse * (connection.minutes - minute + 1),
        "tcpState": "ESTABLISHED" if connection.protocol == 6 and not connection.denied else "",
        "flowType": flow_type,
        "throughput": octets * 8 // 60,
        "reverseThroughput": reverse * 8 // 60,
        "incomplete": False,
    }
    for side, pod in (("source", src), ("destination", dst)):
        if pod:
            record[f"{side}PodName"] = pod.name
            record[f"{side}PodNamespace"] = pod.namespace
            record[f"{side}NodeName"] = pod.node
            record[f"{side}PodLabels"] = pod.labels
            for name in ("octetDeltaCount", "packetDeltaCount", "reverseOctetDeltaCount"):
                record[f"{name}From{side.capitalize()}Node"] = record[name]
            record[f"throughputFrom{side.capitalize()}Node"] = record["throughput"]
    if connection.service:
        ports = WEB_SERVICE["spec"]["ports"][0]
        meta = WEB_SERVICE["metadata"]
        record[f"destinationClusterIPv{family}"] = WEB_SERVICE["spec"]["clusterIPs"][0]
        record["destinationServicePort"] = ports["port"]
        record["destinationServicePortName"] = f"{meta['namespace']}/{meta['name']}:{ports['name']}"
    else:
        record[f"destinationClusterIPv{family}"] = "::" if connection.ipv6 else "0.0.0.0"
    for direction in ("ingress", "egress"):
        rule = getattr(connection, direction)
        if rule:
            name, namespace, rule_name, action, kind = rule
            record[f"{direction}NetworkPolicyName"] = name
            record[f"{direction}NetworkPolicyNamespace"] = namespace
            record[f"{direction}NetworkPolicyRuleName"] = rule_name
            record[f"{direction}NetworkPolicyRuleAction"] = action
            record[f"{direction}NetworkPolicyType"] = kind
    return record


RECORDS = [
    _record(index, connection, minute)
    for index, connection in enumerate(CONNECTIONS)
    for minute in range(1, connection.minutes + 1)
]
# Before the dashboards' time range: never counted.
OLD_RECORDS = [_record(0, replace(CONNECTIONS[0], minutes=120), m) for m in (70, 90, 120)]


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """The aggregator's schema in chDB, holding RECORDS and OLD_RECORDS; closed after the
    module (chDB serves one path per process)."""
    db = Database(ClickHouseConfig(url=tmp_path_factory.mktemp("clickhouse").as_uri()))
    db.connect()
    try:
        prepare(db, 12 * 3600)
        db.insert(records_table(RECORDS + OLD_RECORDS), "quickstart")
        yield db
    finally:
        db.close()


def test_the_load_is_a_quickstart():
    assert 500 <= len(RECORDS) <= 3000
    flow_types = {r["flowType"] for r in RECORDS}
    assert flow_types == {1, 2, 3, 4}
    rules = {
        (direction, r[f"{direction}NetworkPolicyType"], r[f"{direction}NetworkPolicyRuleAction"])
        for r in RECORDS
        for direction in ("ingress", "egress")
        if r.get(f"{direction}NetworkPolicyName")
    }
    assert {kind for _, kind, _ in rules} == {K8S_NP, ANP, CLUSTER_NP}
    assert {action for _, _, action in rules} == {ALLOW, DROP, REJECT}
    assert {(d, a in (DROP, REJECT)) for d, _, a in rules} == {
        ("ingress", False), ("ingress", True), ("egress", False), ("egress", True)
    }  # fmt: skip
    assert all(START <= r["flowEndSeconds"] <= NOW for r in RECORDS)


def test_the_expansion_follows_the_plugin():
    request = Request(START, END, 60, {"namespace": ["$__all"]}, {"namespace": ["a", "b"]},
                      {}, [("flows.sourcePodName", "=", "x")], "flows")  # fmt: skip
    sql = (
        "SELECT $__timeInterval(t) AS time FROM flows WHERE $__timeFilter(t) AND "
        "$__conditionalAll(ns IN (${namespace:singlequote}), $namespace) AND n = $__interval_s"
    )
    assert interpolate(sql, request) == (
        f"SELECT toStartOfInterval(toDateTime(t), INTERVAL 60 second) AS time FROM flows "
        f"WHERE t >= toDateTime({START}) AND t <= toDateTime({END}) AND 1=1 AND n = 60 "
        "settings additional_table_filters={'flows' : ' sourcePodName = \\'x\\' '}"
    )
    request.current["namespace"] = ["b"]
    assert "ns IN ('b')" in interpolate(sql, request)
    request.current["namespace"] = ["$__all"]
    assert "ns IN ('a','b')" in interpolate("ns IN (${namespace:singlequote})", request)
    # The ad-hoc filters are for the flows table only, as clickhouse_adhoc_query names it.
    assert "settings" not in interpolate("SELECT 1 FROM flows_pod_view", request)


def run(database: Database, sql: str, request: Request):
    """(column names and types, rows) of `sql` expanded for `request`."""
    expanded = interpolate(sql, request)
    rows = database.rows(expanded)
    columns = [(row[0], row[1]) for row in database.rows(f"DESCRIBE TABLE ({expanded})")]
    return columns, rows


def panel_queries(name: str) -> list[str]:
    return [sql for dashboard, what, sql in QUERIES
            if dashboard == name and not what.startswith("variable ")]  # fmt: skip


# -- the dashboards --------------------------------------------------------------------------


def test_the_committed_files_are_what_the_generator_writes():
    outputs = generator().outputs()
    committed = {
        str(path.relative_to(YAMLS))
        for path in (YAMLS / "flow-visibility").rglob("*")
        if path.is_file()
    }
    assert committed == set(outputs), "build/yamls/flow-visibility: run build/grafana.py"
    for relative, text in outputs.items():
        assert (YAMLS / relative).read_text() == text, (
            f"build/yamls/{relative} is stale: run `make manifests` (or build/grafana.py)"
        )


def test_the_dashboards_are_theias_set_and_the_metrics():
    uids = {d["uid"]: d["title"] for d in DASHBOARDS.values()}
    # Theia's uids: links and bookmarks to Theia's dashboards keep working.
    theia = {"Yw6zwRkVk", "t1UGX7t7k", "Yxn0Ghh7k", "LGdxbW17z", "K9SPrnJ7k", "1F56RJh7z",
             "KJNMOwQnk", "yRVDEad4k"}  # fmt: skip
    assert set(uids) == theia | {"antrea-flow-metrics"}
    clickhouse = {name for name, dashboard in DASHBOARDS.items() if is_clickhouse(dashboard)}
    assert {name for name, _, _ in QUERIES} == clickhouse and len(clickhouse) == 8


def provisioned_datasources() -> dict[str, str]:
    """uid -> type of the datasources the manifest provisions."""
    configmap = find("ConfigMap", "grafana-datasource-provider")
    datasources = yaml.safe_load(configmap["data"]["datasources.yaml"])["datasources"]
    return {d["uid"]: d["type"] for d in datasources}


def resolve(ref: dict[str, str], dashboard: dict[str, Any]) -> str:
    """The uid a datasource reference means: itself, or the default of the datasource
    variable it names (which must be of the same plugin)."""
    uid = ref["uid"]
    match = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", uid)
    if match:
        (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] in match.groups()]
        assert variable["type"] == "datasource" and variable["query"] == ref["type"]
        uid = variable["current"]["value"]
    return uid


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_dashboard_is_valid(name):
    dashboard = DASHBOARDS[name]
    panels = dashboard["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] in BUILT_IN_PANELS, f"{panel['title']}: {panel['type']}"
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    datasources = provisioned_datasources()
    refs = [v["datasource"] for v in dashboard["templating"]["list"] if "datasource" in v]
    for panel in panels:
        if panel["type"] in ("text", "dashlist"):
            continue
        refs.append(panel["datasource"])
        refs += [t["datasource"] for t in panel["targets"]]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    for ref in refs:
        assert datasources[resolve(ref, dashboard)] == ref["type"], ref
    assert dashboard["time"] == {"from": "now-1h", "to": "now"} and dashboard["timepicker"]
    if is_clickhouse(dashboard):
        kinds = {v["name"]: v["type"] for v in dashboard["templating"]["list"]}
        assert kinds == {"datasource": "datasource", "namespace": "query", "Filter": "adhoc",
                         "clickhouse_adhoc_query": "constant"}  # fmt: skip
        assert adhoc_table(dashboard) == "flows"


@pytest.mark.parametrize(("name", "what", "sql"), QUERIES, ids=QUERY_IDS)
def test_every_clickhouse_query_returns_rows(database, name, what, sql):
    request = request_for(DASHBOARDS[name], database, START, END)
    columns, rows = run(database, sql, request)
    assert rows, f"no rows:\n{interpolate(sql, request)}"
    panel = next((p for p in DASHBOARDS[name]["panels"] if what.startswith(p["title"] + " [")),
                 None)  # fmt: skip
    if panel is None:  # a variable
        return
    (target,) = [t for t in panel["targets"] if what.endswith(f"[{t['refId']}]")]
    numeric = [n for n, t in columns if re.match(r"(U?Int|Float|Decimal)", t)]
    if target["format"] == 0:  # a time series: time, the series' label, its value
        assert [n for n, _ in columns] == ["time", "label", "value"]
        assert columns[0][1].startswith("DateTime") and columns[1][1] == "String"
        assert numeric == ["value"]
    elif panel["type"] in ("piechart", "bargauge"):
        assert [n for n, _ in columns] == ["label", "value"] and numeric == ["value"]
    elif panel["type"] == "stat":
        assert numeric and len(rows) == 1


@pytest.mark.parametrize(("name", "what", "sql"), QUERIES, ids=QUERY_IDS)
def test_every_clickhouse_query_runs_for_a_namespace_and_an_adhoc_filter(database, name, what, sql):
    dashboard = DASHBOARDS[name]
    request = request_for(dashboard, database, START, END, ["backend"])
    columns, rows = run(database, sql, request)
    assert rows, f"no rows for namespace backend:\n{interpolate(sql, request)}"
    request = request_for(
        dashboard, database, START, END, filters=[("sourcePodNamespace", "=", "frontend")]
    )
    database.rows(interpolate(sql, request))  # ClickHouse takes it


def test_the_time_range_namespaces_and_adhoc_filters_select_the_records(database):
    (sql,) = [
        t["rawSql"]
        for p in DASHBOARDS["flow_records_dashboard.json"]["panels"]
        if p["title"] == "Flow Records Count"
        for t in p["targets"]
    ]

    def count(**selection) -> int:
        request = request_for(
            DASHBOARDS["flow_records_dashboard.json"], database, START, END, **selection
        )
        return run(database, sql, request)[1][0][0]

    assert count() == len(RECORDS)  # not OLD_RECORDS: before the time range
    backend = [r for r in RECORDS if "backend" in (r.get("sourcePodNamespace"),
                                                   r.get("destinationPodNamespace"))]  # fmt: skip
    assert count(namespaces=["backend"]) == len(backend) < len(RECORDS)
    frontend = [r for r in RECORDS if r.get("sourcePodNamespace") == "frontend"]
    assert count(filters=[("sourcePodNamespace", "=", "frontend")]) == len(frontend)
    assert count(namespaces=["backend"], filters=[("sourcePodNamespace", "=", "frontend")]) == len(
        [r for r in frontend if r in backend]
    )


def test_system_namespaces_are_left_out_where_theia_leaves_them_out(database):
    for name, dashboard in DASHBOARDS.items():
        if not is_clickhouse(dashboard):
            continue
        request = request_for(dashboard, database, START, END)
        seen = " ".join(
            str(value)
            for sql in panel_queries(name)
            for row in run(database, sql, request)[1]
            for value in row
        )
        shown = any(ns in seen for ns in SYSTEM_NAMESPACES) or "coredns" in seen
        # Theia's Flow Records show every record; the other dashboards leave them out.
        assert shown == (name == "flow_records_dashboard.json"), name


def test_throughput_is_in_bits_per_second(database):
    dashboard = DASHBOARDS["pod_to_pod_dashboard.json"]
    (panel,) = [p for p in dashboard["panels"] if p["title"] == "Throughput of Pod-to-Pod"]
    assert panel["fieldConfig"]["defaults"]["unit"] == "bps"
    _, rows = run(
        database, panel["targets"][0]["rawSql"], request_for(dashboard, database, START, END)
    )
    pair = "frontend/client-1 -> backend/web-2"  # the steady IPv6 flow and a Service flow
    # In time order: the client's timezone decides how the times read, not the buckets.
    shown = sorted((time_, value) for time_, label, value in rows if label == pair)
    expected: dict[int, float] = {}
    for r in RECORDS:
        if (r.get("sourcePodName"), r.get("destinationPodName")) == ("client-1", "web-2"):
            minute = r["flowEndSeconds"] // 60 * 60
            expected[minute] = expected.get(minute, 0) + r["octetDeltaCount"] * 8 / 60
    assert len(shown) == len(expected) >= 50
    for (_, value), minute in zip(shown, sorted(expected), strict=True):
        assert value == pytest.approx(expected[minute])


def summed_outside_sum(sql: str) -> list[str]:
    """Columns a SummingMergeTree view sums that `sql` reads outside sum()/sumIf():
    unmerged parts hold several rows of one key, so only their sum is the value."""
    sql = re.sub(r"`[^`]*`|'[^']*'", lambda m: " " * len(m[0]), sql)  # aliases, strings
    spans = [(m.end() - 1, call_end(sql, m.end() - 1)) for m in re.finditer(r"\bsum(If)?\(", sql)]
    summed = {column for _, sums in VIEWS.values() for column in sums}
    return [
        m[0]
        for m in re.finditer(r"\b\w+\b", sql)
        if m[0] in summed and not any(start < m.start() < end for start, end in spans)
    ]


def test_views_are_read_through_sums():
    assert summed_outside_sum("SELECT sum(octetDeltaCount + throughput) FROM v") == []
    assert summed_outside_sum("SELECT max(throughput) FROM v") == ["throughput"]
    assert summed_outside_sum("SELECT sum(throughput) AS `throughput`, 'throughput' FROM v") == []
    view_queries = [sql for _, _, sql in QUERIES if "_view" in sql]
    assert view_queries
    for sql in view_queries:
        assert summed_outside_sum(sql) == [], sql


NODE_FIELDS = {"id", "title", "subtitle", "mainstat", "secondarystat", "color", "icon",
               "noderadius", "highlighted"}  # fmt: skip
EDGE_FIELDS = {"id", "source", "target", "mainstat", "secondarystat", "thickness", "color",
               "highlighted", "strokedasharray"}  # fmt: skip


def node_graphs() -> list[tuple[str, dict[str, Any]]]:
    return [(name, p) for name, d in DASHBOARDS.items() for p in d["panels"]
            if p["type"] == "nodeGraph"]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "panel"), node_graphs(), ids=lambda x: x if isinstance(x, str) else x["title"]
)
def test_node_graphs_return_grafanas_frames(database, name, panel):
    """Grafana's node graph: a frame named nodes (id, optional title, subtitle, mainstat,
    secondarystat, arc__*, detail__*) and one named edges (id, source, target, ...)."""
    targets = {t["refId"]: t["rawSql"] for t in panel["targets"]}
    assert set(targets) == {"nodes", "edges"}
    request = request_for(DASHBOARDS[name], database, START, END)
    frames = {}
    for ref, sql in targets.items():
        columns, rows = run(database, sql, request)
        assert rows, ref
        names = [n for n, _ in columns]
        frames[ref] = [dict(zip(names, row, strict=True)) for row in rows]
        for column, kind in columns:
            if column in ("mainstat", "secondarystat") or column.startswith("arc__"):
                assert re.match(r"(U?Int|Float)", kind), (column, kind)
    nodes, edges = frames["nodes"], frames["edges"]
    for row in nodes:
        assert {"id", "title", "mainstat"} <= set(row)
        assert all(k in NODE_FIELDS or k.startswith(("arc__", "detail__")) for k in row)
        arcs = [v for k, v in row.items() if k.startswith("arc__")]
        assert not arcs or abs(sum(arcs) - 1) < 1e-9  # Grafana: the arcs add up to 1
    for row in edges:
        assert {"id", "source", "target"} <= set(row)
        assert all(k in EDGE_FIELDS or k.startswith("detail__") for k in row)
    ids = [n["id"] for n in nodes]
    assert len(set(ids)) == len(ids) and len({e["id"] for e in edges}) == len(edges)
    assert {e["source"] for e in edges} | {e["target"] for e in edges} == set(ids)
    arcs = {a["field"] for a in panel["options"]["nodes"]["arcs"]}
    assert arcs == {k for k in nodes[0] if k.startswith("arc__")}


def test_the_policy_graph_tells_denied_connections(database):
    dashboard = DASHBOARDS["networkpolicy_dashboard.json"]
    (panel,) = [p for p in dashboard["panels"] if p["type"] == "nodeGraph"]
    (sql,) = [t["rawSql"] for t in panel["targets"] if t["refId"] == "nodes"]
    columns, rows = run(database, sql, request_for(dashboard, database, START, END))
    names = [n for n, _ in columns]
    denied = {row[0]: row[names.index("arc__denied")] for row in rows}
    assert denied["backend/web-1"] == 0  # allowed only
    assert denied["frontend/client-1"] > 0  # rejected by acnp-db-guard to backend/db
    assert denied["203.0.113.50"] == 1  # dropped by anp-db-egress


# -- the metrics dashboard ------------------------------------------------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}  # fmt: skip


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a label_values() variable query) reads."""
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr)
    if label_values:
        expr = label_values[1]
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        before = expr[: match.start()]
        after = expr[match.end() :].lstrip()
        if after.startswith("(") or match[0] in PROMQL_WORDS:
            continue  # a function or an aggregation, or a keyword
        if before.endswith("$") or re.search(r"[0-9.]$", before):
            continue  # a Grafana variable, or a number's exponent
        names.add(match[0])
    return names


def test_the_promql_parser_finds_metrics_and_only_them():
    expr = (
        'histogram_quantile(0.99, sum by (le, instance) (rate(a_seconds_bucket{instance=~"$x",'
        ' job!="b"}[$__rate_interval]))) / on(instance) group_left b_total * 1e3 > bool 2'
    )
    assert promql_metrics(expr) == {"a_seconds_bucket", "b_total"}
    assert promql_metrics('label_values(c_total{x="y"}, instance)') == {"c_total"}
    assert promql_metrics("sum without (reason) (increase(d[5m] offset 1h))") == {"d"}


def exported_metric_names(registry) -> set[str]:
    """The series names a registry's families give Prometheus (a family without samples
    yet included): counters _total, histograms _bucket, _sum and _count."""
    names = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        names |= {sample.name for sample in family.samples}
        names |= {
            "counter": {f"{family.name}_total"},
            "histogram": {f"{family.name}_{s}" for s in ("bucket", "sum", "count")},
        }.get(family.type, {family.name})
    return names


@pytest.fixture
def exported(tmp_path, monkeypatch):
    """The metric names of a real aggregator (with its ClickHouse sink) and a real agent
    (with the eBPF counter path, which cannot load here)."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    aggregator_conf = tmp_path / "flow-aggregator.conf"
    aggregator_conf.write_text(
        yaml.safe_dump({
            "aggregatorTransportProtocol": "tcp", "listenAddress": "127.0.0.1:0",
            "certDir": str(tmp_path / "certs"), "stateDir": "", "metricsBindAddress": "",
            "clickHouse": {"enable": True,
                           "databaseURL": "http://clickhouse-clickhouse.flow-visibility.svc:8123"},
        })
    )  # fmt: skip
    aggregator = Aggregator(load_aggregator_config(aggregator_conf))
    agent_conf = tmp_path / "antrea-agent.conf"
    agent_conf.write_text(
        yaml.safe_dump({"featureGates": {"FlowExporter": True},
                        "flowCollectorAddr": "127.0.0.1:4739:tcp", "metricsBindAddress": "",
                        "ebpf": {"enable": True}})
    )  # fmt: skip
    config = load_agent_config(agent_conf)

    def no_bpf(max_flows: int):
        raise RuntimeError("no BPF here")

    counter = PacketCounter(None, config.ebpf.max_flows, load_program=no_bpf)
    agent = Agent(config, "node-1", counter=counter)
    return exported_metric_names(aggregator.registry) | exported_metric_names(agent.registry)


def test_the_metrics_dashboard_reads_only_exported_metrics(exported):
    dashboard = DASHBOARDS["metrics_dashboard.json"]
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    expressions += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = set()
    for expr in expressions:
        names = promql_metrics(expr)
        assert names, expr
        assert names <= exported, f"{expr}: {sorted(names - exported)} not exported"
        used |= names
    # What the brief of the dashboard promises: poll duration, exported and dropped
    # records, queues, connected exporters, refused peers, the ClickHouse sink.
    for name in ("antrea_agent_conntrack_poll_cycle_duration_seconds_bucket",
                 "antrea_agent_flow_records_exported_total",
                 "antrea_agent_flow_records_dropped_total",
                 "antrea_agent_flow_export_queue_records",
                 "antrea_flow_aggregator_records_dropped_total",
                 "antrea_flow_aggregator_flows_waiting_for_correlation",
                 "antrea_flow_aggregator_connected_exporters",
                 "antrea_flow_aggregator_refused_peers_total",
                 "antrea_flow_aggregator_clickhouse_pending_records",
                 "antrea_flow_aggregator_clickhouse_insert_failures_total"):  # fmt: skip
        assert name in used, name


# -- the manifest ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.30", "1.37"])
def test_the_manifest_validates_against_the_kubernetes_schemas(version):
    for document in documents():
        kubernetes_validate.validate(document, version, strict=True)


def _container(kind: str, name: str) -> dict[str, Any]:
    (container,) = find(kind, name)["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_clickhouse_is_theias_service_with_the_secrets_credentials():
    service = find("Service", "clickhouse-clickhouse")
    ports = {(p["name"], p["port"]) for p in service["spec"]["ports"]}
    assert ports == {("http", 8123), ("tcp", 9000)}
    template = find("StatefulSet", "clickhouse")["spec"]["template"]
    pod = template["spec"]
    container = _container("StatefulSet", "clickhouse")
    assert container["image"] == "clickhouse/clickhouse-server:24.8"
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    env = _env(container)
    for variable, key in (("CLICKHOUSE_USER", "username"), ("CLICKHOUSE_PASSWORD", "password")):
        assert env[variable] == {"secretKeyRef": {"name": "clickhouse-secret", "key": key}}
    assert env["CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT"] == "1"
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}
    assert {"name": "data", "emptyDir": {}} in pod["volumes"]
    assert "volumeClaimTemplates" in MANIFEST.read_text()  # the comment on keeping the data
    for namespace in ("flow-visibility", "flow-aggregator"):
        secret = find("Secret", "clickhouse-secret", namespace)
        assert set(secret["stringData"]) == {"username", "password"}


def test_the_aggregator_reaches_this_clickhouse(tmp_path, monkeypatch):
    """The README's flow-aggregator.conf and the manifest's Secret, through the real
    config loader, name this Service and user."""
    secret = find("Secret", "clickhouse-secret", "flow-aggregator")["stringData"]
    monkeypatch.setenv("CH_USERNAME", secret["username"])
    monkeypatch.setenv("CH_PASSWORD", secret["password"])
    conf = tmp_path / "flow-aggregator.conf"
    conf.write_text(
        'clickHouse: {enable: true, databaseURL: "http://clickhouse-clickhouse.flow-visibility'
        '.svc:8123"}\nstateDir: ""\n'
    )
    clickhouse = load_aggregator_config(conf).clickhouse
    assert clickhouse is not None
    service = find("Service", "clickhouse-clickhouse")
    port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["http"]
    assert clickhouse.url == f"http://clickhouse-clickhouse.flow-visibility.svc:{port}"
    assert (clickhouse.username, clickhouse.password) == (secret["username"], secret["password"])
    grafana = yaml.safe_load(
        find("ConfigMap", "grafana-datasource-provider")["data"]["datasources.yaml"]
    )["datasources"][0]["jsonData"]
    assert (grafana["protocol"], grafana["host"], grafana["port"]) == (
        "http", "clickhouse-clickhouse.flow-visibility.svc", port
    )  # fmt: skip
    assert grafana["defaultDatabase"] == clickhouse.database


def test_grafana_installs_a_pinned_plugin_and_is_provisioned():
    container = _container("Deployment", "grafana")
    image, tag = container["image"].rsplit(":", 1)
    assert image == "grafana/grafana-oss" and re.fullmatch(r"1[01]\.\d+\.\d+", tag)
    env = _env(container)
    assert re.fullmatch(r"grafana-clickhouse-datasource \d+\.\d+\.\d+", env["GF_INSTALL_PLUGINS"])
    assert "air-gapped" in MANIFEST.read_text()
    for variable in ("GF_SECURITY_ADMIN_USER", "GF_SECURITY_ADMIN_PASSWORD"):
        assert env[variable]["secretKeyRef"]["name"] == "grafana-secret"
    # The datasource file reads the ClickHouse credentials from the environment.
    datasources = find("ConfigMap", "grafana-datasource-provider")["data"]["datasources.yaml"]
    for variable in re.findall(r"\$\{?(\w+)\}?", datasources):
        assert env[variable]["secretKeyRef"]["name"] == "clickhouse-secret"
    assert "http://prometheus-server.monitoring.svc" in datasources
    service = find("Service", "grafana")
    assert service["spec"]["type"] == "NodePort"
    assert [(p["port"], p["nodePort"]) for p in service["spec"]["ports"]] == [(3000, 30008)]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    providers = yaml.safe_load(
        find("ConfigMap", "grafana-dashboard-provider")["data"]["dashboardproviders.yaml"]
    )["providers"]
    assert [p["options"]["path"] for p in providers] == [mounts["dashboards"]]
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{mounts['dashboards']}/homepage.json"


def test_the_configmaps_hold_the_dashboard_files():
    pod = find("Deployment", "grafana")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "dashboards"]
    names = [s["configMap"]["name"] for s in volume["projected"]["sources"]]
    files = {}
    for name in names:
        configmap = find("ConfigMap", name)
        files.update(configmap["data"])
        # `kubectl apply` copies the object into an annotation of at most 256 KiB.
        assert len(json.dumps(configmap)) < 256 * 1024, name
    assert files.keys() == DASHBOARDS.keys()
    for name, text in files.items():
        assert text == (DASHBOARD_DIR / name).read_text(), name
