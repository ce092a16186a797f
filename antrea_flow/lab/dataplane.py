"""Building and removing the lab's network namespaces, links, addresses, routes, rules and
the servers that run in every Pod.

Everything the lab creates lives in network namespaces named `afl-<lab>-...`: an underlay
(a bridge joining the Nodes and the external host), one namespace per Node (uplink `eth0`
with the Node's address and its Pod SNAT address, the bridge `antrea-gw0` holding the Pod
gateway addresses, the Node's netfilter rules), one per Pod and one for the external host.
Nothing is added to the namespace the command runs in, and `down` finds leftovers by name
even after a crash.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .cluster import Cluster, Node, Pod
from .rules import NodeRules

log = logging.getLogger(__name__)

PREFIX = "afl-"
STATE_DIR = Path("/run/antrea-flow/lab")
HTTP_PORT = 8080
IPERF_PORT = 5201


class LabError(RuntimeError):
    pass


LAB_NAME = re.compile(r"^[A-Za-z0-9_]{1,20}$")


@dataclass(frozen=True, slots=True)
class Names:
    """The namespace names of one lab."""

    lab: str

    def __post_init__(self) -> None:
        # No '-': then afl-<name>- can never be the start of another lab's names.
        if not LAB_NAME.match(self.lab):
            raise UsageError(
                f"lab name {self.lab!r}: expected 1 to 20 letters, digits or '_' (no '-')"
            )

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.lab}-"

    @property
    def underlay(self) -> str:
        return f"{self.prefix}underlay"

    @property
    def external(self) -> str:
        return f"{self.prefix}external"

    def node(self, node: Node) -> str:
        return f"{self.prefix}{node.name}"

    def pod(self, pod: Pod) -> str:
        return f"{self.prefix}{pod.namespace}-{pod.name}"


def run(args: list[str], *, input: str | None = None, check: bool = True) -> str:
    """Run a command; on failure raise LabError with its stderr."""
    proc = subprocess.run(args, input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(
            f"{' '.join(args[:6])}... failed: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def ip_batch(netns: str | None, commands: list[str]) -> None:
    args = ["ip", "-batch", "-"] if netns is None else ["ip", "-n", netns, "-batch", "-"]
    run(args, input="\n".join(commands) + "\n")


def sysctl(netns: str, settings: dict[str, str]) -> None:
    run(["ip", "netns", "exec", netns, "sysctl", "-qw", *(f"{k}={v}" for k, v in settings.items())])


def namespaces(prefix: str = PREFIX) -> list[str]:
    out = run(["ip", "netns", "list"], check=False)
    return sorted(line.split()[0] for line in out.splitlines() if line.startswith(prefix))


def _veth_name(prefix: str, name: str) -> str:
    return f"{prefix}{name}"[:15]


class Dataplane:
    """One lab's dataplane for a cluster."""

    def __init__(self, cluster: Cluster, lab: str = "lab"):
        self.cluster = cluster
        self.names = Names(lab)
        self.state_dir = STATE_DIR / lab

    # -- up --------------------------------------------------------------------------------

    def up(self) -> None:
        """Build the lab; an existing one is torn down and rebuilt (idempotent)."""
        if namespaces(self.names.prefix):
            self.down()
        started = time.monotonic()
        try:
            self._namespaces()
            self._underlay()
            for node in self.cluster.nodes:
                self._node(node)
            for pod in self.cluster.pods:
                self._pod(pod)
            self._external()
            for node in self.cluster.nodes:
                self._rules(node)
            self._servers()
        except BaseException:
            self.down()
            raise
        log.info("lab %s is up in %.1f s", self.names.lab, time.monotonic() - started)

    def _namespaces(self) -> None:
        all_names = [self.names.underlay, self.names.external]
        all_names += [self.names.node(n) for n in self.cluster.nodes]
        all_names += [self.names.pod(p) for p in self.cluster.pods]
        ip_batch(None, [f"netns add {name}" for name in all_names])
        for name in all_names:
            ip_batch(name, ["link set lo up"])
            # No duplicate address detection: IPv6 works the moment `up` returns.
            sysctl(
                name, {"net.ipv6.conf.default.accept_dad": "0", "net.ipv6.conf.all.accept_dad": "0"}
            )

    def _underlay(self) -> None:
        ns = self.names.underlay
        commands = ["link add br0 type bridge", "link set br0 up"]
        peers = [(f"n{n.index}", self.names.node(n)) for n in self.cluster.nodes]
        peers.append(("ext", self.names.external))
        for port, peer_ns in peers:
            commands += [
                f"link add {port} type veth peer name eth0 netns {peer_ns}",
                f"link set {port} master br0 up",
            ]
        ip_batch(ns, commands)

    def _node(self, node: Node) -> None:
        ns = self.names.node(node)
        commands = [
            f"addr add {node.address(4)}/24 dev eth0",
            f"addr add {node.address(4, 100)}/24 dev eth0",
            f"addr add {node.address(6)}/64 dev eth0 nodad",
            f"addr add {node.address(6, 100)}/64 dev eth0 nodad",
            "link set eth0 up",
            "link add antrea-gw0 type bridge",
            "link set antrea-gw0 up",
        ]
        for cidr in node.pod_cidrs:
            suffix = " nodad" if cidr.version == 6 else ""
            commands.append(
                f"addr add {node.gateway(cidr.version)}/{cidr.prefixlen} dev antrea-gw0{suffix}"
            )
        for other in self.cluster.nodes:
            if other is node:
                continue
            for cidr in other.pod_cidrs:  # the family comes from the addresses
                commands.append(f"route add {cidr} via {other.address(cidr.version)}")
        ip_batch(ns, commands)
        sysctl(
            ns,
            {
                "net.ipv4.ip_forward": "1",
                "net.ipv6.conf.all.forwarding": "1",
                "net.ipv4.conf.all.rp_filter": "0",
                # Pods reach each other through the Node (below), never by redirect. The
                # kernel sends redirects if `all` or the interface says so; they would
                # also use up the ICMP tokens the REJECT rules' port-unreachables need.
                "net.ipv4.conf.all.send_redirects": "0",
                "net.ipv4.conf.default.send_redirects": "0",
                "net.ipv4.conf.antrea-gw0.send_redirects": "0",
                "net.ipv4.conf.eth0.send_redirects": "0",
                # Every rejected packet is answered, as Antrea's rejects are.
                "net.ipv4.icmp_ratelimit": "0",
                "net.ipv6.icmp.ratelimit": "0",
            },
        )

    def _pod(self, pod: Pod) -> None:
        node_ns, ns = self.names.node(pod.node), self.names.pod(pod)
        veth = _veth_name("v", f"{pod.node.index}{self.cluster.pods.index(pod)}-{pod.name}")
        ip_batch(
            node_ns,
            [
                f"link add {veth} type veth peer name eth0 netns {ns}",
                f"link set {veth} master antrea-gw0 up",
            ],
        )
        # As with Antrea, all Pod traffic is forwarded at L3 by the Node, even between Pods
        # of the same Node: a Pod has a host-length address and only its gateway on-link,
        # so every packet passes the Node's netfilter once, in the IP path.
        commands = ["link set eth0 up"]
        for version, address in pod.addresses.items():
            gateway = pod.node.gateway(version)
            length, suffix = (32, "") if version == 4 else (128, " nodad")
            default = "default" if version == 4 else "::/0"
            commands += [
                f"addr add {address}/{length} dev eth0{suffix}",
                f"route add {gateway} dev eth0",
                f"route add {default} via {gateway}",
            ]
        ip_batch(ns, commands)
        sysctl(
            ns,
            {"net.ipv4.conf.all.accept_redirects": "0", "net.ipv6.conf.all.accept_redirects": "0"},
        )

    def _external(self) -> None:
        ns = self.names.external
        ip_batch(
            ns,
            [
                f"addr add {self.cluster.external_address(4)}/24 dev eth0",
                f"addr add {self.cluster.external_address(6)}/64 dev eth0 nodad",
                "link set eth0 up",
            ],
        )

    def _rules(self, node: Node) -> None:
        ns = self.names.node(node)
        for version, command in ((4, "iptables-restore"), (6, "ip6tables-restore")):
            document = NodeRules(self.cluster, node, version).document()
            run(["ip", "netns", "exec", ns, command], input=document)

    # -- servers ---------------------------------------------------------------------------

    def _servers(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        hosts = [(self.names.pod(p), p.key.replace("/", "-")) for p in self.cluster.pods]
        hosts.append((self.names.external, "external"))
        for ns, label in hosts:
            log_file = open(self.state_dir / f"{label}.log", "ab")  # noqa: SIM115 - owned by the child
            for command in (
                [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", "::"],
                ["iperf3", "--server", "--port", str(IPERF_PORT)],
            ):
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, *command],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    start_new_session=True,
                )
            log_file.close()
        self._wait_listening([ns for ns, _ in hosts])

    @staticmethod
    def _wait_listening(netns_names: list[str], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(netns_names)
        while pending and time.monotonic() < deadline:
            for ns in list(pending):
                out = run(["ip", "netns", "exec", ns, "ss", "-Htln"], check=False)
                if f":{HTTP_PORT}" in out and f":{IPERF_PORT}" in out:
                    pending.discard(ns)
            if pending:
                time.sleep(0.05)
        if pending:
            raise LabError(f"servers did not start in {', '.join(sorted(pending))}")

    # -- down ------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove this lab's namespaces and the processes running in them."""
        return remove(self.names.prefix)


def remove(prefix: str) -> list[str]:
    """Kill the processes in every namespace named `prefix*`, then delete the namespaces."""
    found = namespaces(prefix)
    pids: set[int] = set()
    for ns in found:
        out = run(["ip", "netns", "pids", ns], check=False)
        pids |= {int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in list(pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pids.discard(pid)
        deadline = time.monotonic() + 2.0
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if _alive(p)}
            time.sleep(0.02)
    if found:
        ip_batch(None, [f"netns del {ns}" for ns in found])
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
