"""Decoded records as JSON objects and one-line text."""

from __future__ import annotations

import json

import pytest

from antrea_flow.ipfix.collecting import Peer
from antrea_flow.ipfix.elements import REGISTRY, VARIABLE_LENGTH
from antrea_flow.ipfix.messages import (
    DataSet,
    Message,
    SessionDecoder,
    encode_message,
    encode_set,
    template_messages,
)
from antrea_flow.ipfix.render import exporter_key, json_line, json_value, message_records, text_line
from antrea_flow.ipfix.templates import Field, Template

T1 = Template(
    256,
    [
        Field(REGISTRY.by_name("sourceIPv4Address"), 4),
        Field(REGISTRY.by_name("octetDeltaCount"), 8),
        Field(REGISTRY.by_name("sourcePodName"), VARIABLE_LENGTH),
    ],
)
T2 = Template(
    400,
    [
        Field(REGISTRY.by_name("applicationId"), VARIABLE_LENGTH),
        Field(REGISTRY.by_name("protocolIdentifier"), 1),
    ],
)


def _message(domain: int = 77) -> Message:
    """A real decoded message: two data sets, three records."""
    decoder = SessionDecoder()
    for m in template_messages([T1, T2], 0, 0, domain):
        decoder.decode(m)
    sets = [
        encode_set(256, [T1.encode(["10.0.0.1", 10, "a"]), T1.encode(["10.0.0.2", 20, "b"])]),
        encode_set(400, [T2.encode([b"\x00\xff", 6])]),
    ]
    return decoder.decode(encode_message(sets, 1700000000, 0, domain))


def _peer(address: str) -> Peer:
    return Peer(address, 40000, "tcp", 1)


def test_message_records_add_exporter_domain_and_template():
    rows = message_records(_peer("192.168.1.5"), _message())
    assert rows == [
        {
            "exporterIPv4Address": "192.168.1.5",
            "observationDomainId": 77,
            "templateId": 256,
            "sourceIPv4Address": "10.0.0.1",
            "octetDeltaCount": 10,
            "sourcePodName": "a",
        },
        {
            "exporterIPv4Address": "192.168.1.5",
            "observationDomainId": 77,
            "templateId": 256,
            "sourceIPv4Address": "10.0.0.2",
            "octetDeltaCount": 20,
            "sourcePodName": "b",
        },
        {
            "exporterIPv4Address": "192.168.1.5",
            "observationDomainId": 77,
            "templateId": 400,
            "applicationId": b"\x00\xff",
            "protocolIdentifier": 6,
        },
    ]


def test_message_records_ipv6_exporter():
    rows = message_records(_peer("fd00:10:244::5"), _message())
    assert {row["exporterIPv6Address"] for row in rows} == {"fd00:10:244::5"}
    assert all("exporterIPv4Address" not in row for row in rows)


def test_message_records_ipv6_with_zone():
    rows = message_records(_peer("fe80::1%eth0"), _message())
    assert "exporterIPv6Address" in rows[0]


@pytest.mark.parametrize("address", ["::ffff:192.168.1.5", "::FFFF:192.168.1.5", "::ffff:c0a8:105"])
def test_ipv4_mapped_exporter_is_reported_as_ipv4(address):
    rows = message_records(_peer(address), _message())
    assert rows[0]["exporterIPv4Address"] == "192.168.1.5"
    assert "exporterIPv6Address" not in rows[0]


@pytest.mark.parametrize("address", ["::ffff:abcd", "::ffff:1"])
def test_ipv6_starting_like_a_mapped_address_stays_ipv6(address):
    # ::ffff:abcd (= ::255.255.171.205) and ::ffff:1 are IPv6 addresses but not IPv4-mapped
    # ones (::ffff:0:0/96); stripping the "::ffff:" text would leave "abcd" or "1".
    rows = message_records(_peer(address), _message())
    assert rows[0]["exporterIPv6Address"] == address


def test_record_fields_take_precedence_over_added_ones():
    t = Template(
        300,
        [
            Field(REGISTRY.by_name("observationDomainId"), 4),
            Field(REGISTRY.by_name("exporterIPv4Address"), 4),
        ],
    )
    message = Message(
        0,
        0,
        5,
        data_sets=[DataSet(t, [{"observationDomainId": 9, "exporterIPv4Address": "1.1.1.1"}])],
    )
    (row,) = message_records(_peer("2.2.2.2"), message)
    assert row["observationDomainId"] == 9
    assert row["exporterIPv4Address"] == "1.1.1.1"
    assert row["templateId"] == 300


def test_message_records_does_not_alias_records():
    message = _message()
    rows = message_records(_peer("10.0.0.9"), message)
    rows[0]["octetDeltaCount"] = -1
    assert message.data_sets[0].records[0]["octetDeltaCount"] == 10
    assert rows[1]["octetDeltaCount"] == 20


def test_message_without_data_sets_has_no_rows():
    assert message_records(_peer("10.0.0.9"), Message(0, 0, 1)) == []


@pytest.mark.parametrize(
    "address,key",
    [
        ("10.0.0.1", "exporterIPv4Address"),
        ("fd00::1", "exporterIPv6Address"),
        ("fe80::1%2", "exporterIPv6Address"),
    ],
)
def test_exporter_key(address, key):
    assert exporter_key(address) == key


def test_json_value():
    assert json_value(b"\x00\xab") == "00ab"
    assert json_value(bytearray(b"\x01")) == "01"
    assert json_value(memoryview(b"\x02\x03")) == "0203"
    assert json_value("x") == "x"
    assert json_value(5) == 5


def test_json_line_is_valid_json_with_hex_bytes():
    rows = message_records(_peer("10.0.0.9"), _message())
    for row in rows:
        line = json_line(row)
        assert "\n" not in line
        parsed = json.loads(line)
        assert list(parsed) == list(row)
        for key, value in row.items():
            assert parsed[key] == (value.hex() if isinstance(value, bytes) else value)
    assert json.loads(json_line(rows[2]))["applicationId"] == "00ff"


def test_json_line_keeps_unicode_and_special_characters():
    record = {"sourcePodName": 'pöd "x"\n\u2028', "n": 1.5, "ok": True, "raw": b""}
    assert json.loads(json_line(record)) == {
        "sourcePodName": 'pöd "x"\n\u2028',
        "n": 1.5,
        "ok": True,
        "raw": "",
    }


def test_text_line():
    line = text_line({"a": 1, "b": "x", "c": b"\x0f"})
    assert line == "a=1 b=x c=0f"


@pytest.mark.parametrize("value", ["two\nlines", "carriage\rreturn", "crlf\r\n", "\n"])
def test_text_line_is_one_line_whatever_the_strings(value):
    # Strings come from the wire (any exporter may send them); one record must stay one
    # line of a log, or a crafted pod label could forge log lines.
    line = text_line({"sourcePodLabels": value, "octetDeltaCount": 3})
    assert "\n" not in line
    assert "\r" not in line
    assert line.startswith("sourcePodLabels=")
    assert line.endswith(" octetDeltaCount=3")
