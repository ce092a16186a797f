"""Pod to Pod (same Node and across Nodes), Pod to Service and Pod to the external host, over
IPv4 and IPv6, with HTTP from sockets opened inside the Pods. Where a GET cannot tell who
answered, the Node's conntrack (zone 65520) or the external server's log does."""

from __future__ import annotations

import ipaddress
import secrets

import pytest

from .conftest import (
    CLIENT_1,
    CLIENT_2,
    HTTP,
    SERVICE_IP,
    WEB_1,
    WEB_2,
    Lab,
    ct_fields,
    wait_until,
)

pytestmark = pytest.mark.root

VERSIONS = pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
# Enough connections that both endpoints are chosen unless the choice is broken: each
# connection picks one of two at random, so missing one has probability 2 * 2**-24.
SERVICE_CONNECTIONS = 24


@VERSIONS
@pytest.mark.parametrize(
    ("source", "destination"),
    [(CLIENT_1, WEB_1), (CLIENT_2, WEB_2), (CLIENT_1, WEB_2), (CLIENT_2, WEB_1)],
    ids=["intra-node-1", "intra-node-2", "inter-1-to-2", "inter-2-to-1"],
)
def test_pod_to_pod_http(lab: Lab, source: str, destination: str, version: int):
    status, _ = lab.http_get(source, lab.ip(destination, version))
    assert status == 200


@VERSIONS
@pytest.mark.parametrize("source", [CLIENT_1, CLIENT_2])
def test_service_reaches_both_endpoints(lab: Lab, source: str, version: int):
    cluster_ip = SERVICE_IP[version]
    ports = set()
    for _ in range(SERVICE_CONNECTIONS):
        status, port = lab.http_get(source, cluster_ip, 80)
        assert status == 200
        ports.add(port)
    node = lab.node_of(source)
    args = ["-w", "65520", "-p", "tcp", "-d", cluster_ip]
    if version == 6:
        args = ["-f", "ipv6", *args]
    tuples = [ct_fields(line) for line in lab.conntrack(node, *args)]
    ours = [(orig, reply) for orig, reply in tuples if int(orig["sport"]) in ports]
    assert {int(orig["sport"]) for orig, _ in ours} == ports, "connections missing in conntrack"
    endpoints = {lab.ip(WEB_1, version), lab.ip(WEB_2, version)}
    answered = {ipaddress.ip_address(reply["src"]).compressed for _, reply in ours}
    assert answered == endpoints, f"DNAT targets {answered}, endpoints {endpoints}"
    assert {reply["sport"] for _, reply in ours} == {str(HTTP)}
    assert {orig["dport"] for orig, _ in ours} == {"80"}


@VERSIONS
@pytest.mark.parametrize("source", [CLIENT_1, CLIENT_2])
def test_pod_to_external_goes_out_with_the_nodes_snat_address(lab: Lab, source: str, version):
    node = lab.cluster.pod(source).node
    snat = node.address(version, 100)
    external = lab.cluster.external_address(version)
    path = f"/snat-check-{secrets.token_hex(6)}"
    status, port = lab.http_get(source, external, HTTP, path)
    assert status == 404  # the external server answered (there is no such file)

    # The external host saw the Node's SNAT address (its log names the client).
    log = lab.state_dir / "external.log"

    def logged() -> list[str]:
        lines = log.read_text(errors="replace").splitlines()
        return [line for line in lines if f"GET {path} " in line]

    (line,) = wait_until(logged, f"{path} in {log}")
    client = line.split()[0].removeprefix("::ffff:")
    assert ipaddress.ip_address(client) == ipaddress.ip_address(snat), line

    # The Node tracked the connection in the Pod zone and translated it.
    args = ["-w", "65520", "-p", "tcp", "--sport", str(port), "-d", external]
    if version == 6:
        args = ["-f", "ipv6", *args]
    ((orig, reply),) = [ct_fields(line) for line in lab.conntrack(node.name, *args)]
    assert ipaddress.ip_address(orig["src"]) == ipaddress.ip_address(lab.ip(source, version))
    assert ipaddress.ip_address(reply["dst"]) == ipaddress.ip_address(snat)
