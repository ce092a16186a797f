"""End-to-end fixtures: one lab per test module, always torn down, and the helpers that drive it.

- `lab` brings up the default cluster with `antrea-flow lab up --name t<6 hex>` (a name no user
  lab has) and removes it with `antrea-flow lab down --name ...` in a finally, failures included.
- Traffic is made from the test process with sockets opened inside a Pod's network namespace
  (antrea_flow.conntrack.netns.socket_in), so every connection's local port is known and every
  wait is a socket timeout.
- `AgentHarness` runs one Agent per Node (netns_name = the Node's namespace) on an event loop in
  a background thread, exporting IPFIX over TCP to an in-process CollectingProcess on
  127.0.0.1:0; tests read its records and the agents' stores from the test thread.

Nothing here touches the root network namespace: the lab lives in namespaces `afl-<lab>-*`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from antrea_flow.conntrack import netns
from antrea_flow.conntrack.netlink import ConntrackDumper
from antrea_flow.conntrack.parser import Entry, Parser
from antrea_flow.exporter.agent import Agent, observation_domain_id
from antrea_flow.exporter.config import AgentConfig
from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.collecting import CollectingProcess, Peer
from antrea_flow.ipfix.messages import Message
from antrea_flow.ipfix.render import message_records
from antrea_flow.lab.cluster import Cluster
from antrea_flow.lab.command import current_cluster
from antrea_flow.lab.dataplane import STATE_DIR, Names
from antrea_flow.lab.rules import NOT_QUEUED_COMMENT

# A liveness bound for every wait (never a timing assertion: each condition normally holds
# within milliseconds, or within one idle timeout plus a poll for flow records).
WAIT = 15.0
# How long a connection attempt waits before we call it dropped: a dropped SYN or datagram
# gets no answer at all, so any value shows it; an allowed or rejected one answers at once.
DROP_TIMEOUT = 0.5
# How long an attempt that must be answered (allowed, or rejected) may wait for the answer.
ANSWER_TIMEOUT = 5.0
ZONE = 65520

CLIENT_1, CLIENT_2 = "frontend/client-1", "frontend/client-2"
WEB_1, WEB_2, DB = "backend/web-1", "backend/web-2", "backend/db"
PODS = (CLIENT_1, CLIENT_2, WEB_1, WEB_2, DB)
NODES = ("node-1", "node-2")
SERVICE_IP = {4: "10.96.0.10", 6: "fd00:10:96::a"}
HTTP, IPERF = 8080, 5201
TCP, UDP = 6, 17


def unique_lab_name() -> str:
    return "t" + secrets.token_hex(3)


def cli_command() -> list[str]:
    """The `antrea-flow` console script of this venv (or the module when it is missing)."""
    script = Path(sys.executable).with_name("antrea-flow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "antrea_flow.cli"]


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*cli_command(), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def sh(*args: str, check: bool = True, timeout: float = WAIT) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def lab_namespaces(lab: str) -> list[str]:
    """Every namespace of `ip netns list` with the lab's prefix."""
    prefix = Names(lab).prefix
    lines = sh("ip", "netns", "list").stdout.splitlines()
    return sorted(line.split()[0] for line in lines if line.startswith(prefix))


def netns_pids(namespaces: list[str]) -> dict[str, set[int]]:
    out = {}
    for ns in namespaces:
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        out[ns] = {int(p) for p in pids if p.isdigit()}
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def lab_up(name: str) -> subprocess.CompletedProcess:
    result = cli("lab", "up", "--name", name)
    assert result.returncode == 0, f"lab up --name {name} failed: {result.stderr}"
    return result


def lab_down(name: str) -> subprocess.CompletedProcess:
    return cli("lab", "down", "--name", name)


def family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def version_of(address: str) -> int:
    return ipaddress.ip_address(address).version


def ct_fields(line: str) -> list[dict[str, str]]:
    """The original and reply tuples of one `conntrack -L` line (key=value words in order)."""
    tuples: list[dict[str, str]] = [{}, {}]
    for word in line.split():
        key, eq, value = word.partition("=")
        if not eq:
            continue
        if key in ("src", "dst", "sport", "dport"):
            index = 1 if key in tuples[0] else 0
            tuples[index].setdefault(key, value)
        else:
            tuples[0].setdefault(key, value)  # zone, mark, ... (once per line)
    return tuples


@dataclass
class Lab:
    """A running lab of the default cluster."""

    name: str
    cluster: Cluster
    _inventory: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def names(self) -> Names:
        return Names(self.name)

    @property
    def state_dir(self) -> Path:
        return STATE_DIR / self.name

    def netns(self, target: str) -> str:
        """The namespace of a Pod ("namespace/name"), a Node ("node-1") or "external"."""
        if target == "external":
            return self.names.external
        if "/" not in target:
            return self.names.node(self.cluster.node(target))
        return self.names.pod(self.cluster.pod(target))

    def ip(self, pod: str, version: int = 4) -> str:
        return self.cluster.pod(pod).addresses[version]

    def node_of(self, pod: str) -> str:
        return self.cluster.pod(pod).node.name

    # -- commands in namespaces ----------------------------------------------------------

    def run(self, target: str, *args: str, check: bool = True, timeout: float = WAIT):
        return sh("ip", "netns", "exec", self.netns(target), *args, check=check, timeout=timeout)

    def conntrack(self, node: str, *args: str) -> list[str]:
        """`conntrack -L ARGS` in a Node's namespace, one line per entry."""
        out = self.run(node, "conntrack", "-L", *args, check=False).stdout
        return [line for line in out.splitlines() if line.strip()]

    def ct_entries(self, node: str) -> list[Entry]:
        """The zone-65520 entries of a Node, through the agent's own dumper and parser."""
        dumper = ConntrackDumper(self.netns(node), ZONE)
        try:
            return Parser().parse(dumper.dump()).entries()
        finally:
            dumper.close()

    def inventory(self) -> dict[str, Any]:
        """What `antrea-flow lab inventory` prints for this lab (read once)."""
        if self._inventory is None:
            result = cli("lab", "inventory", "--name", self.name)
            assert result.returncode == 0, result.stderr
            self._inventory = yaml.safe_load(result.stdout)
        return self._inventory

    def rule_ids(self, kind: str, name: str) -> dict[str, Any]:
        """The rule-ids annotation `lab inventory` publishes for a policy."""
        for item in self.inventory()["items"]:
            if item.get("kind") == kind and item["metadata"]["name"] == name:
                return json.loads(item["metadata"]["annotations"]["antrea-flow.io/rule-ids"])
        raise AssertionError(f"no {kind} {name} in the inventory")

    def not_queued(self, node: str) -> int:
        """The DENIED NOT QUEUED column of `antrea-flow lab status` for a Node."""
        result = cli("lab", "status", "--name", self.name)
        assert result.returncode == 0, result.stderr
        for line in result.stdout.splitlines():
            if line.split()[:1] == [node]:
                return int(line.split()[-1])
        raise AssertionError(f"no line for {node} in lab status:\n{result.stdout}")

    def nfqueue_counters(self, node: str) -> int:
        """Packets that reached the NFQUEUE rules of a Node (iptables and ip6tables)."""
        total = 0
        for tool in ("iptables", "ip6tables"):
            out = self.run(node, tool, "-t", "mangle", "-L", "-v", "-x", "-n").stdout
            total += sum(int(line.split()[0]) for line in out.splitlines() if "NFQUEUE" in line)
        return total

    def not_queued_rules(self, node: str) -> int:
        total = 0
        for tool in ("iptables", "ip6tables"):
            out = self.run(node, tool, "-t", "mangle", "-L", "-v", "-x", "-n").stdout
            total += sum(
                int(line.split()[0]) for line in out.splitlines() if NOT_QUEUED_COMMENT in line
            )
        return total

    # -- sockets inside Pods -------------------------------------------------------------

    def socket(self, pod: str, version: int, kind: int) -> socket.socket:
        return netns.socket_in(self.netns(pod), family(version), kind)

    def tcp(self, pod: str, host: str, port: int, timeout: float = WAIT) -> tuple[str, int]:
        """Open a TCP connection from `pod`: ("connected" | "refused" | "reset" | "timeout",
        local port). "reset": the handshake completed, then the server reset the connection
        (iperf3 does so to connections queued while it re-creates its listener)."""
        version = version_of(host)
        with self.socket(pod, version, socket.SOCK_STREAM) as s:
            s.bind(("0.0.0.0" if version == 4 else "::", 0))
            local_port = s.getsockname()[1]
            s.settimeout(timeout)
            try:
                s.connect((host, port))
            except ConnectionRefusedError:
                return "refused", local_port
            except ConnectionResetError:
                return "reset", local_port
            except TimeoutError:
                return "timeout", local_port
            return "connected", local_port

    def udp(
        self, pod: str, host: str, port: int, timeout: float = WAIT, payload: bytes = b"ping"
    ) -> tuple[str, int]:
        """One datagram from `pod` on a connected socket, then wait for an answer:
        ("reply" | "refused" | "timeout", local port). An ICMP port unreachable makes the
        connected socket's recv fail with ECONNREFUSED."""
        version = version_of(host)
        with self.socket(pod, version, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.connect((host, port))
            local_port = s.getsockname()[1]
            try:
                s.send(payload)
                s.recv(65536)
            except ConnectionRefusedError:
                return "refused", local_port
            except TimeoutError:
                return "timeout", local_port
            return "reply", local_port

    def udp_burst(self, pod: str, host: str, port: int, count: int, size: int) -> int:
        """`count` datagrams of `size` bytes from one unconnected socket (ICMP errors do not
        interrupt it); its local port."""
        version = version_of(host)
        with self.socket(pod, version, socket.SOCK_DGRAM) as s:
            s.bind(("0.0.0.0" if version == 4 else "::", 0))
            for _ in range(count):
                s.sendto(b"d" * size, (host, port))
            return s.getsockname()[1]

    def http_get(
        self, pod: str, host: str, port: int = HTTP, path: str = "/", timeout: float = WAIT
    ) -> tuple[int, int]:
        """(HTTP status, local port) of a GET from `pod`."""
        version = version_of(host)
        with self.socket(pod, version, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((host, port))
            local_port = s.getsockname()[1]
            target = f"[{host}]" if version == 6 else host
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {target}:{port}\r\n\r\n".encode())
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        head = b"".join(chunks).split(b"\r\n", 1)[0].decode()
        assert head.startswith("HTTP/"), f"not an HTTP response from {host}:{port}: {head!r}"
        return int(head.split()[1]), local_port


@contextlib.contextmanager
def udp_echo(lab: Lab, pod: str, port: int) -> Iterator[None]:
    """A UDP echo server on both families of `pod`, in a thread of the test process."""
    sock = netns.socket_in(lab.netns(pod), socket.AF_INET6, socket.SOCK_DGRAM)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(65536)
                sock.sendto(data, peer)
            except (TimeoutError, OSError):
                continue

    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.settimeout(0.1)
        thread = threading.Thread(target=serve, name=f"udp-echo-{pod}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(5)
    finally:
        sock.close()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    name = unique_lab_name()
    try:
        lab_up(name)
        yield Lab(name, current_cluster(name))
    finally:
        result = lab_down(name)
        assert result.returncode == 0, f"lab down --name {name}: {result.stderr}"


@pytest.fixture(scope="module")
def inventory_file(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lab's `antrea-flow lab inventory` output, as the agents' inventoryFile."""
    result = cli("lab", "inventory", "--name", lab.name)
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("inventory") / "inventory.yaml"
    path.write_text(result.stdout)
    return path


# -- agents on a background event loop ----------------------------------------------------


class AgentHarness:
    """One Agent per Node of the lab, exporting to one in-process collector (TCP on
    127.0.0.1:0), run on an event loop in a background thread. Use as a context manager."""

    def __init__(
        self,
        lab: Lab,
        inventory: Path,
        nodes: tuple[str, ...] = NODES,
        *,
        deny_queue: int | None = 1,
        deny_record_rate: float = 5000.0,
        poll: float = 1.0,
        active: float = 4.0,
        idle: float = 2.0,
    ):
        self.lab = lab
        self.inventory = inventory
        self.nodes = nodes
        self.deny_queue = deny_queue
        self.deny_record_rate = deny_record_rate
        self.timeouts = (poll, active, idle)
        self.agents: dict[str, Agent] = {}
        self.collector: CollectingProcess | None = None
        self.error: BaseException | None = None
        self._records: list[dict[str, Any]] = []
        self._domains = {observation_domain_id(n): n for n in nodes}
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="e2e-agents", daemon=True)

    # -- the loop thread -----------------------------------------------------------------

    def _handle(self, peer: Peer, message: Message) -> None:
        for record in message_records(peer, message):
            record["_node"] = self._domains.get(record["observationDomainId"], "?")
            self._records.append(record)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by start()/stop() in the test thread
            self.error = exc
        finally:
            self._ready.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        collector = CollectingProcess(TransportAddress("127.0.0.1", 0, "tcp"), self._handle)
        await collector.start()
        self.collector = collector
        try:
            poll, active, idle = self.timeouts
            config = AgentConfig(
                flow_exporter_enabled=True,
                collector=TransportAddress("127.0.0.1", collector.port, "tcp"),
                poll_interval=poll,
                active_timeout=active,
                idle_timeout=idle,
                conntrack_zone=ZONE,
                inventory_file=str(self.inventory),
                tls_cert_dir="",
                metrics_address=None,
                protocol_filter=None,
                deny_queue=self.deny_queue,
                deny_record_rate=self.deny_record_rate,
            )
            for node in self.nodes:
                self.agents[node] = Agent(config, node, netns_name=self.lab.netns(node))
            self._tasks = [
                asyncio.create_task(agent.run(self._stop), name=f"agent-{node}")
                for node, agent in self.agents.items()
            ]
            self._ready.set()
            await self._stop.wait()
        finally:
            self._stop.set()
            if self._tasks:
                done, pending = await asyncio.wait(self._tasks, timeout=WAIT)
                for task in pending:
                    task.cancel()
                failures = [t.exception() for t in done if not t.cancelled() and t.exception()]
                if pending or failures:
                    self.error = failures[0] if failures else TimeoutError("agent did not stop")
                # The collector shares this loop: let it read what the agents sent last.
                sent = sum(a.exporter.stats.records_sent for a in self.agents.values())
                deadline = time.monotonic() + 5.0
                while collector.stats.records < sent and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
            await collector.stop()

    # -- the test thread -----------------------------------------------------------------

    def __enter__(self) -> AgentHarness:
        self._thread.start()
        try:
            self._ready.wait(WAIT)
            self._check()
            wait_until(
                lambda: (
                    self._check()
                    or all(
                        a.store.stats.polls >= 1 and a.exporter.stats.connected
                        for a in self.agents.values()
                    )
                ),
                "every agent polled once and connected to the collector",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _check(self) -> bool:
        """Raise the error of the loop or of an agent that ended; False while all run."""
        if self.error is not None:
            raise self.error
        for task in self._tasks:
            if task.done():
                raise AssertionError(f"{task.get_name()} ended: {task.exception()!r}")
        if self._ready.is_set() and not self.agents and not self._thread.is_alive():
            raise AssertionError("the agent thread ended before the agents started")
        return False

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread.is_alive():
            self._thread.join(WAIT + 10)
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    # -- records -------------------------------------------------------------------------

    def records(self, **match: Any) -> list[dict[str, Any]]:
        """Records received so far whose fields equal `match` (`_node` is the exporter)."""
        return [r for r in list(self._records) if all(r.get(k) == v for k, v in match.items())]

    def wait_records(self, what: str, timeout: float = WAIT, **match: Any) -> list[dict]:
        return wait_until(lambda: self.records(**match), what, timeout)

    def denied_gauge(self, node: str) -> float | None:
        registry = self.agents[node].registry
        return registry.get_sample_value("antrea_agent_denied_connection_count")


def nfqueue_stats(lab: Lab, node: str, queue: int = 1) -> dict[str, int] | None:
    """The kernel's line for `queue` in the Node's /proc/net/netfilter/nfnetlink_queue
    (None while nobody listens on it)."""
    out = lab.run(node, "cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    for line in out.splitlines():
        words = line.split()
        if words and int(words[0]) == queue:
            names = ("queue", "portid", "waiting", "mode", "range", "dropped", "user_dropped")
            stats = dict(zip(names, map(int, words), strict=False))
            stats["id_sequence"] = int(words[7])
            return stats
    return None
