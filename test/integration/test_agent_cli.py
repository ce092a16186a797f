"""`antrea-flow agent` as a subprocess: exports a pod network's flows to an `antrea-flow
collector` subprocess and serves metrics; exits 0 on SIGTERM and when the FlowExporter
gate is off; a bad config or namespace stops it with a one-line error."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import nodenet
from .ipfixkit import free_port
from .nodenet import CLIENT_V4, CLUSTER_V4, SERVER_V4, NodeNet, wait_until

WAIT = 20.0


def command() -> list[str]:
    script = Path(sys.executable).parent / "antrea-flow"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "antrea_flow.cli"]


def write_config(path: Path, **overrides: Any) -> Path:
    config: dict[str, Any] = {
        "featureGates": {"FlowExporter": True},
        "flowCollectorAddr": "127.0.0.1:4739:tcp",
        "flowPollInterval": "1s",
        "activeFlowExportTimeout": "3s",
        "idleFlowExportTimeout": "2s",
        "conntrackZone": nodenet.ZONE,
        "metricsBindAddress": "",
    }
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def run_agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command(), "agent", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextlib.contextmanager
def background(args: list[str], directory: Path, name: str) -> Iterator[subprocess.Popen]:
    """A subprocess with stdout/stderr in files NAME.out/NAME.err; killed if still running."""
    with open(directory / f"{name}.out", "w") as out, open(directory / f"{name}.err", "w") as err:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def text(directory: Path, name: str) -> str:
    return (directory / name).read_text()


def logged(process: subprocess.Popen, directory: Path, name: str, line: str) -> None:
    """Wait until the background process `name` logs `line`; it must still be running."""
    wait_until(
        lambda: line in text(directory, f"{name}.err") or process.poll() is not None,
        f"{name}: {line!r}",
        WAIT,
    )
    assert process.poll() is None, text(directory, f"{name}.err")


def json_records(directory: Path, name: str) -> list[dict[str, Any]]:
    # Only complete lines: the collector may be in the middle of writing one.
    content = text(directory, name)
    return [json.loads(line) for line in content.splitlines(keepends=True) if line.endswith("\n")]


@pytest.fixture(scope="module")
def net() -> NodeNet:
    with nodenet.node_network() as network:
        yield network


@pytest.mark.root
@pytest.mark.parametrize("ebpf", [False, pytest.param(True, marks=pytest.mark.ebpf)])
def test_agent_exports_to_collector_process_and_exits_on_sigterm(net, tmp_path, ebpf):
    """With the counter path too: its loading forks nothing that could signal the agent's
    loop (pyroute2's netns option did: the agent stopped a second after loading)."""
    net.flush_conntrack()
    collector_port = free_port()
    metrics_port = free_port()
    inventory = nodenet.write_inventory(tmp_path / "inventory.yaml")
    config = write_config(
        tmp_path / "antrea-agent.conf",
        flowCollectorAddr=f"127.0.0.1:{collector_port}:tcp",
        inventoryFile=str(inventory),
        metricsBindAddress=f"127.0.0.1:{metrics_port}",
        # Antrea's other agent keys are accepted (the same ConfigMap works).
        trafficEncapMode="encap",
        **({"ebpf": {"enable": True}, "hostGateway": "br0"} if ebpf else {}),
    )
    collector_args = [
        *command(),
        "collector",
        "--address",
        f"127.0.0.1:{collector_port}:tcp",
        "--output",
        "json",
    ]
    agent_args = [*command(), "agent", "--config", str(config), "--node-name", "node-1"]
    agent_args += ["--netns", net.node]
    with background(collector_args, tmp_path, "collector") as collector:
        logged(collector, tmp_path, "collector", "collecting IPFIX on")
        with background(agent_args, tmp_path, "agent") as agent:
            logged(agent, tmp_path, "agent", "connected to collector")
            if ebpf:
                logged(agent, tmp_path, "agent", "eBPF packet counter loaded")
            port = net.udp_burst(CLUSTER_V4, nodenet.SERVICE_DNS_PORT, 20, 100)

            def flow() -> list[dict[str, Any]]:
                return [
                    r
                    for r in json_records(tmp_path, "collector.out")
                    if r["sourceTransportPort"] == port and r["protocolIdentifier"] == 17
                ]

            wait_until(
                lambda: any(r["flowEndReason"] == 1 for r in flow()) or agent.poll() is not None,
                "the flow's idle record",
                WAIT,
            )
            assert agent.poll() is None, text(tmp_path, "agent.err")
            with urllib.request.urlopen(
                f"http://127.0.0.1:{metrics_port}/metrics", timeout=10
            ) as response:
                metrics = response.read().decode()
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(WAIT)
        collector.send_signal(signal.SIGTERM)
        collector_code = collector.wait(WAIT)
    agent_log = text(tmp_path, "agent.err")
    assert code == 0, agent_log
    assert collector_code == 0, text(tmp_path, "collector.err")
    assert "Traceback" not in agent_log, agent_log
    assert f"in netns {net.node}" in agent_log
    records = flow()
    assert sum(r["packetDeltaCount"] for r in records) == 20
    assert sum(r["octetDeltaCount"] for r in records) == 20 * 128
    last = records[-1]
    assert last["sourceIPv4Address"] == CLIENT_V4
    assert last["destinationIPv4Address"] == SERVER_V4
    assert last["destinationClusterIPv4"] == CLUSTER_V4
    assert last["destinationServicePortName"] == "prod/web:dns"
    assert last["sourcePodName"] == "client" and last["destinationPodName"] == "server"
    assert last["sourceNodeName"] == "node-1"
    assert last["templateId"] == 256 and last["exporterIPv4Address"] == "127.0.0.1"
    assert "antrea_agent_flow_collector_reconnection_count 1.0" in metrics
    assert "antrea_agent_conntrack_poll_cycle_duration_seconds_count" in metrics
    assert ("tcpControlBits" in last) == ebpf
    if ebpf:
        assert "antrea_agent_ebpf_loaded 1.0" in metrics
        shown = net.run(net.node, "tc", "filter", "show", "dev", "vc", "ingress").stdout
        assert "antrea-flow" not in shown  # detached on SIGTERM


def test_agent_with_flow_exporter_gate_off_exits_zero(tmp_path):
    config = write_config(tmp_path / "antrea-agent.conf", featureGates={"FlowExporter": False})
    result = run_agent("--config", str(config), "--node-name", "node-1")
    assert result.returncode == 0, result.stderr
    assert "FlowExporter" in result.stderr and "off" in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ({"flowPollIntervall": "1s"}, ["flowPollIntervall", "did you mean flowPollInterval"]),
        ({"flowPollInterval": "500ms"}, ["flowPollInterval", "500ms", "at least"]),
        ({"conntrackZone": 70000}, ["conntrackZone", "70000"]),
        ({"flowCollectorAddr": "127.0.0.1:4739:sctp"}, ["flowCollectorAddr", "sctp"]),
    ],
    ids=["unknown-key", "poll-too-short", "zone-out-of-range", "bad-protocol"],
)
def test_agent_bad_config_one_line_error(tmp_path, override, names):
    config = write_config(tmp_path / "antrea-agent.conf", **override)
    result = run_agent("--config", str(config), "--node-name", "node-1")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_agent_unknown_netns_one_line_error(tmp_path):
    name = "doesnotexist"
    assert not os.path.exists(f"/run/netns/{name}")
    config = write_config(tmp_path / "antrea-agent.conf")
    result = run_agent("--config", str(config), "--node-name", "node-1", "--netns", name)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0]


@pytest.mark.parametrize("name", ["a/b", ".."])
def test_agent_invalid_netns_name_one_line_error(tmp_path, name):
    config = write_config(tmp_path / "antrea-agent.conf")
    result = run_agent("--config", str(config), "--node-name", "node-1", "--netns", name)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert name in lines[0] and "--netns" in lines[0], lines[0]


@pytest.mark.root
def test_agent_missing_inventory_one_line_error(net, tmp_path):
    missing = tmp_path / "no-such-inventory.yaml"
    config = write_config(tmp_path / "antrea-agent.conf", inventoryFile=str(missing))
    # --netns: the agent must never touch the root namespace's sysctls in these tests.
    result = run_agent("--config", str(config), "--node-name", "node-1", "--netns", net.node)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(missing) in lines[0], lines[0]
