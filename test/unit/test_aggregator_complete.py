"""The aggregator service's completion of exported records from the inventory (Pods by IP,
their Nodes and labels), and the intake-to-sink path with an injected clock."""

from __future__ import annotations

import json
import textwrap

import pytest

from antrea_flow.aggregator.config import load_aggregator_config
from antrea_flow.aggregator.service import Aggregator
from antrea_flow.ipfix.antrea import exporter_templates
from antrea_flow.ipfix.collecting import Peer
from antrea_flow.ipfix.messages import DataSet, Message

INVENTORY = """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata:
    namespace: frontend
    name: client
    labels: {app: client, tier: web}
  spec: {nodeName: node-1}
  status: {podIPs: [{ip: 10.10.1.5}, {ip: "fd00:10:10:1::5"}]}
- apiVersion: v1
  kind: Pod
  metadata:
    namespace: backend
    name: server
    labels: {app: server}
  spec: {nodeName: node-2}
  status: {podIPs: [{ip: 10.10.2.7}, {ip: "fd00:10:10:2::7"}]}
- apiVersion: v1
  kind: Pod
  metadata: {namespace: backend, name: unlabelled}
  spec: {nodeName: node-2}
  status: {podIP: 10.10.2.8}
- apiVersion: v1
  kind: Node
  metadata: {name: node-2}
  spec: {podCIDRs: [10.10.2.0/24]}
  status: {addresses: [{type: InternalIP, address: 192.168.77.12}]}
- apiVersion: v1
  kind: Service
  metadata: {namespace: backend, name: web}
  spec: {clusterIPs: [10.96.0.10], ports: [{name: http, port: 80}, {name: dns, port: 53,
         protocol: UDP}]}
"""


class Clock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class ListSink:
    name = "list"

    def __init__(self):
        self.records: list[dict] = []
        self.sent = 0
        self.dropped: dict = {}

    def send(self, record: dict) -> None:
        self.records.append(record)
        self.sent += 1


@pytest.fixture
def clock():
    return Clock(1000.0)


@pytest.fixture
def aggregator(tmp_path, clock):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(INVENTORY, encoding="utf-8")
    conf = tmp_path / "flow-aggregator.conf"
    conf.write_text(
        textwrap.dedent(
            f"""\
            aggregatorTransportProtocol: tcp
            listenAddress: "127.0.0.1:0"
            metricsBindAddress: ""
            certDir: {tmp_path / "certs"}
            inventoryFile: {inventory}
            flowExportInterval: 60s
            correlationTimeout: 30s
            """
        ),
        encoding="utf-8",
    )
    config = load_aggregator_config(conf)
    agg = Aggregator(config, clock=clock)
    assert not (tmp_path / "certs").exists(), "no certificates without TLS"
    agg.inventory.refresh()
    agg.sinks.append(ListSink())
    return agg


def exported(ipv6: bool = False, **fields) -> dict:
    """A record as the store exports it (the fields _complete looks at)."""
    family = "IPv6" if ipv6 else "IPv4"
    record = {
        f"source{family}Address": "fd00:10:10:1::5" if ipv6 else "10.10.1.5",
        f"destination{family}Address": "fd00:10:10:2::7" if ipv6 else "10.10.2.7",
        "sourcePodName": "",
        "sourcePodNamespace": "",
        "sourceNodeName": "",
        "destinationPodName": "",
        "destinationPodNamespace": "",
        "destinationNodeName": "",
    }
    record.update(fields)
    return record


@pytest.mark.parametrize("ipv6", [False, True])
def test_missing_pods_namespaces_and_nodes_are_filled_by_ip(aggregator, ipv6):
    record = exported(ipv6)
    aggregator._complete(record)
    assert (record["sourcePodName"], record["sourcePodNamespace"], record["sourceNodeName"]) == (
        "client",
        "frontend",
        "node-1",
    )
    assert (
        record["destinationPodName"],
        record["destinationPodNamespace"],
        record["destinationNodeName"],
    ) == ("server", "backend", "node-2")
    assert json.loads(record["sourcePodLabels"]) == {"app": "client", "tier": "web"}
    assert json.loads(record["destinationPodLabels"]) == {"app": "server"}


def test_present_fields_are_never_overwritten(aggregator):
    record = exported(
        sourcePodName="client-as-the-agent-saw-it",
        sourcePodNamespace="frontend-agent",
        sourceNodeName="node-from-agent",
    )
    aggregator._complete(record)
    assert record["sourcePodName"] == "client-as-the-agent-saw-it"
    assert record["sourcePodNamespace"] == "frontend-agent"
    assert record["sourceNodeName"] == "node-from-agent"
    # the other side, missing, is filled
    assert record["destinationPodName"] == "server"


def test_each_missing_field_is_filled_and_each_present_one_kept(aggregator):
    record = exported(
        sourceNodeName="node-from-agent",  # Pod name and namespace missing
        destinationPodName="server",
        destinationPodNamespace="",  # namespace and Node missing
    )
    aggregator._complete(record)
    assert record["sourcePodName"] == "client"
    assert record["sourcePodNamespace"] == "frontend"
    assert record["sourceNodeName"] == "node-from-agent"
    assert record["destinationPodName"] == "server"
    assert record["destinationPodNamespace"] == "backend"
    assert record["destinationNodeName"] == "node-2"


def test_addresses_not_in_the_inventory_are_left_alone(aggregator):
    record = exported(destinationIPv4Address="93.184.216.34", sourceIPv4Address="10.10.9.9")
    aggregator._complete(record)
    assert record["sourcePodName"] == "" and record["destinationPodName"] == ""
    assert "sourcePodLabels" not in record and "destinationPodLabels" not in record


def test_a_pod_without_labels_gets_no_labels_field(aggregator):
    record = exported(destinationIPv4Address="10.10.2.8")
    aggregator._complete(record)
    assert record["destinationPodName"] == "unlabelled"
    assert "destinationPodLabels" not in record


def test_a_node_address_names_its_node(aggregator):
    record = exported(sourceIPv4Address="192.168.77.12")  # host traffic of node-2
    aggregator._complete(record)
    assert record["sourceNodeName"] == "node-2" and record["sourcePodName"] == ""


def test_a_missing_service_port_name_is_filled_from_the_services(aggregator):
    record = exported(destinationClusterIPv4="10.96.0.10", destinationServicePort=53,
                      protocolIdentifier=17, destinationServicePortName="")  # fmt: skip
    aggregator._complete(record)
    assert record["destinationServicePortName"] == "backend/web:dns"
    kept = exported(destinationClusterIPv4="10.96.0.10", destinationServicePort=80,
                    protocolIdentifier=6, destinationServicePortName="as/agent:saw")  # fmt: skip
    aggregator._complete(kept)
    assert kept["destinationServicePortName"] == "as/agent:saw"
    unknown = exported(destinationClusterIPv4="10.96.0.10", destinationServicePort=8443,
                       protocolIdentifier=6, destinationServicePortName="")  # fmt: skip
    aggregator._complete(unknown)
    assert unknown["destinationServicePortName"] == ""


def test_a_reused_pod_ip_is_named_by_the_flows_start_time(aggregator, clock):
    store = aggregator.metadata

    def job(name: str, created: str) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": "jobs", "name": name, "creationTimestamp": created},
            "spec": {"nodeName": "node-1"},
            "status": {"podIP": "10.10.1.77"},
        }

    old = job("old", "1970-01-01T00:01:40Z")  # 100
    new = job("new", "1970-01-01T00:16:00Z")  # 960
    store.apply([("ADDED", old)])
    clock.now = 950.0
    store.apply([("DELETED", old), ("ADDED", new)])
    late = exported(sourceIPv4Address="10.10.1.77", flowStartSeconds=500)
    aggregator._complete(late)
    assert late["sourcePodName"] == "old"  # the flow began before the IP was reused
    fresh = exported(sourceIPv4Address="10.10.1.77", flowStartSeconds=980)
    aggregator._complete(fresh)
    assert fresh["sourcePodName"] == "new"


def agent_record(side: str, end: int, packets: int) -> dict:
    template = exporter_templates()[0]
    record = dict(zip(template.keys, template.values_from({}), strict=True))
    record.update(
        sourceIPv4Address="10.10.1.5",
        destinationIPv4Address="10.10.2.7",
        protocolIdentifier=6,
        sourceTransportPort=40000,
        destinationTransportPort=8080,
        flowStartSeconds=900,
        flowEndSeconds=end,
        flowEndReason=2,
        packetTotalCount=packets,
        packetDeltaCount=packets,
        flowType=2,
    )
    if side == "source":
        record.update(sourcePodName="client", sourcePodNamespace="frontend", sourceNodeName="")
    else:
        record.update(destinationPodName="server", destinationPodNamespace="backend")
    return record


def message(domain: int, *records: dict) -> Message:
    return Message(
        export_time=0,
        sequence_number=0,
        observation_domain_id=domain,
        data_sets=[DataSet(exporter_templates()[0], list(records))],
    )


def test_intake_to_sink_with_completion_and_provenance(aggregator, clock):
    sink = aggregator.sinks[-1]
    node1 = Peer("192.168.77.101", 50001, "tcp", 1)
    node2 = Peer("::ffff:192.168.77.102", 50002, "tcp", 2)  # a v4 agent on a dual-stack socket
    aggregator._intake(node1, message(11, agent_record("source", 990, 5)))
    assert aggregator.export_due() == 0  # waiting for node-2's half
    clock.now += 5
    aggregator._intake(node2, message(22, agent_record("destination", 991, 4)))
    assert aggregator.export_due() == 1
    (record,) = sink.records
    assert record["incomplete"] is False
    assert record["originalExporterIPv4Address"] == "192.168.77.102"
    assert record["originalObservationDomainId"] == 22
    assert "originalExporterIPv6Address" not in record
    assert record["packetTotalCountFromSourceNode"] == 5
    assert record["packetTotalCountFromDestinationNode"] == 4
    # the agents' Pods are kept; both Pods' labels are added
    assert record["sourcePodName"] == "client"
    assert json.loads(record["sourcePodLabels"]) == {"app": "client", "tier": "web"}
    assert json.loads(record["destinationPodLabels"]) == {"app": "server"}
    assert aggregator.export_due() == 0


def test_an_incomplete_record_is_completed_from_the_inventory(aggregator, clock):
    sink = aggregator.sinks[-1]
    node1 = Peer("192.168.77.101", 50001, "tcp", 1)
    aggregator._intake(node1, message(11, agent_record("source", 990, 5)))
    clock.now += 29
    assert aggregator.export_due() == 0
    clock.now += 1  # correlationTimeout 30s
    assert aggregator.export_due() == 1
    (record,) = sink.records
    assert record["incomplete"] is True
    assert record["destinationPodName"] == "server"
    assert record["destinationPodNamespace"] == "backend"
    assert record["destinationNodeName"] == "node-2"
    assert aggregator.store.stats.correlation_timeouts == 1


def test_drain_on_shutdown_goes_to_the_sinks(aggregator, clock):
    sink = aggregator.sinks[-1]
    aggregator._intake(
        Peer("192.168.77.101", 50001, "tcp", 1), message(11, agent_record("source", 990, 5))
    )
    assert aggregator.export_due(drain=True) == 1
    assert sink.records[0]["incomplete"] is True
    assert sink.records[0]["destinationPodName"] == "server"
