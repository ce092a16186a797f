"""A flood of denied packets: client-1 sends UDP to web-1:9999 (isolation drop on node-1) as
fast as a Python loop can. The Node queues at most its packet-in rate to the agent and counts
the rest (DENIED NOT QUEUED in `lab status`); the agent records at most denyRecordRate packets
per second and counts the rest; every packet the sender sent is accounted for, give or take
what a full queue let through unqueued. Meanwhile allowed traffic works and the agent polls."""

from __future__ import annotations

import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from antrea_flow.exporter.denyqueue import QUEUE_LENGTH

from .conftest import CLIENT_1, WAIT, WEB_1, AgentHarness, Lab, nfqueue_stats, wait_until

pytestmark = pytest.mark.root

RECORD_RATE = 200  # denyRecordRate: low, so that the limit shows within a short flood
FLOOD_PORT = 9999

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


def test_flood_of_denied_packets(lab: Lab, inventory_file: Path):
    node = "node-1"
    with AgentHarness(lab, inventory_file, (node,), deny_record_rate=RECORD_RATE) as agents:
        agent = agents.agents[node]
        deny = agent.denied.stats
        recorded_before = deny.recorded
        not_recorded_before = sum(deny.not_recorded.values())
        not_queued_before = lab.not_queued(node)
        polls_before = agent.store.stats.polls

        started = time.monotonic()
        sender = subprocess.Popen(
            ["ip", "netns", "exec", lab.netns(CLIENT_1), sys.executable, "-c", SENDER]
            + [lab.ip(WEB_1, 4), str(FLOOD_PORT)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert read_line(sender, "the sender") == "ready"
            # During the flood: allowed traffic between the same Pods, and the agent's loop.
            status, _ = lab.http_get(CLIENT_1, lab.ip(WEB_1, 4))
            assert status == 200
            wait_until(
                lambda: agent.store.stats.polls >= polls_before + 2,
                "two polls of the agent during the flood",
            )
            wait_until(lambda: deny.not_recorded["rate_limited"] > 0, "rate-limited denied packets")
            assert sender.poll() is None, "the sender ended before the checks"
        finally:
            sender.send_signal(signal.SIGTERM)
            out, err = sender.communicate(timeout=WAIT)
        sent, failed = map(int, out.split()[-2:])

        # Until the Node has nothing more for the agent: the queue is empty and the counts
        # stand still.
        def settled(previous: list) -> bool:
            stats = nfqueue_stats(lab, node)
            now = (agent.deny_queue.packets, lab.not_queued_rules(node))
            done = stats is not None and stats["waiting"] == 0 and previous[-1:] == [now]
            previous.append(now)
            return done

        history: list = []
        wait_until(lambda: settled(history) or time.sleep(0.25), "the deny queue drained")
        elapsed = time.monotonic() - started

        recorded = deny.recorded - recorded_before
        not_recorded = sum(deny.not_recorded.values()) - not_recorded_before
        not_queued = lab.not_queued(node) - not_queued_before
        accounted = recorded + not_recorded + not_queued
        print(
            f"flood: sent {sent} ({failed} sends failed) in {elapsed:.1f} s; recorded "
            f"{recorded}, not recorded {dict(deny.not_recorded)}, not queued {not_queued}"
        )
        assert deny.not_recorded["rate_limited"] > 0
        assert 0 < recorded <= RECORD_RATE * (elapsed + 1) + 1, "more than denyRecordRate/s"
        assert accounted <= sent, "more denied packets than were sent"
        assert sent - accounted <= QUEUE_LENGTH, (
            f"{sent - accounted} of {sent} denied packets are in no count"
        )
