"""Interoperability with softflowd, an independent IPFIX exporter: it reads a pcap file we
write (known packets and timestamps) and exports its flows to our collector over UDP and TCP,
with reduced-size encodings, biflow (RFC 5103) reverse counters, an options template, and
each of its four absolute time formats."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from .ipfixkit import RecordSink, collecting, eventually, exporting, run, through_sentinel

pytestmark = pytest.mark.needs("softflowd")

# -- a pcap file of our own ---------------------------------------------------------------

T0_SEC, T0_USEC = 1_700_000_000, 123_456  # the first packet's timestamp
SENTINEL_DOMAIN = 0x5E5E  # our own exporter's, for the sentinel (never softflowd's)


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ipv4_packet(src: str, dst: str, protocol: int, l4: bytes) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(l4),
        1,
        0,
        64,
        protocol,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + l4


def udp_segment(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp_segment(sport: int, dport: int, flags: int, seq: int, ack: int, payload=b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload


def ethernet(packet: bytes) -> bytes:
    return b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + packet


@dataclass(frozen=True)
class Packet:
    usec: int  # microseconds after T0
    ip: bytes

    @property
    def timestamp_us(self) -> int:
        return (T0_SEC * 1_000_000 + T0_USEC) + self.usec


def write_pcap(path: Path, packets: list[Packet]) -> None:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]  # LINKTYPE_ETHERNET
    for p in packets:
        frame = ethernet(p.ip)
        sec, usec = divmod(p.timestamp_us, 1_000_000)
        out.append(struct.pack("<IIII", sec, usec, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))


SYN, ACK, FIN, PSH = 0x02, 0x10, 0x01, 0x08

CLIENT, SERVER, WEB = "10.1.0.1", "10.2.0.2", "10.2.0.3"
UDP_FORWARD = [
    Packet(0, ipv4_packet(CLIENT, SERVER, 17, udp_segment(40000, 5353, b"q" * 30))),
    Packet(1_500_000, ipv4_packet(CLIENT, SERVER, 17, udp_segment(40000, 5353, b"q" * 41))),
]
UDP_REVERSE = [
    Packet(250_500, ipv4_packet(SERVER, CLIENT, 17, udp_segment(5353, 40000, b"r" * 100))),
]
TCP_FORWARD = [
    Packet(2_000_000, ipv4_packet(CLIENT, WEB, 6, tcp_segment(50000, 80, SYN, 1000, 0))),
    Packet(
        2_002_000,
        ipv4_packet(CLIENT, WEB, 6, tcp_segment(50000, 80, ACK | PSH, 1001, 5001, b"G" * 200)),
    ),
    Packet(2_500_000, ipv4_packet(CLIENT, WEB, 6, tcp_segment(50000, 80, FIN | ACK, 1201, 5001))),
]
TCP_REVERSE = [
    Packet(2_001_000, ipv4_packet(WEB, CLIENT, 6, tcp_segment(80, 50000, SYN | ACK, 5000, 1001))),
    Packet(2_600_000, ipv4_packet(WEB, CLIENT, 6, tcp_segment(80, 50000, FIN | ACK, 5001, 1202))),
]
PACKETS = sorted(UDP_FORWARD + UDP_REVERSE + TCP_FORWARD + TCP_REVERSE, key=lambda p: p.usec)


@dataclass(frozen=True)
class ExpectedFlow:
    src: str
    dst: str
    sport: int
    dport: int
    protocol: int
    forward: list[Packet]
    reverse: list[Packet]


FLOWS = [
    ExpectedFlow(CLIENT, SERVER, 40000, 5353, 17, UDP_FORWARD, UDP_REVERSE),
    ExpectedFlow(CLIENT, WEB, 50000, 80, 6, TCP_FORWARD, TCP_REVERSE),
]

# softflowd -A: (the IE pair it sends, the value for a timestamp in microseconds). softflowd
# keeps microseconds and encodes micro/nano as NTP times of (usec + 1), so nanoseconds come
# out within the microsecond.
TIME_FORMATS = {
    "sec": ("flowStartSeconds", "flowEndSeconds", lambda us: us // 1_000_000),
    "milli": ("flowStartMilliseconds", "flowEndMilliseconds", lambda us: us // 1000),
    "micro": ("flowStartMicroseconds", "flowEndMicroseconds", lambda us: us),
    "nano": ("flowStartNanoseconds", "flowEndNanoseconds", lambda us: us * 1000),
}


async def run_softflowd(tmp_path: Path, pcap: Path, port: int, protocol: str, time_format: str):
    process = await asyncio.create_subprocess_exec(
        shutil.which("softflowd"),
        "-r",
        str(pcap),
        "-n",
        f"127.0.0.1:{port}",
        "-v",
        "10",
        "-P",
        protocol,
        "-b",
        "-A",
        time_format,
        "-d",
        "-p",
        str(tmp_path / "softflowd.pid"),
        # No control socket: with -r, softflowd 1.1 tests the poll result of its control
        # socket without ever polling (an uninitialised array), and depending on stack
        # garbage blocks in accept() on it forever.
        "-c",
        "none",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "Flows exported: 2" in text, text
    return text


@pytest.mark.parametrize("time_format", sorted(TIME_FORMATS))
@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_softflowd_flows_decode(protocol, time_format, tmp_path):
    pcap = tmp_path / "flows.pcap"
    write_pcap(pcap, PACKETS)
    start_key, end_key, convert = TIME_FORMATS[time_format]

    async def scenario():
        sink = RecordSink()
        async with collecting(protocol, sink) as collector:
            await run_softflowd(tmp_path, pcap, collector.port, protocol, time_format)
            await eventually(
                lambda: sum(1 for _, _, r in sink.records if "sourceIPv4Address" in r) >= 2,
                "both flows decoded",
            )
            # softflowd has exited: all it sent is in the collector's socket (UDP) or in a
            # session that ends (TCP). What is not decoded once a sentinel datagram sent
            # after it was (UDP), or once the session ended (TCP), never comes.
            if protocol == "udp":
                async with exporting(collector, domain=SENTINEL_DOMAIN) as sentinel:
                    await through_sentinel(sentinel, sink)
                sink.messages[:] = [
                    (peer, message)
                    for peer, message in sink.messages
                    if message.observation_domain_id != SENTINEL_DOMAIN
                ]
            else:
                await eventually(lambda: collector.stats.sessions_open == 0, "session ended")
        return sink, collector.stats

    sink, stats = run(scenario())
    assert not stats.malformed
    assert stats.handler_errors == 0 and stats.lost_records == 0
    flows = [r for _, _, r in sink.records if "sourceIPv4Address" in r]
    assert len(flows) == len(FLOWS)
    for expected in FLOWS:
        (got,) = [r for r in flows if r["sourceTransportPort"] == expected.sport]
        assert got["sourceIPv4Address"] == expected.src
        assert got["destinationIPv4Address"] == expected.dst
        assert got["destinationTransportPort"] == expected.dport
        assert got["protocolIdentifier"] == expected.protocol
        assert got["packetDeltaCount"] == len(expected.forward)
        assert got["octetDeltaCount"] == sum(len(p.ip) for p in expected.forward)
        assert got["reversePacketDeltaCount"] == len(expected.reverse)
        assert got["reverseOctetDeltaCount"] == sum(len(p.ip) for p in expected.reverse)
        first = min(p.timestamp_us for p in expected.forward + expected.reverse)
        last = max(p.timestamp_us for p in expected.forward + expected.reverse)
        if time_format == "nano":
            assert got[start_key] // 1000 == first
            assert got[end_key] // 1000 == last
        else:
            assert got[start_key] == convert(first)
            assert got[end_key] == convert(last)
    tcp = next(r for r in flows if r["protocolIdentifier"] == 6)
    assert tcp["tcpControlBits"] == SYN | ACK | FIN | PSH  # 1-byte encoding, OR of flags
    assert tcp["reverseTcpControlBits"] == SYN | ACK | FIN
    # The reduced-size fields were announced as such and decoded to the same values.
    lengths = {
        (f.element.name): f.length
        for _, m in sink.messages
        for t in m.templates
        if not t.is_options
        for f in t.fields
    }
    assert lengths["octetDeltaCount"] == 4 and lengths["tcpControlBits"] == 1


def test_softflowd_options_record_decodes(tmp_path):
    """softflowd's options template (scope meteringProcessId) and its record decode without
    a malformed count, and its string field (interfaceName, fixed length 16, NUL-padded
    name of the pcap file) decodes as text like any string field."""
    pcap = tmp_path / "flows.pcap"
    write_pcap(pcap, PACKETS)

    async def scenario():
        sink = RecordSink()
        async with collecting("udp", sink) as collector:
            await run_softflowd(tmp_path, pcap, collector.port, "udp", "milli")
            await eventually(lambda: len(sink.records) >= 3, "flows and options decoded")
        return sink, collector.stats

    sink, stats = run(scenario())
    assert not stats.malformed
    options = [t for _, m in sink.messages for t in m.templates if t.is_options]
    assert options and options[0].scope_field_count == 1
    assert options[0].fields[0].element.name == "meteringProcessId"
    (record,) = [r for _, tid, r in sink.records if tid == options[0].template_id]
    assert record["meteringProcessId"] > 0
    name = record["interfaceName"]
    assert isinstance(name, str), f"interfaceName decoded as {type(name).__name__}: {name!r}"
    assert str(pcap).startswith(name.rstrip("\x00"))
