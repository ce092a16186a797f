"""What templates a peer can make a collector hold, and what they cost it.

Before: one 64 KB template message (16,377 variable-length fields) from any peer blocked the
event loop for 2 to 5 s generating and compiling Python source, and its codec (20 to 38 MB)
stayed in a process-wide cache; 100,000 ordinary templates in one session cost 303 MB. Now a
template costs its plan until it has decoded COMPILE_AFTER records, its state is bounded per
template, domain, session and collector, and it is given back when it or its session goes.
"""

from __future__ import annotations

import gc
import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from antrea_flow.ipfix import templates as templates_module
from antrea_flow.ipfix.elements import REGISTRY, VARIABLE_LENGTH, DataType
from antrea_flow.ipfix.messages import (
    MAX_MESSAGE_SIZE,
    LimitError,
    SessionDecoder,
    TemplateBudget,
    TemplateLimits,
    template_cost,
    withdrawal_message,
)
from antrea_flow.ipfix.templates import COMPILE_AFTER, Field, Template, zero_value

HEADER = struct.Struct(">HHIII")
EXPORT_TIME = 1_700_000_000
UNKNOWN = 600  # IANA ids from here on are not in the registry: 8-byte octetArrays
POD_NAME = REGISTRY.by_name("sourcePodName")  # string, Antrea PEN


def message(*sets: bytes, seq: int = 0, domain: int = 1) -> bytes:
    body = b"".join(sets)
    return HEADER.pack(10, 16 + len(body), EXPORT_TIME, seq, domain) + body


def template_set(*records: bytes) -> bytes:
    body = b"".join(records)
    return struct.pack(">HH", 2, 4 + len(body)) + body


def u64_template(tid: int, fields: int = 1, first_id: int = UNKNOWN) -> bytes:
    """A template record of `fields` 8-byte fields (IANA ids from `first_id`)."""
    out = struct.pack(">HH", tid, fields)
    for i in range(fields):
        out += struct.pack(">HH", first_id + i, 8)
    return out


def data_set(tid: int, values: list[int]) -> bytes:
    body = b"".join(struct.pack(">Q", v) for v in values)
    return struct.pack(">HH", tid, 4 + len(body)) + body


def test_the_largest_template_message_is_refused_before_its_fields_are_read():
    # 16,377 variable-length Antrea fields: what fills a 64 KB message.
    fields = (MAX_MESSAGE_SIZE - 16 - 4 - 4) // 8
    record = (
        struct.pack(">HH", 256, fields)
        + struct.pack(">HHI", POD_NAME.element_id | 0x8000, VARIABLE_LENGTH, POD_NAME.enterprise)
        * fields
    )
    decoder = SessionDecoder()
    with pytest.raises(LimitError) as refused:
        decoder.decode(message(template_set(record)))
    assert refused.value.reason == "template_fields"
    assert decoder.template_count() == 0 and decoder.cost == 0 and decoder.budget.used == 0


def test_a_template_at_the_field_limit_is_accepted():
    decoder = SessionDecoder(limits=TemplateLimits(max_fields=40))
    decoder.decode(message(template_set(u64_template(256, 40))))
    assert decoder.template_count() == 1
    with pytest.raises(LimitError, match="template_fields"):
        decoder.decode(message(template_set(u64_template(257, 41))))
    assert set(decoder.templates(1)) == {256}


def test_templates_per_observation_domain_are_bounded_and_a_refusal_changes_nothing():
    decoder = SessionDecoder(limits=TemplateLimits(max_templates=3))
    decoder.decode(message(template_set(*(u64_template(t) for t in (256, 257, 258)))))
    # Redefining one is no new template.
    decoder.decode(message(template_set(u64_template(257, 2))))
    with pytest.raises(LimitError, match="templates"):
        decoder.decode(message(template_set(u64_template(259), u64_template(256, 3))))
    held = decoder.templates(1)
    assert set(held) == {256, 257, 258}
    assert len(held[256].fields) == 1, "a refused message changed a template"
    # Another domain has its own count.
    decoder.decode(message(template_set(u64_template(259)), domain=2))
    assert set(decoder.templates(2)) == {259}


def test_observation_domains_per_session_are_bounded():
    decoder = SessionDecoder(limits=TemplateLimits(max_domains=2))
    for domain in (1, 2):
        decoder.decode(message(template_set(u64_template(256)), domain=domain))
    with pytest.raises(LimitError, match="domains"):
        decoder.decode(message(template_set(u64_template(256)), domain=3))
    assert decoder.templates(3) == {}


def test_a_sessions_template_memory_is_bounded():
    limit = 3 * template_cost(10)
    decoder = SessionDecoder(limits=TemplateLimits(max_session_bytes=limit))
    for tid in (256, 257, 258):
        decoder.decode(message(template_set(u64_template(tid, 10))))
    assert decoder.cost == limit
    with pytest.raises(LimitError, match="session_template_memory"):
        decoder.decode(message(template_set(u64_template(259))))
    # Withdrawing one makes room again.
    decoder.decode(withdrawal_message([256], EXPORT_TIME, 0, 1))
    decoder.decode(message(template_set(u64_template(259))))
    assert set(decoder.templates(1)) == {257, 258, 259}


def test_the_collectors_template_memory_is_shared_and_given_back_when_a_session_closes():
    budget = TemplateBudget(2 * template_cost(10))
    first, second = SessionDecoder(budget=budget), SessionDecoder(budget=budget)
    first.decode(message(template_set(u64_template(256, 10))))
    first.decode(message(template_set(u64_template(257, 10))))
    with pytest.raises(LimitError, match="template_memory"):
        second.decode(message(template_set(u64_template(256, 10))))
    first.close()
    assert budget.used == 0
    second.decode(message(template_set(u64_template(256, 10))))
    assert budget.used == template_cost(10)


def test_expired_templates_give_their_memory_back():
    decoder = SessionDecoder(template_timeout=60.0)
    decoder.decode(message(template_set(u64_template(256))), now=0.0)
    assert decoder.budget.used == template_cost(1)
    assert decoder.expire_templates(60.0) == 1
    assert decoder.budget.used == 0 and decoder.cost == 0


def test_100000_templates_in_one_session_are_refused_past_the_limit():
    decoder = SessionDecoder()
    limits = decoder.limits
    accepted = refused = 0
    for number in range(100_000):  # ids 256..65535 and round again
        try:
            decoder.decode(message(template_set(u64_template(256 + number % 65280))))
            accepted += 1
        except LimitError:
            refused += 1
    assert decoder.template_count() == limits.max_templates
    assert refused > 90_000 and accepted + refused == 100_000
    assert decoder.cost == limits.max_templates * template_cost(1) <= limits.max_session_bytes


# -- compilation is earned, shared and freed -------------------------------------------------


def test_a_peers_template_is_compiled_only_after_it_decoded_enough_records():
    decoder = SessionDecoder()
    decoder.decode(message(template_set(u64_template(256, 3, first_id=700))))
    template = decoder.templates(1)[256]
    assert not template.compiled
    batch = 100
    decoded = 0
    while decoded + batch < COMPILE_AFTER:
        out = decoder.decode(message(data_set(256, list(range(3 * batch)))))
        decoded += batch
        assert not template.compiled and len(out.data_sets[0].records) == batch
    decoder.decode(message(data_set(256, list(range(3 * batch)))))
    assert template.compiled


def test_a_layout_earns_its_codec_from_the_records_all_sessions_decoded():
    # A hundred agents sending a thousand records each: no session alone reaches
    # COMPILE_AFTER, together they do, and every session's template then uses the codec.
    announced = message(template_set(u64_template(256, 3, first_id=720)))
    sessions = [SessionDecoder() for _ in range(4)]
    for decoder in sessions:
        decoder.decode(announced)
    per_session = COMPILE_AFTER // 3
    for decoder in sessions[:3]:
        decoder.decode(message(data_set(256, list(range(3 * per_session)))))
    assert not any(d.templates(1)[256].compiled for d in sessions)
    sessions[3].decode(message(data_set(256, list(range(3 * 10)))))
    assert sessions[3].templates(1)[256].compiled
    # At their next data set, and before it: a hundred agents' sessions announced before
    # the layout was compiled decoded their first set interpreted (38% of the aggregator
    # benchmark's records).
    interpreted = templates_module._interpreted_decoder.__code__.co_consts
    calls = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in interpreted:
            calls.append(frame.f_code)

    sys.setprofile(profile)
    try:
        for decoder in sessions[:3]:
            decoder.decode(message(data_set(256, [1, 2, 3])))
    finally:
        sys.setprofile(None)
    assert all(d.templates(1)[256].compiled for d in sessions)
    assert not calls, "a set decoded interpreted although its layout was compiled"


def test_a_compiled_codec_is_shared_by_layout_and_freed_with_its_last_template():
    first = SessionDecoder()
    announced = message(template_set(u64_template(256, 3, first_id=710)))
    first.decode(announced)
    first.templates(1)[256].compile()
    second = SessionDecoder()
    second.decode(announced)
    assert second.templates(1)[256].compiled, "the same layout was not shared"
    layout = second.templates(1)[256].fields
    first.close()
    second.close()
    gc.collect()
    assert layout not in templates_module._CODECS


# -- both codecs decode alike ----------------------------------------------------------------

_TYPES = [
    ie
    for ie in REGISTRY
    if ie.data_type
    not in (DataType.basicList, DataType.subTemplateList, DataType.subTemplateMultiList)
]


@st.composite
def layouts_and_values(draw):
    chosen = draw(st.lists(st.sampled_from(_TYPES), min_size=1, max_size=12))
    fields = []
    for ie in chosen:
        length = ie.natural_length
        if ie.data_type in (DataType.string, DataType.octetArray) and draw(st.booleans()):
            length = draw(st.integers(1, 20))
        fields.append(Field(ie, length))
    values = []
    for f in fields:
        t = f.element.data_type
        if t == DataType.string:
            # A fixed-length string is NUL-padded: what fits, without trailing NULs.
            size = 300 if f.variable else f.length
            text = draw(st.text(st.characters(codec="ascii", min_codepoint=1), max_size=size))
            values.append(text)
        elif t == DataType.octetArray:
            size = (0, 300) if f.variable else (f.length, f.length)
            values.append(draw(st.binary(min_size=size[0], max_size=size[1])))
        else:
            values.append(zero_value(f) if draw(st.booleans()) else _sample(draw, f))
    return fields, values


def _sample(draw, f: Field):
    t = f.element.data_type
    if t.name.startswith("unsigned"):
        return draw(st.integers(0, (1 << (8 * f.length)) - 1))
    if t.name.startswith("signed"):
        return draw(st.integers(-(1 << (8 * f.length - 1)), (1 << (8 * f.length - 1)) - 1))
    if t == DataType.boolean:
        return draw(st.booleans())
    if t == DataType.ipv4Address:
        return draw(st.ip_addresses(v=4)).compressed
    if t == DataType.ipv6Address:
        return draw(st.ip_addresses(v=6)).compressed
    if t == DataType.macAddress:
        return draw(st.binary(min_size=6, max_size=6)).hex(":")
    if t in (DataType.dateTimeSeconds,):
        return draw(st.integers(0, 2**32 - 1))
    if t == DataType.dateTimeMilliseconds:
        return draw(st.integers(0, 2**63))
    if t == DataType.dateTimeMicroseconds:  # within the NTP era (until 2036)
        return draw(st.integers(0, 2_000_000_000 * 10**6))
    if t == DataType.dateTimeNanoseconds:
        return draw(st.integers(0, 2_000_000_000 * 10**9))
    return zero_value(f)


@settings(max_examples=300, deadline=None)
@given(layouts_and_values())
def test_the_interpreted_and_the_compiled_codec_decode_alike(case):
    fields, values = case
    interpreted = Template(300, fields)
    assert not interpreted.compiled or interpreted.fields in templates_module._CODECS
    wire = Template(300, fields, compiled=True).encode(values)
    padded = b"\xaa" + wire + b"\xbb"
    slow = templates_module._interpreted_decoder(interpreted.fields, interpreted.keys)
    fast = Template(300, fields, compiled=True).decoder
    assert slow(padded, 1) == fast(padded, 1)
    assert slow(padded, 1)[1] == 1 + len(wire)
