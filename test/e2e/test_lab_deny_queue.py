"""What a lab Node hands to the deny queue: every packet its policy chains deny, the packets
conntrack finds invalid included (they are neither ESTABLISHED nor RELATED, so the filter
denies them too), each with the id of the denying rule as packet mark."""

from __future__ import annotations

import socket
import struct

import pytest

from antrea_flow.conntrack import netns
from antrea_flow.exporter.denyqueue import DenyQueue
from antrea_flow.lab.cluster import ISOLATION_INGRESS_ID

from .conftest import DB, HTTP, TCP, WEB_2, Lab, wait_until

pytestmark = pytest.mark.root

RST = 0x04
SOURCE_PORT = 40404


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_reset(source: str, destination: str, sport: int, dport: int) -> bytes:
    """A TCP segment with only RST set (of no connection: conntrack calls it invalid)."""
    header = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, RST, 0, 0, 0)
    pseudo = socket.inet_aton(source) + socket.inet_aton(destination)
    pseudo += struct.pack("!BBH", 0, TCP, len(header))
    return header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]


def test_an_invalid_packet_is_queued_with_the_denying_rule(lab: Lab):
    seen: list[tuple[bytes, int]] = []
    queue = DenyQueue(lab.netns("node-2"), 1, lambda packet, mark: seen.append((packet, mark)))
    queue.start()
    try:
        source, destination = lab.ip(DB, 4), lab.ip(WEB_2, 4)
        with netns.socket_in(lab.netns(DB), socket.AF_INET, socket.SOCK_RAW, TCP) as raw:
            raw.sendto(tcp_reset(source, destination, SOURCE_PORT, HTTP), (destination, 0))
        wait_until(lambda: seen, "the reset in the deny queue of node-2")
        ((packet, mark),) = seen
        assert mark == ISOLATION_INGRESS_ID  # web-2 accepts nothing from db
        header = (packet[0] & 0x0F) * 4
        ip = (packet[9], socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20]))
        assert ip == (TCP, source, destination)
        assert struct.unpack_from("!HH", packet, header) == (SOURCE_PORT, HTTP)
        assert packet[header + 13] == RST
    finally:
        queue.stop()
