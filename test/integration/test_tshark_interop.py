"""Interoperability with Wireshark: our IPFIX as captured on lo and decoded by tshark, an
independent decoder, shows every value we sent, in template order.

tshark's cflow dissector names IANA fields after NetFlow (octets = octetDeltaCount, ...),
marks RFC 5103 reverse fields with "(Reverse Type ...)", shows Antrea's fields (PEN 56506,
"Project Antrea") as hex bytes, and omits zero-length variable-length fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import secrets
import shutil
import socket
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from antrea_flow.ipfix.elements import ANTREA_PEN, IANA, REVERSE_PEN, DataType
from antrea_flow.ipfix.templates import Field

from .ipfixkit import (
    TEMPLATES,
    V4,
    V6,
    RecordSink,
    assert_exactly_once,
    collecting,
    eventually,
    exporting,
    make_record,
    run,
    template_id_of,
)

pytestmark = [pytest.mark.root, pytest.mark.needs("tshark", "dumpcap")]

DOMAIN = 0xC0FFEE
# IANA element names and the cflow field tshark shows them as.
CFLOW_NAMES = {
    "flowStartSeconds": "cflow.abstimestart",
    "flowEndSeconds": "cflow.abstimeend",
    "flowEndReason": "cflow.flow_end_reason",
    "sourceTransportPort": "cflow.srcport",
    "destinationTransportPort": "cflow.dstport",
    "protocolIdentifier": "cflow.protocol",
    "packetTotalCount": "cflow.permanent_packets",
    "octetTotalCount": "cflow.permanent_octets",
    "packetDeltaCount": "cflow.packets",
    "octetDeltaCount": "cflow.octets",
    "sourceIPv4Address": "cflow.srcaddr",
    "destinationIPv4Address": "cflow.dstaddr",
    "sourceIPv6Address": "cflow.srcaddrv6",
    "destinationIPv6Address": "cflow.dstaddrv6",
}


@contextlib.asynccontextmanager
async def capturing(path: Path, capture_filter: str):
    """dumpcap on lo with `capture_filter`, from when it reports capturing until the block
    ends (then it is stopped and has written `path`).

    dumpcap writes what it captured a while later (its kernel buffer hands packets over in
    blocks), and what it has not written when it is stopped is lost. So at the end a marker
    datagram goes over lo, captured too, and dumpcap is stopped once the marker is in the
    file: every packet sent before it is written by then."""
    marker_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    marker_socket.bind(("127.0.0.1", 0))
    marker_port = marker_socket.getsockname()[1]
    marker = b"end of the capture " + secrets.token_hex(16).encode()
    process = await asyncio.create_subprocess_exec(
        shutil.which("dumpcap"),
        "-i",
        "lo",
        "-f",
        f"({capture_filter}) or (udp port {marker_port})",
        "-w",
        str(path),
        "-q",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        seen = []

        async def started() -> None:
            while True:
                line = await process.stderr.readline()
                if not line:
                    raise AssertionError(f"dumpcap exited: {b''.join(seen).decode()}")
                seen.append(line)
                if b"Capturing on" in line:
                    return

        await asyncio.wait_for(started(), 20)
        await eventually(path.exists, "dumpcap's capture file", timeout=10)
        yield
        marker_socket.sendto(marker, ("127.0.0.1", marker_port))
        await eventually(lambda: marker in path.read_bytes(), "the marker written by dumpcap")
    finally:
        marker_socket.close()
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.communicate(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


def tshark_pdml(path: Path, decode_as: str) -> ET.Element:
    result = subprocess.run(
        ["tshark", "-n", "-r", str(path), "-d", decode_as, "-T", "pdml"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return ET.fromstring(result.stdout)


def flow_entries(flow: ET.Element) -> list[ET.Element]:
    """The value fields of one decoded record, in wire order (timedelta groups the start
    and end times of a record; a string entry has its length as a child)."""
    entries = []
    for child in flow:
        if child.get("name") == "cflow.timedelta":
            entries.extend(child)
        else:
            entries.append(child)
    return entries


def expected_bytes(field: Field, value) -> bytes:
    """Our encoding of an Antrea field, written out independently of the codec."""
    t = field.element.data_type
    if t == DataType.string:
        return value.encode("utf-8")
    if t in (DataType.ipv4Address, DataType.ipv6Address):
        return ipaddress.ip_address(value).packed
    return int(value).to_bytes(field.length, "big")


def epoch_from_show(show: str) -> int:
    # "Nov 14, 2023 22:13:21.000000000 UTC"
    stamp = datetime.datetime.strptime(show[:21], "%b %d, %Y %H:%M:%S")
    return int(stamp.replace(tzinfo=datetime.UTC).timestamp())


def check_record(template_id: int, record: dict, entries: list[ET.Element]) -> None:
    template = TEMPLATES[template_id]
    shown = list(entries)
    for key, field in zip(template.keys, template.fields, strict=True):
        value = record[key]
        ie = field.element
        if field.variable and expected_bytes(field, value) == b"":
            continue  # tshark shows no entry for an empty variable-length field
        assert shown, f"tshark shows nothing for {key} and later fields"
        entry = shown.pop(0)
        name, showname, show = entry.get("name"), entry.get("showname"), entry.get("show")
        where = f"record {record['octetDeltaCount']} field {key}: {showname!r}"
        if ie.enterprise == ANTREA_PEN:
            assert name == "cflow.enterprise_private_entry", where
            raw = expected_bytes(field, value)
            prefix = (
                f"Enterprise Private entry: (Project Antrea) Type {ie.element_id}: "
                "Value (hex bytes): "
            )
            assert showname.startswith(prefix), where
            hex_shown = showname[len(prefix) :]
            if hex_shown.endswith("…"):  # tshark abbreviates long values in the summary
                assert raw.hex(" ").startswith(hex_shown[:-1].rstrip()), where
            else:
                assert hex_shown == raw.hex(" "), where
            assert bytes.fromhex(entry.get("value")) == raw, where
            continue
        assert ie.enterprise in (IANA, REVERSE_PEN), where
        base = key if ie.enterprise == IANA else key[7].lower() + key[8:]  # drop "reverse"
        assert name == CFLOW_NAMES[base], where
        assert ("Reverse" in showname) == (ie.enterprise == REVERSE_PEN), where
        if ie.data_type == DataType.dateTimeSeconds:
            assert int(entry.get("value"), 16) == value, where
            assert epoch_from_show(show) == value, where
        elif ie.data_type in (DataType.ipv4Address, DataType.ipv6Address):
            assert ipaddress.ip_address(show) == ipaddress.ip_address(value), where
        else:
            assert int(show) == value, where
    assert not shown, f"tshark shows more entries than the template has: {shown}"


# Records of both templates, covering empty strings, a non-ASCII string and a string too
# long for the one-byte length form (3-byte form, 0xFF + uint16).
RECORD_NUMBERS = [1, 2, 3, 4, 5, 8, 260, 261, 262, 263]


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_tshark_decodes_every_field_we_send(protocol, tmp_path):
    records = {i: make_record(i) for i in RECORD_NUMBERS}
    assert {template_id_of(r) for r in records.values()} == {V4, V6}
    assert any(len(r["destinationPodName"]) >= 255 for r in records.values())
    capture = tmp_path / "ipfix.pcapng"

    async def scenario():
        sink = RecordSink()
        async with collecting(protocol, sink) as collector:
            port = collector.port
            async with (
                capturing(capture, f"{protocol} port {port}"),
                exporting(collector, domain=DOMAIN) as exporter,
            ):
                for record in records.values():
                    assert exporter.add_mapping(template_id_of(record), record)
                await eventually(lambda: len(sink.records) >= len(records), "decoded")
        return sink, port

    sink, port = run(scenario())
    assert_exactly_once(sink, records)  # our own collector agrees

    pdml = tshark_pdml(capture, f"{protocol}.port=={port},cflow")
    assert "Project Antrea" in ET.tostring(pdml, encoding="unicode")

    decoded: dict[int, tuple[int, list[ET.Element]]] = {}
    data_sequences: list[tuple[int, int]] = []  # (sequence, records in that message)
    templates_seen: dict[int, int] = {}
    for proto in pdml.iter("proto"):
        if proto.get("name") != "cflow":
            continue
        problems = [f.get("showname") for f in proto.iter("field") if "_ws." in f.get("name")]
        assert not problems, f"tshark flags our IPFIX: {problems}"
        header = {f.get("name"): f.get("show") for f in proto if f.get("name")}
        assert header["cflow.version"] == "10"
        assert int(header["cflow.od_id"]) == DOMAIN
        in_message = 0
        for flowset in proto:
            if not (flowset.get("show") or "").startswith("Set "):
                continue
            set_id = int(flowset.find("field[@name='cflow.flowset_id']").get("show"))
            if set_id == 2:
                current = None
                for item in flowset.iter("field"):
                    if item.get("name") == "cflow.template_id":
                        current = int(item.get("show"))
                    elif item.get("name") == "cflow.template_field_count":
                        templates_seen[current] = int(item.get("show"))
                continue
            for flow in flowset:
                if not (flow.get("show") or "").startswith("Flow "):
                    continue
                entries = flow_entries(flow)
                octets = next(
                    e
                    for e in entries
                    if e.get("name") == "cflow.octets" and "Reverse" not in e.get("showname")
                )
                counter = int(octets.get("show"))
                assert counter not in decoded, f"record {counter} decoded twice by tshark"
                decoded[counter] = (set_id, entries)
                in_message += 1
        if in_message:
            data_sequences.append((int(header["cflow.sequence"]), in_message))

    assert templates_seen == {V4: 37, V6: 37}
    assert sorted(decoded) == sorted(records)
    for counter, (set_id, entries) in decoded.items():
        assert set_id == template_id_of(records[counter])
        check_record(set_id, records[counter], entries)
    # The sequence number of each message counts the data records sent before it.
    total = 0
    for sequence, count in data_sequences:
        assert sequence == total
        total += count
    assert total == len(records)
