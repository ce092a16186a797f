"""The default cluster's policies, enforced as Kubernetes and Antrea define them:

- K8s NetworkPolicy backend/web-allow-frontend: web Pods accept namespace frontend on TCP 8080
  and 5201 only; anything else to them is dropped (isolation): no answer at all.
- ACNP acnp-db-guard: db rejects app=client (TCP RST: refused at once; UDP: ICMP port
  unreachable, which a connected UDP socket reports as ECONNREFUSED) and allows app=web.

A drop is seen as no answer within DROP_TIMEOUT; allowed and rejected attempts wait up to
ANSWER_TIMEOUT and must end in a connection or a refusal, never in a timeout."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import (
    ANSWER_TIMEOUT,
    CLIENT_1,
    CLIENT_2,
    DB,
    DROP_TIMEOUT,
    HTTP,
    IPERF,
    WEB_1,
    WEB_2,
    Lab,
    udp_echo,
)

pytestmark = pytest.mark.root

VERSIONS = pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
UDP_ECHO = 9053  # a UDP echo server the tests run in db and web-1
OTHER_PORT = 9999
IPERF_ATTEMPTS = 10

TCP_CASES = [
    # source, destination, port, outcome
    (CLIENT_1, WEB_1, HTTP, "connected"),  # frontend -> web, same Node
    (CLIENT_1, WEB_2, HTTP, "connected"),  # frontend -> web, across Nodes
    (CLIENT_2, WEB_1, IPERF, "connected"),
    (CLIENT_2, WEB_2, IPERF, "connected"),
    (CLIENT_1, WEB_1, OTHER_PORT, "timeout"),  # not an allowed port: isolation drop
    (DB, WEB_1, HTTP, "timeout"),  # not from frontend: isolation drop, across Nodes
    (DB, WEB_2, HTTP, "timeout"),  # the same on db's own Node
    (DB, WEB_2, IPERF, "timeout"),
    (CLIENT_1, DB, HTTP, "refused"),  # acnp-db-guard reject-clients, across Nodes
    (CLIENT_2, DB, HTTP, "refused"),  # the same on db's own Node
    (CLIENT_2, DB, IPERF, "refused"),
    (WEB_1, DB, HTTP, "connected"),  # acnp-db-guard allow-web
    (WEB_2, DB, IPERF, "connected"),
]

UDP_CASES = [
    (WEB_1, DB, "reply"),  # allow-web has no port list: UDP too
    (WEB_2, DB, "reply"),
    (CLIENT_1, DB, "refused"),  # reject-clients: ICMP port unreachable
    (CLIENT_2, DB, "refused"),
    (DB, WEB_1, "timeout"),  # isolation drop
    (CLIENT_1, WEB_1, "timeout"),  # web allows frontend on TCP only
]


def case_id(case) -> str:
    source, destination, *rest = case
    return "-".join([source.split("/")[1], destination.split("/")[1], *map(str, rest)])


@VERSIONS
@pytest.mark.parametrize("case", TCP_CASES, ids=case_id)
def test_tcp(lab: Lab, case, version: int):
    source, destination, port, expected = case
    what = f"{source} -> {destination}:{port} over IPv{version}"
    if expected != "connected":
        timeout = DROP_TIMEOUT if expected == "timeout" else ANSWER_TIMEOUT
        outcome, _ = lab.tcp(source, lab.ip(destination, version), port, timeout)
        assert outcome == expected, what
        return
    # iperf3 closes and re-creates its listener around each test it runs, so a connection
    # to 5201 may find no listener for a moment (refused or reset by the Pod itself, never
    # by a policy here: web Pods only drop, and db allows web). A drop is a timeout.
    outcomes = []
    for _ in range(IPERF_ATTEMPTS):
        outcome, _ = lab.tcp(source, lab.ip(destination, version), port, ANSWER_TIMEOUT)
        outcomes.append(outcome)
        if outcome in ("connected", "timeout") or port != IPERF:
            break
        time.sleep(0.1)
    assert outcomes[-1] == "connected", f"{what}: {outcomes}"


@pytest.fixture(scope="module")
def echo_servers(lab: Lab):
    with udp_echo(lab, DB, UDP_ECHO), udp_echo(lab, WEB_1, UDP_ECHO):
        yield


@VERSIONS
@pytest.mark.parametrize("case", UDP_CASES, ids=case_id)
def test_udp(lab: Lab, echo_servers, case, version: int):
    source, destination, expected = case
    timeout = DROP_TIMEOUT if expected == "timeout" else ANSWER_TIMEOUT
    outcome, _ = lab.udp(source, lab.ip(destination, version), UDP_ECHO, timeout)
    assert outcome == expected, f"{source} -> {destination}:{UDP_ECHO}/udp over IPv{version}"


@VERSIONS
def test_iperf3_between_allowed_pods(lab: Lab, version: int):
    """A real iperf3 test on an allowed path (frontend -> web, across Nodes): the iperf3
    servers also survived the bare connections of the tests above."""
    server = lab.ip(WEB_2, version)
    for _ in range(IPERF_ATTEMPTS):
        command = ["iperf3", "-c", server, "-p", str(IPERF), "-n", "256K", "-J"]
        result = lab.run(CLIENT_1, *command, check=False, timeout=30)
        report = json.loads(result.stdout or "{}")
        # "the server is busy" or no listener for a moment: iperf3 serves one test at a time.
        if result.returncode == 0 or "error" not in report:
            break
        time.sleep(0.2)
    assert result.returncode == 0, report.get("error", result.stderr)
    assert report["end"]["sum_sent"]["bytes"] >= 256 * 1024
    assert report["end"]["sum_received"]["bytes"] > 0
