"""The columnar ctnetlink parser, on messages built here byte by byte as the kernel lays
them out (linux/netfilter/nfnetlink_conntrack.h)."""

import gc
import socket
import struct
import weakref
from functools import partial

import numpy as np
import pytest
from agentkit import ESTABLISHED, TIME_WAIT, conntrack_entry, ip

from antrea_flow.conntrack.netlink import Frames
from antrea_flow.conntrack.parser import (
    _CHECK_ROWS,
    NUMERIC,
    TCP_STATES,
    Dump,
    Entry,
    ParseError,
    Parser,
)

IPCTNL_MSG_CT_NEW = (1 << 8) | 0
NLM_F_MULTI = 0x2
NLA_F_NESTED = 0x8000

CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO = 1, 2, 3, 4
CTA_TIMEOUT, CTA_MARK, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY = 7, 8, 9, 10
CTA_USE, CTA_ID, CTA_ZONE, CTA_TIMESTAMP, CTA_LABELS = 11, 12, 18, 20, 22
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
CTA_COUNTERS32_PACKETS, CTA_COUNTERS32_BYTES = 3, 4
CTA_TIMESTAMP_START, CTA_TIMESTAMP_STOP = 1, 2
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE, CTA_PROTOINFO_TCP_WSCALE_ORIGINAL = 1, 2
CTA_PROTOINFO_TCP_WSCALE_REPLY, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL = 3, 4
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58


# -- a ctnetlink message builder -----------------------------------------------------------


def attr(kind, payload):
    """One attribute: native-endian length and type, the payload, padding to 4 bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + bytes(-length % 4)


def nested(kind, *children):
    return attr(kind | NLA_F_NESTED, b"".join(children))


def u8(kind, value):
    return attr(kind, struct.pack(">B", value))


def be16(kind, value):
    return attr(kind, struct.pack(">H", value))


def be32(kind, value):
    return attr(kind, struct.pack(">I", value))


def be64(kind, value):
    return attr(kind, struct.pack(">Q", value))


def message(family, attributes, seq=1):
    body = struct.pack("=BBH", family, 0, 0) + attributes
    header = struct.pack("=IHHII", 16 + len(body), IPCTNL_MSG_CT_NEW, NLM_F_MULTI, seq, 0)
    return header + body


def tuple_attr(kind, proto, src, dst, sport, dport, icmp_id=None):
    v6 = len(src) == 16
    ip_attrs = (
        attr(CTA_IP_V6_SRC, src) + attr(CTA_IP_V6_DST, dst)
        if v6
        else attr(CTA_IP_V4_SRC, src) + attr(CTA_IP_V4_DST, dst)
    )
    proto_attrs = [u8(CTA_PROTO_NUM, proto)]
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        ids = (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE)
        if proto == IPPROTO_ICMPV6:
            ids = (CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE)
        proto_attrs += [
            be16(ids[0], icmp_id or 0),
            u8(ids[1], dport >> 8),
            u8(ids[2], dport & 0xFF),
        ]
    else:
        proto_attrs += [be16(CTA_PROTO_SRC_PORT, sport), be16(CTA_PROTO_DST_PORT, dport)]
    return nested(kind, nested(CTA_TUPLE_IP, ip_attrs), nested(CTA_TUPLE_PROTO, *proto_attrs))


def build(
    e,
    *,
    zone=True,
    mark=True,
    counters=64,
    timestamp=True,
    labels=None,
    protoinfo=True,
    extras=True,
    order=None,
    filler=b"",
):
    """The ctnetlink message of entry `e`, with the optional parts the kernel may leave out.

    `labels`/`timestamp`/`zone`/`mark` absent mean the Entry must hold 0 (or b"") there;
    `counters` is 64, 32 or None.
    """
    family = socket.AF_INET6 if len(e.orig_src) == 16 else socket.AF_INET
    parts = {
        "orig": tuple_attr(CTA_TUPLE_ORIG, e.proto, e.orig_src, e.orig_dst, e.orig_sport,
                           e.orig_dport, icmp_id=0x1234),
        "reply": tuple_attr(CTA_TUPLE_REPLY, e.proto, e.reply_src, e.reply_dst, e.reply_sport,
                            e.reply_dport, icmp_id=0x1234),
        "status": be32(CTA_STATUS, e.status),
    }  # fmt: skip
    if extras:
        parts["timeout"] = be32(CTA_TIMEOUT, 431999)
    if mark:
        parts["mark"] = be32(CTA_MARK, e.mark)
    if counters == 64:
        parts["counters"] = nested(
            CTA_COUNTERS_ORIG, be64(CTA_COUNTERS_PACKETS, e.orig_packets),
            be64(CTA_COUNTERS_BYTES, e.orig_bytes),
        ) + nested(
            CTA_COUNTERS_REPLY, be64(CTA_COUNTERS_PACKETS, e.reply_packets),
            be64(CTA_COUNTERS_BYTES, e.reply_bytes),
        )  # fmt: skip
    elif counters == 32:
        parts["counters"] = nested(
            CTA_COUNTERS_ORIG, be32(CTA_COUNTERS32_PACKETS, e.orig_packets),
            be32(CTA_COUNTERS32_BYTES, e.orig_bytes),
        ) + nested(
            CTA_COUNTERS_REPLY, be32(CTA_COUNTERS32_PACKETS, e.reply_packets),
            be32(CTA_COUNTERS32_BYTES, e.reply_bytes),
        )  # fmt: skip
    if zone:
        parts["zone"] = be16(CTA_ZONE, e.zone)
    if timestamp:
        ts = [be64(CTA_TIMESTAMP_START, e.start_ns)]
        if e.stop_ns:
            ts.append(be64(CTA_TIMESTAMP_STOP, e.stop_ns))
        parts["timestamp"] = nested(CTA_TIMESTAMP, *ts)
    if protoinfo and e.proto == IPPROTO_TCP:
        parts["protoinfo"] = nested(
            CTA_PROTOINFO,
            nested(
                CTA_PROTOINFO_TCP,
                u8(CTA_PROTOINFO_TCP_STATE, e.tcp_state),
                u8(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, 7),
                u8(CTA_PROTOINFO_TCP_WSCALE_REPLY, 7),
                attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, b"\x23\x00"),
            ),
        )
    parts["id"] = be32(CTA_ID, e.id)
    if extras:
        parts["use"] = be32(CTA_USE, 1)
    if labels is not None:
        parts["labels"] = attr(CTA_LABELS, labels)
    if order is not None:
        parts = {k: parts[k] for k in order if k in parts} | parts
    return message(family, b"".join(parts.values()) + filler)


def frames(*messages):
    """Frames over the messages, as ConntrackDumper._receive lays them out."""
    buffer = bytearray()
    by_length = {}
    for m in messages:
        assert len(m) % 4 == 0
        by_length.setdefault(len(m), []).append(len(buffer) // 4)
        buffer += m
    return Frames(buffer, by_length, len(messages))


# The entry a dump of a busy node would hold: NAT done, assured, seen reply, confirmed.
make = partial(conntrack_entry, status=0x18E, mark=0x12, start_ns=1_700_000_000_123_456_789)


def parse(*messages, parser=None):
    return (parser or Parser()).parse(frames(*messages))


def by_id(entries):
    return sorted(entries, key=lambda e: e.id)


def check_dump(dump, expected):
    """The dump holds exactly `expected` (in any order), and its columns agree with its
    entries row by row."""
    entries = dump.entries()
    assert len(dump) == len(expected) == len(entries)
    assert by_id(entries) == by_id(expected)
    for name in NUMERIC:
        column = dump.columns[name]
        assert column.dtype == np.int64, name
        assert column.tolist() == [getattr(e, name) for e in entries], name
    byte_fields = ("orig_src", "orig_dst", "reply_src", "reply_dst", "labels")
    for e in entries:
        assert isinstance(e, Entry)
        assert all(isinstance(getattr(e, f), bytes) for f in byte_fields)
    # The same fields as 16-byte columns, for any selection in any order.
    index = np.arange(len(entries))[::-1].copy()
    for name in byte_fields:
        values, full = dump.packed(name, index)
        wanted = [getattr(entries[i], name) for i in index.tolist()]
        assert [bytes(v)[: len(w)] for v, w in zip(values, wanted, strict=True)] == wanted, name
        assert all(not any(bytes(v)[len(w) :]) for v, w in zip(values, wanted, strict=True)), name
        assert full.tolist() == [len(w) == 16 for w in wanted], name


# -- single layouts ----------------------------------------------------------------------


def test_ipv4_udp():
    e = make(proto=IPPROTO_UDP, dport=53, sport=51234, status=0x8, mark=0x1)
    dump = parse(build(e))
    check_dump(dump, [e])
    (got,) = dump.entries()
    assert got.proto == 17
    assert got.tcp_state == -1
    assert (got.orig_sport, got.orig_dport, got.reply_sport, got.reply_dport) == (
        51234, 53, 53, 51234,
    )  # fmt: skip
    assert got.orig_src == ip("10.10.1.5") and got.reply_src == ip("10.10.1.6")


def test_ipv4_tcp_with_state_and_service_dnat():
    e = make(service=("10.96.0.10", 80), tcp=ESTABLISHED)
    (got,) = parse(build(e)).entries()
    assert got == e
    assert got.tcp_state == ESTABLISHED
    assert (got.orig_dst, got.orig_dport) == (ip("10.96.0.10"), 80)
    assert (got.reply_src, got.reply_sport) == (ip("10.10.1.6"), 8080)


@pytest.mark.parametrize("state", range(len(TCP_STATES)))
def test_every_tcp_state(state):
    e = make(tcp=state, ct_id=100 + state)
    check_dump(parse(build(e)), [e])


def test_tcp_without_protoinfo_has_no_state():
    e = make(tcp=-1)
    check_dump(parse(build(e, protoinfo=False)), [e])


def test_ipv6_tcp():
    e = make(src="fd00:10:10:1::5", dst="fd00:10:10:1::6", service=("fd00:10:96::a", 80),
             ct_labels=bytes(range(16)))  # fmt: skip
    dump = parse(build(e, labels=e.labels))
    check_dump(dump, [e])
    (got,) = dump.entries()
    assert len(got.orig_src) == 16 and got.orig_dst == ip("fd00:10:96::a")


def test_ipv6_udp():
    e = make(proto=IPPROTO_UDP, src="fd00::1", dst="fd00::2", sport=5353, dport=5353)
    check_dump(parse(build(e)), [e])


def test_icmp_ports_are_zero_and_type_times_256_plus_code():
    echo = make(proto=IPPROTO_ICMP, dport=8 * 256 + 0, sport=0 * 256 + 0, ct_id=1)
    unreachable = make(proto=IPPROTO_ICMP, dport=3 * 256 + 13, sport=0, ct_id=2)
    dump = parse(build(echo), build(unreachable))
    check_dump(dump, [echo, unreachable])
    got = {e.id: e for e in dump.entries()}
    assert (got[1].orig_sport, got[1].orig_dport) == (0, 2048)
    assert (got[1].reply_sport, got[1].reply_dport) == (0, 0)  # echo reply: type 0 code 0
    assert got[2].orig_dport == 3 * 256 + 13


def test_icmpv6_echo():
    e = make(proto=IPPROTO_ICMPV6, src="fd00::1", dst="fd00::2", dport=128 * 256, sport=129 * 256)
    (got,) = parse(build(e)).entries()
    assert got == e
    assert (got.orig_dport, got.reply_dport) == (128 * 256, 129 * 256)
    assert got.orig_sport == 0 and got.reply_sport == 0


def test_labels_are_the_raw_16_bytes():
    raw = bytes(8) + (201).to_bytes(4, "big") + (101).to_bytes(4, "big")
    e = make(ct_labels=raw)
    (got,) = parse(build(e, labels=raw)).entries()
    assert got.labels == raw


def test_entry_without_labels_timestamp_zone_mark_and_counters():
    e = make(zone=0, mark=0, ct_labels=b"", counters=(0, 0, 0, 0), start_ns=0, stop_ns=0)
    dump = parse(build(e, zone=False, mark=False, counters=None, timestamp=False))
    check_dump(dump, [e])


def test_timestamp_with_stop_time():
    e = make(proto=IPPROTO_UDP, status=0x18E | (1 << 9), stop_ns=1_700_000_005_000_000_001)
    (got,) = parse(build(e)).entries()
    assert got.stop_ns == 1_700_000_005_000_000_001
    assert got.start_ns == 1_700_000_000_123_456_789


def test_32_bit_counters():
    e = make(counters=(4_000_000_000, 4_294_967_295, 1, 2))
    check_dump(parse(build(e, counters=32)), [e])


def test_64_bit_counters_above_32_bits():
    e = make(counters=(2**40 + 1, 2**62 + 12345, 2**32, 2**63 - 1))
    check_dump(parse(build(e, counters=64)), [e])


def test_full_width_32_bit_fields():
    e = make(status=0xFFFFFFFF, mark=0xFFFFFFFF, ct_id=0xFFFFFFFE, zone=65535, sport=65535,
             dport=65535)  # fmt: skip
    check_dump(parse(build(e)), [e])


def test_without_ignored_attributes():
    e = make()
    check_dump(parse(build(e, extras=False)), [e])


def test_attribute_order_does_not_matter():
    e = make(ct_labels=b"\x01" * 16)
    reordered = build(e, labels=e.labels, order=["id", "labels", "zone", "mark", "counters",
                                                  "protoinfo", "timestamp", "status"])  # fmt: skip
    assert reordered != build(e, labels=e.labels)
    check_dump(parse(reordered), [e])


# -- many entries and several layouts ----------------------------------------------------


def mixed_entries():
    return [
        make(ct_id=1, sport=40001),
        make(ct_id=2, sport=40002, proto=IPPROTO_UDP, dport=53),
        make(ct_id=3, sport=40003, src="fd00::5", dst="fd00::6"),
        make(ct_id=4, sport=40004, ct_labels=b"\x00" * 12 + b"\x00\x00\x00\x65"),
        make(ct_id=5, proto=IPPROTO_ICMP, dport=2048),
        make(ct_id=6, sport=40006, counters=(7, 700, 6, 600), tcp=TIME_WAIT),
        make(ct_id=7, sport=40007, proto=IPPROTO_UDP, zone=0, mark=0, start_ns=0,
             counters=(0, 0, 0, 0)),
        make(ct_id=8, sport=40008, counters=(3, 300, 2, 200)),
        make(ct_id=9, sport=40009, src="fd00::7", dst="fd00::8", proto=IPPROTO_UDP),
    ]  # fmt: skip


def build_mixed(entries):
    out = []
    for e in entries:
        if e.id == 7:
            out.append(build(e, zone=False, mark=False, counters=None, timestamp=False))
        elif e.id == 8:
            out.append(build(e, counters=32))
        else:
            out.append(build(e, labels=e.labels or None))
    return out


def test_many_entries_of_several_layouts_in_one_dump():
    entries = mixed_entries()
    dump = parse(*build_mixed(entries))
    check_dump(dump, entries)


def test_many_entries_of_the_same_layout():
    entries = [make(ct_id=i, sport=1024 + i, counters=(i, i * 100, i // 2, i * 7))
               for i in range(1, 301)]  # fmt: skip
    dump = parse(*[build(e) for e in entries])
    check_dump(dump, entries)


def test_two_layouts_of_the_same_length_are_each_parsed_by_their_own_shape():
    # One carries CTA_ZONE where the other carries CTA_MARK: same total length, different
    # attribute headers at the same offsets.
    with_zone = make(ct_id=1, zone=65520, mark=0)
    with_mark = make(ct_id=2, zone=0, mark=0x12)
    a = build(with_zone, mark=False)
    b = build(with_mark, zone=False)
    assert len(a) == len(b) and a != b
    parser = Parser()
    dump = parse(a, b, a, parser=parser)
    check_dump(dump, [with_zone, with_mark, with_zone])
    assert parser.shape_count == 2


def test_ipv4_and_ipv6_layouts_of_the_same_length():
    v6 = make(ct_id=1, src="fd00::5", dst="fd00::6")
    v4 = make(ct_id=2, ct_labels=bytes(range(16)))
    m6 = build(v6)
    m4 = build(v4, labels=v4.labels)
    # Pad the IPv4 message with an ignored attribute (CTA_HELP) to the IPv6 length.
    gap = len(m6) - len(m4)
    assert gap > 4 and gap % 4 == 0
    m4 = build(v4, labels=v4.labels, filler=attr(5, bytes(gap - 4)))
    assert len(m4) == len(m6)
    check_dump(parse(m4, m6, m4, m6, m6), [v4, v6, v4, v6, v6])


def test_same_layout_with_attributes_in_another_order():
    e1 = make(ct_id=1)
    e2 = make(ct_id=2, sport=2)
    a = build(e1)
    b = build(e2, order=["mark", "status"])
    assert len(a) == len(b)
    check_dump(parse(b, a, b, a), [e2, e1, e2, e1])


def test_shapes_are_remembered_across_polls():
    parser = Parser()
    entries = mixed_entries()
    messages = build_mixed(entries)
    check_dump(parse(*messages, parser=parser), entries)
    learnt = parser.shape_count
    assert learnt >= 6
    # New counters (where the message carries them) and the messages in another order.
    changed = [e if e.id == 7 else e._replace(orig_packets=e.orig_packets + 5,
                                              orig_bytes=e.orig_bytes + 500)
               for e in reversed(entries)]  # fmt: skip
    check_dump(parse(*build_mixed(changed), parser=parser), changed)
    assert parser.shape_count == learnt


def test_empty_dump():
    dump = Parser().parse(Frames(bytearray(), {}, 0))
    assert len(dump) == 0
    assert dump.entries() == []
    assert all(len(dump.columns[name]) == 0 for name in NUMERIC)


# -- entries(index) ----------------------------------------------------------------------


def test_entries_at_an_index_in_the_index_order():
    entries = mixed_entries()
    dump = parse(*build_mixed(entries))
    everything = dump.entries()
    index = np.array([8, 0, 5, 3, 7])
    assert dump.entries(index) == [everything[i] for i in index]
    reverse = np.arange(len(dump))[::-1].copy()
    assert dump.entries(reverse) == everything[::-1]
    assert dump.entries(np.array([], dtype=np.int64)) == []
    assert dump.entries(np.array([4])) == [everything[4]]
    assert dump.entries(np.array([6, 2, 6])) == [everything[6], everything[2], everything[6]]


def test_entries_by_id_order_as_the_store_asks():
    entries = mixed_entries()
    dump = parse(*build_mixed(entries))
    order = np.argsort(dump.columns["id"], kind="stable")
    assert [e.id for e in dump.entries(order)] == sorted(e.id for e in entries)
    assert by_id(dump.entries(order)) == by_id(entries)


# -- errors ------------------------------------------------------------------------------


def corrupt(msg, offset, length):
    """`msg` with the attribute header at `offset` given another length."""
    out = bytearray(msg)
    struct.pack_into("=H", out, offset, length)
    return bytes(out)


FIRST_ATTR = 20  # after the netlink and nfgen headers


@pytest.mark.parametrize("length", [0, 2, 3, 0xFFF0])
def test_corrupt_top_level_attribute_length_raises(length):
    msg = build(make())
    with pytest.raises(ParseError):
        parse(corrupt(msg, FIRST_ATTR, length))


def test_corrupt_nested_attribute_length_raises():
    msg = build(make())
    # CTA_TUPLE_ORIG > CTA_TUPLE_IP: its header is right after the tuple's.
    inner = FIRST_ATTR + 4
    assert struct.unpack_from("=HH", msg, inner)[1] == CTA_TUPLE_IP | NLA_F_NESTED
    with pytest.raises(ParseError):
        parse(corrupt(msg, inner, 200))


def test_corrupt_message_of_a_known_length_is_not_misread():
    parser = Parser()
    good = build(make(ct_id=1))
    parse(good, parser=parser)
    bad = corrupt(build(make(ct_id=2)), FIRST_ATTR, 0xFFF0)
    assert len(bad) == len(good)
    with pytest.raises(ParseError):
        parse(good, bad, parser=parser)


def test_last_attribute_overrunning_the_message_raises():
    msg = build(make(), labels=bytes(16))
    last = len(msg) - 20  # the labels attribute: 4 + 16 bytes
    assert struct.unpack_from("=HH", msg, last) == (20, CTA_LABELS)
    with pytest.raises(ParseError):
        parse(corrupt(msg, last, 24))


def test_buffer_that_is_not_whole_words_raises():
    with pytest.raises(ParseError):
        Parser().parse(Frames(bytearray(build(make())) + b"\0\0", {}, 0))


def test_message_shorter_than_its_headers_raises():
    with pytest.raises(ParseError):
        Parser().parse(Frames(bytearray(16), {16: [0]}, 1))


# -- Dump.of -----------------------------------------------------------------------------


def test_dump_of_entries_round_trips():
    entries = mixed_entries()
    dump = Dump.of(entries)
    assert len(dump) == len(entries)
    assert dump.entries() == entries
    for name in NUMERIC:
        assert dump.columns[name].tolist() == [getattr(e, name) for e in entries]
        assert dump.columns[name].dtype == np.int64
    assert dump.entries(np.array([3, 1])) == [entries[3], entries[1]]


def test_dump_of_a_parsed_dump_has_the_same_columns():
    parsed = parse(*build_mixed(mixed_entries()))
    copy = Dump.of(parsed.entries())
    assert copy.entries() == parsed.entries()
    for name in NUMERIC:
        assert copy.columns[name].tolist() == parsed.columns[name].tolist()


def test_dump_of_nothing():
    dump = Dump.of([])
    assert len(dump) == 0 and dump.entries() == []
    assert len(dump.columns["id"]) == 0


def test_layouts_of_the_same_length_are_told_apart_across_check_blocks():
    # The headers are checked a block of entries at a time; entries of the other layout
    # at both ends of blocks must still go to their own shape.
    count = 2 * _CHECK_ROWS + 5
    others = {0, _CHECK_ROWS - 1, _CHECK_ROWS, 2 * _CHECK_ROWS, count - 1}
    messages = [
        build(make(ct_id=i, zone=0, mark=0x12), zone=False)
        if i in others
        else build(make(ct_id=i, zone=65520, mark=0), mark=False)
        for i in range(count)
    ]
    dump = parse(*messages)
    columns = (dump.columns[name].tolist() for name in ("id", "zone", "mark"))
    by_id = {i: (zone, mark) for i, zone, mark in zip(*columns, strict=True)}
    assert by_id == {i: (0, 0x12) if i in others else (65520, 0) for i in range(count)}


def test_a_dump_is_freed_as_soon_as_it_is_dropped():
    # A reference cycle would keep each poll's dump (its whole buffer) alive until the
    # garbage collector's next full pass, which the agent's tuning makes rare.
    dump = parse(*[build(e) for e in mixed_entries()])
    assert dump.columns["orig_packets"].tolist()  # columns are made when first read
    dump.entries()
    gone = weakref.ref(dump)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del dump
        assert gone() is None
    finally:
        if enabled:
            gc.enable()
