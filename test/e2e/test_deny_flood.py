"""Floods of denied packets, and where every one of them goes.

A sender in a Pod sends UDP to a Pod that denies it, as fast as a Python loop can. The Node
queues at most its packet-in rate to the agent, one limit for all its deny rules, and counts
the rest (DENIED NOT QUEUED in `lab status`); the agent records at most denyRecordRate
packets per second and counts the rest by reason, including the packets that reached the
queue but not the agent (a full socket: gaps in the queue's packet ids) and those whose
handling failed. So every packet a sender sent is in exactly one count. Meanwhile allowed
traffic works and the agent polls."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from antrea_flow.exporter.denyqueue import DenyQueue
from antrea_flow.lab.rules import DENY_BURST, DENY_RATE

from .conftest import (
    CLIENT_1,
    CLIENT_2,
    DB,
    UDP,
    WAIT,
    WEB_1,
    WEB_2,
    AgentHarness,
    Lab,
    nfqueue_stats,
    wait_until,
)

pytestmark = pytest.mark.root

RECORD_RATE = 200  # denyRecordRate: low, so that the limit shows within a short flood
FLOOD_PORT = 9999
DROP, REJECT = 2, 3
# xt_limit charges each packet a whole number of credits earned per jiffy: depending on HZ,
# the rounding lets up to ~10% more than the rate through (never twice as much).
RATE_SLACK = 1.1

SENDER = textwrap.dedent(
    """
    import signal, socket, sys
    stop = False
    def finish(*_):
        global stop
        stop = True
    signal.signal(signal.SIGTERM, finish)
    host, port = sys.argv[1], int(sys.argv[2])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setblocking(False)
    address, data = (host, port), b"f" * 32
    sent = failed = 0
    print("ready", flush=True)
    while not stop:
        for _ in range(64):
            try:
                s.sendto(data, address)
                sent += 1
            except OSError:
                failed += 1
    print(sent, failed, flush=True)
    """
)


def read_line(process: subprocess.Popen, what: str) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(WAIT):
            raise AssertionError(f"{what} printed nothing within {WAIT}s")
    line = process.stdout.readline()
    if not line:
        raise AssertionError(f"{what} ended ({process.wait(WAIT)}): {process.stderr.read()}")
    return line.strip()


def flood(lab: Lab, flows: list[tuple[str, str]], during: Callable[[], None]) -> list[int]:
    """Run one sender per (source Pod, destination Pod) to FLOOD_PORT over IPv4 while
    `during` runs; the number of datagrams each one sent."""
    senders = []
    try:
        for source, destination in flows:
            senders.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", lab.netns(source), sys.executable, "-c", SENDER]
                    + [lab.ip(destination, 4), str(FLOOD_PORT)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            assert read_line(senders[-1], f"the sender in {source}") == "ready"
        during()
        assert all(s.poll() is None for s in senders), "a sender ended before the checks"
    finally:
        for sender in senders:
            sender.send_signal(signal.SIGTERM)
        outputs = [sender.communicate(timeout=WAIT)[0] for sender in senders]
    return [int(out.split()[-2]) for out in outputs]


class Counts:
    """Where the denied packets of a Node went since this was made. `handled` counts the
    packets the queue's handler took to the end (the agent's deny store: recorded, or not
    recorded by reason)."""

    def __init__(self, lab: Lab, node: str, queue: DenyQueue, handled: Callable[[], int]):
        self.lab, self.node, self.queue, self.handled = lab, node, queue, handled
        self.start = self._now()

    def _now(self) -> dict[str, int]:
        stats = nfqueue_stats(self.lab, self.node)
        assert stats is not None, f"nothing listens on queue 1 of {self.node}"
        return {
            "not_queued": self.lab.not_queued_rules(self.node),  # over the Node's rate
            "queued": self.lab.nfqueue_counters(self.node),  # within it: to NFQUEUE
            "numbered": stats["id_sequence"],  # by the kernel: put in the socket, or a gap
            "read": self.queue.packets,
            "socket_overflow": self.queue.socket_overflow,
            "error": self.queue.errors,
            "handled": self.handled(),
        }

    def since(self) -> dict[str, int]:
        now = self._now()
        return {key: now[key] - self.start[key] for key in now}


def store_counts(lab: Lab, node: str, agent) -> Counts:
    deny = agent.denied.stats
    return Counts(
        lab, node, agent.deny_queue, lambda: deny.recorded + sum(deny.not_recorded.values())
    )


def assert_every_packet_counted(sent: int, counts: dict[str, int]) -> None:
    print(f"sent {sent}: {counts}")
    assert counts["queued"] + counts["not_queued"] == sent, "denied packets the Node did not see"
    # The one case nobody can count: a packet that found the queue full went on unnumbered.
    lost = counts["queued"] - counts["numbered"]
    assert lost == 0, f"{lost} packets found the agent's queue full"
    assert counts["read"] + counts["socket_overflow"] == counts["numbered"]
    assert counts["handled"] + counts["error"] == counts["read"]
    counted = counts["handled"] + counts["socket_overflow"] + counts["error"]
    assert sent == counted + counts["not_queued"]


def settle(counts: Counts, sent: int) -> dict[str, int]:
    """Until the Node has nothing more for the agent, and the counts since `counts` was made
    (returned) account for the `sent` packets: the Node saw each of them (queued, or over
    its rate), numbered each one it queued, and the agent read or counted missed each one
    numbered, and handled or counted failed each one read; none waits for a verdict. These
    are the balances `assert_every_packet_counted` checks: a packet that never reaches its
    count keeps them from holding, and the wait fails with the counts it saw last."""
    last: dict[str, Any] = {}

    def balanced() -> bool:
        stats = nfqueue_stats(counts.lab, counts.node)
        since = counts.since()
        last.update(since, waiting=None if stats is None else stats["waiting"])
        return (
            stats is not None
            and stats["waiting"] == 0
            and since["queued"] + since["not_queued"] == sent
            and since["queued"] == since["numbered"]
            and since["read"] + since["socket_overflow"] == since["numbered"]
            and since["handled"] + since["error"] == since["read"]
        )

    try:
        wait_until(balanced, "every denied packet counted")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: sent {sent}, counts {last}") from None
    return {key: value for key, value in last.items() if key != "waiting"}


def test_flood_of_denied_packets(lab: Lab, inventory_file: Path):
    """client-1 to web-1:9999, an isolation drop on node-1."""
    node = "node-1"
    with AgentHarness(lab, inventory_file, (node,), deny_record_rate=RECORD_RATE) as agents:
        agent = agents.agents[node]
        deny = agent.denied.stats
        counts = store_counts(lab, node, agent)
        rate_limited = deny.not_recorded["rate_limited"]
        recorded = deny.recorded
        polls = agent.store.stats.polls

        def meanwhile() -> None:
            status, _ = lab.http_get(CLIENT_1, lab.ip(WEB_1, 4))
            assert status == 200  # allowed traffic between the same Pods
            wait_until(lambda: agent.store.stats.polls >= polls + 2, "two polls during the flood")
            wait_until(
                lambda: deny.not_recorded["rate_limited"] > rate_limited, "rate-limited packets"
            )

        started = time.monotonic()
        (sent,) = flood(lab, [(CLIENT_1, WEB_1)], meanwhile)
        since = settle(counts, sent)
        elapsed = time.monotonic() - started
        assert since["not_queued"] > 0, "the flood never went over the Node's rate"
        assert 0 < deny.recorded - recorded <= RECORD_RATE * (elapsed + 1) + 1
        assert_every_packet_counted(sent, since)


def test_a_flood_of_two_deny_rules_shares_the_nodes_limit(lab: Lab, inventory_file: Path):
    """db to web-2 (isolation drop) and client-2 to db (the ACNP's reject) at once, both on
    node-2: the Node hands the agent no more than one limit lets through, not one per rule."""
    node = "node-2"
    with AgentHarness(lab, inventory_file, (node,), deny_record_rate=RECORD_RATE) as agents:
        agent = agents.agents[node]
        counts = store_counts(lab, node, agent)
        polls = agent.store.stats.polls

        def meanwhile() -> None:
            wait_until(lambda: agent.store.stats.polls >= polls + 2, "two polls during the flood")

        started = time.monotonic()
        sent = flood(lab, [(DB, WEB_2), (CLIENT_2, DB)], meanwhile)
        elapsed = time.monotonic() - started  # the senders have stopped
        since = settle(counts, sum(sent))
        allowed = DENY_BURST + DENY_RATE * RATE_SLACK * elapsed
        assert all(s > allowed for s in sent), f"a sender alone stayed within the limit: {sent}"
        assert since["queued"] <= allowed, f"{since['queued']} queued in {elapsed:.2f} s"
        assert_every_packet_counted(sum(sent), since)
        for source, action in ((DB, DROP), (CLIENT_2, REJECT)):
            agents.wait_records(
                f"a deny record of {source}'s flood",
                _node=node,
                protocolIdentifier=UDP,
                destinationTransportPort=FLOOD_PORT,
                sourceIPv4Address=lab.ip(source, 4),
                ingressNetworkPolicyRuleAction=action,
            )


def test_an_overflowing_socket_is_counted_from_the_gaps_in_packet_ids(lab: Lab):
    """A slow agent whose socket holds few packets: the kernel numbers each queued packet and
    lets those the socket cannot take go on. The agent counts them from the gap before the
    next packet it reads, or, when none comes, from the last id the kernel gave out."""
    node, burst, late_size = "node-2", 1000, 17
    handled = 0
    missed_before_late: list[int] = []

    def slow(packet: bytes, mark: int) -> None:
        nonlocal handled
        handled += 1
        if len(packet) == 20 + 8 + late_size:  # IPv4, UDP, payload
            missed_before_late.append(queue.socket_overflow)
        time.sleep(0.001)

    queue = DenyQueue(lab.netns(node), 1, slow)
    queue.start()
    try:
        # netfilterqueue's receive buffer (about 4.9 MB) takes thousands of packets: a small
        # one overflows within a burst. (The queue's socket is not public: test only.)
        fd = os.dup(queue._nfq.get_fd())
        with socket.socket(fileno=fd) as netlink:
            netlink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        counts = Counts(lab, node, queue, lambda: handled)
        web = lab.ip(WEB_2, 4)
        # Within the Node's burst (4096 packets): all of them are queued.
        lab.udp_burst(DB, web, FLOOD_PORT, burst, 16)
        # The socket drains; the tail of the burst is not counted yet (that takes two of
        # the queue's quiet intervals).
        wait_until(
            lambda: (nfqueue_stats(lab, node) or {}).get("waiting") == 0, "the socket drained"
        )
        lab.udp_burst(DB, web, FLOOD_PORT, 1, late_size)
        wait_until(lambda: missed_before_late, "the late packet read")
        assert missed_before_late[0] > 0, "the gap before the late packet was not counted"
        settle(counts, burst + 1)
        missed = queue.socket_overflow
        lab.udp_burst(DB, web, FLOOD_PORT, burst, 16)  # and nothing after it
        since = settle(counts, 2 * burst + 1)
        assert queue.socket_overflow > missed, "the tail was not counted"
        assert_every_packet_counted(2 * burst + 1, since)
    finally:
        queue.stop()


def test_a_failing_handler_is_counted_and_the_queue_goes_on(lab: Lab):
    node = "node-2"
    calls = 0

    def failing(packet: bytes, mark: int) -> None:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise ValueError("odd packet")

    queue = DenyQueue(lab.netns(node), 1, failing)
    queue.start()
    try:
        counts = Counts(lab, node, queue, lambda: calls - queue.errors)
        for sent in (10, 20):  # the queue still reads after its handler failed
            lab.udp_burst(DB, lab.ip(WEB_2, 4), FLOOD_PORT, 10, 16)
            wait_until(lambda s=sent: queue.packets >= s, f"{sent} packets read")
        since = settle(counts, 20)
        assert since["error"] == 10
        assert_every_packet_counted(20, since)
    finally:
        queue.stop()
