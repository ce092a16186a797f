"""IPFIX messages: encoding, packing, stream framing and per-session decoding."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from antrea_flow.ipfix.antrea import exporter_templates
from antrea_flow.ipfix.elements import (
    ANTREA_PEN,
    REGISTRY,
    REVERSE_PEN,
    VARIABLE_LENGTH,
)
from antrea_flow.ipfix.messages import (
    DEFAULT_UDP_MESSAGE_SIZE,
    MAX_MESSAGE_SIZE,
    MessageError,
    MessagePacker,
    SessionDecoder,
    StreamFramer,
    encode_message,
    encode_set,
    encode_template_record,
    template_messages,
    withdrawal_message,
)
from antrea_flow.ipfix.templates import Field, Template

HEADER = struct.Struct(">HHIII")
EXPORT_TIME = 1_700_000_000


# -- helpers: bytes built by hand, independent of the encoder under test --------------------------


def raw_message(body: bytes, *, seq: int = 0, domain: int = 1, version: int = 10) -> bytes:
    return HEADER.pack(version, 16 + len(body), EXPORT_TIME, seq, domain) + body


def raw_set(set_id: int, body: bytes) -> bytes:
    return struct.pack(">HH", set_id, 4 + len(body)) + body


def raw_template(tid: int, fields: list[tuple[int, int, int]]) -> bytes:
    """A template record; fields are (element id, length, enterprise)."""
    out = struct.pack(">HH", tid, len(fields))
    for element_id, length, pen in fields:
        if pen:
            out += struct.pack(">HHI", element_id | 0x8000, length, pen)
        else:
            out += struct.pack(">HH", element_id, length)
    return out


def raw_options_template(tid: int, scope: int, fields: list[tuple[int, int, int]]) -> bytes:
    plain = raw_template(tid, fields)
    return plain[:4] + struct.pack(">H", scope) + plain[4:]


def u32_template(tid: int) -> Template:
    """Template `tid`: octetDeltaCount as 4 bytes (a record is 4 bytes)."""
    return Template(tid, [Field(REGISTRY.by_name("octetDeltaCount"), 4)])


def u32_records(tid: int, values: list[int]) -> bytes:
    return raw_set(tid, b"".join(struct.pack(">I", v) for v in values))


def announce(
    decoder: SessionDecoder,
    *templates: Template,
    domain: int = 1,
    now: float = 0.0,
    seq: int = 0,
):
    for msg in template_messages(list(templates), EXPORT_TIME, seq, domain):
        decoder.decode(msg, now)


def header_fields(message: bytes) -> tuple[int, int, int, int, int]:
    return HEADER.unpack_from(message, 0)


def iter_sets(message: bytes):
    offset = 16
    while offset < len(message):
        set_id, length = struct.unpack_from(">HH", message, offset)
        yield set_id, message[offset + 4 : offset + length]
        offset += length
    assert offset == len(message)


AGENT_RECORD = {
    "flowStartSeconds": 1637706961,
    "flowEndSeconds": 1637706973,
    "sourceIPv4Address": "10.10.0.79",
    "destinationIPv4Address": "10.10.1.25",
    "sourceTransportPort": 44752,
    "destinationTransportPort": 80,
    "protocolIdentifier": 6,
    "sourcePodName": "frontend-7d9f8c6b5-x2kqz",
    "sourcePodNamespace": "default",
    "destinationServicePortName": "backend/web:http",
    "destinationClusterIPv4": "10.103.234.179",
    "tcpState": "ESTABLISHED",
}


# -- headers and sets -----------------------------------------------------------------------------


def test_encode_message_header():
    sets = [encode_set(300, [b"\x00\x00\x00\x01"]), encode_set(301, [b"\x02\x02"])]
    message = encode_message(sets, 1637706973, 12345, 0xCAFE)
    assert header_fields(message) == (10, len(message), 1637706973, 12345, 0xCAFE)
    assert len(message) == 16 + 8 + 6
    assert message[16:] == b"\x01\x2c\x00\x08\x00\x00\x00\x01\x01\x2d\x00\x06\x02\x02"


def test_encode_message_sequence_is_modulo_2_32():
    message = encode_message([], 0, 2**32 + 5, 1)
    assert header_fields(message)[3] == 5


def test_encode_message_refuses_oversize():
    fits = encode_set(300, [bytes(MAX_MESSAGE_SIZE - 20)])
    assert len(encode_message([fits], 0, 0, 1)) == MAX_MESSAGE_SIZE
    big = encode_set(300, [bytes(MAX_MESSAGE_SIZE - 19)])
    with pytest.raises(ValueError):
        encode_message([big], 0, 0, 1)


def test_encode_set_header():
    assert encode_set(256, [b"ab", b"cd"]) == b"\x01\x00\x00\x08abcd"


def test_default_udp_message_size():
    assert DEFAULT_UDP_MESSAGE_SIZE == 1452
    assert MAX_MESSAGE_SIZE == 65535


# -- MessagePacker --------------------------------------------------------------------------------


def _agent_records(count: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    template = exporter_templates()[0]
    out = []
    for i in range(count):
        record = dict(AGENT_RECORD)
        record["sourcePodName"] = "pod-" + "x" * rng.randrange(0, 300)
        record["octetDeltaCount"] = i
        out.append(template.encode_mapping(record))
    return out


@pytest.mark.parametrize("max_size", [1452, 65535])
def test_packer_fills_messages_up_to_the_limit(max_size):
    template = exporter_templates()[0]
    records = _agent_records(800)
    packer = MessagePacker(observation_domain_id=42, max_message_size=max_size)
    decoder = SessionDecoder()
    announce(decoder, template, domain=42)
    pending = records
    sent = 0
    decoded = []
    messages = 0
    while pending:
        message, count = packer.pack(256, pending, EXPORT_TIME)
        messages += 1
        version, length, export_time, seq, domain = header_fields(message)
        assert (version, length, export_time, domain) == (10, len(message), EXPORT_TIME, 42)
        assert seq == sent  # records sent before this message
        assert len(message) <= max_size
        assert count >= 1
        assert len(message) == 20 + sum(len(r) for r in pending[:count])
        if count < len(pending):
            # As many as fit: one more record would not have fitted.
            assert len(message) + len(pending[count]) > max_size
        sets = list(iter_sets(message))
        assert [s[0] for s in sets] == [256]
        result = decoder.decode(message)
        decoded += result.data_sets[0].records
        sent += count
        pending = pending[count:]
    assert sent == len(records)
    assert packer.sequence_number == len(records)
    assert [r["octetDeltaCount"] for r in decoded] == list(range(len(records)))
    assert decoder.lost_records == 0
    assert messages > 1


def test_packer_exact_fit():
    records = [bytes([i]) * 10 for i in range(7)]
    packer = MessagePacker(1, max_message_size=20 + 3 * 10)
    assert packer.max_record_size == 30
    message, count = packer.pack(300, records, 0)
    assert count == 3
    assert len(message) == 50
    assert message[20:] == b"".join(records[:3])
    message, count = packer.pack(300, records[3:], 0)
    assert count == 3
    assert header_fields(message)[3] == 3
    message, count = packer.pack(300, records[6:], 0)
    assert count == 1
    assert header_fields(message)[3] == 6
    assert header_fields(message)[1] == len(message) == 30


def test_packer_sequence_wraps_modulo_2_32():
    packer = MessagePacker(1)
    packer.sequence_number = 2**32 - 2
    message, count = packer.pack(300, [b"\x00\x00\x00\x01"] * 5, 0)
    assert count == 5
    assert header_fields(message)[3] == 2**32 - 2
    assert packer.sequence_number == 3
    message, _ = packer.pack(300, [b"\x00\x00\x00\x01"], 0)
    assert header_fields(message)[3] == 3


def test_packer_refuses_a_record_larger_than_a_message():
    packer = MessagePacker(1, max_message_size=1452)
    with pytest.raises(ValueError):
        packer.pack(300, [bytes(1433)], 0)
    assert packer.sequence_number == 0
    message, count = packer.pack(300, [bytes(1432)], 0)
    assert (len(message), count) == (1452, 1)


@pytest.mark.parametrize("size", [0, 20, 65536, 100000])
def test_packer_max_size_out_of_range(size):
    with pytest.raises(ValueError):
        MessagePacker(1, max_message_size=size)


# -- template messages ----------------------------------------------------------------------------


def _many_templates(count: int) -> list[Template]:
    base = exporter_templates()[0]
    return [Template(300 + i, base.fields) for i in range(count)]


@pytest.mark.parametrize("max_size", [1452, 65535])
def test_template_messages_split_and_decode(max_size):
    templates = _many_templates(60)
    messages = template_messages(templates, EXPORT_TIME, 77, 9, max_message_size=max_size)
    if max_size == 1452:
        assert len(messages) > 1
    else:
        assert len(messages) == 1
    decoder = SessionDecoder()
    seen = []
    for message in messages:
        version, length, export_time, seq, domain = header_fields(message)
        assert (version, length, export_time, seq, domain) == (10, len(message), EXPORT_TIME, 77, 9)
        assert len(message) <= max_size
        assert {set_id for set_id, _ in iter_sets(message)} == {2}
        seen += decoder.decode(message).templates
    assert seen == templates
    assert decoder.templates(9) == {t.template_id: t for t in templates}


def test_template_messages_exact_fit():
    templates = [u32_template(300 + i) for i in range(7)]
    size = len(encode_template_record(templates[0]))
    assert size == 8
    messages = template_messages(templates, 0, 0, 1, max_message_size=16 + 4 + 3 * size)
    assert [len(m) for m in messages] == [44, 44, 28]
    decoder = SessionDecoder()
    counts = [len(decoder.decode(m).templates) for m in messages]
    assert counts == [3, 3, 1]


def test_template_messages_refuse_a_template_larger_than_a_message():
    with pytest.raises(ValueError):
        template_messages(_many_templates(1), 0, 0, 1, max_message_size=100)


def test_template_record_encodes_enterprise_bit_and_pen():
    template = Template(
        258,
        [
            Field(REGISTRY.by_name("octetDeltaCount"), 8),
            Field(REGISTRY.by_name("reverseOctetDeltaCount"), 8),
            Field(REGISTRY.by_name("sourcePodName"), VARIABLE_LENGTH),
            Field(REGISTRY.by_name("sourceTransportPort"), 2),
        ],
    )
    expected = (
        struct.pack(">HH", 258, 4)
        + struct.pack(">HH", 1, 8)
        + struct.pack(">HHI", 0x8000 | 1, 8, REVERSE_PEN)
        + struct.pack(">HHI", 0x8000 | 101, 0xFFFF, ANTREA_PEN)
        + struct.pack(">HH", 7, 2)
    )
    assert encode_template_record(template) == expected
    (message,) = template_messages([template], 0, 0, 1)
    assert message[16:] == raw_set(2, expected)


def test_options_template_record_and_set_id():
    template = Template(
        400,
        [
            Field(REGISTRY.by_name("observationDomainId"), 4),
            Field(REGISTRY.by_name("exportedMessageTotalCount"), 8),
            Field(REGISTRY.by_name("exportedFlowRecordTotalCount"), 8),
        ],
        scope_field_count=1,
    )
    record = encode_template_record(template)
    assert record == struct.pack(">HHHHHHHHH", 400, 3, 1, 149, 4, 41, 8, 42, 8)
    (message,) = template_messages([template, u32_template(300)], 0, 0, 1)
    assert sorted(set_id for set_id, _ in iter_sets(message)) == [2, 3]


def test_withdrawal_message_bytes():
    message = withdrawal_message([300, 301], EXPORT_TIME, 5, 7)
    assert header_fields(message) == (10, 28, EXPORT_TIME, 5, 7)
    assert message[16:] == raw_set(2, struct.pack(">HHHH", 300, 0, 301, 0))


# -- SessionDecoder: templates and data -----------------------------------------------------------


def test_decode_data_after_templates():
    template = exporter_templates()[0]
    decoder = SessionDecoder()
    announce(decoder, template, domain=5)
    assert decoder.templates(5) == {256: template}
    record = template.encode_mapping(AGENT_RECORD)
    message = decoder.decode(raw_message(raw_set(256, record * 3), seq=0, domain=5))
    assert message.observation_domain_id == 5
    assert message.export_time == EXPORT_TIME
    assert message.sequence_number == 0
    assert message.record_count == 3
    (data_set,) = message.data_sets
    assert data_set.template == template
    for decoded in data_set.records:
        for key, value in AGENT_RECORD.items():
            assert decoded[key] == value


def test_decode_template_and_data_in_one_message():
    body = raw_set(2, raw_template(300, [(1, 4, 0)])) + u32_records(300, [7, 8])
    message = SessionDecoder().decode(raw_message(body))
    assert [t.template_id for t in message.templates] == [300]
    assert message.data_sets[0].records == [{"octetDeltaCount": 7}, {"octetDeltaCount": 8}]


def test_decode_unknown_elements_as_octet_arrays():
    body = raw_set(2, raw_template(300, [(32000, 2, 0), (9, 3, 12345)]))
    body += raw_set(300, b"\x01\x02abc")
    message = SessionDecoder().decode(raw_message(body))
    assert message.data_sets[0].records == [{"ie32000": b"\x01\x02", "ie12345_9": b"abc"}]


def test_templates_are_kept_per_observation_domain():
    decoder = SessionDecoder()
    a = Template(256, [Field(REGISTRY.by_name("sourceTransportPort"), 2)])
    b = Template(
        256,
        [
            Field(REGISTRY.by_name("protocolIdentifier"), 1),
            Field(REGISTRY.by_name("sourcePodName"), VARIABLE_LENGTH),
        ],
    )
    announce(decoder, a, domain=1)
    announce(decoder, b, domain=2)
    assert decoder.templates(1) == {256: a}
    assert decoder.templates(2) == {256: b}
    assert decoder.templates(3) == {}
    assert decoder.template_count() == 2
    one = decoder.decode(raw_message(raw_set(256, b"\x12\x34"), domain=1))
    two = decoder.decode(raw_message(raw_set(256, b"\x06\x03abc"), domain=2))
    assert one.data_sets[0].records == [{"sourceTransportPort": 0x1234}]
    assert two.data_sets[0].records == [{"protocolIdentifier": 6, "sourcePodName": "abc"}]
    with pytest.raises(MessageError) as err:
        decoder.decode(raw_message(raw_set(256, b"\x12\x34"), domain=3))
    assert err.value.reason == "unknown_template"


def test_template_redefinition_replaces_layout():
    decoder = SessionDecoder()
    announce(decoder, u32_template(300))
    announce(decoder, Template(300, [Field(REGISTRY.by_name("protocolIdentifier"), 1)]))
    message = decoder.decode(raw_message(raw_set(300, b"\x11")))
    assert message.data_sets[0].records == [{"protocolIdentifier": 17}]


def test_withdraw_one_template():
    decoder = SessionDecoder()
    announce(decoder, u32_template(300), u32_template(301))
    message = decoder.decode(withdrawal_message([300], 0, 0, 1))
    assert message.withdrawn == [300]
    assert set(decoder.templates(1)) == {301}
    with pytest.raises(MessageError) as err:
        decoder.decode(raw_message(u32_records(300, [1])))
    assert err.value.reason == "unknown_template"
    ok = decoder.decode(raw_message(u32_records(301, [1])))
    assert ok.record_count == 1


def test_withdraw_only_affects_its_domain():
    decoder = SessionDecoder()
    announce(decoder, u32_template(300), domain=1)
    announce(decoder, u32_template(300), domain=2)
    decoder.decode(withdrawal_message([300], 0, 0, 1))
    assert decoder.templates(1) == {}
    assert set(decoder.templates(2)) == {300}


def test_withdraw_all_templates():
    decoder = SessionDecoder()
    options = Template(
        400,
        [
            Field(REGISTRY.by_name("observationDomainId"), 4),
            Field(REGISTRY.by_name("octetDeltaCount"), 8),
        ],
        1,
    )
    announce(decoder, u32_template(300), u32_template(301), options)
    message = decoder.decode(raw_message(raw_set(2, struct.pack(">HH", 2, 0))))
    assert message.withdrawn == [2]
    # Template id 2 withdraws the data templates; options templates go with set 3 id 3.
    assert set(decoder.templates(1)) == {400}
    decoder.decode(raw_message(raw_set(3, struct.pack(">HH", 3, 0))))
    assert decoder.templates(1) == {}


def test_withdraw_all_after_a_template_in_the_same_message():
    decoder = SessionDecoder()
    announce(decoder, u32_template(300))
    body = raw_set(2, raw_template(301, [(1, 4, 0)])) + raw_set(2, struct.pack(">HH", 2, 0))
    message = decoder.decode(raw_message(body))
    assert [t.template_id for t in message.templates] == [301]
    assert decoder.templates(1) == {}
    # Within one template set too.
    announce(decoder, u32_template(300))
    body = raw_set(2, raw_template(301, [(1, 4, 0)]) + struct.pack(">HH", 2, 0))
    decoder.decode(raw_message(body))
    assert decoder.templates(1) == {}


def test_template_after_withdraw_all_in_the_same_message_survives():
    decoder = SessionDecoder()
    announce(decoder, u32_template(300), u32_template(302))
    body = raw_set(2, struct.pack(">HH", 2, 0) + raw_template(301, [(1, 4, 0)]))
    body += u32_records(301, [5])
    message = decoder.decode(raw_message(body))
    assert set(decoder.templates(1)) == {301}
    assert message.data_sets[0].records == [{"octetDeltaCount": 5}]


def test_data_for_template_withdrawn_earlier_in_the_same_message_is_refused():
    decoder = SessionDecoder()
    announce(decoder, u32_template(300))
    body = raw_set(2, struct.pack(">HH", 300, 0)) + u32_records(300, [1])
    with pytest.raises(MessageError) as err:
        decoder.decode(raw_message(body))
    assert err.value.reason == "unknown_template"
    assert set(decoder.templates(1)) == {300}


def test_options_template_and_data():
    body = raw_set(3, raw_options_template(400, 1, [(149, 4, 0), (41, 8, 0), (42, 4, 0)]))
    body += raw_set(400, struct.pack(">IQI", 7, 1000, 55) + struct.pack(">IQI", 8, 2000, 66))
    decoder = SessionDecoder()
    message = decoder.decode(raw_message(body))
    (template,) = message.templates
    assert template.is_options
    assert template.scope_field_count == 1
    assert template.keys == (
        "observationDomainId",
        "exportedMessageTotalCount",
        "exportedFlowRecordTotalCount",
    )
    assert message.data_sets[0].records == [
        {
            "observationDomainId": 7,
            "exportedMessageTotalCount": 1000,
            "exportedFlowRecordTotalCount": 55,
        },
        {
            "observationDomainId": 8,
            "exportedMessageTotalCount": 2000,
            "exportedFlowRecordTotalCount": 66,
        },
    ]
    assert decoder.templates(1)[400] == template


def test_options_template_round_trip_through_template_messages():
    options = Template(
        400,
        [
            Field(REGISTRY.by_name("observationDomainId"), 4),
            Field(REGISTRY.by_name("samplerName"), VARIABLE_LENGTH),
        ],
        scope_field_count=1,
    )
    decoder = SessionDecoder()
    announce(decoder, options)
    assert decoder.templates(1)[400] == options
    message = decoder.decode(raw_message(raw_set(400, options.encode([3, "s1"]))))
    assert message.data_sets[0].records == [{"observationDomainId": 3, "samplerName": "s1"}]


# -- padding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [1, 2, 3])
def test_data_set_padding_is_accepted(padding):
    decoder = SessionDecoder()
    announce(decoder, u32_template(300))
    body = raw_set(300, struct.pack(">II", 1, 2) + bytes(padding)) + u32_records(300, [3])
    message = decoder.decode(raw_message(body))
    assert [ds.records for ds in message.data_sets] == [
        [{"octetDeltaCount": 1}, {"octetDeltaCount": 2}],
        [{"octetDeltaCount": 3}],
    ]
    assert decoder.lost_records == 0


def test_data_set_padding_with_variable_length_template():
    decoder = SessionDecoder()
    template = Template(
        300,
        [
            Field(REGISTRY.by_name("octetDeltaCount"), 4),
            Field(REGISTRY.by_name("tcpState"), VARIABLE_LENGTH),
        ],
    )
    announce(decoder, template)
    body = raw_set(300, template.encode([1, "ESTABLISHED"]) + bytes(4))
    message = decoder.decode(raw_message(body))
    assert message.data_sets[0].records == [{"octetDeltaCount": 1, "tcpState": "ESTABLISHED"}]


def test_non_zero_bytes_shorter_than_a_record_are_a_truncated_record():
    # RFC 7011 3.3.1: padding octets MUST be zero. Non-zero leftovers are the start of a
    # record cut short, which must not vanish silently.
    decoder = SessionDecoder()
    announce(decoder, Template(300, [Field(REGISTRY.by_name("octetDeltaCount"), 8)]))
    body = raw_set(300, struct.pack(">Q", 1) + b"\x00\x00\x01\x02")
    with pytest.raises(MessageError) as err:
        decoder.decode(raw_message(body))
    assert err.value.reason == "truncated_record"


@pytest.mark.parametrize("padding", [1, 2, 3, 4, 7])
def test_template_set_padding_is_accepted(padding):
    body = raw_set(2, raw_template(300, [(1, 4, 0)]) + bytes(padding))
    body += raw_set(3, raw_options_template(400, 1, [(149, 4, 0)]) + bytes(padding))
    body += u32_records(300, [9])
    decoder = SessionDecoder()
    message = decoder.decode(raw_message(body))
    assert [t.template_id for t in message.templates] == [300, 400]
    assert message.withdrawn == []
    assert set(decoder.templates(1)) == {300, 400}
    assert message.data_sets[0].records == [{"octetDeltaCount": 9}]


def test_empty_message_and_empty_set():
    decoder = SessionDecoder()
    message = decoder.decode(raw_message(b""))
    assert message.record_count == 0
    announce(decoder, u32_template(300))
    message = decoder.decode(raw_message(raw_set(300, b"")))
    assert message.record_count == 0


# -- UDP template expiry --------------------------------------------------------------------------


def test_udp_templates_expire():
    decoder = SessionDecoder(template_timeout=10.0)
    announce(decoder, u32_template(300), u32_template(301), now=100.0)
    assert decoder.expire_templates(109.9) == 0
    assert decoder.decode(raw_message(u32_records(300, [1])), now=109.9).record_count == 1
    assert decoder.expire_templates(110.1) == 2
    assert decoder.templates(1) == {}
    with pytest.raises(MessageError) as err:
        decoder.decode(raw_message(u32_records(300, [1])), now=110.2)
    assert err.value.reason == "unknown_template"


def test_template_refresh_pushes_expiry_forward():
    decoder = SessionDecoder(template_timeout=10.0)
    announce(decoder, u32_template(300), u32_template(301), now=100.0)
    announce(decoder, u32_template(300), now=105.0)
    assert decoder.expire_templates(110.5) == 1
    assert set(decoder.templates(1)) == {300}
    assert decoder.expire_templates(114.9) == 0
    assert decoder.expire_templates(115.1) == 1
    assert decoder.templates(1) == {}


def test_data_does_not_refresh_templates():
    decoder = SessionDecoder(template_timeout=10.0)
    announce(decoder, u32_template(300), now=0.0)
    decoder.decode(raw_message(u32_records(300, [1])), now=9.0)
    assert decoder.expire_templates(10.5) == 1


def test_expiry_is_per_domain():
    decoder = SessionDecoder(template_timeout=10.0)
    announce(decoder, u32_template(300), domain=1, now=0.0)
    announce(decoder, u32_template(300), domain=2, now=5.0)
    assert decoder.expire_templates(12.0) == 1
    assert decoder.templates(1) == {}
    assert set(decoder.templates(2)) == {300}


def test_withdrawn_template_does_not_expire_later():
    decoder = SessionDecoder(template_timeout=10.0)
    announce(decoder, u32_template(300), now=0.0)
    decoder.decode(withdrawal_message([300], 0, 0, 1), now=1.0)
    assert decoder.expire_templates(100.0) == 0


def test_tcp_templates_never_expire():
    decoder = SessionDecoder()
    announce(decoder, u32_template(300), now=0.0)
    assert decoder.expire_templates(1e12) == 0
    assert set(decoder.templates(1)) == {300}


# -- sequence numbers -----------------------------------------------------------------------------


def _data(seq: int, count: int, domain: int = 1) -> bytes:
    return raw_message(u32_records(300, list(range(count))), seq=seq, domain=domain)


def test_no_loss_when_sequence_numbers_follow():
    decoder = SessionDecoder()
    announce(decoder, u32_template(300))
    seq = 0
    for count in (3, 1, 10, 2):
        decoder.decode(_data(seq, count))
        seq += count
    assert decoder.lost_records == 0


@pytest.mark.parametrize("gap", [1, 5, 1000])
def test_sequence_gap_counts_missing_records(gap):
    decoder = SessionDecoder()
    announce(decoder, u32_template(300))
    decoder.decode(_data(0, 3))
    decoder.decode(_data(3 + gap, 2))
    assert decoder.lost_records == gap
    decoder.decode(_data(3 + gap + 2, 1))
    assert decoder.lost_records == gap


def test_sequence_wrap_is_not_a_loss():
    decoder = SessionDecoder()
    announce(decoder, u32_template(300), seq=2**32 - 2)
    decoder.decode(_data(2**32 - 2, 5))
    decoder.decode(_data(3, 1))
    assert decoder.lost_records == 0
    decoder.decode(_data(4 + 6, 1))
    assert decoder.lost_records == 6


def test_gap_across_the_wrap():
    decoder = SessionDecoder()
    announce(decoder, u32_template(300), seq=2**32 - 3)
    decoder.decode(_data(2**32 - 3, 1))  # next expected 2**32 - 2
    decoder.decode(_data(4, 1))  # 2**32-2, 2**32-1, 0, 1, 2, 3 missing
    assert decoder.lost_records == 6


def test_template_only_messages_do_not_advance_the_sequence():
    decoder = SessionDecoder()
    announce(decoder, u32_template(300))
    decoder.decode(_data(0, 4))
    for message in template_messages([u32_template(301)], EXPORT_TIME, 4, 1):
        decoder.decode(message)
    decoder.decode(_data(4, 1))
    assert decoder.lost_records == 0


def test_late_duplicate_is_not_counted_as_loss():
    decoder = SessionDecoder()
    announce(decoder, u32_template(300))
    decoder.decode(_data(0, 5))
    decoder.decode(_data(5, 5))
    decoder.decode(_data(0, 5))  # a late copy (UDP): behind the expectation
    assert decoder.lost_records == 0
    decoder.decode(_data(10, 5))  # exactly the record after the newest seen: nothing lost
    assert decoder.lost_records == 0


def test_reordered_messages_are_not_counted_twice():
    # UDP delivers A, C, B, D. When C arrives B looks lost (5 records); B's late arrival
    # must not move the expectation backwards and make D look like a second gap.
    decoder = SessionDecoder()
    announce(decoder, u32_template(300))
    decoder.decode(_data(0, 5))  # A
    decoder.decode(_data(10, 5))  # C
    assert decoder.lost_records == 5
    decoder.decode(_data(5, 5))  # B, late
    decoder.decode(_data(15, 5))  # D
    assert decoder.lost_records <= 5


def test_sequence_is_tracked_per_domain():
    decoder = SessionDecoder()
    announce(decoder, u32_template(300), domain=1)
    announce(decoder, u32_template(300), domain=2)
    decoder.decode(_data(0, 3, domain=1))
    decoder.decode(_data(0, 7, domain=2))
    decoder.decode(_data(3, 1, domain=1))
    decoder.decode(_data(7, 1, domain=2))
    assert decoder.lost_records == 0
    decoder.decode(_data(10, 1, domain=1))  # expected 4
    assert decoder.lost_records == 6


# -- malformed input ------------------------------------------------------------------------------

TLS_CLIENT_HELLO = bytes.fromhex("16030100c8010000c40303") + bytes(32)


def _decoder_with_state() -> SessionDecoder:
    decoder = SessionDecoder(template_timeout=100.0)
    announce(decoder, u32_template(300), now=0.0)
    decoder.decode(_data(0, 2))
    return decoder


def _assert_state_unchanged(decoder: SessionDecoder) -> None:
    assert decoder.templates(1) == {300: u32_template(300)}
    assert decoder.template_count() == 1
    assert decoder.lost_records == 0
    # The sequence expectation is untouched: the next good message shows no loss.
    assert decoder.decode(_data(2, 1)).data_sets[0].records == [{"octetDeltaCount": 0}]
    assert decoder.lost_records == 0
    # The expiry is untouched too.
    assert decoder.expire_templates(99.0) == 0
    assert decoder.expire_templates(100.0) == 1


def _bad_template_set(body: bytes) -> bytes:
    return raw_message(raw_set(2, body))


MALFORMED = {
    "netflow_v9": (HEADER.pack(9, 16, 0, 0, 0), "bad_version"),
    "version_0": (bytes(20), "bad_version"),
    "tls_client_hello": (TLS_CLIENT_HELLO, "bad_version"),
    "length_shorter_than_data": (
        raw_message(u32_records(300, [1]))[:-4] + b"\x00" * 4 + b"\x01",
        "bad_length",
    ),
    "length_longer_than_data": (raw_message(u32_records(300, [1, 2]))[:-4], "bad_length"),
    "length_below_header": (struct.pack(">HHIII", 10, 8, 0, 0, 1), "bad_length"),
    "set_overruns_message": (
        raw_message(struct.pack(">HH", 300, 12) + struct.pack(">I", 1)),
        "bad_set_length",
    ),
    "set_length_3": (raw_message(struct.pack(">HH", 300, 3) + bytes(4)), "bad_set_length"),
    "set_length_0": (raw_message(struct.pack(">HH", 300, 0) + bytes(4)), "bad_set_length"),
    "stray_bytes_after_sets": (raw_message(u32_records(300, [1]) + b"\x01\x2c"), "truncated"),
    "truncated_header": (HEADER.pack(10, 16, 0, 0, 1)[:15], "truncated"),
    "empty": (b"", "truncated"),
    "unknown_template": (raw_message(u32_records(999, [1])), "unknown_template"),
    "set_id_1": (raw_message(raw_set(1, bytes(4))), "bad_set_id"),
    "set_id_0": (raw_message(raw_set(0, bytes(4))), "bad_set_id"),
    "set_id_255": (raw_message(raw_set(255, bytes(4))), "bad_set_id"),
    "template_id_below_256": (_bad_template_set(raw_template(100, [(1, 4, 0)])), "bad_template"),
    "template_ipv4_3_bytes": (_bad_template_set(raw_template(301, [(8, 3, 0)])), "bad_template"),
    "template_variable_unsigned": (
        _bad_template_set(raw_template(301, [(1, 0xFFFF, 0)])),
        "bad_template",
    ),
    "template_zero_length_field": (
        _bad_template_set(raw_template(301, [(1, 0, 0)])),
        "bad_template",
    ),
    "withdraw_reserved_id": (_bad_template_set(struct.pack(">HHI", 5, 0, 1)), "bad_template"),
    "options_template_without_scope": (
        raw_message(raw_set(3, raw_options_template(401, 0, [(149, 4, 0)]))),
        "bad_template",
    ),
    "options_scope_above_field_count": (
        raw_message(raw_set(3, raw_options_template(401, 2, [(149, 4, 0)]))),
        "bad_template",
    ),
    "template_field_list_cut": (
        _bad_template_set(raw_template(301, [(1, 4, 0), (2, 8, 0)])[:-2]),
        "truncated",
    ),
    "template_pen_cut": (
        _bad_template_set(raw_template(301, [(101, 0xFFFF, ANTREA_PEN)])[:-2]),
        "truncated",
    ),
    "variable_field_overruns_set": (
        raw_message(raw_set(2, raw_template(302, [(82, 0xFFFF, 0)])) + raw_set(302, b"\x0aabc")),
        "truncated_record",
    ),
    "long_variable_field_overruns_message": (
        raw_message(raw_set(2, raw_template(302, [(82, 0xFFFF, 0)])) + raw_set(302, b"\xff\x01")),
        "truncated_record",
    ),
    "variable_field_overruns_into_next_set": (
        raw_message(
            raw_set(2, raw_template(302, [(82, 0xFFFF, 0)]))
            + raw_set(302, b"\x05ab")
            + u32_records(300, [1])
        ),
        "truncated_record",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_message_reason_and_no_state_change(case):
    data, reason = MALFORMED[case]
    decoder = _decoder_with_state()
    with pytest.raises(MessageError) as err:
        decoder.decode(data, now=50.0)
    assert err.value.reason == reason
    assert str(err.value).startswith(reason + ": ")
    assert err.value.detail
    _assert_state_unchanged(decoder)


def test_tls_handshake_is_named():
    with pytest.raises(MessageError) as err:
        SessionDecoder().decode(TLS_CLIENT_HELLO)
    assert err.value.reason == "bad_version"
    assert "TLS" in str(err.value)


def test_netflow_is_named():
    with pytest.raises(MessageError) as err:
        SessionDecoder().decode(HEADER.pack(5, 16, 0, 0, 0))
    assert "NetFlow v5" in str(err.value)


def test_staged_templates_of_a_bad_message_are_not_applied():
    decoder = _decoder_with_state()
    body = (
        raw_set(2, raw_template(300, [(4, 1, 0)]))  # would redefine 300
        + raw_set(2, raw_template(301, [(1, 4, 0)]))  # would add 301
        + raw_set(2, struct.pack(">HH", 2, 0))  # would withdraw all
        + u32_records(999, [1])  # unknown template: the whole message is refused
    )
    with pytest.raises(MessageError) as err:
        decoder.decode(raw_message(body, seq=2), now=50.0)
    assert err.value.reason == "unknown_template"
    _assert_state_unchanged(decoder)


def test_withdrawal_in_a_bad_message_is_not_applied():
    decoder = _decoder_with_state()
    body = raw_set(2, struct.pack(">HH", 300, 0)) + raw_set(1, bytes(4))
    with pytest.raises(MessageError):
        decoder.decode(raw_message(body, seq=2), now=50.0)
    _assert_state_unchanged(decoder)


def test_message_error_is_value_error():
    err = MessageError("bad_version", "detail")
    assert isinstance(err, ValueError)
    assert (err.reason, err.detail, str(err)) == ("bad_version", "detail", "bad_version: detail")


# -- StreamFramer ---------------------------------------------------------------------------------


def _stream_messages() -> list[bytes]:
    template = exporter_templates()[0]
    messages = template_messages(exporter_templates(), EXPORT_TIME, 0, 1)
    packer = MessagePacker(1)
    records = [template.encode_mapping(AGENT_RECORD)] * 3
    for _ in range(4):
        messages.append(packer.pack(256, records, EXPORT_TIME)[0])
    messages.append(raw_message(b"", seq=packer.sequence_number))  # a header-only message
    messages.append(packer.pack(256, [template.encode_mapping(AGENT_RECORD)] * 200, 0)[0])
    return messages


def _feed_in_chunks(framer: StreamFramer, data: bytes, cuts: list[int]) -> list[bytes]:
    out = []
    last = 0
    for cut in sorted(cuts) + [len(data)]:
        out += framer.feed(data[last:cut])
        last = cut
    return out


def test_framer_one_byte_at_a_time():
    messages = _stream_messages()
    stream = b"".join(messages)
    framer = StreamFramer()
    out = []
    for i in range(len(stream)):
        out += framer.feed(stream[i : i + 1])
    assert out == messages
    assert framer.pending_bytes == 0


def test_framer_whole_stream_at_once():
    messages = _stream_messages()
    framer = StreamFramer()
    assert framer.feed(b"".join(messages)) == messages
    assert framer.pending_bytes == 0


def test_framer_keeps_partial_message():
    message = raw_message(u32_records(300, [1, 2, 3]))
    framer = StreamFramer()
    assert framer.feed(message[:3]) == []
    assert framer.pending_bytes == 3
    assert framer.feed(message[3:-1]) == []
    assert framer.pending_bytes == len(message) - 1
    assert framer.feed(message[-1:] + message[:5]) == [message]
    assert framer.pending_bytes == 5


@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=60))
@settings(max_examples=150, deadline=None)
def test_framer_random_splits(cut_seeds):
    messages = _STREAM
    stream = _STREAM_BYTES
    cuts = [c % (len(stream) + 1) for c in cut_seeds]
    framer = StreamFramer()
    assert _feed_in_chunks(framer, stream, cuts) == messages
    assert framer.pending_bytes == 0


_STREAM = _stream_messages()
_STREAM_BYTES = b"".join(_STREAM)


def test_framed_messages_decode():
    decoder = SessionDecoder()
    framer = StreamFramer()
    total = 0
    for message in framer.feed(_STREAM_BYTES):
        total += decoder.decode(message).record_count
    assert total == 4 * 3 + 200
    assert decoder.lost_records == 0


@pytest.mark.parametrize(
    "noise,reason",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad_version"),
        (TLS_CLIENT_HELLO, "bad_version"),
        (struct.pack(">HH", 10, 4) + bytes(12), "bad_length"),
        (bytes(16), "bad_version"),
    ],
)
def test_framer_raises_on_noise(noise, reason):
    framer = StreamFramer()
    with pytest.raises(MessageError) as err:
        framer.feed(noise)
    assert err.value.reason == reason


def test_framer_names_tls():
    with pytest.raises(MessageError, match="TLS"):
        StreamFramer().feed(TLS_CLIENT_HELLO[:4])


def test_framer_raises_on_noise_after_messages():
    message = raw_message(u32_records(300, [1]))
    framer = StreamFramer()
    assert framer.feed(message) == [message]
    with pytest.raises(MessageError):
        framer.feed(b"\x00\x05\x00\x30")


def test_framer_does_not_lose_messages_before_noise():
    # A good message and garbage arriving in one read: the good message is still delivered
    # (and the error surfaces on the next feed), so the records it carries are not lost.
    message = raw_message(u32_records(300, [1]))
    framer = StreamFramer()
    delivered = []
    with pytest.raises(MessageError):
        delivered += framer.feed(message + b"GARBAGE-GARBAGE-GARBAGE")
        delivered += framer.feed(b"")
    assert delivered == [message]


@given(st.binary(min_size=4, max_size=64))
@settings(max_examples=200, deadline=None)
def test_framer_on_random_bytes_raises_or_frames(data):
    framer = StreamFramer()
    try:
        out = framer.feed(data)
    except MessageError as err:
        assert err.reason in ("bad_version", "bad_length")
        return
    consumed = sum(len(m) for m in out)
    assert b"".join(out) == data[:consumed]
    for message in out:
        assert message[:2] == b"\x00\x0a"
        assert struct.unpack(">H", message[2:4])[0] == len(message)
    assert framer.pending_bytes == len(data) - consumed


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_decoder_never_raises_anything_but_message_error(data):
    decoder = _decoder_with_state()
    try:
        decoder.decode(raw_message(data, seq=2))
    except MessageError:
        _assert_state_unchanged(decoder)


def test_an_implausible_jump_is_a_reset_not_lost_records():
    # Any exporter can write any number into its header: before, a jump of 2**31 - 1 was
    # counted as that many lost records (a fuzzer drove records_lost_total to 1.15e12).
    decoder = SessionDecoder()
    announce(decoder, u32_template(300))
    decoder.decode(_data(0, 3))
    decoder.decode(_data(2**31 + 2, 1))
    decoder.decode(_data(7, 1))
    assert decoder.lost_records == 0
    assert decoder.sequences.counts.resets == 2
