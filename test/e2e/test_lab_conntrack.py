"""What the lab leaves in the Nodes' conntrack for the agent, as Antrea's OVS pipeline does:
Pod traffic in zone 65520, the connection-source mark bits (0x2 from a local Pod, 0x1 from the
uplink), the Service bit 0x10 on DNATed connections, and the id of the allowing ingress rule in
the ct labels (bytes 12..15, big endian), equal to the id `lab inventory` publishes."""

from __future__ import annotations

import ipaddress

import pytest

from antrea_flow.conntrack.parser import Entry

from .conftest import (
    CLIENT_1,
    DB,
    HTTP,
    SERVICE_IP,
    TCP,
    WEB_1,
    WEB_2,
    ZONE,
    Lab,
    ct_fields,
)

pytestmark = pytest.mark.root

VERSIONS = pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
FROM_UPLINK, FROM_POD, SERVICE = 0x1, 0x2, 0x10


def rule_id(lab: Lab, kind: str, policy: str, index: int = 0, rule: str | None = None) -> int:
    """The published id of an ingress rule, by index or by the rule's name."""
    for item in lab.inventory()["items"]:
        if item.get("kind") == kind and item["metadata"]["name"] == policy:
            if rule is not None:
                names = [r.get("name") for r in item["spec"]["ingress"]]
                index = names.index(rule)
            return lab.rule_ids(kind, policy)["ingress"][index]
    raise AssertionError(f"no {kind} {policy} in the inventory")


def entry(lab: Lab, node: str, source: str, port: int, version: int) -> Entry:
    """The zone-65520 entry on `node` of the TCP connection from `source` with this port."""
    packed = ipaddress.ip_address(lab.ip(source, version)).packed
    found = [
        e
        for e in lab.ct_entries(node)
        if e.proto == TCP and e.orig_src == packed and e.orig_sport == port
    ]
    assert len(found) == 1, f"{len(found)} entries on {node} for {source} port {port}"
    return found[0]


def ingress_id(e: Entry) -> int:
    return int.from_bytes(e.labels[12:16], "big") if e.labels else 0


def egress_id(e: Entry) -> int:
    return int.from_bytes(e.labels[8:12], "big") if e.labels else 0


def zones(lab: Lab, node: str, port: int, version: int) -> set[str]:
    """The zones of every entry (any zone) with this source port, by the conntrack tool."""
    args = ["-p", "tcp", "--sport", str(port)]
    if version == 6:
        args = ["-f", "ipv6", *args]
    return {ct_fields(line)[0].get("zone", "0") for line in lab.conntrack(node, *args)}


@VERSIONS
def test_intra_node_connection(lab: Lab, version: int):
    status, port = lab.http_get(CLIENT_1, lab.ip(WEB_1, version))
    assert status == 200
    e = entry(lab, "node-1", CLIENT_1, port, version)
    assert e.zone == ZONE
    assert zones(lab, "node-1", port, version) == {str(ZONE)}
    assert e.mark & 0xF == FROM_POD
    assert not e.mark & SERVICE
    assert ingress_id(e) == rule_id(lab, "NetworkPolicy", "web-allow-frontend")
    assert egress_id(e) == 0


@VERSIONS
def test_inter_node_connection(lab: Lab, version: int):
    status, port = lab.http_get(CLIENT_1, lab.ip(WEB_2, version))
    assert status == 200
    source_side = entry(lab, "node-1", CLIENT_1, port, version)
    destination_side = entry(lab, "node-2", CLIENT_1, port, version)
    for node, e in (("node-1", source_side), ("node-2", destination_side)):
        assert e.zone == ZONE
        assert zones(lab, node, port, version) == {str(ZONE)}
        assert not e.mark & SERVICE
    assert source_side.mark & 0xF == FROM_POD
    assert destination_side.mark & 0xF == FROM_UPLINK
    # The ingress rule is enforced, and recorded, on the destination's Node only.
    assert ingress_id(destination_side) == rule_id(lab, "NetworkPolicy", "web-allow-frontend")
    assert ingress_id(source_side) == 0


@VERSIONS
def test_service_connection(lab: Lab, version: int):
    status, port = lab.http_get(CLIENT_1, SERVICE_IP[version], 80)
    assert status == 200
    e = entry(lab, "node-1", CLIENT_1, port, version)
    assert e.zone == ZONE
    assert e.mark & 0xF == FROM_POD
    assert e.mark & SERVICE, f"mark {e.mark:#x} lacks the Service bit"
    assert e.orig_dst == ipaddress.ip_address(SERVICE_IP[version]).packed
    endpoints = {ipaddress.ip_address(lab.ip(p, version)).packed for p in (WEB_1, WEB_2)}
    assert e.reply_src in endpoints
    assert e.reply_sport == HTTP


@VERSIONS
@pytest.mark.parametrize("source", [WEB_1, WEB_2])
def test_acnp_allow_rule_in_labels(lab: Lab, source: str, version: int):
    status, port = lab.http_get(source, lab.ip(DB, version))
    assert status == 200
    e = entry(lab, "node-2", source, port, version)
    assert e.zone == ZONE
    assert e.mark & 0xF == (FROM_POD if source == WEB_2 else FROM_UPLINK)
    assert ingress_id(e) == rule_id(lab, "ClusterNetworkPolicy", "acnp-db-guard", rule="allow-web")
    assert ingress_id(e) != rule_id(
        lab, "ClusterNetworkPolicy", "acnp-db-guard", rule="reject-clients"
    )
