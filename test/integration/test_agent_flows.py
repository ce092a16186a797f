"""The node agent against a real kernel: conntrack in a node namespace with pod namespaces on
a bridge (see nodenet.py), the agent polling it every second and exporting IPFIX over TCP to
an in-process collector. Checks exact counters, the active/idle/end-of-flow sequence, IPv6,
a collector restart, the zone and ownership filters, the sysctls the agent turns on, and
the agent's metrics.

Where a test checks which timeout fires when, the agent is driven (`driven_agent`): the test
runs its rounds on a clock only the test moves, so the outcome never depends on how the
scheduler spaced real polls; the others run the agent's own loop in real time."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from antrea_flow.conntrack.parser import ParseError
from antrea_flow.exporter.agent import Agent, enable_accounting, observation_domain_id
from antrea_flow.exporter.config import AgentConfig
from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.collecting import CollectingProcess, Peer
from antrea_flow.ipfix.messages import Message
from antrea_flow.ipfix.render import message_records
from antrea_flow.metrics import serve

from . import nodenet
from .ipfixkit import V4, V6, Clock, eventually, free_port, run
from .nodenet import (
    CLIENT_V4,
    CLIENT_V6,
    CLUSTER_V4,
    CLUSTER_V6,
    NAMESPACE,
    SERVER_V4,
    SERVER_V6,
    NodeNet,
)

pytestmark = pytest.mark.root

NODE = "node-1"
POLL, ACTIVE, IDLE = 1.0, 3.0, 2.0
UDP, TCP = 17, 6
END_IDLE, END_ACTIVE, END_OF_FLOW = 1, 2, 3
INTRA_NODE = 1
# Liveness bound for one expected export: idle timeout + a poll + generous slack.
EXPORT_WAIT = 15.0
# A driven agent's bound on the rounds until an expected export (each POLL seconds of its
# clock): a few more than the longest timeout.
ROUNDS = int((ACTIVE + IDLE) / POLL) + 3
# A driven agent's step past every timeout: what is not exported after two is never due.
PAST_TIMEOUTS = ACTIVE + IDLE
COUNTERS = (
    ("packetDeltaCount", "packetTotalCount"),
    ("octetDeltaCount", "octetTotalCount"),
    ("reversePacketDeltaCount", "reversePacketTotalCount"),
    ("reverseOctetDeltaCount", "reverseOctetTotalCount"),
)


@pytest.fixture(scope="module")
def net() -> NodeNet:
    with nodenet.node_network() as network:
        yield network


@pytest.fixture(scope="module")
def inventory_file(tmp_path_factory) -> Path:
    return nodenet.write_inventory(tmp_path_factory.mktemp("agent") / "inventory.yaml")


@pytest.fixture
def fresh(net: NodeNet) -> NodeNet:
    """The shared network with an empty conntrack table (no flows of earlier tests)."""
    net.flush_conntrack()
    return net


def agent_config(inventory: Path, collector_port: int) -> AgentConfig:
    return AgentConfig(
        flow_exporter_enabled=True,
        collector=TransportAddress("127.0.0.1", collector_port, "tcp"),
        poll_interval=POLL,
        active_timeout=ACTIVE,
        idle_timeout=IDLE,
        conntrack_zone=nodenet.ZONE,
        inventory_file=str(inventory),
        tls_cert_dir="",
        metrics_address=None,
        protocol_filter=None,
    )


@dataclass
class Harness:
    """A running agent and the collector it exports to; records in arrival order, each
    tagged with the collector instance (`_collector`) that received it."""

    net: NodeNet
    agent: Agent
    port: int
    collector: CollectingProcess | None = None
    instance: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    sequences: list = field(default_factory=list)  # the last collector's, for the next
    clock: Clock | None = None  # a driven agent's (see driven_agent)

    def _handle(self, peer: Peer, message: Message) -> None:
        for record in message_records(peer, message):
            record["_collector"] = self.instance
            self.records.append(record)

    async def start_collector(self) -> None:
        """A collector that follows the agent's sequence numbers across its sessions, and
        across its own restarts (as the aggregator does through its checkpoint), so the
        agent's replay after a reconnect is taken once."""
        self.instance += 1
        collector = CollectingProcess(
            TransportAddress("127.0.0.1", self.port, "tcp"),
            self._handle,
            sequence_scope="exporter",
        )
        assert collector.exporter_sequences is not None
        for stream, expected, export_time in self.sequences:
            collector.exporter_sequences.resume(stream, expected, export_time)
        await collector.start()
        self.collector = collector
        self.port = collector.port

    async def stop_collector(self) -> None:
        if self.collector is not None:
            await self.collector.stop()
            assert self.collector.exporter_sequences is not None
            self.sequences = self.collector.exporter_sequences.state()
            self.collector = None

    def flow(self, proto: int, source_port: int) -> list[dict[str, Any]]:
        """The records of the connection from the client socket with this port."""
        return [
            r
            for r in self.records
            if r["protocolIdentifier"] == proto and r["sourceTransportPort"] == source_port
        ]

    async def wait_flow(
        self, proto: int, source_port: int, done: Callable[[list[dict]], bool], what: str
    ) -> list[dict[str, Any]]:
        await eventually(lambda: done(self.flow(proto, source_port)), what, EXPORT_WAIT, 0.05)
        return self.flow(proto, source_port)

    async def wait_polls(self, count: int) -> None:
        """Until the agent has started `count` more polls."""
        target = self.agent.store.stats.polls + count
        await eventually(
            lambda: self.agent.store.stats.polls >= target, f"{count} polls", EXPORT_WAIT
        )

    async def wait_delivered(self) -> None:
        """Until the collector has every record the agent has queued so far."""
        exporter = self.agent.exporter
        await eventually(
            lambda: exporter.queued == 0 and len(self.records) >= exporter.stats.records_sent,
            "the collector has every record queued so far",
            EXPORT_WAIT,
        )

    # -- a driven agent (driven_agent) ---------------------------------------------------

    async def round(self, advance: float = POLL) -> None:
        """Move the agent's clock on by `advance` seconds and run one round of its loop at
        that time (the metadata check, a poll, the export of what is due); return once the
        collector has every record the round exported."""
        assert self.clock is not None, "rounds are for a driven agent"
        self.clock.now += advance
        self.agent.refresh_metadata()
        await in_thread(self.agent.poll)
        self.agent.export_due()
        await self.wait_delivered()

    async def rounds_until(
        self, proto: int, source_port: int, done: Callable[[list[dict]], bool], what: str
    ) -> list[dict[str, Any]]:
        """Rounds POLL seconds apart until `done(records of the connection)`."""
        for _ in range(ROUNDS):
            if done(self.flow(proto, source_port)):
                return self.flow(proto, source_port)
            await self.round()
        raise AssertionError(f"not within {ROUNDS} rounds: {what}")


@contextlib.asynccontextmanager
async def running_agent(
    net: NodeNet, inventory: Path, *, clock: Callable[[], float] = time.time
) -> AsyncIterator[Harness]:
    harness = Harness(net, None, 0)  # type: ignore[arg-type]
    await harness.start_collector()
    agent = Agent(agent_config(inventory, harness.port), NODE, netns_name=net.node, clock=clock)
    harness.agent = agent
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await eventually(lambda: agent.store.stats.polls >= 1 or task.done(), "a first poll")
        if task.done():
            task.result()  # the agent failed to start: raise its error
        await eventually(lambda: agent.exporter.stats.connected, "agent connected")
        yield harness
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 15)
            if harness.collector is not None:
                # The collector shares this loop: let it read what the agent sent last.
                collector = harness.collector
                with contextlib.suppress(AssertionError):
                    await eventually(
                        lambda: collector.stats.records >= agent.exporter.stats.records_sent,
                        "the collector read the last records",
                        5.0,
                    )
        finally:
            await harness.stop_collector()


@contextlib.asynccontextmanager
async def driven_agent(
    net: NodeNet,
    inventory: Path,
    configure: Callable[[AgentConfig], AgentConfig] = lambda config: config,
) -> AsyncIterator[Harness]:
    """An agent whose rounds the test runs (`Harness.round`) on a clock only the test moves:
    which timeout fires when then depends on the traffic and the times the test chose,
    never on how the scheduler spaced real polls. (The run loop, with real time, is what
    the other tests run.) The clock starts at a whole second and moves by whole seconds, so
    a record's flowEndSeconds is the exact time of the round that last saw its traffic. It
    starts an hour ahead of real time: a real agent reads its clock after the dump, so every
    connection it sees began before that poll; a driven clock behind real time (a loaded
    machine spends more between rounds than the test advances) would put a kernel start
    time after the round that saw it, and flowStartSeconds after flowEndSeconds."""
    harness = Harness(net, None, 0)  # type: ignore[arg-type]
    await harness.start_collector()
    clock = Clock(float(int(time.time()) + 3600))
    config = configure(agent_config(inventory, harness.port))
    agent = Agent(config, NODE, netns_name=net.node, clock=clock)
    harness.agent, harness.clock = agent, clock
    try:
        # What the run loop does before its first round.
        agent.refresh_metadata()
        enable_accounting(net.node)
        agent.exporter.start()
        await agent.start_counter()
        await eventually(lambda: agent.exporter.stats.connected, "agent connected")
        yield harness
    finally:
        try:
            # The agent's own shutdown: a run told to stop before its first round makes its
            # last poll, exports what it holds, stops the exporter and closes its socket.
            stop = asyncio.Event()
            stop.set()
            await asyncio.wait_for(agent.run(stop), 15)
        finally:
            await harness.stop_collector()


def last_end(reason: int) -> Callable[[list[dict]], bool]:
    return lambda rs: bool(rs) and rs[-1]["flowEndReason"] == reason


def assert_deltas_add_up(records: list[dict[str, Any]]) -> None:
    """Each record's totals equal the sum of the deltas up to it: nothing lost, nothing
    counted twice; the first record's deltas are its totals."""
    assert records
    sums = dict.fromkeys((delta for delta, _ in COUNTERS), 0)
    for i, record in enumerate(records):
        for delta, total in COUNTERS:
            sums[delta] += record[delta]
            assert sums[delta] == record[total], (
                f"record {i} of {len(records)}: sum of {delta} {sums[delta]} != {total} "
                f"{record[total]}; reasons {[r['flowEndReason'] for r in records]}"
            )
    first = records[0]
    for delta, total in COUNTERS:
        assert first[delta] == first[total]


def ct_counters(line: str) -> list[tuple[int, int]]:
    """(packets, bytes) of both directions of one `conntrack -L` line."""
    packets = [int(w[8:]) for w in line.split() if w.startswith("packets=")]
    octets = [int(w[6:]) for w in line.split() if w.startswith("bytes=")]
    assert len(packets) == len(octets) == 2, line
    return list(zip(packets, octets, strict=True))


def tcp_entries(net: NodeNet, source_port: int) -> list[str]:
    """The pod zone's conntrack entries of the TCP connection from this client port."""
    return net.conntrack("-w", str(nodenet.ZONE), "-p", "tcp", "--sport", str(source_port))


def in_thread(function: Callable, *args: Any) -> Any:
    """Blocking helpers (subprocesses in the pods) run off the loop the agent runs on."""
    return asyncio.to_thread(function, *args)


# -- 1. exact counters, enrichment, Service fields ------------------------------------------


def test_udp_to_service_exact_counters_and_metadata(fresh, inventory_file):
    async def scenario():
        async with driven_agent(fresh, inventory_file) as h:
            port = await in_thread(fresh.udp_burst, CLUSTER_V4, nodenet.SERVICE_DNS_PORT, 100, 100)
            await h.round(0.0)
            records = await h.rounds_until(UDP, port, last_end(END_IDLE), "an idle record")
            idle_at = h.clock.now
            for _ in range(2):  # the entry stays in the table, without new traffic
                await h.round(PAST_TIMEOUTS)
            entries = fresh.conntrack("-w", str(nodenet.ZONE), "-p", "udp", "--sport", str(port))
            return port, records, idle_at, h.flow(UDP, port), entries

    port, records, idle_at, final, entries = run(scenario())
    assert final == records, "records after the idle-timeout record without new traffic"
    assert idle_at == records[-1]["flowEndSeconds"] + IDLE, "not exported at its idle timeout"
    assert sum(r["packetDeltaCount"] for r in records) == 100
    assert sum(r["octetDeltaCount"] for r in records) == 100 * (100 + 8 + 20)
    last = records[-1]
    assert (last["packetTotalCount"], last["octetTotalCount"]) == (100, 12800)
    assert_deltas_add_up(records)
    for record in records:
        assert record["reversePacketDeltaCount"] == record["reverseOctetDeltaCount"] == 0
        assert record["reversePacketTotalCount"] == record["reverseOctetTotalCount"] == 0
        assert record["templateId"] == V4
        assert record["observationDomainId"] == observation_domain_id(NODE)
        assert record["sourceIPv4Address"] == CLIENT_V4
        assert record["destinationIPv4Address"] == SERVER_V4  # after DNAT
        assert record["sourceTransportPort"] == port
        assert record["destinationTransportPort"] == nodenet.UDP_PORT  # after DNAT
        assert record["flowType"] == INTRA_NODE
        assert record["sourcePodName"] == "client"
        assert record["sourcePodNamespace"] == NAMESPACE
        assert record["destinationPodName"] == "server"
        assert record["destinationPodNamespace"] == NAMESPACE
        assert record["sourceNodeName"] == record["destinationNodeName"] == NODE
        assert record["destinationClusterIPv4"] == CLUSTER_V4
        assert record["destinationServicePort"] == nodenet.SERVICE_DNS_PORT
        assert record["destinationServicePortName"] == f"{NAMESPACE}/{nodenet.SERVICE_NAME}:dns"
        assert record["tcpState"] == ""
        assert record["flowStartSeconds"] <= record["flowEndSeconds"]
    # The entry the records describe is in Antrea's pod zone, with the same counters.
    assert len(entries) == 1, entries
    assert f"zone={nodenet.ZONE}" in entries[0]
    assert f"dst={CLUSTER_V4}" in entries[0] and f"dport={nodenet.SERVICE_DNS_PORT}" in entries[0]
    assert ct_counters(entries[0]) == [(100, 12800), (0, 0)]


# -- 2. active, idle and end-of-flow exports of one long TCP connection ----------------------


def test_long_tcp_connection_active_idle_end_records(fresh, inventory_file):
    bursts = 10  # one a second: three active timeouts

    async def scenario():
        async with driven_agent(fresh, inventory_file) as h:
            client = await in_thread(fresh.tcp_client, CLUSTER_V4, nodenet.SERVICE_HTTP_PORT)
            await in_thread(client.send, 1000)
            await h.round(0.0)
            first_seen = h.clock.now
            for _ in range(bursts):
                await in_thread(client.send, 1000)
                await h.round()
            port = client.port
            await h.rounds_until(TCP, port, last_end(END_IDLE), "an idle record once quiet")
            idle_at = h.clock.now
            await in_thread(client.close)
            # The next round sees the connection ended, not its way there (FIN_WAIT, ...).
            await in_thread(
                nodenet.wait_until,
                lambda: any("TIME_WAIT" in e for e in tcp_entries(fresh, port)),
                "the connection in TIME_WAIT",
            )
            await h.round()
            records = h.flow(TCP, port)
            for _ in range(2):
                await h.round(PAST_TIMEOUTS)
            return first_seen, idle_at, records, h.flow(TCP, port), tcp_entries(fresh, port)

    first_seen, idle_at, records, final, entries = run(scenario())
    reasons = [r["flowEndReason"] for r in records]
    assert reasons[-1] == END_OF_FLOW, f"the round after the close did not end it: {reasons}"
    # Traffic every round: an active record every ACTIVE seconds, exactly, and no idle one.
    # (After the traffic the client's last delayed ACK may be seen a round later and make
    # one more active record before the idle one: whether it is depends on the kernel.)
    actives = [int(first_seen + ACTIVE * k) for k in range(1, int(bursts // ACTIVE) + 1)]
    assert [r["flowEndSeconds"] for r in records[: len(actives)]] == actives, reasons
    assert reasons[-2:] == [END_IDLE, END_OF_FLOW], reasons
    assert set(reasons[:-2]) == {END_ACTIVE} and len(reasons) - 2 >= len(actives), reasons
    assert idle_at == records[-2]["flowEndSeconds"] + IDLE, "not exported at its idle timeout"
    assert final == records, "records after the end-of-flow record"
    assert_deltas_add_up(records)
    last = records[-1]
    assert last["tcpState"] == "TIME_WAIT"
    assert [r["tcpState"] for r in records[:-2]] == ["ESTABLISHED"] * (len(records) - 2)
    # The payload both ways plus headers; the final totals are the kernel's counters.
    assert last["octetTotalCount"] > bursts * 1000
    assert last["reverseOctetTotalCount"] > bursts * 1000
    assert len(entries) == 1 and "TIME_WAIT" in entries[0], entries
    assert ct_counters(entries[0]) == [
        (last["packetTotalCount"], last["octetTotalCount"]),
        (last["reversePacketTotalCount"], last["reverseOctetTotalCount"]),
    ]
    assert len({r["flowStartSeconds"] for r in records}) == 1
    ends = [r["flowEndSeconds"] for r in records]
    assert ends == sorted(ends)
    for record in records:
        assert record["destinationServicePortName"] == f"{NAMESPACE}/{nodenet.SERVICE_NAME}:http"
        assert record["destinationClusterIPv4"] == CLUSTER_V4
        assert record["destinationTransportPort"] == nodenet.TCP_PORT


# -- 3. IPv6 ---------------------------------------------------------------------------------


def test_ipv6_flows_use_template_257(fresh, inventory_file):
    def connect_and_close(host: str, port: int) -> int:
        client = fresh.tcp_client(host, port)
        client.send(2000)
        client.close()
        return client.port

    async def scenario():
        async with running_agent(fresh, inventory_file) as h:
            direct = await in_thread(connect_and_close, SERVER_V6, nodenet.TCP_PORT)
            service = await in_thread(connect_and_close, CLUSTER_V6, nodenet.SERVICE_HTTP_PORT)
            done = last_end(END_OF_FLOW)
            a = await h.wait_flow(TCP, direct, done, "the direct IPv6 connection's end")
            b = await h.wait_flow(TCP, service, done, "the IPv6 Service connection's end")
            return a, b

    direct, service = run(scenario())
    for records in (direct, service):
        assert_deltas_add_up(records)
        assert records[-1]["reverseOctetTotalCount"] > 2000
        for record in records:
            assert record["templateId"] == V6
            assert "sourceIPv4Address" not in record
            assert record["sourceIPv6Address"] == CLIENT_V6
            assert record["destinationIPv6Address"] == SERVER_V6
            assert record["destinationTransportPort"] == nodenet.TCP_PORT
            assert record["flowType"] == INTRA_NODE
            assert (record["sourcePodName"], record["destinationPodName"]) == ("client", "server")
            assert record["sourceNodeName"] == record["destinationNodeName"] == NODE
    for record in direct:
        assert record["destinationClusterIPv6"] == "::"
        assert record["destinationServicePort"] == 0
        assert record["destinationServicePortName"] == ""
    for record in service:
        assert record["destinationClusterIPv6"] == CLUSTER_V6
        assert record["destinationServicePort"] == nodenet.SERVICE_HTTP_PORT
        assert record["destinationServicePortName"] == f"{NAMESPACE}/{nodenet.SERVICE_NAME}:http"


# -- 4. collector restart -------------------------------------------------------------------


def test_collector_restart_loses_and_duplicates_nothing(fresh, inventory_file):
    udp_packets = 5

    async def scenario():
        async with running_agent(fresh, inventory_file) as h:
            agent = h.agent
            tcp = await in_thread(fresh.tcp_client, SERVER_V4, nodenet.TCP_PORT)
            udp_ports: list[int] = []
            stop_traffic = asyncio.Event()

            async def traffic() -> None:
                while not stop_traffic.is_set():
                    await in_thread(tcp.send, 500)
                    udp_ports.append(
                        await in_thread(
                            fresh.udp_burst, SERVER_V4, nodenet.UDP_PORT, udp_packets, 50
                        )
                    )
                    await asyncio.sleep(0.4)

            talker = asyncio.create_task(traffic())
            try:
                # Records of both kinds reach the first collector...
                await eventually(
                    lambda: h.flow(TCP, tcp.port) and any(h.flow(UDP, p) for p in udp_ports),
                    "first records of the TCP connection and of a UDP flow",
                    EXPORT_WAIT,
                )
                # ...which then goes away between two messages, while traffic goes on.
                await eventually(
                    lambda: h.collector.stats.records == agent.exporter.stats.records_sent,
                    "the first collector has all records sent so far",
                )
                await h.stop_collector()
                await eventually(lambda: not agent.exporter.stats.connected, "agent noticed")
                await eventually(
                    lambda: agent.exporter.queued > 0, "records queued during the outage"
                )
                queued = agent.exporter.queued
                await eventually(
                    lambda: agent.exporter.queued > queued, "more records queued in the outage"
                )
                await h.start_collector()
                await eventually(lambda: agent.exporter.stats.connected, "agent reconnected")
                # Traffic across the reconnection: new flows while the backlog goes out.
                rounds = len(udp_ports)
                await eventually(
                    lambda: len(udp_ports) >= rounds + 2,
                    "two rounds of traffic after the reconnection",
                    EXPORT_WAIT,
                )
            finally:
                stop_traffic.set()
                await asyncio.wait_for(talker, nodenet.WAIT * 2)
            await in_thread(tcp.close)
            await h.wait_flow(TCP, tcp.port, last_end(END_OF_FLOW), "the TCP end-of-flow")
            for port in udp_ports:
                await h.wait_flow(UDP, port, last_end(END_IDLE), f"UDP flow {port} idle record")
            await eventually(lambda: agent.exporter.queued == 0, "queue drained")
            await eventually(
                lambda: len(h.records) == agent.exporter.stats.records_sent, "all sent arrived"
            )
            return h, tcp.port, udp_ports, queued

    h, tcp_port, udp_ports, queued = run(scenario())
    agent = h.agent
    assert queued > 0
    assert agent.exporter.stats.connections == 2
    assert not agent.exporter.stats.records_dropped
    assert (
        len(h.records)
        == agent.exporter.stats.records_sent
        == sum(agent.store.stats.exported.values())
    )
    tcp_records = h.flow(TCP, tcp_port)
    assert {r["_collector"] for r in tcp_records} == {1, 2}, "the connection spans both"
    assert_deltas_add_up(tcp_records)
    assert tcp_records[-1]["flowEndReason"] == END_OF_FLOW
    assert len(udp_ports) >= 5
    seen_by = set()
    for port in udp_ports:
        records = h.flow(UDP, port)
        assert_deltas_add_up(records)
        assert records[-1]["packetTotalCount"] == udp_packets
        seen_by.update(r["_collector"] for r in records)
    assert seen_by == {1, 2}
    # No record was delivered twice: a (connection, export) pair appears once.
    fields = ("protocolIdentifier", "sourceTransportPort", "flowEndSeconds", "flowEndReason")
    fields += ("packetTotalCount", "reversePacketTotalCount")
    keys = [tuple(r[f] for f in fields) for r in h.records]
    assert len(keys) == len(set(keys))


# -- 5. what is not exported -----------------------------------------------------------------


def test_other_zones_uncommitted_and_foreign_connections_are_not_exported(fresh, inventory_file):
    async def scenario():
        async with running_agent(fresh, inventory_file) as h:
            burst = fresh.udp_burst
            zone1 = await in_thread(burst, SERVER_V4, nodenet.OTHER_ZONE_UDP_PORT, 3, 10)
            uncommitted = await in_thread(burst, SERVER_V4, nodenet.UNCOMMITTED_UDP_PORT, 3, 10)
            # From the node itself: not through br0's PREROUTING, so conntrack zone 0.
            zone0 = await in_thread(burst, SERVER_V4, nodenet.UDP_PORT, 3, 10, fresh.node)
            # Between two addresses of no Pod in the inventory, in the pod zone.
            foreign = await in_thread(
                burst, nodenet.UNKNOWN_V4, nodenet.UDP_PORT, 3, 10, fresh.stranger
            )
            control = await in_thread(burst, SERVER_V4, nodenet.UDP_PORT, 3, 10)
            await h.wait_flow(UDP, control, last_end(END_IDLE), "the control flow's record")
            await h.wait_polls(2)
            table = fresh.conntrack("-p", "udp")
            return h, (zone1, uncommitted, zone0, foreign, control), table

    h, ports, table = run(scenario())
    zone1, uncommitted, zone0, foreign, control = ports

    def entry(source: str, sport: int) -> str:
        (line,) = [e for e in table if f"src={source} " in e and f"sport={sport} " in e]
        return line

    # The kernel state is what the test meant it to be.
    assert "zone=1 " in entry(CLIENT_V4, zone1)
    assert f"zone={nodenet.ZONE}" in entry(CLIENT_V4, uncommitted)
    assert "mark=0 " in entry(CLIENT_V4, uncommitted)
    assert "zone=" not in entry(nodenet.GATEWAY_V4, zone0)
    assert f"zone={nodenet.ZONE}" in entry(nodenet.STRANGER_V4, foreign)
    assert "mark=2 " in entry(nodenet.STRANGER_V4, foreign)
    # Only the control flow is exported.
    assert h.flow(UDP, control)
    for name, port in (
        ("zone 1", zone1),
        ("uncommitted", uncommitted),
        ("zone 0", zone0),
        ("no local Pod", foreign),
    ):
        assert not h.flow(UDP, port), f"{name} connection exported"
    exported_sources = {r.get("sourceIPv4Address") for r in h.records}
    assert nodenet.STRANGER_V4 not in exported_sources
    assert nodenet.GATEWAY_V4 not in exported_sources
    filtered = h.agent.store.stats.filtered
    assert filtered["no_local_pod"] >= 1, dict(filtered)
    assert filtered["uncommitted"] >= 1, dict(filtered)
    assert not any(c.key[3] in (zone1, uncommitted, zone0, foreign) for c in h.agent.store)


# -- 6. sysctls and conntrack timestamps -----------------------------------------------------


def test_agent_enables_accounting_and_uses_conntrack_start_time(fresh, inventory_file):
    for key in ("net.netfilter.nf_conntrack_acct", "net.netfilter.nf_conntrack_timestamp"):
        assert fresh.sysctl(key, "0") == "0"
    # The agent's clock runs 1000 s ahead: a flowStartSeconds near the real time can only
    # have come from the kernel's conntrack timestamp, not from the time of the poll.
    skew = 1000.0

    def skewed() -> float:
        return time.time() + skew

    async def scenario():
        async with running_agent(fresh, inventory_file, clock=skewed) as h:
            values = [
                fresh.sysctl("net.netfilter.nf_conntrack_acct"),
                fresh.sysctl("net.netfilter.nf_conntrack_timestamp"),
            ]
            before = time.time()
            port = await in_thread(fresh.udp_burst, CLUSTER_V4, nodenet.SERVICE_DNS_PORT, 10, 100)
            after = time.time()
            records = await h.wait_flow(UDP, port, last_end(END_IDLE), "the flow's record")
            entries = fresh.conntrack(
                "-w", str(nodenet.ZONE), "-p", "udp", "--sport", str(port), "-o", "ktimestamp"
            )
            return values, before, after, records, entries

    values, before, after, records, entries = run(scenario())
    assert values == ["1", "1"]
    record = records[-1]
    assert record["packetTotalCount"] == 10 and record["octetTotalCount"] == 10 * 128
    assert int(before) <= record["flowStartSeconds"] <= int(after) + 1
    assert record["flowEndSeconds"] >= before + skew - 1
    # The same second as conntrack's own start timestamp (printed in local time).
    assert len(entries) == 1, entries
    start_text = entries[0].split("[start=", 1)[1].split("]", 1)[0]
    kernel_start = time.mktime(time.strptime(start_text, "%a %b %d %H:%M:%S %Y"))
    assert record["flowStartSeconds"] == int(kernel_start)


# -- 7. metrics ------------------------------------------------------------------------------


def scrape(port: int) -> dict[str, Any]:
    """{name: {labels tuple: value}} of the agent's endpoint (histograms as samples)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


REASON_NAMES = {END_IDLE: "idle_timeout", END_ACTIVE: "active_timeout", END_OF_FLOW: "end_of_flow"}


def agent_snapshot(agent: Agent) -> tuple[int, int, dict[str, float]]:
    exported = agent.store.stats.exported
    return (
        len(agent.store),
        agent.exporter.stats.records_written,
        {name: float(exported.get(reason, 0)) for reason, name in REASON_NAMES.items()},
    )


def scraped_snapshot(scraped: dict[str, Any]) -> tuple[int, int, dict[str, float]]:
    return (
        one(scraped, "antrea_agent_conntrack_antrea_connection_count"),
        one(scraped, "antrea_agent_flow_records_sent_total"),
        {
            dict(labels)["reason"]: value
            for labels, value in scraped["antrea_agent_flow_records_exported_total"].items()
        },
    )


def test_metrics_endpoint(fresh, inventory_file):
    metrics_port = free_port()

    async def scenario():
        async with running_agent(fresh, inventory_file) as h:
            server, _ = serve(h.agent.registry, TransportAddress("127.0.0.1", metrics_port, "tcp"))
            try:
                udp = await in_thread(fresh.udp_burst, SERVER_V4, nodenet.UDP_PORT, 4, 10)
                tcp = await in_thread(fresh.tcp_client, SERVER_V4, nodenet.TCP_PORT)
                await in_thread(tcp.send, 100)
                await h.wait_flow(UDP, udp, last_end(END_IDLE), "the UDP flow's record")
                await h.wait_polls(1)
                # The agent keeps running: take a scrape during which its state held still.
                deadline = time.monotonic() + EXPORT_WAIT
                while True:
                    before = agent_snapshot(h.agent)
                    scraped = await in_thread(scrape, metrics_port)
                    if agent_snapshot(h.agent) == before:
                        break
                    assert time.monotonic() < deadline, "the agent's state never held still"
                await in_thread(tcp.close)
                table_max = int(fresh.sysctl("net.netfilter.nf_conntrack_max"))
                return scraped, before, table_max
            finally:
                server.shutdown()
                server.server_close()

    scraped, (store_size, sent, exported), table_max = run(scenario())
    assert store_size >= 2  # the TCP connection and the UDP flow (idle, still in the table)
    assert scraped_snapshot(scraped) == (store_size, sent, exported)
    total = one(scraped, "antrea_agent_conntrack_total_connection_count")
    assert store_size <= total <= table_max
    assert one(scraped, "antrea_agent_conntrack_max_connection_count") == table_max
    assert one(scraped, "antrea_agent_denied_connection_count") == 0
    assert one(scraped, "antrea_agent_conntrack_poll_failures_total") == 0
    assert one(scraped, "antrea_agent_flow_records_requeued_total") == 0
    assert one(scraped, "antrea_agent_flow_collector_reconnection_count") == 1
    buckets = scraped["antrea_agent_conntrack_poll_cycle_duration_seconds_bucket"]
    bounds = {dict(labels)["le"] for labels in buckets}
    assert {"0.01", "0.1", "1.0", "10.0", "+Inf"} <= bounds, bounds
    count = one(scraped, "antrea_agent_conntrack_poll_cycle_duration_seconds_count")
    assert count > 0
    assert buckets[(("le", "+Inf"),)] == count
    assert one(scraped, "antrea_agent_conntrack_poll_cycle_duration_seconds_sum") > 0
    assert exported["idle_timeout"] >= 1
    assert 1 <= sent <= sum(exported.values())
    dropped = scraped["antrea_agent_flow_records_dropped_total"]
    assert {dict(labels)["reason"] for labels in dropped} >= {"queue_full", "shutdown"}
    assert all(value == 0 for value in dropped.values())


def one(scraped: dict[str, Any], name: str) -> float:
    """The value of an unlabelled metric (counters are exposed with a _total suffix)."""
    samples = scraped.get(name)
    assert samples is not None, f"{name} missing; have {sorted(scraped)}"
    assert len(samples) == 1, samples
    return next(iter(samples.values()))


# -- entries that leave the table, inventory reloads -----------------------------------------


def test_deleted_entry_ends_its_flow(fresh, inventory_file):
    async def scenario():
        async with driven_agent(fresh, inventory_file) as h:
            client = await in_thread(fresh.tcp_client, SERVER_V4, nodenet.TCP_PORT)
            await in_thread(client.send, 3000)
            await h.round(0.0)
            await h.round(IDLE / 2)
            assert h.flow(TCP, client.port) == []  # nothing due yet
            # The connection leaves the table without a FIN (as a flush or timeout does).
            deleted = fresh.run(
                fresh.node, "conntrack", "-D", "-p", "tcp", "--sport", str(client.port)
            )
            await h.round(IDLE / 4)  # still before its idle timeout: the poll ends it
            records = h.flow(TCP, client.port)
            for _ in range(2):
                await h.round(PAST_TIMEOUTS)
            after = h.flow(TCP, client.port)
            await in_thread(client.close)
            return deleted, records, after

    deleted, records, after = run(scenario())
    assert "1 flow entries have been deleted" in deleted.stderr, deleted.stderr
    assert after == records
    assert [r["flowEndReason"] for r in records] == [END_OF_FLOW]
    assert_deltas_add_up(records)
    assert records[0]["octetTotalCount"] > 3000 and records[0]["reverseOctetTotalCount"] > 3000


def _close_the_netlink_socket(agent):
    agent._dumper.close()


def _feed_the_parser_a_broken_dump(agent):
    def parse(frames):
        raise ParseError("attribute of length 2 overruns its container")

    agent._parser.parse = parse


@pytest.mark.parametrize("breakage", [_close_the_netlink_socket, _feed_the_parser_a_broken_dump])
def test_failed_poll_keeps_connections_and_the_next_poll_recovers(fresh, inventory_file, breakage):
    async def scenario():
        async with running_agent(fresh, inventory_file) as h:
            client = await in_thread(fresh.tcp_client, SERVER_V4, nodenet.TCP_PORT)
            await in_thread(client.send, 3000)
            await h.wait_polls(1)
            # The dump or its parsing breaks under the agent: the next poll fails.
            breakage(h.agent)
            await eventually(lambda: h.agent.polls_failed >= 1, "a failed poll", EXPORT_WAIT)
            await in_thread(client.send, 2000)
            records = await h.wait_flow(
                TCP,
                client.port,
                lambda rs: bool(rs) and rs[-1]["octetTotalCount"] > 5000,
                "a record counting the bytes sent after the failure",
            )
            failures = h.agent.registry.get_sample_value(
                "antrea_agent_conntrack_poll_failures_total"
            )
            await in_thread(client.close)
            return records, failures, h.agent.polls_failed

    records, failures, polls_failed = run(scenario())
    assert polls_failed == 1  # one failure, then a fresh socket: no failure after it
    assert failures == 1
    assert all(r["flowEndReason"] != END_OF_FLOW for r in records)
    assert_deltas_add_up(records)


def test_inventory_reload_picks_up_a_new_pod(fresh, tmp_path):
    inventory = nodenet.write_inventory(tmp_path / "inventory.yaml")

    async def scenario():
        async with running_agent(fresh, inventory) as h:
            port = await in_thread(
                fresh.udp_burst, nodenet.UNKNOWN_V4, nodenet.UDP_PORT, 7, 10, fresh.stranger
            )
            await h.wait_polls(2)
            skipped = h.agent.store.stats.filtered["no_local_pod"]
            assert h.flow(UDP, port) == []
            objects = nodenet.inventory()
            objects["items"].append(
                nodenet.pod("stranger", (nodenet.STRANGER_V4, nodenet.STRANGER_V6), {})
            )
            inventory.write_text(yaml.safe_dump(objects))
            records = await h.wait_flow(UDP, port, last_end(END_IDLE), "the flow, now exported")
            return skipped, records

    skipped, records = run(scenario())
    assert skipped >= 1
    assert_deltas_add_up(records)
    last = records[-1]
    assert last["packetTotalCount"] == 7
    assert last["sourcePodName"] == "stranger" and last["sourceNodeName"] == NODE
    assert last["destinationPodName"] == "" and last["destinationNodeName"] == ""
    assert last["flowType"] == 2  # the destination is in a pod subnet, not a known Pod
