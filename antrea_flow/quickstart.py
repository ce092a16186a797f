"""The `quickstart` command: the whole pipeline on the lab, with real traffic.

It brings the default lab up (as lab `quickstart`), starts the flow aggregator (mutual TLS)
and one agent per Node exactly as a user would run them (`antrea-flow aggregator` and
`antrea-flow agent` processes with their config files, in DIR), and an external IPFIX
collector; then runs a traffic mix covering every kind of flow and policy decision, shows
the aggregated records as they reach the collector, writes them to DIR/flows.jsonl (and the
aggregator to ClickHouse embedded in it, DIR/clickhouse), and on exit (Ctrl-C or
--duration) stops everything, removes the lab and answers a few questions from ClickHouse.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from .aggregator.config import ClickHouseConfig
from .codes import ACTION_NAMES, AGGREGATOR_SERVICE_NAME
from .errors import UsageError
from .ipfix.address import TransportAddress
from .ipfix.collecting import CollectingProcess, Peer
from .ipfix.messages import Message
from .ipfix.render import json_line, message_records
from .lab import command as lab
from .lab.cluster import Cluster
from .lab.dataplane import Names

LAB = "quickstart"
_ENDPOINT = "if({side}PodName != '', concat({side}PodNamespace, '/', {side}PodName), {side}IP)"
TOP_TALKERS = f"""
SELECT {_ENDPOINT.format(side="source")} AS source,
       {_ENDPOINT.format(side="destination")} AS destination,
       sum(octetDeltaCount + reverseOctetDeltaCount) AS octets
FROM default.flows GROUP BY source, destination ORDER BY octets DESC LIMIT 5
"""
# A rule that drops without a name is the isolation of a Pod no rule allows.
_DENIED_SIDE = """
SELECT if({side}NetworkPolicyName = '', '(isolated: no rule allows it)',
          concat({side}NetworkPolicyNamespace, if({side}NetworkPolicyNamespace = '', '', '/'),
                 {side}NetworkPolicyName, ' ', {side}NetworkPolicyRuleName)) AS policy,
       {side}NetworkPolicyRuleAction AS action,
       sourceIP, destinationIP, sourceTransportPort, destinationTransportPort,
       protocolIdentifier
FROM default.flows WHERE {side}NetworkPolicyRuleAction IN (2, 3)
"""
DENIED_BY_POLICY = f"""
SELECT policy, action,
       uniqExact(sourceIP, destinationIP, sourceTransportPort, destinationTransportPort,
                 protocolIdentifier) AS connections
FROM ({_DENIED_SIDE.format(side="ingress")} UNION ALL {_DENIED_SIDE.format(side="egress")})
GROUP BY policy, action ORDER BY connections DESC, policy
"""
FLOW_TYPES = {1: "intra", 2: "inter", 3: "to-ext", 4: "from-ext"}
PROBE_EVERY = 4.0
IPERF = ("frontend/client-1", "backend/web-2", 5201, "10M", 12)
# High-rate UDP that conntrack never sees (the lab leaves UDP 5201 untracked): only the
# agents' eBPF counter path can report it.
UNTRACKED_UDP = ("frontend/client-1", "frontend/client-2", 5201, "20M", 8)


@dataclass(frozen=True, slots=True)
class Probe:
    what: str
    pod: str
    host: str
    port: int
    expect: str  # ok, refused, timeout


def traffic_mix(cluster: Cluster) -> list[Probe]:
    """Every case the README promises: intra/inter-node, Service over IPv4 and IPv6,
    external, and each policy decision."""

    def ip(pod: str, version: int = 4) -> str:
        return cluster.pod(pod).addresses[version]

    service = next(s for s in cluster.services if s.name == "web")
    v4 = next(a for a in service.cluster_ips if ":" not in a)
    v6 = next(a for a in service.cluster_ips if ":" in a)
    return [
        Probe(
            "intra-node, allowed by web-allow-frontend",
            "frontend/client-1",
            ip("backend/web-1"),
            8080,
            "ok",
        ),
        Probe(
            "inter-node, allowed by web-allow-frontend",
            "frontend/client-1",
            ip("backend/web-2"),
            8080,
            "ok",
        ),
        Probe("inter-node over IPv6", "frontend/client-2", ip("backend/web-1", 6), 8080, "ok"),
        Probe("to Service backend/web (IPv4)", "frontend/client-2", v4, 80, "ok"),
        Probe("to Service backend/web (IPv6)", "frontend/client-1", v6, 80, "ok"),
        Probe("to the external host", "frontend/client-1", cluster.external_address(4), 8080, "ok"),
        Probe(
            "to the external host (IPv6)",
            "frontend/client-2",
            cluster.external_address(6),
            8080,
            "ok",
        ),
        Probe("dropped: web is isolated", "backend/db", ip("backend/web-1"), 8080, "timeout"),
        Probe("rejected by acnp-db-guard", "frontend/client-1", ip("backend/db"), 8080, "refused"),
        Probe("allowed by acnp-db-guard", "backend/web-1", ip("backend/db"), 8080, "ok"),
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Table:
    """Prints aggregated records as rows."""

    FORMAT = "{:<8} {:<18} {:<22} {:<17} {:<9} {:>9} {:>7} {:<32} {:<8} {}"

    def __init__(self) -> None:
        print(
            self.FORMAT.format(
                "TIME", "SOURCE", "DESTINATION", "SERVICE", "PROTO", "BYTES", "MBIT/S",
                "INGRESS POLICY", "TYPE", "",
            )
        )  # fmt: skip

    @staticmethod
    def _end(record: dict, side: str) -> str:
        pod = record.get(f"{side}PodName")
        if pod:
            return f"{record.get(f'{side}PodNamespace')}/{pod}"
        return record.get(f"{side}IPv4Address") or record.get(f"{side}IPv6Address", "")

    @staticmethod
    def _policy(record: dict, direction: str) -> str:
        action = record.get(f"{direction}NetworkPolicyRuleAction", 0)
        if not action:
            return ""
        name = record.get(f"{direction}NetworkPolicyName") or "isolation"
        rule = record.get(f"{direction}NetworkPolicyRuleName")
        return f"{name}{'/' + rule if rule else ''} {ACTION_NAMES.get(action, action)}"

    def row(self, record: dict) -> None:
        proto = {6: "tcp", 17: "udp"}.get(record.get("protocolIdentifier", 0), "ip")
        egress = self._policy(record, "egress")
        notes = ("egress " + egress) if egress else ""
        print(
            self.FORMAT.format(
                time.strftime("%H:%M:%S"),
                self._end(record, "source")[:18],
                self._end(record, "destination")[:22],
                record.get("destinationServicePortName", "")[:17],
                f"{proto}/{record.get('destinationTransportPort', 0)}",
                record.get("octetDeltaCount", 0),
                f"{record.get('throughput', 0) / 1e6:.2f}",
                self._policy(record, "ingress")[:32],
                FLOW_TYPES.get(record.get("flowType", 0), ""),
                notes,
            ),
            flush=True,
        )


class Quickstart:
    def __init__(self, output: Path, duration: float | None):
        self.output = output
        self.duration = duration
        self.processes: dict[str, subprocess.Popen] = {}
        self.records = 0
        self.iperf: dict[str, Any] = {}
        self.udp: dict[str, Any] = {}
        self.outcomes: dict[str, tuple[str, str]] = {}  # probe -> (seen, expected)
        self._flows: TextIO | None = None  # flows.jsonl while run() runs
        # The aggregator's embedded ClickHouse, queried by the summary once it has stopped.
        self.database = ClickHouseConfig(url=(output / "clickhouse").as_uri())
        self.api_port = API_PORT  # the flow API and UI (another when that port is taken)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # -- processes -------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.output / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - the child's
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "antrea_flow.cli", *args],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()

    def _check_processes(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.output / "logs" / f"{name}.log").read_text()[-600:]
                raise UsageError(f"{name} exited with {process.returncode}:\n{tail}")

    async def _wait(self, ready, what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self._check_processes()
            if time.monotonic() > deadline:
                raise UsageError(f"timed out waiting for {what}")
            await asyncio.sleep(0.1)

    def _start_pipeline(self, cluster: Cluster, collector_port: int) -> None:
        certs = self.output / "certs"
        inventory = _write_yaml(self.output / "inventory.yaml", cluster.inventory())
        aggregator_port = _free_port()
        self.aggregator_port = aggregator_port
        # The flow API where `antrea-flow observe` looks by default, unless it is taken.
        self.api_port = API_PORT if not _listening(API_PORT) else _free_port()
        config = _write_yaml(
            self.output / "flow-aggregator.conf",
            {
                "externalFlowCollectorAddr": f"127.0.0.1:{collector_port}:tcp",
                "flowExportInterval": "5s",
                "aggregatorTransportProtocol": "tls",
                "flowAggregatorAddress": AGGREGATOR_SERVICE_NAME,
                "listenAddress": f"127.0.0.1:{aggregator_port}",
                "inactiveFlowRecordTimeout": "30s",
                "correlationTimeout": "15s",
                "certDir": str(certs),
                "jsonLogPath": str(self.output / "aggregator-flows.jsonl"),
                "inventoryFile": str(inventory),
                "metricsBindAddress": f"127.0.0.1:{_free_port()}",
                "apiBindAddress": f"127.0.0.1:{self.api_port}",
                "clickHouse": {
                    "enable": True,
                    "databaseURL": self.database.url,
                    "commitInterval": "1s",
                },
            },
        )
        self._spawn("aggregator", ["aggregator", "--config", str(config)])
        self.agent_configs = []
        self.agent_metrics_ports = []
        for node in cluster.nodes:
            metrics_port = _free_port()
            self.agent_metrics_ports.append(metrics_port)
            path = _write_yaml(
                self.output / f"antrea-agent-{node.name}.conf",
                {
                    "featureGates": {"FlowExporter": True},
                    "flowCollectorAddr": f"127.0.0.1:{aggregator_port}:tls",
                    "flowPollInterval": "1s",
                    "activeFlowExportTimeout": "5s",
                    "idleFlowExportTimeout": "2s",
                    "inventoryFile": str(inventory),
                    "tlsCertDir": str(certs),
                    "metricsBindAddress": f"127.0.0.1:{metrics_port}",
                    "denyQueue": 1,
                    "ebpf": {"enable": True},
                },
            )
            self.agent_configs.append((node, path))

    def _start_agents(self) -> None:
        names = Names(LAB)
        for node, path in self.agent_configs:
            self._spawn(
                f"agent-{node.name}",
                [
                    "agent",
                    "--config",
                    str(path),
                    "--node-name",
                    node.name,
                    "--netns",
                    names.node(node),
                ],
            )

    def _stop_processes(self) -> None:
        # Agents first (they send what they hold), then the aggregator (it drains).
        for group in (
            [p for n, p in self.processes.items() if n.startswith("agent")],
            [p for n, p in self.processes.items() if n == "aggregator"],
        ):
            for process in group:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in group:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    # -- traffic ---------------------------------------------------------------------------

    async def _in_pod(self, pod: str, *command: str, timeout: float = 30.0) -> str:
        ns = Names(LAB).pod(self.cluster.pod(pod))
        process = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, *command,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            return ""
        finally:
            # Also when the traffic is cancelled: nothing it started may send packets while
            # the agents stop (a Node that stopped first would miss its half of them).
            if process.returncode is None:
                process.kill()
                await process.wait()
        return out.decode()

    async def _probes(self) -> None:
        while True:
            mix = traffic_mix(self.cluster)
            results = await asyncio.gather(
                *(
                    self._in_pod(
                        p.pod, sys.executable, "-m", "antrea_flow.lab.probe", p.host, str(p.port)
                    )
                    for p in mix
                )
            )
            for probe, result in zip(mix, results, strict=True):
                self.outcomes[probe.what] = (result.strip(), probe.expect)
            await asyncio.sleep(PROBE_EVERY)

    async def _iperf(self) -> None:
        client, server, port, rate, seconds = IPERF
        host = self.cluster.pod(server).addresses[4]
        out = await self._in_pod(
            client, "iperf3", "-c", host, "-p", str(port), "-b", rate, "-t", str(seconds), "-J",
            timeout=seconds + 20,
        )  # fmt: skip
        with contextlib.suppress(ValueError, KeyError):
            result = json.loads(out)
            self.iperf = {
                "bits_per_second": result["end"]["sum_sent"]["bits_per_second"],
                "local_port": result["start"]["connected"][0]["local_port"],
            }

    async def _untracked_udp(self) -> None:
        """iperf3 over UDP between two Pods, after the TCP run (one test per server)."""
        client, server, port, rate, seconds = UNTRACKED_UDP
        host = self.cluster.pod(server).addresses[4]
        await asyncio.sleep(2.0)
        out = await self._in_pod(
            client, "iperf3", "-u", "-c", host, "-p", str(port), "-b", rate, "-l", "1000",
            "-t", str(seconds), "-J", timeout=seconds + 20,
        )  # fmt: skip
        with contextlib.suppress(ValueError, KeyError):
            result = json.loads(out)
            self.udp = {
                "packets": result["end"]["sum"]["packets"],
                "local_port": result["start"]["connected"][0]["local_port"],
            }

    # -- collector -------------------------------------------------------------------------

    def _collected(self, peer: Peer, message: Message) -> None:
        flows = self._flows
        assert flows is not None  # run() opens it before the collector starts
        for record in message_records(peer, message):
            self.records += 1
            flows.write(json_line(record) + "\n")
            self.table.row(record)
        flows.flush()

    # -- run ---------------------------------------------------------------------------------

    async def run(self) -> int:
        (self.output / "logs").mkdir(parents=True, exist_ok=True)
        # What the aggregator appends to is this run's alone.
        (self.output / "aggregator-flows.jsonl").unlink(missing_ok=True)
        shutil.rmtree(self.output / "clickhouse", ignore_errors=True)
        print(f"building the lab {LAB!r} (network namespaces afl-{LAB}-*) ...", flush=True)
        self.cluster = lab.up(LAB, None).cluster
        flows = self._flows = (self.output / "flows.jsonl").open("w")
        collector = CollectingProcess(TransportAddress("127.0.0.1", 0, "tcp"), self._collected)
        tasks: list[asyncio.Task] = []
        try:
            await collector.start()
            assert collector.port is not None  # start() binds it
            self._start_pipeline(self.cluster, collector.port)
            certs = self.output / "certs"
            await self._wait(
                lambda: all((certs / f).exists() for f in ("ca.crt", "tls.crt", "tls.key")),
                "the aggregator's certificates",
            )
            await self._wait(lambda: _listening(self.aggregator_port), "the aggregator to listen")
            self._start_agents()
            print(
                f"aggregator on 127.0.0.1:{self.aggregator_port} (mutual TLS), agents on "
                f"{', '.join(n.name for n in self.cluster.nodes)}, external collector on "
                f"127.0.0.1:{collector.port}; logs and configs in {self.output}\n",
                flush=True,
            )
            server = "" if self.api_port == API_PORT else f" --server {self.api_url}"
            print(
                f"flows in a browser: {self.api_url}/ (while this runs); in another terminal: "
                f"{_command()} observe{server} --verdict DROPPED\n",
                flush=True,
            )
            self.table = Table()
            await self._wait(
                lambda: all(_ready(port) for port in self.agent_metrics_ports),
                "the agents' first poll (their /readyz)",
            )
            tasks = [asyncio.create_task(self._probes()), asyncio.create_task(self._iperf()),
                     asyncio.create_task(self._untracked_udp())]  # fmt: skip
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            deadline = None if self.duration is None else loop.time() + self.duration
            while not stop.is_set() and (deadline is None or loop.time() < deadline):
                self._check_processes()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            print("\nstopping: agents, aggregator (it exports what it holds), collector ...")
            self._stop_processes()
            await asyncio.sleep(0.5)
            await collector.stop()
            flows.close()
            lab.down(LAB)
        return self._summary()

    def _summary(self) -> int:
        path = self.output / "flows.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        # IPFIX has no "incomplete" element: the aggregator's JSON log says which were.
        logged = self.output / "aggregator-flows.jsonl"
        lines = logged.read_text().splitlines() if logged.exists() else []
        incomplete = sum(1 for line in lines if json.loads(line).get("incomplete"))
        print(
            f"\n{len(records)} aggregated records in {path} "
            f"({incomplete} exported incomplete: a Node's half never came)"
        )
        for what, (outcome, expected) in self.outcomes.items():
            note = "" if outcome == expected else f"   UNEXPECTED: the policy says {expected}"
            print(f"  {what:<45} {outcome}{note}")
        if self.iperf:
            flows = [
                r
                for r in records
                if r.get("sourceTransportPort") == self.iperf["local_port"]
                and r.get("destinationTransportPort") == IPERF[2]
            ]
            if flows:
                last = max(flows, key=lambda r: r.get("flowEndSeconds", 0))
                seconds = max(1, last["flowEndSeconds"] - last["flowStartSeconds"])
                measured = last["octetTotalCount"] * 8 / seconds
                print(
                    f"  iperf3 {IPERF[0]} -> {IPERF[1]}: iperf3 reports "
                    f"{self.iperf['bits_per_second'] / 1e6:.2f} Mbit/s; its flow records: "
                    f"{measured / 1e6:.2f} Mbit/s over {seconds} s"
                )
        if self.udp:
            packets = sum(
                r.get("packetDeltaCount", 0)
                for r in records
                if r.get("sourceTransportPort") == self.udp["local_port"]
                and r.get("protocolIdentifier") == 17
            )
            print(
                f"  untracked UDP {UNTRACKED_UDP[0]} -> {UNTRACKED_UDP[1]} (no conntrack entry): "
                f"iperf3 sent {self.udp['packets']} datagrams; its flow records (eBPF "
                f"counter path): {packets} packets"
            )
        self._database_answers()
        unexpected = any(seen != expected for seen, expected in self.outcomes.values())
        return 0 if records and not unexpected else 1

    def _database_answers(self) -> None:
        """What the aggregator wrote to its embedded ClickHouse (it has stopped, so this
        process may open the directory): a few questions a user asks first."""
        from .aggregator.clickhouse import Database, DatabaseError

        database = Database(self.database)
        try:
            database.connect()
            ((count,),) = database.rows("SELECT count() FROM default.flows")
            talkers = database.rows(TOP_TALKERS)
            denied = database.rows(DENIED_BY_POLICY)
        except DatabaseError as exc:
            print(f"\nClickHouse: {exc}")
            return
        finally:
            database.close()
        print(f"\nClickHouse (embedded, {self.database.url}): {count} records in default.flows")
        print("  top talkers by bytes (both directions):")
        for source, destination, octets in talkers:
            print(f"    {source:<24} -> {destination:<24} {octets / 1e6:>10.2f} MB")
        print("  denied connections by policy rule:")
        for policy, action, connections in denied:
            name = ACTION_NAMES.get(action, str(action))
            print(f"    {policy:<44} {name:<7} {connections:>4} connections")


API_PORT = 10349  # apiBindAddress's default port


def _command() -> str:
    """How the user runs `antrea-flow` from here: the virtualenv's script, which a new
    terminal does not have on its PATH."""
    script = Path(sys.executable).with_name("antrea-flow")
    if not script.exists():
        return "antrea-flow"
    relative = os.path.relpath(script)
    return relative if not relative.startswith("..") else str(script)


def _ready(port: int) -> bool:
    """The component whose metrics endpoint is on `port` says it is ready."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
            return answer.status == 200
    except OSError:  # not listening yet, or 503
        return False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def main(args) -> int:
    if os.geteuid() != 0:
        raise UsageError("quickstart needs root: it builds the lab in network namespaces")
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    return asyncio.run(Quickstart(output, args.duration).run())
