"""End to end on the lab: agents and the aggregator that take their metadata (and their
certificates) from a Kubernetes API server produce the same enriched records as with the
inventory file.

The API server is the fake of test/integration (the real `kubernetes` client talks to it
over HTTP), serving exactly what `antrea-flow lab inventory` prints. The same traffic mix
as the quickstart's (every flow type, Services over both families, each policy decision)
runs twice: once with `inventoryFile` and plain TCP, once with `clientConnection.kubeconfig`,
no inventory and mutual TLS with credentials handed over through the API. The Kubernetes
fields of the aggregated records must not differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from integration.fakeapi import FakeApiServer
from integration.ipfixkit import free_port

from antrea_flow.aggregator.config import load_aggregator_config
from antrea_flow.aggregator.service import Aggregator
from antrea_flow.exporter.agent import Agent
from antrea_flow.exporter.config import load_agent_config
from antrea_flow.quickstart import traffic_mix

from .conftest import DROP_TIMEOUT, NODES, WAIT, Lab, wait_until

pytestmark = pytest.mark.root

# What the metadata decides in a record (the rest is counters and times).
KUBERNETES_FIELDS = (
    "sourcePodName", "sourcePodNamespace", "sourceNodeName", "sourcePodLabels",
    "destinationPodName", "destinationPodNamespace", "destinationNodeName",
    "destinationPodLabels", "destinationServicePortName", "destinationServicePort",
    "destinationClusterIPv4", "destinationClusterIPv6", "flowType",
    "ingressNetworkPolicyName", "ingressNetworkPolicyNamespace", "ingressNetworkPolicyType",
    "ingressNetworkPolicyRuleName", "ingressNetworkPolicyRuleAction",
    "egressNetworkPolicyName", "egressNetworkPolicyNamespace", "egressNetworkPolicyType",
    "egressNetworkPolicyRuleName", "egressNetworkPolicyRuleAction",
)  # fmt: skip
OUTCOMES = {"ok": "connected", "refused": "refused", "timeout": "timeout"}
# Through a Service, the endpoint is picked at random: which Pod answered, and so the flow
# type, may differ between runs. They are checked against the address instead.
ENDPOINT_FIELDS = ("destinationPodName", "destinationPodNamespace", "destinationNodeName",
                   "destinationPodLabels", "flowType")  # fmt: skip


class Pipeline:
    """The aggregator and one agent per Node, from config files, on an event loop in a
    background thread; the aggregator writes its records to a JSON log."""

    def __init__(self, lab: Lab, directory: Path, **source: Any):
        self.lab = lab
        self.directory = directory
        directory.mkdir()
        self.json_log = directory / "flows.jsonl"
        port = free_port()
        tls = "kubeconfig" in source
        aggregator_conf = {
            "listenAddress": f"127.0.0.1:{port}",
            "aggregatorTransportProtocol": "tls" if tls else "tcp",
            "flowExportInterval": "1s",
            "correlationTimeout": "10s",
            "certDir": str(directory / "certs"),
            "stateDir": "",
            "jsonLogPath": str(self.json_log),
            "metricsBindAddress": "",
            **self._source_keys(source),
        }
        self.aggregator = Aggregator(
            load_aggregator_config(self._write("fa.conf", aggregator_conf))
        )
        self.agents = []
        for node in NODES:
            conf = {
                "featureGates": {"FlowExporter": True},
                "flowCollectorAddr": f"127.0.0.1:{port}:{'tls' if tls else 'tcp'}",
                "flowPollInterval": "1s",
                "activeFlowExportTimeout": "4s",
                "idleFlowExportTimeout": "2s",
                "metricsBindAddress": "",
                "denyQueue": 1,
                **self._source_keys(source),
            }
            config = load_agent_config(self._write(f"agent-{node}.conf", conf))
            self.agents.append(Agent(config, node, netns_name=lab.netns(node)))
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._error: list[BaseException] = []
        self._thread = threading.Thread(target=self._main, daemon=True)

    @staticmethod
    def _source_keys(source: dict[str, Any]) -> dict[str, Any]:
        if "kubeconfig" in source:
            return {"clientConnection": {"kubeconfig": str(source["kubeconfig"])},
                    "metadataSyncTimeout": "20s"}  # fmt: skip
        return {"inventoryFile": str(source["inventory"])}

    def _write(self, name: str, data: dict[str, Any]) -> Path:
        path = self.directory / name
        path.write_text(yaml.safe_dump(data))
        return path

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._run())
        except BaseException as exc:
            self._error.append(exc)

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        aggregator_stop = asyncio.Event()
        aggregator = asyncio.create_task(self.aggregator.run(aggregator_stop))
        try:
            # Agents stop first: what they hold goes to the aggregator before it drains.
            await asyncio.gather(*(agent.run(self._stop) for agent in self.agents))
        finally:
            aggregator_stop.set()
            await aggregator

    def __enter__(self) -> Pipeline:
        self._thread.start()
        wait_until(
            lambda: (
                self._check()
                or (
                    self.aggregator.listening
                    and all(a.ready() and a.exporter.stats.connected for a in self.agents)
                )
            ),
            "the aggregator listens and every agent polled and connected",
            timeout=30,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._loop.close()
        self._check()

    def _check(self) -> bool:
        if self._error:
            raise self._error[0]
        return False

    def records(self) -> list[dict[str, Any]]:
        if not self.json_log.exists():
            return []
        out = []
        for line in self.json_log.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # the line being written
                out.append(json.loads(line))
        return out


def endpoint_fields(lab: Lab, record: dict[str, Any]) -> dict[str, Any]:
    """What a record through a Service must say of the Pod that answered, by its address."""
    address = record.get("destinationIPv4Address") or record.get("destinationIPv6Address")
    pod = next(p for p in lab.cluster.pods if address in p.addresses.values())
    source = record.get("sourceIPv4Address") or record.get("sourceIPv6Address")
    client = next(p for p in lab.cluster.pods if source in p.addresses.values())
    return {
        "destinationPodName": pod.name,
        "destinationPodNamespace": pod.namespace,
        "destinationNodeName": pod.node.name,
        "destinationPodLabels": json.dumps(pod.labels, sort_keys=True),
        "flowType": 1 if pod.node == client.node else 2,
    }


def run_traffic(lab: Lab, pipeline: Pipeline) -> dict[str, dict[str, Any]]:
    """The traffic mix once; the Kubernetes fields of each probe's aggregated record (those
    of the answering Pod checked against its address when a Service picked it)."""
    ports = {}
    for probe in traffic_mix(lab.cluster):
        timeout = DROP_TIMEOUT if probe.expect == "timeout" else WAIT
        outcome, port = lab.tcp(probe.pod, probe.host, probe.port, timeout=timeout)
        assert outcome == OUTCOMES[probe.expect], (probe.what, outcome)
        ports[probe.what] = (lab.ip(probe.pod, 6 if ":" in probe.host else 4), port)

    def found() -> dict[str, dict[str, Any]] | None:
        by_port = {}
        for record in pipeline.records():
            source = record.get("sourceIPv4Address") or record.get("sourceIPv6Address")
            by_port[(source, record.get("sourceTransportPort"))] = record
        if not all(key in by_port for key in ports.values()):
            return None
        return {what: by_port[key] for what, key in ports.items()}

    records = wait_until(found, "an aggregated record of every probe", timeout=40)
    out = {}
    for what, record in records.items():
        fields = {f: record.get(f) for f in KUBERNETES_FIELDS}
        if record.get("destinationServicePortName"):
            for name, value in endpoint_fields(lab, record).items():
                assert fields.pop(name) == value, (what, name, record)
        out[what] = fields
    return out


@pytest.fixture
def api(lab: Lab) -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        server.put_all(lab.inventory()["items"])
        yield server


def test_metadata_and_certificates_from_the_api_give_the_same_records_as_the_file(
    lab: Lab, inventory_file: Path, api: FakeApiServer, tmp_path: Path
):
    with Pipeline(lab, tmp_path / "file", inventory=inventory_file) as pipeline:
        from_file = run_traffic(lab, pipeline)
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    started = time.monotonic()
    with Pipeline(lab, tmp_path / "api", kubeconfig=kubeconfig) as pipeline:
        assert pipeline.aggregator.watch is not None and pipeline.aggregator.watch.synced
        assert all(a.watch is not None and a.watch.synced for a in pipeline.agents)
        from_api = run_traffic(lab, pipeline)
    assert time.monotonic() - started < 120
    assert from_api == from_file
    # The records say something: Pods, a Service, and the decisions of both kinds of policy.
    values = [v for record in from_file.values() for v in record.values()]
    assert "backend/web:http" in values and "web-allow-frontend" in values
    assert "acnp-db-guard" in values
    # Each agent watched only its own Node's Pods; the certificates came through the API.
    selectors = {r.resource for r in api.requests_of("watch")}
    assert {"pods", "nodes", "services", "networkpolicies.networking.k8s.io"} <= selectors
    assert api.get("configmaps", "flow-aggregator", "flow-aggregator-ca") is not None
    gets = {(r.resource, r.name) for r in api.requests_of("get")}
    assert ("secrets", "flow-aggregator-client-tls") in gets
