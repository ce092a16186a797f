"""The eBPF packet counter on real interfaces (root, BCC): in a Node's network namespace
with three Pods on a bridge, exactly the packets sent are counted, each once, with the
bytes conntrack would count (TCP checked against conntrack itself); untracked traffic and
fragments too; detaching leaves the interfaces as they were, a foreign clsact qdisc and its
filter survive, and filters left by an agent that did not stop are replaced."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from antrea_flow.conntrack import netns
from antrea_flow.ebpf.counter import PacketCounter
from antrea_flow.k8s.stores import pack_ip

from . import nodenet
from .nodenet import (
    CLIENT_V4,
    CLIENT_V6,
    SERVER_V4,
    SERVER_V6,
    TCP_PORT,
    UDP_PORT,
    NodeNet,
    node_network,
    sh,
)

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

UNTRACKED_PORT = nodenet.UNCOMMITTED_UDP_PORT  # has a sink; here, conntrack never sees it


@pytest.fixture(scope="module")
def net() -> Iterator[NodeNet]:
    with node_network() as net:
        net.sysctl("net.netfilter.nf_conntrack_acct", "1")  # conntrack's counts to compare
        # One port's traffic bypasses conntrack (operators do so for high-rate UDP).
        net.run(net.node, "iptables", "-w", "-t", "raw", "-I", "PREROUTING", "1", "-p", "udp",
                "--dport", str(UNTRACKED_PORT), "-j", "NOTRACK")  # fmt: skip
        yield net


@pytest.fixture
def counter(net: NodeNet) -> Iterator[PacketCounter]:
    counter = PacketCounter(net.node, 4096, gateway="br0")
    counter.start()
    try:
        counter.evict()  # what came before the test (neighbour discovery...)
        yield counter
    finally:
        counter.stop()


def flows_of(flows: np.ndarray, source: str, destination: str, proto: int) -> np.ndarray:
    keys = flows["key"]
    size = 16 if ":" in source else 4
    src = keys["src"][:, :size].tobytes()
    dst = keys["dst"][:, :size].tobytes()
    want_src, want_dst = pack_ip(source), pack_ip(destination)
    hits = [
        i
        for i in range(len(flows))
        if src[i * size : (i + 1) * size] == want_src
        and dst[i * size : (i + 1) * size] == want_dst
        and keys["proto"][i] == proto
    ]
    return flows[hits]


def icmp_echo(net: NodeNet, destination: str, count: int) -> None:
    sock = netns.socket_in(net.client, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(5)
    with sock:
        for sequence in range(count):
            header = struct.pack("!BBHHH", 8, 0, 0, 4242, sequence) + b"p" * 56
            words = struct.unpack(f"!{len(header) // 2}H", header)
            total = sum(words)
            total = (total >> 16) + (total & 0xFFFF)
            checksum = ~(total + (total >> 16)) & 0xFFFF
            sock.sendto(header[:2] + struct.pack("!H", checksum) + header[4:], (destination, 0))
            while sock.recv(2048)[20] != 0:  # until the echo reply (type 0)
                pass


def test_exactly_the_packets_sent_each_once(net: NodeNet, counter: PacketCounter):
    udp_port = net.udp_burst(SERVER_V4, UDP_PORT, 300, 100)
    udp6_port = net.udp_burst(SERVER_V6, UDP_PORT, 200, 60)
    untracked_port = net.udp_burst(SERVER_V4, UNTRACKED_PORT, 150, 20)
    icmp_echo(net, SERVER_V4, 7)
    flows, _ = counter.evict()

    (udp,) = [f for f in flows_of(flows, CLIENT_V4, SERVER_V4, 17) if f["key"]["sport"] == udp_port]
    assert (udp["packets"], udp["bytes"], udp["rev_packets"]) == (300, 300 * 128, 0)
    assert udp["key"]["dport"] == UDP_PORT and udp["key"]["version"] == 4
    (udp6,) = [f for f in flows_of(flows, CLIENT_V6, SERVER_V6, 17)
               if f["key"]["sport"] == udp6_port]  # fmt: skip
    assert (udp6["packets"], udp6["bytes"]) == (200, 200 * (60 + 8 + 40))
    (untracked,) = [f for f in flows_of(flows, CLIENT_V4, SERVER_V4, 17)
                    if f["key"]["sport"] == untracked_port]  # fmt: skip
    assert (untracked["packets"], untracked["bytes"]) == (150, 150 * 48)
    (echo,) = flows_of(flows, CLIENT_V4, SERVER_V4, 1)
    assert echo["key"]["dport"] == 8 << 8  # the request's type: replies count in reverse
    assert (echo["packets"], echo["rev_packets"]) == (7, 7)
    assert echo["bytes"] == echo["rev_bytes"] == 7 * 84
    assert echo["first_ns"] <= echo["last_ns"]
    # Each packet once: the server's side of these flows is not a second entry.
    assert len(flows_of(flows, SERVER_V4, CLIENT_V4, 17)) == 0
    # And the map is empty after an eviction.
    again, _ = counter.evict()
    assert len(flows_of(again, CLIENT_V4, SERVER_V4, 17)) == 0


def test_tcp_counts_equal_conntracks(net: NodeNet, counter: PacketCounter):
    client = net.tcp_client(SERVER_V4, TCP_PORT)
    for size in (1000, 20_000, 5):
        client.send(size)
    client.close()
    lines = [line for line in net.conntrack("-p", "tcp", "--sport", str(client.port))]
    assert len(lines) == 1, lines
    words = lines[0].split()
    packets = [int(w.split("=")[1]) for w in words if w.startswith("packets=")]
    octets = [int(w.split("=")[1]) for w in words if w.startswith("bytes=")]
    flows, _ = counter.evict()
    (flow,) = [f for f in flows_of(flows, CLIENT_V4, SERVER_V4, 6)
               if f["key"]["sport"] == client.port]  # fmt: skip
    assert [int(flow["packets"]), int(flow["rev_packets"])] == packets
    assert [int(flow["bytes"]), int(flow["rev_bytes"])] == octets
    assert flow["flags"] & 0x02 and flow["flags"] & 0x01  # SYN and FIN were seen


def test_fragments_are_counted_apart_from_their_first(net: NodeNet, counter: PacketCounter):
    port = net.udp_burst(SERVER_V4, UDP_PORT, 10, 3000)  # 3 fragments each at MTU 1500
    flows, _ = counter.evict()
    (first,) = [f for f in flows_of(flows, CLIENT_V4, SERVER_V4, 17) if f["key"]["sport"] == port]
    rest = [f for f in flows_of(flows, CLIENT_V4, SERVER_V4, 17) if f["key"]["fragment"]]
    assert (first["packets"], first["bytes"], first["key"]["fragment"]) == (10, 10 * 1500, 0)
    assert len(rest) == 1 and rest[0]["key"]["sport"] == rest[0]["key"]["dport"] == 0
    assert (rest[0]["packets"], rest[0]["bytes"]) == (20, 10 * (1500 + 68))


def filters(net: NodeNet, device: str, direction: str) -> str:
    return sh("ip", "netns", "exec", net.node, "tc", "filter", "show", "dev", device,
              direction).stdout  # fmt: skip


def qdiscs(net: NodeNet, device: str) -> str:
    return sh("ip", "netns", "exec", net.node, "tc", "qdisc", "show", "dev", device).stdout


def test_detach_leaves_the_interfaces_as_they_were(net: NodeNet):
    # vx already has a clsact qdisc and a filter of someone else's.
    tc = ("ip", "netns", "exec", net.node, "tc")
    sh(*tc, "qdisc", "add", "dev", "vx", "clsact")
    sh(*tc, "filter", "add", "dev", "vx", "ingress", "prio", "7", "protocol", "all", "u32",
       "match", "u32", "0", "0", "flowid", ":1")  # fmt: skip
    try:
        before = {d: (qdiscs(net, d), filters(net, d, "ingress")) for d in ("vc", "vs", "vx")}
        counter = PacketCounter(net.node, 1024, gateway="br0")
        counter.start()
        assert counter.interfaces is not None and len(counter.interfaces.attached) == 3
        for device in ("vc", "vs", "vx"):
            assert "antrea-flow-ingress" in filters(net, device, "ingress")
            assert "antrea-flow-egress" in filters(net, device, "egress")
        assert "pref 7 u32" in filters(net, "vx", "ingress")
        counter.stop()
        after = {d: (qdiscs(net, d), filters(net, d, "ingress")) for d in ("vc", "vs", "vx")}
        assert after == before
        assert "clsact" in after["vx"][0] and "pref 7 u32" in after["vx"][1]
        assert "clsact" not in after["vc"][0]
    finally:
        sh(*tc, "qdisc", "del", "dev", "vx", "clsact", check=False)


CRASHING_AGENT = """
import sys
from antrea_flow.ebpf.counter import PacketCounter
PacketCounter(sys.argv[1], 1024, gateway="br0").start()
print("attached", flush=True)
sys.stdin.read()
"""


def test_filters_of_an_agent_that_was_killed_are_replaced(net: NodeNet):
    crashed = subprocess.Popen(
        [sys.executable, "-c", CRASHING_AGENT, net.node],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert nodenet.read_line(crashed, "the first agent attached") == "attached"
    finally:
        crashed.kill()  # no detaching: its filters stay, holding its programs
        crashed.wait(10)
    assert "antrea-flow-ingress" in filters(net, "vc", "ingress")
    restarted = PacketCounter(net.node, 1024, gateway="br0")
    try:
        restarted.start()
        shown = filters(net, "vc", "ingress")
        assert shown.count("antrea-flow-ingress") == 1
        port = net.udp_burst(SERVER_V4, UDP_PORT, 5, 10)
        flows, _ = restarted.evict()
        (flow,) = [
            f for f in flows_of(flows, CLIENT_V4, SERVER_V4, 17) if f["key"]["sport"] == port
        ]
        assert flow["packets"] == 5
    finally:
        restarted.stop()
    assert "antrea-flow" not in filters(net, "vc", "ingress")


def test_a_new_pod_interface_is_followed_and_a_removed_one_forgotten(net: NodeNet):
    counter = PacketCounter(net.node, 1024, gateway="br0")
    counter.start()
    try:
        assert counter.interfaces is not None
        before = set(counter.interfaces.attached)
        sh("ip", "-n", net.node, "link", "add", "vnew", "type", "veth", "peer", "name", "vpeer")
        sh("ip", "-n", net.node, "link", "set", "vnew", "master", "br0", "up")
        nodenet.wait_until(lambda: len(counter.interfaces.attached) == len(before) + 1,
                           "the new interface attached")  # fmt: skip
        assert "antrea-flow-ingress" in filters(net, "vnew", "ingress")
        sh("ip", "-n", net.node, "link", "del", "vnew")
        nodenet.wait_until(lambda: counter.interfaces.attached == before, "the interface forgotten")
    finally:
        counter.stop()


MANY_FLOWS_SCRIPT = """
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"z" * 10, (host, port))
"""


def test_a_full_map_loses_nothing_through_the_ring_buffer(net: NodeNet):
    counter = PacketCounter(net.node, 1024, gateway="br0")  # the smallest map
    woken = []
    counter.on_full = lambda: woken.append(True)
    counter.start()
    try:
        counter.evict()
        net.run(net.client, sys.executable, "-c", MANY_FLOWS_SCRIPT, SERVER_V4, str(UDP_PORT),
                "1500")  # fmt: skip
        nodenet.wait_until(lambda: woken, "the ring buffer's first record")
        flows, _ = counter.evict()
        mine = [
            f for f in flows_of(flows, CLIENT_V4, SERVER_V4, 17) if f["key"]["dport"] == UDP_PORT
        ]
        assert sum(int(f["packets"]) for f in mine) == 1500
        assert len({int(f["key"]["sport"]) for f in mine}) > 1024  # more than the map holds
        assert set(counter.stats.fallback) == {"E2BIG"}  # the map was full: no room to add
        assert counter.stats.lost == 0
    finally:
        counter.stop()


def test_attaching_in_another_namespace_forks_no_process(net: NodeNet, monkeypatch):
    """A child forked from the agent keeps its asyncio signal handling: the signal that
    ends such a child reached the agent's loop, which stopped (pyroute2's netns option
    forks a helper). The compiler helper is started by exec, not fork."""

    def no_fork() -> int:
        raise AssertionError("os.fork() called while starting the counter")

    monkeypatch.setattr(os, "fork", no_fork)
    counter = PacketCounter(net.node, 1024, gateway="br0")
    counter.start()
    counter.stop()
