"""A one-node pod network in network namespaces, for the agent's integration tests.

Layout (every namespace named `<prefix>-<role>`, prefix "afx-" + random hex):

    node:     br0 10.10.1.1/24, fd00:10:10:1::1/64; forwarding on; bridged traffic goes
              through iptables/ip6tables (br_netfilter), so conntrack in this namespace sees
              pod-to-pod traffic; Antrea-like rules put pod traffic in zone 65520, set the
              ct mark's "committed" bits (0x2/0xf), DNAT ClusterIPs and set the Service bit.
    client:   eth0 10.10.1.5, fd00:10:10:1::5 (Pod prod/client in the inventory)
    server:   eth0 10.10.1.6, fd00:10:10:1::6 (Pod prod/server), plus 10.10.1.66 which is
              nobody in the inventory; runs a TCP echo server and UDP sinks
    stranger: eth0 10.10.1.7, fd00:10:10:1::7 (not in the inventory)

Nothing is added to the root namespace. `node_network()` removes every namespace (and the
processes it started in them) on exit, failure included.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ZONE = 65520
OTHER_ZONE = 1
GATEWAY_V4, GATEWAY_V6 = "10.10.1.1", "fd00:10:10:1::1"
CLIENT_V4, CLIENT_V6 = "10.10.1.5", "fd00:10:10:1::5"
SERVER_V4, SERVER_V6 = "10.10.1.6", "fd00:10:10:1::6"
UNKNOWN_V4 = "10.10.1.66"  # a second address of the server pod, in no inventory
STRANGER_V4, STRANGER_V6 = "10.10.1.7", "fd00:10:10:1::7"
CLUSTER_V4, CLUSTER_V6 = "10.96.0.10", "fd00:10:96::a"
POD_CIDRS = ("10.10.1.0/24", "fd00:10:10:1::/64")

# Server ports in the server pod; Service ports on the ClusterIPs.
TCP_PORT = 8080  # echo
UDP_PORT = 5353  # sink
OTHER_ZONE_UDP_PORT = 7777  # pod traffic to it is tracked in zone 1
UNCOMMITTED_UDP_PORT = 7778  # pod traffic to it gets no committed ct mark
SERVICE_HTTP_PORT = 80  # -> TCP_PORT
SERVICE_DNS_PORT = 53  # -> UDP_PORT

NAMESPACE = "prod"
SERVICE_NAME = "web"

# How long any helper waits for a process or a condition (liveness bound only).
WAIT = 15.0

SERVER_SCRIPT = textwrap.dedent(
    """
    import socket, sys, threading

    def echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def tcp(port):
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
        s.listen(128)
        def serve():
            while True:
                conn, _ = s.accept()
                threading.Thread(target=echo, args=(conn,), daemon=True).start()
        threading.Thread(target=serve, daemon=True).start()

    def udp(port):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        def sink():
            while True:
                s.recv(65536)
        threading.Thread(target=sink, daemon=True).start()

    tcp(int(sys.argv[1]))
    for port in sys.argv[2:]:
        udp(int(port))
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
    """
)

# Sends COUNT datagrams of SIZE bytes from one socket; prints the local port.
UDP_CLIENT_SCRIPT = textwrap.dedent(
    """
    import socket, sys, time
    host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.connect((host, port))
    for i in range(count):
        s.send(b"x" * size)
        if i % 10 == 9:
            time.sleep(0.001)
    print(s.getsockname()[1], flush=True)
    """
)

# A TCP client driven by stdin: "send N" sends N bytes and reads the echo; "close" closes.
# Prints its local port first, then "ok" after each command.
TCP_CLIENT_SCRIPT = textwrap.dedent(
    """
    import socket, sys
    host, port = sys.argv[1], int(sys.argv[2])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.create_connection((host, port), timeout=10)
    print(s.getsockname()[1], flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "send":
            n = int(words[1])
            s.sendall(b"y" * n)
            got = 0
            while got < n:
                chunk = s.recv(65536)
                if not chunk:
                    raise SystemExit("server closed")
                got += len(chunk)
        elif words[0] == "close":
            s.close()
            print("ok", flush=True)
            break
        print("ok", flush=True)
    """
)


def sh(*args: str, check: bool = True, timeout: float = WAIT) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


@dataclass
class NodeNet:
    prefix: str
    node: str
    client: str
    server: str
    stranger: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def namespaces(self) -> list[str]:
        return [self.node, self.client, self.server, self.stranger]

    # -- commands -------------------------------------------------------------------------

    def run(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", ns, *args, check=check)

    def sysctl(self, key: str, value: str | None = None, ns: str | None = None) -> str:
        ns = ns or self.node
        if value is not None:
            self.run(ns, "sysctl", "-q", "-w", f"{key}={value}")
        return self.run(ns, "sysctl", "-n", key).stdout.strip()

    def flush_conntrack(self) -> None:
        # "0 flow entries" is reported on stderr with status 0, or 1 on older tools.
        self.run(self.node, "conntrack", "-F", check=False)

    def conntrack(self, *args: str) -> list[str]:
        """`conntrack -L ARGS` in the node namespace, one line per entry."""
        out = self.run(self.node, "conntrack", "-L", *args, check=False)
        return [line for line in out.stdout.splitlines() if line.strip()]

    def popen(self, ns: str, *args: str, **kwargs: Any) -> subprocess.Popen:
        """A process in namespace `ns`, killed when the network is torn down."""
        process = subprocess.Popen(["ip", "netns", "exec", ns, *args], **kwargs)
        self.processes.append(process)
        return process

    def python(self, ns: str, script: str, *args: str, **kwargs: Any) -> subprocess.Popen:
        return self.popen(ns, sys.executable, "-c", script, *map(str, args), **kwargs)

    def udp_burst(self, host: str, port: int, count: int, size: int, ns: str | None = None) -> int:
        """Send `count` datagrams of `size` bytes from one socket; its source port."""
        out = self.run(
            ns or self.client,
            sys.executable,
            "-c",
            UDP_CLIENT_SCRIPT,
            host,
            str(port),
            str(count),
            str(size),
        )
        return int(out.stdout.split()[0])

    def tcp_client(self, host: str, port: int, ns: str | None = None) -> TcpClient:
        process = self.python(
            ns or self.client,
            TCP_CLIENT_SCRIPT,
            host,
            str(port),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        client = TcpClient(process)
        client.port = int(client.read_line())
        return client


def read_line(process: subprocess.Popen, what: str) -> str:
    """The next line `process` prints (text mode), waiting at most WAIT seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(WAIT):
            process.kill()
            raise AssertionError(f"{what} printed nothing within {WAIT}s")
    line = process.stdout.readline()
    if not line:
        process.wait(WAIT)
        raise AssertionError(f"{what} ended ({process.returncode}): {process.stderr.read()}")
    return line.strip()


class TcpClient:
    """A TCP connection from a pod, driven line by line (blocking, each step bounded:
    call it from a thread when an event loop must keep running)."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.port = 0

    def read_line(self) -> str:
        return read_line(self.process, "the TCP client")

    def send(self, size: int) -> None:
        self.process.stdin.write(f"send {size}\n")
        self.process.stdin.flush()
        assert self.read_line() == "ok"

    def close(self) -> None:
        self.process.stdin.write("close\n")
        self.process.stdin.flush()
        assert self.read_line() == "ok"
        self.process.wait(WAIT)


def _setup(net: NodeNet) -> None:
    n = net.node
    for ns in net.namespaces:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", n, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", n, "addr", "add", f"{GATEWAY_V4}/24", "dev", "br0")
    sh("ip", "-n", n, "addr", "add", f"{GATEWAY_V6}/64", "dev", "br0", "nodad")
    sh("ip", "-n", n, "link", "set", "br0", "up")
    pods = [
        (net.client, "vc", [CLIENT_V4], [CLIENT_V6]),
        (net.server, "vs", [SERVER_V4, UNKNOWN_V4], [SERVER_V6]),
        (net.stranger, "vx", [STRANGER_V4], [STRANGER_V6]),
    ]
    for ns, port, v4s, v6s in pods:
        sh("ip", "-n", n, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", n, "link", "set", port, "master", "br0", "up")
        for address in v4s:
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        for address in v6s:
            sh("ip", "-n", ns, "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", GATEWAY_V4)
        sh("ip", "-n", ns, "-6", "route", "add", "default", "via", GATEWAY_V6)
    for key in (
        "net.ipv4.ip_forward",
        "net.ipv6.conf.all.forwarding",
        "net.bridge.bridge-nf-call-iptables",
        "net.bridge.bridge-nf-call-ip6tables",
    ):
        net.sysctl(key, "1")
    for tool, cluster_ip, server in (
        ("iptables", CLUSTER_V4, SERVER_V4),
        ("ip6tables", CLUSTER_V6, f"[{SERVER_V6}]"),
    ):
        rules = [
            # Zone 1 for one port (the first CT target wins), Antrea's pod zone for the rest.
            f"-t raw -A PREROUTING -i br0 -p udp --dport {OTHER_ZONE_UDP_PORT} "
            f"-j CT --zone {OTHER_ZONE}",
            f"-t raw -A PREROUTING -i br0 -j CT --zone {ZONE}",
            # Committed connections carry a connection-source mark; one port gets none.
            f"-t mangle -A PREROUTING -i br0 -p udp --dport {UNCOMMITTED_UDP_PORT} -j RETURN",
            "-t mangle -A PREROUTING -i br0 -m conntrack --ctstate NEW "
            "-j CONNMARK --set-xmark 0x2/0xf",
            f"-t nat -A PREROUTING -d {cluster_ip} -p tcp --dport {SERVICE_HTTP_PORT} "
            f"-j DNAT --to-destination {server}:{TCP_PORT}",
            f"-t nat -A PREROUTING -d {cluster_ip} -p udp --dport {SERVICE_DNS_PORT} "
            f"-j DNAT --to-destination {server}:{UDP_PORT}",
            # Two conntrack matches: NEW and DNAT ("--ctstate NEW,DNAT" means either).
            "-t mangle -A POSTROUTING -m conntrack --ctstate NEW -m conntrack --ctstate DNAT "
            "-j CONNMARK --or-mark 0x10",
        ]
        for rule in rules:
            net.run(n, tool, "-w", *rule.split())


def _teardown(net: NodeNet) -> None:
    for process in net.processes:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
    for process in net.processes:
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    for ns in net.namespaces:
        # Anything still running in our namespaces was started by this test.
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    for ns in net.namespaces:
        sh("ip", "netns", "del", ns, check=False)


def start_servers(net: NodeNet) -> None:
    server = net.python(
        net.server,
        SERVER_SCRIPT,
        str(TCP_PORT),
        str(UDP_PORT),
        str(OTHER_ZONE_UDP_PORT),
        str(UNCOMMITTED_UDP_PORT),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = read_line(server, "the server pod's servers")
    if line != "ready":
        raise RuntimeError(f"the server pod's servers did not start: {line}")


@contextlib.contextmanager
def node_network(servers: bool = True) -> Iterator[NodeNet]:
    prefix = "afx-" + secrets.token_hex(4)
    net = NodeNet(prefix, f"{prefix}-node", f"{prefix}-client", f"{prefix}-srv", f"{prefix}-x")
    try:
        _setup(net)
        if servers:
            start_servers(net)
        yield net
    finally:
        _teardown(net)


def pod(name: str, ips: tuple[str, ...], labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {"nodeName": "node-1", "containers": [{"name": "main", "image": "busybox"}]},
        "status": {"podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]},
    }


def inventory() -> dict[str, Any]:
    """The Kubernetes objects of this network: node-1, the two Pods, Service prod/web."""
    return {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": "node-1"},
                "spec": {"podCIDR": POD_CIDRS[0], "podCIDRs": list(POD_CIDRS)},
            },
            pod("client", (CLIENT_V4, CLIENT_V6), {"app": "client"}),
            pod("server", (SERVER_V4, SERVER_V6), {"app": "server"}),
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": SERVICE_NAME, "namespace": NAMESPACE},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": CLUSTER_V4,
                    "clusterIPs": [CLUSTER_V4, CLUSTER_V6],
                    "ipFamilies": ["IPv4", "IPv6"],
                    "selector": {"app": "server"},
                    "ports": [
                        {
                            "name": "dns",
                            "port": SERVICE_DNS_PORT,
                            "protocol": "UDP",
                            "targetPort": UDP_PORT,
                        },
                        {
                            "name": "http",
                            "port": SERVICE_HTTP_PORT,
                            "protocol": "TCP",
                            "targetPort": TCP_PORT,
                        },
                    ],
                },
            },
        ],
    }


def write_inventory(path: Path) -> Path:
    path.write_text(yaml.safe_dump(inventory(), sort_keys=False))
    return path


def wait_until(predicate, what: str, timeout: float = WAIT, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)
