"""The agent with its eBPF counter path (root, BCC) on a real kernel: traffic conntrack
does not see becomes records of its own with exact counts; a connection shorter than a
poll gets its TCP flags and packet times; conntrack's flows are still in exactly one
record; and conntrack's counts agree with the counter's."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from antrea_flow.exporter.config import AgentConfig, EbpfConfig

from . import nodenet
from .ipfixkit import run
from .nodenet import CLUSTER_V4, SERVER_V4, NodeNet
from .test_agent_flows import (
    POLL,
    TCP,
    UDP,
    Harness,
    assert_deltas_add_up,
    driven_agent,
    in_thread,
    last_end,
)

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

UNTRACKED_PORT = nodenet.UNCOMMITTED_UDP_PORT  # a sink; here conntrack never sees it
SYN, FIN, ACK = 0x02, 0x01, 0x10
# One UDP socket: its port first, then for each line N on stdin N datagrams and "ok".
STEADY_SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
print(s.getsockname()[1], flush=True)
for line in sys.stdin:
    for _ in range(int(line)):
        s.send(b"s" * 50)
    print("ok", flush=True)
"""


@pytest.fixture(scope="module")
def net() -> NodeNet:
    with nodenet.node_network() as network:
        network.run(network.node, "iptables", "-w", "-t", "raw", "-I", "PREROUTING", "1",
                    "-p", "udp", "--dport", str(UNTRACKED_PORT), "-j", "NOTRACK")  # fmt: skip
        yield network


@pytest.fixture(scope="module")
def inventory_file(tmp_path_factory) -> Path:
    return nodenet.write_inventory(tmp_path_factory.mktemp("agent-ebpf") / "inventory.yaml")


def with_counter(config: AgentConfig) -> AgentConfig:
    ebpf = EbpfConfig(enable=True, max_flows=4096, active_timeout=POLL)
    return dataclasses.replace(config, ebpf=ebpf, host_gateway="br0")


@contextlib.asynccontextmanager
async def counting_agent(net: NodeNet, inventory: Path) -> AsyncIterator[Harness]:
    """A driven agent (see test_agent_flows.driven_agent) with the counter path on."""
    async with driven_agent(net, inventory, with_counter) as harness:
        assert harness.agent.ebpf_loaded, "the counter did not load (see the log)"
        await harness.round(0.0)  # what came before the test
        yield harness


def test_untracked_traffic_is_a_record_of_its_own_with_exact_counts(net, inventory_file):
    async def scenario():
        async with counting_agent(net, inventory_file) as h:
            port = await in_thread(net.udp_burst, SERVER_V4, UNTRACKED_PORT, 250, 200)
            return port, await h.rounds_until(UDP, port, last_end(1), "its idle record")

    port, records = run(scenario())
    assert sum(r["packetDeltaCount"] for r in records) == 250
    assert sum(r["octetDeltaCount"] for r in records) == 250 * (200 + 8 + 20)
    assert_deltas_add_up(records)
    first = records[0]
    assert (first["sourcePodName"], first["destinationPodName"]) == ("client", "server")
    assert first["destinationTransportPort"] == UNTRACKED_PORT and first["flowType"] == 1
    assert first["tcpState"] == "" and first["destinationServicePortName"] == ""
    assert 0 < first["flowStartMilliseconds"] <= records[-1]["flowEndMilliseconds"]


def test_a_connection_shorter_than_a_poll_gets_flags_and_packet_times(net, inventory_file):
    async def scenario():
        async with counting_agent(net, inventory_file) as h:
            before = int(time.time() * 1000)
            client = await in_thread(net.tcp_client, SERVER_V4, nodenet.TCP_PORT)
            await in_thread(client.send, 3000)
            await in_thread(client.close)
            after = int(time.time() * 1000)
            records = await h.rounds_until(TCP, client.port, last_end(3), "its end record")
            entries = net.conntrack("-w", str(nodenet.ZONE), "-p", "tcp", "--sport",
                                    str(client.port))  # fmt: skip
            return before, after, records, entries, h.agent.store.counts.disagreements

    before, after, records, entries, disagreements = run(scenario())
    assert len(records) == 1  # conntrack's connection, not a second one of the counter's
    (record,) = records
    assert record["tcpControlBits"] & (SYN | FIN | ACK) == SYN | FIN | ACK
    assert before <= record["flowStartMilliseconds"] <= record["flowEndMilliseconds"] <= after
    packets = record["packetTotalCount"] + record["reversePacketTotalCount"]
    assert packets >= 8 and disagreements == 0


def test_conntracks_flows_are_still_in_exactly_one_record(net, inventory_file):
    async def scenario():
        async with counting_agent(net, inventory_file) as h:
            port = await in_thread(net.udp_burst, CLUSTER_V4, nodenet.SERVICE_DNS_PORT, 80, 50)
            records = await h.rounds_until(UDP, port, last_end(1), "its idle record")
            return port, records, list(h.records)

    port, records, everything = run(scenario())
    assert sum(r["packetDeltaCount"] for r in records) == 80
    assert {r["destinationServicePortName"] for r in records} == {"prod/web:dns"}
    # No record of the counter's for the same packets (either address they had).
    others = [r for r in everything if r["sourceTransportPort"] == port and r not in records]
    assert others == []


def test_an_untracked_flow_stays_one_flow_across_polls_whatever_the_eviction_period(
    net, inventory_file
):
    """The map is emptied at every poll: with a cacheActiveTimeout longer than the idle
    timeout, a steady untracked flow looked idle between evictions and was split in two."""

    def slow_evictions(config: AgentConfig) -> AgentConfig:
        ebpf = EbpfConfig(enable=True, max_flows=4096, active_timeout=30.0)
        return dataclasses.replace(config, ebpf=ebpf, host_gateway="br0")

    async def scenario():
        async with driven_agent(net, inventory_file, slow_evictions) as h:
            await h.round(0.0)
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
            sender = net.python(net.client, STEADY_SENDER, SERVER_V4, str(UNTRACKED_PORT), **pipes)
            port = int(nodenet.read_line(sender, "the sender's port"))
            for _ in range(5):  # a burst each poll, from one socket, for five polls
                sender.stdin.write("10\n")
                sender.stdin.flush()
                nodenet.read_line(sender, "the burst sent")
                await h.round()
            sender.stdin.close()
            return port, await h.rounds_until(UDP, port, last_end(1), "its idle record")

    port, records = run(scenario())
    assert [r["flowEndReason"] for r in records].count(1) == 1  # one end, at the end
    assert len({r["flowStartSeconds"] for r in records}) == 1
    assert sum(r["packetDeltaCount"] for r in records) == 50
    assert_deltas_add_up(records)
