"""The ELK flow collector of build/yamls/elk-flow-collector/: generated from build/elk.py, its
IPFIX definitions exactly the aggregator's elements, its ruby filter run for real (Ruby) on
records of the aggregation store, every field the Kibana objects use one that Logstash
produces, the saved objects consistent, the importer run against a stand-in Kibana, and the
manifest valid against the Kubernetes schemas."""

from __future__ import annotations

import copy
import datetime
import importlib.util
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from antrea_flow.aggregator.aggregation import AggregationStore
from antrea_flow.ipfix.antrea import aggregator_templates, exporter_templates
from antrea_flow.ipfix.elements import VARIABLE_LENGTH, DataType

ROOT = Path(__file__).resolve().parents[2]
COLLECTOR = ROOT / "build" / "yamls" / "elk-flow-collector"
HARNESS = Path(__file__).resolve().parent / "elk" / "filter_harness.rb"
KUBERNETES_VERSIONS = ("1.30", "1.37")
RUBY = shutil.which("ruby")
needs_ruby = pytest.mark.skipif(RUBY is None, reason="ruby is not installed (make setup)")


def load_generator():
    spec = importlib.util.spec_from_file_location("elk", ROOT / "build" / "elk.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


elk = load_generator()


def documents() -> list[dict[str, Any]]:
    text = (COLLECTOR / "elk-flow-collector.yml").read_text()
    return [d for d in yaml.safe_load_all(text) if d]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
    return matches[0]


def saved_objects() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (COLLECTOR / "kibana.ndjson").read_text().splitlines()]


def by_type(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["type"] == kind]


def ipfix_definitions() -> dict[int, dict[int, list[str]]]:
    return yaml.safe_load((COLLECTOR / "logstash" / "ipfix.yml").read_text())


# -- generated, not edited ----------------------------------------------------------------


def test_the_committed_files_are_exactly_what_the_generator_writes():
    outputs = elk.outputs()
    assert set(outputs) == {
        "elk-flow-collector/elk-flow-collector.yml",
        "elk-flow-collector/kibana.ndjson",
        "elk-flow-collector/logstash/logstash.conf",
        "elk-flow-collector/logstash/logstash.yml",
        "elk-flow-collector/logstash/ipfix.yml",
        "elk-flow-collector/logstash/filter.rb",
    }
    committed = {str(p.relative_to(COLLECTOR.parent)) for p in COLLECTOR.rglob("*") if p.is_file()}
    assert committed == set(outputs), "files in the folder that build/elk.py does not write"
    for name, text in outputs.items():
        assert (COLLECTOR.parent / name).read_text() == text, (
            f"build/yamls/{name} is stale: run `make manifests`"
        )


# -- ipfix.yml ----------------------------------------------------------------------------

# How the netflow codec reads each type of ipfix.yml: the IPFIX types it suits and the
# template lengths it reads correctly. It sizes uint16/32/64 by the template's length
# (reduced-size encoding), but uint8 and the addresses are fixed, and strings are read with
# their length prefix when the template says variable length (65535).
CODEC_READS = {
    ":uint8": ({DataType.unsigned8}, {1}),
    ":uint16": ({DataType.unsigned16}, {1, 2}),
    ":uint32": ({DataType.unsigned32, DataType.dateTimeSeconds}, {1, 2, 3, 4}),
    ":uint64": ({DataType.unsigned64, DataType.dateTimeMilliseconds}, set(range(1, 9))),
    ":ip4_addr": ({DataType.ipv4Address}, {4}),
    ":ip6_addr": ({DataType.ipv6Address}, {16}),
    ":string": ({DataType.string}, {VARIABLE_LENGTH}),
}


def test_ipfix_yml_declares_exactly_the_elements_of_both_aggregator_templates():
    declared = {
        (pen, element_id): name.removeprefix(":")
        for pen, elements in ipfix_definitions().items()
        for element_id, (_, name) in elements.items()
    }
    exported = {
        (f.element.enterprise, f.element.element_id): f.element.name
        for template in aggregator_templates()
        for f in template.fields
    }
    # Both families: the IPv6 template's addresses are in, beside the IPv4 ones.
    assert (0, 27) in exported and (0, 8) in exported and (56506, 107) in exported
    assert declared == exported
    # PEN keys replace the codec's default tables: IANA and reverse are declared again.
    assert set(ipfix_definitions()) == {0, 29305, 56506}


@pytest.mark.parametrize("template", aggregator_templates(), ids=lambda t: str(t.template_id))
def test_each_declared_type_reads_the_templates_field_as_sent(template):
    definitions = ipfix_definitions()
    for f in template.fields:
        codec_type, name = definitions[f.element.enterprise][f.element.element_id]
        assert name == f":{f.element.name}"
        types, lengths = CODEC_READS[codec_type]
        assert f.element.data_type in types, (f.element.name, codec_type)
        assert f.length in lengths, (f.element.name, codec_type, f.length)


# -- filter.rb, run in Ruby on the aggregator's records -------------------------------------

START = 1_700_000_000
NODE1, NODE2 = ("192.168.77.101", 1), ("192.168.77.102", 2)


def agent_record(ipv6: bool = False, **values: Any) -> dict[str, Any]:
    """An agent's record as the aggregator's collecting process decodes it."""
    template = exporter_templates(packet_details=True)[1 if ipv6 else 0]
    out = dict(zip(template.keys, template.values_from({}), strict=True))
    out.update(flowStartSeconds=START, flowEndSeconds=START + 30, flowEndReason=2,
               tcpState="ESTABLISHED")  # fmt: skip
    unknown = set(values) - set(out)
    assert not unknown, unknown
    out.update(values)
    return out


def counters(octets: int, reverse_octets: int, packets: int = 10) -> dict[str, int]:
    return dict(
        octetTotalCount=octets, octetDeltaCount=octets,
        reverseOctetTotalCount=reverse_octets, reverseOctetDeltaCount=reverse_octets,
        packetTotalCount=packets, packetDeltaCount=packets,
        reversePacketTotalCount=packets, reversePacketDeltaCount=packets,
    )  # fmt: skip


def aggregated_records() -> dict[str, dict[str, Any]]:
    """Four flows through the aggregation store: an inter-node Pod-to-Service flow (both
    Nodes' halves), a Pod-to-External one, an intra-node IPv6 one denied by an egress rule,
    and one from outside the cluster to a Pod."""
    store = AggregationStore(export_interval=60.0, inactive_timeout=90.0, correlation_timeout=60.0)
    tcp = dict(
        sourceIPv4Address="10.10.1.5", destinationIPv4Address="10.10.2.7",
        sourceTransportPort=40000, destinationTransportPort=8080, protocolIdentifier=6,
        flowType=2, destinationServicePortName="backend/web:http", destinationServicePort=80,
        destinationClusterIPv4="10.96.0.10",
        flowStartMilliseconds=START * 1000 + 250, flowEndMilliseconds=(START + 30) * 1000 + 750,
        **counters(15_000_000, 3_000_000),
    )  # fmt: skip
    store.add(agent_record(**tcp, sourcePodName="client", sourcePodNamespace="frontend",
                           sourceNodeName="node-1", egressNetworkPolicyName="allow-web",
                           egressNetworkPolicyType=3, egressNetworkPolicyRuleAction=1,
                           egressNetworkPolicyRuleName="web"), NODE1, 0.0)  # fmt: skip
    store.add(agent_record(**tcp, destinationPodName="server", destinationPodNamespace="backend",
                           destinationNodeName="node-2",
                           ingressNetworkPolicyName="allow-frontend",
                           ingressNetworkPolicyNamespace="backend", ingressNetworkPolicyType=1,
                           ingressNetworkPolicyRuleAction=1), NODE2, 0.0)  # fmt: skip
    store.add(agent_record(sourceIPv4Address="10.10.1.5", destinationIPv4Address="8.8.8.8",
                           sourceTransportPort=53000, destinationTransportPort=53,
                           protocolIdentifier=17, flowType=3, sourcePodName="client",
                           sourcePodNamespace="frontend", sourceNodeName="node-1",
                           **counters(1_200, 2_400)), NODE1, 0.0)  # fmt: skip
    store.add(agent_record(ipv6=True, sourceIPv6Address="fd00:10:10:1::5",
                           destinationIPv6Address="fd00:10:10:1::9", protocolIdentifier=58,
                           flowType=1, sourcePodName="client", sourcePodNamespace="frontend",
                           destinationPodName="db", destinationPodNamespace="backend",
                           sourceNodeName="node-1", destinationNodeName="node-1",
                           egressNetworkPolicyName="deny-ping",
                           egressNetworkPolicyNamespace="frontend", egressNetworkPolicyType=2,
                           egressNetworkPolicyRuleAction=2, **counters(840, 0, 10)),
              NODE1, 0.0)  # fmt: skip
    store.add(agent_record(sourceIPv4Address="192.0.2.1", destinationIPv4Address="10.10.2.7",
                           sourceTransportPort=5000, destinationTransportPort=3868,
                           protocolIdentifier=132, flowType=4, destinationPodName="server",
                           destinationPodNamespace="backend", destinationNodeName="node-2",
                           **counters(600, 300, 4)), NODE2, 0.0)  # fmt: skip
    records = store.expire(0.0)
    assert len(records) == 4 and not any(r["incomplete"] for r in records)
    out = {}
    for record in records:
        kind = {6: "service", 17: "external", 58: "denied", 132: "inbound"}
        out[kind[record["protocolIdentifier"]]] = record
    return out


def iso8601(milliseconds: int) -> str:
    """Time as Logstash 7's LogStash::Timestamp#to_iso8601 writes it (milliseconds, Z)."""
    seconds, milli = divmod(milliseconds, 1000)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{milli:03d}Z"


def codec_event(record: dict[str, Any]) -> dict[str, Any]:
    """The Logstash event the netflow codec makes of one exported record: every element of
    its template (absent ones at the zero the exporter sends), flowStart/End Seconds and
    Milliseconds as ISO-8601 strings, the IPFIX version, the export time as @timestamp."""
    template = aggregator_templates()[1 if "sourceIPv6Address" in record else 0]
    values = dict(zip(template.keys, template.values_from(record), strict=True))
    for name in ("flowStartSeconds", "flowEndSeconds"):
        values[name] = iso8601(values[name] * 1000)
    for name in ("flowStartMilliseconds", "flowEndMilliseconds"):
        values[name] = iso8601(values[name])
    values["version"] = 10
    return {"@timestamp": iso8601((START + 60) * 1000), "@version": "1", "ipfix": values}


def run_filter(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert RUBY is not None
    done = subprocess.run(
        [RUBY, str(HARNESS), str(COLLECTOR / "logstash" / "filter.rb")],
        input="".join(json.dumps(e) + "\n" for e in events),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture(scope="module")
def filtered() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """By flow: (the aggregator's record, the event the filter returned)."""
    if RUBY is None:
        pytest.skip("ruby is not installed (make setup)")
    records = aggregated_records()
    out = run_filter([codec_event(r) for r in records.values()])
    assert len(out) == len(records)
    return {
        kind: (record, event["ipfix"])
        for (kind, record), event in zip(records.items(), out, strict=True)
    }


def test_filter_names_protocols_flow_types_and_policies(filtered):
    _, service = filtered["service"]
    assert service["protocolIdentifier"] == 6  # the number stays a number
    assert service["protocolIdentifierStr"] == "TCP"
    assert service["flowTypeStr"] == "Inter-Node"
    assert service["egressNetworkPolicyTypeStr"] == "Antrea ClusterNetworkPolicy"
    assert service["egressNetworkPolicyRuleActionStr"] == "Allow"
    assert service["egressNetworkPolicyName"] == "allow-web"
    assert service["egressNetworkPolicyNamespace"] == "N/A"  # cluster-wide: no namespace
    assert service["ingressNetworkPolicyTypeStr"] == "K8s NetworkPolicy"
    assert service["ingressNetworkPolicyName"] == "allow-frontend"
    assert service["ingressNetworkPolicyNamespace"] == "backend"
    _, external = filtered["external"]
    assert (external["protocolIdentifierStr"], external["flowTypeStr"]) == ("UDP", "To External")
    for direction in ("ingress", "egress"):
        assert external[f"{direction}NetworkPolicyName"] == "N/A"
        assert external[f"{direction}NetworkPolicyNamespace"] == "N/A"
        assert external[f"{direction}NetworkPolicyTypeStr"] == "N/A"
        assert external[f"{direction}NetworkPolicyRuleActionStr"] == "No Action"
    _, denied = filtered["denied"]
    assert (denied["protocolIdentifierStr"], denied["flowTypeStr"]) == ("IPv6-ICMP", "Intra-Node")
    assert denied["egressNetworkPolicyRuleActionStr"] == "Drop"
    assert denied["egressNetworkPolicyTypeStr"] == "Antrea NetworkPolicy"
    _, inbound = filtered["inbound"]
    assert (inbound["protocolIdentifierStr"], inbound["flowTypeStr"]) == ("SCTP", "From External")


def test_filter_sets_addresses_pods_and_flow_keys(filtered):
    _, service = filtered["service"]
    assert (service["sourceIP"], service["destinationIP"]) == ("10.10.1.5", "10.10.2.7")
    assert (service["sourcePod"], service["destinationPod"]) == (
        "frontend/client",
        "backend/server",
    )
    assert service["flowKey"] == "frontend/client:40000->backend/server:8080 TCP"
    assert service["flowKeyPodToPod"] == service["flowKey"]
    # The Service's port name, a separator, then its port (upstream ran the two together).
    assert service["flowKeyPodToService"] == "frontend/client:40000->backend/web:http:80 TCP"
    assert "flowKeyPodToExternal" not in service
    _, external = filtered["external"]
    assert external["flowKeyPodToExternal"] == "frontend/client:53000->8.8.8.8:53 UDP"
    assert external["flowKey"] == external["flowKeyPodToExternal"]
    assert "flowKeyPodToPod" not in external and "flowKeyPodToService" not in external
    assert "destinationPod" not in external
    _, denied = filtered["denied"]
    assert (denied["sourceIP"], denied["destinationIP"]) == ("fd00:10:10:1::5", "fd00:10:10:1::9")
    assert denied["flowKeyPodToPod"] == "frontend/client:0->backend/db:0 IPv6-ICMP"
    _, inbound = filtered["inbound"]
    assert inbound["flowKey"] == "192.0.2.1:5000->backend/server:3868 SCTP"
    assert not {"sourcePod", "flowKeyPodToPod", "flowKeyPodToExternal"} & set(inbound)


def test_filter_keeps_the_aggregators_throughputs_and_adds_exact_mbps(filtered):
    record, service = filtered["service"]
    # 15 MB in 30 s from the source Node's record: the aggregator's bits/s, kept.
    assert record["throughputFromSourceNode"] == 15_000_000 * 8 // 30
    for name in elk.THROUGHPUTS:
        assert service[name] == record[name]
        assert service[f"{name}Mbps"] == pytest.approx(record[name] / 1e6)
    assert service["throughputFromSourceNodeMbps"] == pytest.approx(4.0)
    # Deltas since the previous export: what a sum over a time range must add.
    assert (service["bytes"], service["reverseBytes"]) == (15_000_000, 3_000_000)
    assert (service["packets"], service["reversePackets"]) == (10, 10)
    assert service["bytes"] == record["octetDeltaCount"]


def test_filter_parses_the_codecs_iso8601_times(filtered):
    _, service = filtered["service"]
    assert service["flowStartMilliseconds"].endswith(".250Z")  # as the codec wrote it
    assert service["flowDurationSeconds"] == pytest.approx(30.5)
    _, external = filtered["external"]
    assert external["flowDurationSeconds"] == pytest.approx(30.0)  # from the seconds


@needs_ruby
def test_filter_skips_a_time_it_cannot_parse():
    event = codec_event(aggregated_records()["external"])
    event["ipfix"]["flowEndMilliseconds"] = "not a time"
    (out,) = run_filter([event])
    assert "flowDurationSeconds" not in out["ipfix"]
    assert out["ipfix"]["flowKey"]  # the rest is derived all the same


@needs_ruby
def test_filter_adds_exactly_the_declared_fields_with_their_types():
    events = [codec_event(r) for r in aggregated_records().values()]
    added: dict[str, set[type]] = {}
    for before, after in zip(events, run_filter(events), strict=True):
        for name, value in after["ipfix"].items():
            if name not in before["ipfix"]:
                added.setdefault(name, set()).add(type(value))
        # What the filter replaces keeps its type (a string policy name becomes "N/A").
        for name, value in before["ipfix"].items():
            assert type(after["ipfix"][name]) is type(value), name
    assert set(added) == set(elk.DERIVED_FIELDS)
    python_types = {"long": int, "float": float, "string": str}
    for name, types in added.items():
        assert types == {python_types[elk.DERIVED_FIELDS[name]]}, (name, types)


@needs_ruby
def test_filter_keeps_nothing_between_events():
    events = [codec_event(r) for r in aggregated_records().values()]
    forward = run_filter(events)
    backward = run_filter(events[::-1] + events)
    assert backward[: len(events)][::-1] == forward
    assert backward[len(events) :] == forward


# -- kibana.ndjson --------------------------------------------------------------------------

DASHBOARD_TITLES = {
    "Antrea Flows: Overview",
    "Antrea Flows: Pod-to-Pod",
    "Antrea Flows: Pod-to-External",
    "Antrea Flows: Pod-to-Service",
    "Antrea Flows: Flow Records",
    "Antrea Flows: Node Throughput",
    "Antrea Flows: Network Policy",
}
VISUALIZATION_TYPES = {
    "pie", "line", "histogram", "horizontal_bar", "metric", "input_control_vis", "markdown",
    "vega",
}  # fmt: skip
META_FIELDS = {"_id", "_index", "_score", "_source", "_type"}


def vis_state(o: dict[str, Any]) -> dict[str, Any]:
    return json.loads(o["attributes"]["visState"])


def search_source(o: dict[str, Any]) -> dict[str, Any]:
    return json.loads(o["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])


def vega_specs(objects) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in by_type(objects, "visualization"):
        state = vis_state(o)
        if state["type"] == "vega":
            yield o["attributes"]["title"], json.loads(state["params"]["spec"])


def es_requests(spec: Any) -> Iterator[dict[str, Any]]:
    """The Elasticsearch requests of a Vega spec: the `url` objects that name an index."""
    if isinstance(spec, dict):
        url = spec.get("url")
        if isinstance(url, dict) and "index" in url:
            yield url
        for value in spec.values():
            yield from es_requests(value)
    elif isinstance(spec, list):
        for value in spec:
            yield from es_requests(value)


def field_values(tree: Any, keys: tuple[str, ...] = ("field",)) -> Iterator[str]:
    """Every string value of those keys, at any depth (Elasticsearch query DSL, agg params)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in keys and isinstance(value, str):
                yield value
            else:
                yield from field_values(value, keys)
    elif isinstance(tree, list):
        for value in tree:
            yield from field_values(value, keys)


def query_clauses(tree: Any) -> Iterator[dict[str, Any]]:
    """The query clauses of a request body (the `exists` of a filter aggregation): they
    test a field, which may be text, where aggregations need doc values."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in ("exists", "term", "match_phrase"):
                yield {key: value}
            else:
                yield from query_clauses(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from query_clauses(value)


def used_fields(objects) -> tuple[set[str], set[str]]:
    """(every field a saved object names, those it aggregates on)."""
    named, aggregated = set(), set()
    for pattern in by_type(objects, "index-pattern"):
        named |= {f["name"] for f in json.loads(pattern["attributes"]["fields"])}
        named |= set(json.loads(pattern["attributes"]["fieldFormatMap"]))
        named.add(pattern["attributes"]["timeFieldName"])
    for search in by_type(objects, "search"):
        named |= set(search["attributes"]["columns"])
        named |= {column for column, _ in search["attributes"]["sort"]}
    for vis in by_type(objects, "visualization"):
        state = vis_state(vis)
        aggregated |= set(field_values(state["aggs"]))
        # An input control lists a field's values with a terms aggregation.
        aggregated |= set(field_values(state["params"].get("controls", []), ("fieldName",)))
        named |= set(field_values(search_source(vis)["filter"]))
    for _, spec in vega_specs(objects):
        for request in es_requests(spec):
            queried = set(field_values(list(query_clauses(request["body"]))))
            named |= queried
            aggregated |= set(field_values(request["body"])) - queried
            named.add(request["%timefield%"])
    for board in by_type(objects, "dashboard"):
        for f in search_source(board)["filter"]:
            named |= set(field_values(f)) | {f["meta"]["key"]}
    return named | aggregated, aggregated


def produced_fields() -> dict[str, str]:
    """Every field of a stored record, with its Elasticsearch type: the codec's (the
    elements of ipfix.yml, its `version`), the filter's (declared in build/elk.py, and held
    equal to what filter.rb sets by the test above), and Logstash's @timestamp."""
    out = {"@timestamp": "date"}
    times = {"flowStartSeconds", "flowEndSeconds", "flowStartMilliseconds", "flowEndMilliseconds"}
    for elements in ipfix_definitions().values():
        for codec_type, name in elements.values():
            name = name.removeprefix(":")
            numeric = codec_type.startswith(":uint")
            out[f"ipfix.{name}"] = "date" if name in times else "long" if numeric else "string"
    out["ipfix.version"] = "long"
    out.update({f"ipfix.{name}": kind for name, kind in elk.DERIVED_FIELDS.items()})
    for name, kind in list(out.items()):
        if kind == "string":
            out[f"{name}.keyword"] = "keyword"
    return out


def test_every_field_the_kibana_objects_use_is_one_logstash_produces():
    objects = saved_objects()
    named, aggregated = used_fields(objects)
    # The extraction reaches into each kind of object (else this test would check nothing).
    assert {
        "ipfix.bytes",  # pies
        "ipfix.flowKey.keyword",  # sum_bucket's custom bucket
        "ipfix.sourcePodName.keyword",  # input controls
        "ipfix.throughputFromSourceNodeMbps",  # the Vega-Lite heatmap
        "ipfix.destinationServicePortName.keyword",  # a Vega sankey
        "ipfix.flowKeyPodToPod",  # a dashboard filter
        "ipfix.flowDurationSeconds",  # the saved search's columns
    } <= named
    produced = produced_fields()
    assert named - META_FIELDS - set(produced) == set()
    # Aggregations need doc values: keywords, numbers and dates, never analysed text.
    assert {name for name in aggregated if produced[name] == "string"} == set()


def test_the_index_pattern_lists_the_fields_as_elasticsearch_maps_them():
    (pattern,) = by_type(saved_objects(), "index-pattern")
    assert pattern["attributes"]["title"] == "flow-*"
    assert pattern["attributes"]["timeFieldName"] == "@timestamp"
    fields = {f["name"]: f for f in json.loads(pattern["attributes"]["fields"])}
    produced = produced_fields()
    assert set(fields) - META_FIELDS == set(produced)
    for name, kind in produced.items():
        assert fields[name]["esTypes"] == ["text" if kind == "string" else kind], name
        assert fields[name]["aggregatable"] is (kind != "string"), name


REFERENCE_KEYS = ("indexRefName", "indexPatternRefName", "panelRefName")
NESTED_JSON = ("visState", "searchSourceJSON", "panelsJSON")


def parsed(tree: Any) -> Any:
    """A saved object with its attributes that hold JSON text parsed."""
    if isinstance(tree, dict):
        return {k: parsed(json.loads(v) if k in NESTED_JSON else v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [parsed(v) for v in tree]
    return tree


def test_kibana_ndjson_is_saved_objects_whose_references_resolve():
    objects = saved_objects()
    keys = [(o["type"], o["id"]) for o in objects]
    assert len(keys) == len(set(keys))
    assert {o["type"] for o in objects} == {"index-pattern", "search", "visualization", "dashboard"}
    for o in objects:
        assert set(o) >= {"id", "type", "attributes", "references", "migrationVersion"}
        assert o["attributes"]["title"]
        for ref in o["references"]:
            assert (ref["type"], ref["id"]) in keys, (o["attributes"]["title"], ref)
        names = [ref["name"] for ref in o["references"]]
        assert len(names) == len(set(names))
        # Each reference name the object uses is one of its references, and each is used.
        used = set(field_values(parsed(o), REFERENCE_KEYS))
        assert used == set(names), o["attributes"]["title"]
    for vis in by_type(objects, "visualization"):
        assert vis_state(vis)["type"] in VISUALIZATION_TYPES
        assert vis_state(vis)["title"] == vis["attributes"]["title"]


def test_the_seven_dashboards_lay_out_their_panels_from_their_references():
    objects = saved_objects()
    boards = {o["attributes"]["title"]: o for o in by_type(objects, "dashboard")}
    assert set(boards) == DASHBOARD_TITLES
    ids = {o["id"] for o in objects}
    for title, board in boards.items():
        panels = json.loads(board["attributes"]["panelsJSON"])
        refs = {ref["name"]: ref for ref in board["references"]}
        cells = set()
        for panel in panels:
            assert refs[panel["panelRefName"]]["id"] in ids
            grid = panel["gridData"]
            assert grid["x"] + grid["w"] <= 48, title
            cell = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                    for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
            assert not cell & cells, f"{title}: panels overlap"
            cells |= cell
    flow_records = boards["Antrea Flows: Flow Records"]
    assert "search" in {ref["type"] for ref in flow_records["references"]}
    # The seed's asks: sankeys (Pod-to-Pod, the policies), Node heatmaps, per-Service lines.
    titles = {o["id"]: o["attributes"]["title"] for o in objects}

    def panel_titles(name: str) -> set[str]:
        return {titles[ref["id"]] for ref in boards[name]["references"] if ref["id"] in titles}

    vega_titles = dict(vega_specs(objects))
    assert "Antrea Flows: Pod-to-Pod Bytes" in panel_titles("Antrea Flows: Pod-to-Pod")
    assert "Antrea Flows: Tx Mbps by Service" in panel_titles("Antrea Flows: Pod-to-Service")
    node = panel_titles("Antrea Flows: Node Throughput")
    heatmaps = {t for t in node if "Heatmap" in t}
    assert len(heatmaps) == 2  # Tx and Rx
    assert all("vega-lite" in vega_titles[t]["$schema"] for t in heatmaps)
    assert "Antrea Flows: Tx Mbps by Source Node" in node
    policy = panel_titles("Antrea Flows: Network Policy")
    assert "Antrea Flows: Egress to Ingress Network Policy Bytes" in policy
    assert "Antrea Flows: Network Policy Filter" in policy


def test_vega_specs_parse_and_query_the_flow_indices_in_the_dashboards_context():
    specs = dict(vega_specs(saved_objects()))
    assert len(specs) >= 7
    for title, spec in specs.items():
        assert re.fullmatch(r"https://vega\.github\.io/schema/vega(-lite)?/v\d\.json",
                            spec["$schema"]), title  # fmt: skip
        (request,) = es_requests(spec)
        assert request["index"] == "flow-*"
        assert request["%context%"] is True and request["%timefield%"] == "@timestamp"
        assert "query" not in request["body"]  # Kibana refuses a query with %context%


def test_the_policy_sankey_goes_from_egress_to_ingress_policies():
    specs = dict(vega_specs(saved_objects()))
    spec = specs["Antrea Flows: Egress to Ingress Network Policy Bytes"]
    flows = next(d for d in spec["data"] if d["name"] == "flows")
    expressions = {t["as"]: t["expr"] for t in flows["transform"] if t["type"] == "formula"}
    assert "egressName" in expressions["source"] and "ingressName" in expressions["target"]
    sources = flows["url"]["body"]["aggs"]["links"]["composite"]["sources"]
    terms = {name: body["terms"]["field"] for s in sources for name, body in s.items()}
    assert terms["egressName"] == "ipfix.egressNetworkPolicyName.keyword"
    assert terms["ingressNamespace"] == "ipfix.ingressNetworkPolicyNamespace.keyword"


def test_the_navigation_links_every_dashboard():
    objects = saved_objects()
    (nav,) = [o for o in by_type(objects, "visualization") if vis_state(o)["type"] == "markdown"]
    linked = set(re.findall(r"\(#/view/([0-9a-f-]+)\)", vis_state(nav)["params"]["markdown"]))
    assert linked == {o["id"] for o in by_type(objects, "dashboard")}


def test_ids_are_stable_across_generations():
    first = [(o["type"], o["id"], o["attributes"]["title"]) for o in elk.kibana_objects()]
    again = [
        (o["type"], o["id"], o["attributes"]["title"]) for o in load_generator().kibana_objects()
    ]
    assert first == again
    overview = next(i for kind, i, title in first if title == "Antrea Flows: Overview")
    assert overview == elk.object_id("dashboard", "Antrea Flows: Overview")


# -- logstash.conf and logstash.yml ----------------------------------------------------------


def logstash_conf() -> str:
    text = (COLLECTOR / "logstash" / "logstash.conf").read_text()
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # without comments


def test_the_pipeline_takes_ipfix_on_udp_and_tcp_into_daily_indices():
    conf = logstash_conf()
    inputs = re.findall(r"^  (udp|tcp) \{(.*?)^  \}", conf, re.S | re.M)
    assert [kind for kind, _ in inputs] == ["udp", "tcp"]
    ttl = {}
    for kind, body in inputs:
        assert re.search(r"port => 4739\b", body)
        assert re.search(r"codec => netflow \{", body)
        assert "versions => [10]" in body and 'target => "ipfix"' in body
        assert 'ipfix_definitions => "/usr/share/logstash/antrea-flow/ipfix.yml"' in body
        ttl[kind] = int(re.search(r"cache_ttl => (\d+)", body).group(1))
    assert ttl["tcp"] > ttl["udp"] >= 3600  # a TCP session sends its templates once
    assert 'path => "/usr/share/logstash/antrea-flow/filter.rb"' in conf
    assert 'index => "flow-%{+YYYY.MM.dd}"' in conf
    assert "stdout" not in conf and "rubydebug" not in conf


def test_logstash_yml_sets_no_setting_the_environment_would_rewrite():
    settings = yaml.safe_load((COLLECTOR / "logstash" / "logstash.yml").read_text())
    assert settings["http.host"] == "0.0.0.0" and settings["pipeline.workers"] >= 1
    deployment = find(documents(), "Deployment", "logstash")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    squash = {re.sub(r"[._]", "", name.lower()) for name in settings}
    env = {re.sub(r"[._]", "", e["name"].lower()) for e in container["env"]}
    # The image's entry point writes such variables into logstash.yml, mounted read-only.
    assert not squash & env
    # The path.* and http.*/pipeline.* settings it knows by name, none set from outside.
    assert not {"pathconfig", "httphost", "pipelineworkers", "nodename"} & env


# -- the manifest ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_document_validates_against_the_kubernetes_schemas(version):
    for document in documents():
        kubernetes_validate.validate(document, version, strict=True)


def test_the_validation_would_catch_a_misspelled_field():
    job = copy.deepcopy(find(documents(), "Job", "kibana-import"))
    job["spec"]["ttlSecondsAfterFinish"] = job["spec"].pop("ttlSecondsAfterFinished")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSIONS[0], strict=True)


def test_one_apply_creates_everything_in_its_namespace():
    objects = documents()
    assert objects[0]["kind"] == "Namespace"
    assert objects[0]["metadata"]["name"] == "elk-flow-collector"
    found = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert found == {
        ("Namespace", "elk-flow-collector"),
        ("Service", "elasticsearch"),
        ("StatefulSet", "elasticsearch"),
        ("ConfigMap", "logstash-configmap"),
        ("Service", "logstash"),
        ("Deployment", "logstash"),
        ("Service", "kibana"),
        ("Deployment", "kibana"),
        ("ConfigMap", "kibana-saved-objects"),
        ("Job", "kibana-import"),
    }
    for o in objects[1:]:
        assert o["metadata"]["namespace"] == "elk-flow-collector", o["metadata"]["name"]


def test_the_configmaps_hold_the_files_on_disk_within_apply_limits():
    objects = documents()
    logstash = find(objects, "ConfigMap", "logstash-configmap")["data"]
    assert logstash == {
        name: (COLLECTOR / "logstash" / name).read_text()
        for name in ("logstash.conf", "logstash.yml", "ipfix.yml", "filter.rb")
    }
    saved = find(objects, "ConfigMap", "kibana-saved-objects")
    assert saved["data"] == {"kibana.ndjson": (COLLECTOR / "kibana.ndjson").read_text()}
    # `kubectl apply` keeps the whole object in an annotation of at most 256 KiB.
    assert len(json.dumps(saved, separators=(",", ":"))) < 240 * 1024


def test_logstash_mounts_what_its_pipeline_names():
    objects = documents()
    deployment = find(objects, "Deployment", "logstash")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v["configMap"] for v in pod["volumes"]}
    files = {}
    for mount in container["volumeMounts"]:
        source = volumes[mount["name"]]
        assert source["name"] == "logstash-configmap"
        if "subPath" in mount:
            files[mount["mountPath"]] = mount["subPath"]
        else:
            for item in source["items"]:
                files[f"{mount['mountPath']}/{item['path']}"] = item["key"]
    assert files == {
        "/usr/share/logstash/config/logstash.yml": "logstash.yml",
        "/usr/share/logstash/pipeline/logstash.conf": "logstash.conf",
        "/usr/share/logstash/antrea-flow/ipfix.yml": "ipfix.yml",
        "/usr/share/logstash/antrea-flow/filter.rb": "filter.rb",
    }
    for path in re.findall(r'(?:path|ipfix_definitions) => "([^"]+)"', logstash_conf()):
        assert path in files, path
    ports = {(p["name"], p["port"], p["protocol"])
             for p in find(objects, "Service", "logstash")["spec"]["ports"]}  # fmt: skip
    assert ports == {("udp-ipfix", 4739, "UDP"), ("tcp-ipfix", 4739, "TCP")}
    # A changed pipeline changes the Pod template, so an apply restarts Logstash.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert list(annotations) == ["antrea-flow/logstash-config"]


def containers(objects) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(workload, container, whether it is an init container) of every Pod template."""
    for o in objects:
        if o["kind"] in ("StatefulSet", "Deployment", "Job"):
            pod = o["spec"]["template"]["spec"]
            for c in pod.get("initContainers", []):
                yield o["metadata"]["name"], c, True
            for c in pod["containers"]:
                yield o["metadata"]["name"], c, False


def test_images_are_pinned_oss_and_only_the_sysctl_step_is_privileged():
    objects = documents()
    images = {c["name"]: c["image"] for _, c, _ in containers(objects)}
    assert images == {
        "max-map-count": "busybox:1.36.1",
        "elasticsearch": "docker.elastic.co/elasticsearch/elasticsearch-oss:7.10.2",
        "logstash": "docker.elastic.co/logstash/logstash-oss:7.10.2",
        "kibana": "docker.elastic.co/kibana/kibana-oss:7.10.2",
        "import": "curlimages/curl:8.5.0",
    }
    for workload, c, init in containers(objects):
        security = c["securityContext"]
        if c["name"] == "max-map-count":
            assert init and c["command"] == ["sysctl", "-w", "vm.max_map_count=262144"]
            assert security["privileged"] is True
            continue
        assert security["runAsNonRoot"] is True and isinstance(security["runAsUser"], int)
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert c["resources"]["limits"]["memory"], workload
        if workload != "kibana-import":
            assert "readinessProbe" in c, workload
    es = find(objects, "StatefulSet", "elasticsearch")["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in es["containers"][0]["env"]}
    assert env["ES_JAVA_OPTS"] == "-Xms512m -Xmx1g" and env["discovery.type"] == "single-node"
    assert es["volumes"] == [{"name": "data", "emptyDir": {}}]


def test_kibana_opens_on_the_overview_dashboard_on_node_port_30007():
    objects = documents()
    service = find(objects, "Service", "kibana")["spec"]
    assert service["type"] == "NodePort"
    assert [(p["port"], p["nodePort"]) for p in service["ports"]] == [(5601, 30007)]
    (container,) = find(objects, "Deployment", "kibana")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    (overview,) = [
        o for o in saved_objects() if o["attributes"]["title"] == "Antrea Flows: Overview"
    ]
    assert env["KIBANA_DEFAULTAPPID"] == f"dashboard/{overview['id']}"
    assert env["ELASTICSEARCH_HOSTS"] == "http://elasticsearch:9200"


# -- the importer Job, against a stand-in Kibana --------------------------------------------


class FakeKibana(BaseHTTPRequestHandler):
    """Answers as Kibana 7.10 does: not ready at first, then green; an import of saved
    objects (multipart, with kbn-xsrf) and a change of advanced settings."""

    import_success = True
    status_calls = 0
    imports: list[bytes] = []
    settings: list[dict[str, Any]] = []

    def log_message(self, *args):
        pass

    def reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        assert self.path == "/api/status"
        cls = type(self)
        cls.status_calls += 1
        if cls.status_calls == 1:
            self.reply(503, {"statusCode": 503, "error": "Service Unavailable"})
        else:
            self.reply(200, {"status": {"overall": {"since": "x", "state": "green"}}})

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("kbn-xsrf") != "true":
            return self.reply(400, {"message": "Request must contain a kbn-xsrf header."})
        if self.path == "/api/saved_objects/_import?overwrite=true":
            type(self).imports.append(body)
            return self.reply(200, {"success": type(self).import_success, "successCount": 1})
        assert self.path == "/api/kibana/settings"
        type(self).settings.append(json.loads(body))
        self.reply(200, {"settings": {}})


@pytest.fixture
def kibana():
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    FakeKibana.status_calls, FakeKibana.imports, FakeKibana.settings = 0, [], []
    FakeKibana.import_success = True
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKibana)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_importer(url: str) -> subprocess.CompletedProcess:
    """The Job's script as the Job runs it, with the mounted file where the test has it and
    a short pause between status polls."""
    (container,) = find(documents(), "Job", "kibana-import")["spec"]["template"]["spec"][
        "containers"
    ]
    mount = container["volumeMounts"][0]["mountPath"]
    script = container["command"][2].replace(f"@{mount}/", f"@{COLLECTOR}/")
    script = script.replace("sleep 10", "sleep 0.1")
    assert container["command"][:2] == ["sh", "-c"] and mount == "/kibana"
    return subprocess.run(["sh", "-c", script], env={"KIBANA_URL": url, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_importer_waits_for_kibana_then_imports_the_saved_objects(kibana):
    done = run_importer(kibana)
    assert done.returncode == 0, done.stderr
    assert FakeKibana.status_calls == 2  # it waited while Kibana was not ready
    (upload,) = FakeKibana.imports
    assert b'name="file"; filename="kibana.ndjson"' in upload
    assert (COLLECTOR / "kibana.ndjson").read_bytes() in upload
    (settings,) = FakeKibana.settings
    objects = saved_objects()
    (overview,) = [o for o in objects if o["attributes"]["title"] == "Antrea Flows: Overview"]
    (pattern,) = by_type(objects, "index-pattern")
    route = f"/app/dashboards#/view/{overview['id']}"
    assert settings == {"changes": {"defaultIndex": pattern["id"], "defaultRoute": route}}


def test_the_importer_fails_when_kibana_refuses_the_objects(kibana):
    FakeKibana.import_success = False
    done = run_importer(kibana)
    assert done.returncode != 0
    assert FakeKibana.settings == []  # nothing after a failed import
