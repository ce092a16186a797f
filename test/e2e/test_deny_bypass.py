"""The deny queue never changes a decision of the dataplane: denied packets are handed to the
agent on NFQUEUE before the Node's own drop or reject rule, bypassing the queue when no agent
listens, and accepted by the agent on to that rule when one does. So drop stays a drop (no
answer) and reject stays a reject (refused at once) without an agent, with one, and with one
that is stuck while its queue is full (the queue fails open)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from antrea_flow.exporter.denyqueue import QUEUE_LENGTH, DenyQueue

from .conftest import (
    ANSWER_TIMEOUT,
    CLIENT_1,
    CLIENT_2,
    DB,
    DROP_TIMEOUT,
    HTTP,
    NODES,
    WAIT,
    WEB_1,
    WEB_2,
    AgentHarness,
    Lab,
    nfqueue_stats,
    wait_until,
)

pytestmark = pytest.mark.root

VERSIONS = pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
OTHER_PORT = 9999


def assert_decisions(lab: Lab, version: int) -> None:
    """Allowed, dropped and rejected connections of the default cluster, as they must be
    (the probes run side by side: each waits for its own answer or timeout)."""

    def ip(pod: str) -> str:
        return lab.ip(pod, version)

    probes = {
        "allowed: frontend -> web": (lambda: lab.http_get(CLIENT_1, ip(WEB_2))[0], 200),
        "allowed: web -> db": (lambda: lab.http_get(WEB_2, ip(DB))[0], 200),
        # UDP reject answers with ICMP port unreachable (client-1 is on the other Node).
        "rejected: client-1 -> db (UDP)": (
            lambda: lab.udp(CLIENT_1, ip(DB), OTHER_PORT, ANSWER_TIMEOUT)[0],
            "refused",
        ),
    }
    for source, destination in ((DB, WEB_1), (DB, WEB_2)):
        probes[f"dropped: {source} -> {destination}"] = (
            lambda s=source, d=destination: lab.tcp(s, ip(d), HTTP, DROP_TIMEOUT)[0],
            "timeout",
        )
        probes[f"dropped: {source} -> {destination} (UDP)"] = (
            lambda s=source, d=destination: lab.udp(s, ip(d), OTHER_PORT, DROP_TIMEOUT)[0],
            "timeout",
        )
    for source in (CLIENT_1, CLIENT_2):
        probes[f"rejected: {source} -> db"] = (
            lambda s=source: lab.tcp(s, ip(DB), HTTP, ANSWER_TIMEOUT)[0],
            "refused",
        )
    with ThreadPoolExecutor(len(probes)) as pool:
        futures = {what: pool.submit(probe) for what, (probe, _) in probes.items()}
        outcomes = {what: future.result(WAIT) for what, future in futures.items()}
    expected = {what: want for what, (_, want) in probes.items()}
    assert outcomes == expected, f"IPv{version}"


def queued(lab: Lab) -> int:
    return sum(lab.nfqueue_counters(node) for node in NODES)


@VERSIONS
def test_without_an_agent_the_queue_is_bypassed(lab: Lab, version: int):
    for node in NODES:
        assert nfqueue_stats(lab, node) is None, f"something listens on queue 1 of {node}"
    before = queued(lab)
    assert_decisions(lab, version)
    # The denied packets did go through the NFQUEUE rules (and were let on to the deny rule).
    assert queued(lab) > before


@VERSIONS
def test_with_an_agent_listening_decisions_are_unchanged(
    lab: Lab, inventory_file: Path, version: int
):
    with AgentHarness(lab, inventory_file) as agents:
        for node in NODES:
            assert nfqueue_stats(lab, node) is not None, f"the agent of {node} is not bound"
        recorded = {n: a.denied.stats.recorded for n, a in agents.agents.items()}
        assert_decisions(lab, version)
        for node, agent in agents.agents.items():
            wait_until(
                lambda a=agent, n=node: a.denied.stats.recorded > recorded[n],
                f"the agent of {node} saw denied packets",
            )


def test_a_stuck_agent_with_a_full_queue_changes_nothing(lab: Lab):
    """The agent of node-2 stops taking packets: once its queue holds QUEUE_LENGTH packets,
    further denied packets go on to the deny rule (fail open) instead of being dropped
    unanswered: a reject is still refused at once, allowed traffic is untouched."""
    release = threading.Event()
    seen: list[int] = []

    def stuck(packet: bytes, mark: int) -> None:
        seen.append(mark)
        release.wait(WAIT + 15)

    queue = DenyQueue(lab.netns("node-2"), 1, stuck)
    queue.start()
    try:
        # Fill the queue with isolation drops on node-2 (within the Node's queueing burst).
        def full() -> bool:
            stats = nfqueue_stats(lab, "node-2")
            return stats is not None and stats["waiting"] >= QUEUE_LENGTH

        lab.udp_burst(DB, lab.ip(WEB_2, 4), OTHER_PORT, QUEUE_LENGTH, 16)
        for _ in range(10):
            if full():
                break
            lab.udp_burst(DB, lab.ip(WEB_2, 4), OTHER_PORT, 500, 16)
        wait_until(full, f"{QUEUE_LENGTH} packets waiting in queue 1 of node-2")
        for version in (4, 6):
            outcome, _ = lab.tcp(CLIENT_2, lab.ip(DB, version), HTTP, ANSWER_TIMEOUT)
            assert outcome == "refused", f"rejected: client-2 -> db over IPv{version}"
            outcome, _ = lab.tcp(DB, lab.ip(WEB_2, version), HTTP, DROP_TIMEOUT)
            assert outcome == "timeout", f"dropped: db -> web-2 over IPv{version}"
            status, _ = lab.http_get(WEB_2, lab.ip(DB, version))
            assert status == 200, f"allowed: web-2 -> db over IPv{version}"
        assert len(seen) == 1  # the agent is still stuck on the first packet
    finally:
        release.set()
        queue.stop()
