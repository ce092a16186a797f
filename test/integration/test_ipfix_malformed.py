"""Malformed input against running TCP and UDP collectors: each bad session is closed (each
bad datagram dropped), counted under its reason, never reaches the handler, and neither a
concurrent good exporter nor a following valid session notices."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import struct

from antrea_flow.ipfix.messages import (
    HEADER,
    SET_HEADER,
    TEMPLATE_SET_ID,
    encode_message,
    encode_set,
    encode_template_record,
)

from .ipfixkit import (
    TEMPLATES,
    V4,
    V6,
    WAIT,
    RecordSink,
    add_paced,
    assert_exactly_once,
    collecting,
    eventually,
    exporting,
    make_record,
    run,
)

EXPORT_TIME = 1_700_000_000


def template_set(*template_ids: int) -> bytes:
    return encode_set(TEMPLATE_SET_ID, [encode_template_record(TEMPLATES[t]) for t in template_ids])


def data_set(template_id: int, *counters: int) -> bytes:
    template = TEMPLATES[template_id]
    ipv6 = template_id == V6
    return encode_set(
        template_id, [template.encode_mapping(make_record(c, ipv6=ipv6)) for c in counters]
    )


def message(*sets: bytes, domain: int, sequence: int = 0) -> bytes:
    return encode_message(list(sets), EXPORT_TIME, sequence, domain)


def valid_message(domain: int, *counters: int) -> bytes:
    return message(template_set(V4, V6), data_set(V4, *counters), domain=domain)


def noise() -> bytes:
    data = random.Random(20240611).randbytes(300)
    assert data[:2] != b"\x00\x0a"  # not a version 10 header by chance
    return data


def tls_client_hello() -> bytes:
    """The first flight of a real TLS client, as an exporter configured for tls sends it."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # handshake record
    return hello


def with_length(msg: bytes, length: int) -> bytes:
    return msg[:2] + struct.pack(">H", length) + msg[4:]


def truncated_record(domain: int) -> bytes:
    """Templates and a data set whose only record is cut 3 bytes short (the set and message
    lengths agree with the bytes present, so only the record overruns)."""
    template = TEMPLATES[V4]
    record = template.encode_mapping(make_record(5, ipv6=False))[:-3]
    assert len(record) >= template.min_record_length  # not mistakable for set padding
    return message(template_set(V4), encode_set(V4, [record]), domain=domain)


def unknown_template(domain: int) -> bytes:
    return message(data_set(V4, 6), domain=domain)  # no template announced in this session


def bad_set_length(domain: int) -> bytes:
    msg = valid_message(domain, 7)
    # The first set claims to run past the end of the message.
    return msg[: HEADER.size] + SET_HEADER.pack(TEMPLATE_SET_ID, 0xFFF0) + msg[HEADER.size + 4 :]


def netflow_v9(domain: int) -> bytes:
    """A well-formed message but for the version: 9, as a NetFlow v9 exporter sends."""
    return struct.pack(">H", 9) + valid_message(domain, 3)[2:]


# (name, bytes, reason): each a separate TCP session. Observation domains 900+ mark them.
def stream_cases() -> list[tuple[str, bytes, str]]:
    return [
        ("noise", noise(), "bad_version"),
        ("netflow v9 header", netflow_v9(902), "bad_version"),
        ("length shorter than a header", with_length(valid_message(903, 2), 8), "bad_length"),
        ("set longer than its message", bad_set_length(904), "bad_set_length"),
        ("truncated record", truncated_record(905), "truncated_record"),
        ("data set for an unknown template", unknown_template(906), "unknown_template"),
        ("TLS ClientHello", tls_client_hello(), "bad_version"),
    ]


async def session_is_closed(reader: asyncio.StreamReader) -> bool:
    """True once the collector has closed (or reset) the connection."""
    try:
        data = await asyncio.wait_for(reader.read(65536), WAIT)
    except ConnectionError:
        return True
    return data == b""


def test_tcp_collector_survives_malformed_sessions():
    good_records = {i: make_record(i) for i in range(1, 401)}
    cases = stream_cases()

    async def scenario():
        sink = RecordSink()
        async with collecting("tcp", sink) as collector:
            stats = collector.stats
            async with exporting(collector, domain=1) as good:
                items = list(good_records.items())
                await add_paced(good, dict(items[:100]), lambda: len(sink.records))
                for n, (name, payload, reason) in enumerate(cases):
                    before = stats.malformed[reason]
                    reader, writer = await asyncio.open_connection("127.0.0.1", collector.port)
                    try:
                        writer.write(payload)
                        await writer.drain()
                        assert await session_is_closed(reader), f"{name}: session left open"
                    finally:
                        writer.close()
                        with contextlib.suppress(OSError):
                            await writer.wait_closed()
                    await eventually(
                        lambda r=reason, b=before: stats.malformed[r] == b + 1,
                        f"{name} counted as {reason}",
                    )
                    # The good exporter goes on during and between the bad sessions.
                    chunk = dict(items[100 + 40 * n : 100 + 40 * (n + 1)])
                    await add_paced(good, chunk, lambda: len(sink.records))
                await eventually(lambda: stats.sessions_open == 1, "bad sessions gone")
                rest = dict(items[100 + 40 * len(cases) :])
                await add_paced(good, rest, lambda: len(sink.records))
                assert good.stats.connections == 1 and good.stats.send_errors == 0

                # A following valid session is decoded as usual.
                reader, writer = await asyncio.open_connection("127.0.0.1", collector.port)
                try:
                    writer.write(valid_message(77, 5001, 5002))
                    await writer.drain()
                    await eventually(
                        lambda: any(m.observation_domain_id == 77 for _, m in sink.messages),
                        "the valid session's records",
                    )
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            return sink, stats

    sink, stats = run(scenario())
    expected = {}
    for _, _, reason in cases:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(stats.malformed) == expected
    domains = {m.observation_domain_id for _, m in sink.messages}
    assert domains == {1, 77}, "a malformed session reached the handler"
    valid = [r for p, _, r in sink.records if r["octetDeltaCount"] in (5001, 5002)]
    assert [r["octetDeltaCount"] for r in valid] == [5001, 5002]
    good_only = RecordSink(records=[x for x in sink.records if x[2]["octetDeltaCount"] < 5000])
    assert_exactly_once(good_only, good_records)
    assert stats.lost_records == 0


def test_tcp_malformed_message_after_valid_ones_closes_only_that_session():
    """A session that was fine and then sends garbage: the whole messages before the bad one
    are delivered (however TCP happened to segment the stream), the session ends, and a new
    session from the same exporter decodes."""

    async def scenario():
        sink = RecordSink()
        async with collecting("tcp", sink) as collector:
            reader, writer = await asyncio.open_connection("127.0.0.1", collector.port)
            try:
                writer.write(valid_message(50, 1, 2))
                writer.write(message(data_set(V4, 3), domain=50, sequence=2))
                writer.write(with_length(message(data_set(V4, 4), domain=50, sequence=3), 15))
                writer.write(message(data_set(V4, 99), domain=50, sequence=4))  # never read
                await writer.drain()
                assert await session_is_closed(reader)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            await eventually(lambda: collector.stats.malformed["bad_length"] == 1, "counted")
            reader, writer = await asyncio.open_connection("127.0.0.1", collector.port)
            try:
                writer.write(valid_message(50, 10))
                await writer.drain()
                await eventually(lambda: 10 in sink.counters(), "the new session")
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            await eventually(lambda: collector.stats.sessions_open == 0, "sessions closed")
            return sink, collector.stats

    sink, stats = run(scenario())
    assert sink.counters() == [1, 2, 3, 10], "valid messages before the bad one were lost"
    assert stats.sessions_total == 2
    assert dict(stats.malformed) == {"bad_length": 1}


def test_udp_collector_drops_malformed_datagrams():
    good_records = {i: make_record(i) for i in range(1, 301)}

    async def scenario():
        sink = RecordSink()
        async with collecting("udp", sink) as collector:
            stats = collector.stats
            bad = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            bad.connect(("127.0.0.1", collector.port))
            bad_port = bad.getsockname()[1]
            try:
                async with exporting(collector, domain=1) as good:
                    items = list(good_records.items())
                    await add_paced(good, dict(items[:100]), lambda: len(sink.records))
                    sequence = [
                        ("noise", noise(), "bad_version"),
                        ("netflow v9 header", netflow_v9(31), "bad_version"),
                        ("shorter than a header", valid_message(31, 1)[:12], "truncated"),
                        ("length below 16", with_length(valid_message(31, 1), 8), "bad_length"),
                        (
                            "length beyond the datagram",
                            with_length(valid_message(31, 1), 2000),
                            "bad_length",
                        ),
                        (
                            "length short of the datagram",
                            valid_message(31, 1) + b"\x00" * 8,
                            "bad_length",
                        ),
                        ("set longer than its message", bad_set_length(31), "bad_set_length"),
                        (
                            "data set for an unknown template",
                            unknown_template(31),
                            "unknown_template",
                        ),
                        # Templates and a bad record in one datagram: the datagram is dropped
                        # whole, so the templates it carried are not learned either...
                        ("truncated record", truncated_record(31), "truncated_record"),
                        # ...and data relying on them is still for an unknown template.
                        (
                            "data after the dropped templates",
                            unknown_template(31),
                            "unknown_template",
                        ),
                        ("TLS ClientHello", tls_client_hello(), "bad_version"),
                    ]
                    expected: dict[str, int] = {}
                    next_good = 100
                    for name, payload, reason in sequence:
                        bad.send(payload)
                        expected[reason] = expected.get(reason, 0) + 1
                        await eventually(
                            lambda e=dict(expected): dict(stats.malformed) == e,
                            f"{name} counted as {reason}",
                        )
                        # The good exporter goes on between the bad datagrams.
                        chunk = dict(items[next_good : next_good + 15])
                        next_good += len(chunk)
                        await add_paced(good, chunk, lambda: len(sink.records))
                    # The same exporter address then sends valid messages: decoded.
                    bad.send(valid_message(31, 7001))
                    bad.send(message(data_set(V4, 7002, 7003), domain=31, sequence=1))
                    await eventually(lambda: 7003 in sink.counters(), "the valid datagrams")
                    await add_paced(good, dict(items[next_good:]), lambda: len(sink.records))
                    assert good.stats.send_errors == 0
            finally:
                bad.close()
            return sink, dict(stats.malformed), expected, bad_port

    sink, malformed, expected, bad_port = run(scenario())
    assert malformed == expected
    from_bad = [r["octetDeltaCount"] for p, _, r in sink.records if p.port == bad_port]
    assert from_bad == [7001, 7002, 7003]
    good_only = RecordSink(records=[x for x in sink.records if x[0].port != bad_port])
    assert_exactly_once(good_only, good_records)
