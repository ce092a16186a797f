"""The exporting process's delivery core with plain values: no socket, no event loop.
Stream offsets and acknowledgements are numbers the test makes up, as a session reports
them from its socket."""

from __future__ import annotations

import struct

import pytest

from antrea_flow.ipfix import antrea
from antrea_flow.ipfix.delivery import Delivery
from antrea_flow.ipfix.messages import SessionDecoder, template_messages

V4 = antrea.EXPORTER_TEMPLATE_ID_IPV4
HEADER = struct.Struct(">HHIII")


def core(**kwargs) -> Delivery:
    kwargs.setdefault("max_message_size", 1452)
    kwargs.setdefault("reliable", True)
    return Delivery(antrea.exporter_templates(), 7, **kwargs)


def add(delivery: Delivery, *numbers: int) -> None:
    for i in numbers:
        assert delivery.add_mapping(V4, {"octetDeltaCount": i, "sourcePodName": f"p{i}"})


class Session:
    """A session as the asyncio driver runs one: writes count bytes of a stream."""

    def __init__(self, delivery: Delivery, now: float = 0.0):
        self.delivery = delivery
        self.now = now
        self.written = 0
        self.messages = [self._write(m) for m in delivery.open_session(now)]

    def _write(self, message: bytes) -> bytes:
        self.written += len(message)
        return message

    def send(self, count: int | None = None) -> list[bytes]:
        """Send up to `count` messages (all there are by default)."""
        out = []
        while count is None or len(out) < count:
            message = self.delivery.next_message(self.now)
            if message is None:
                break
            out.append(self._write(message))
            self.delivery.sent(self.written, self.now)
        self.messages += out
        return out


def numbers(messages: list[bytes]) -> list[int]:
    """The records' numbers (octetDeltaCount), decoded by a session that knows templates."""
    decoder = SessionDecoder()
    for message in template_messages(antrea.exporter_templates(), 0, 0, 7):
        decoder.decode(message)
    return [
        r["octetDeltaCount"]
        for m in messages
        for data_set in decoder.decode(m).data_sets
        for r in data_set.records
    ]


def sequences(messages: list[bytes]) -> list[tuple[int, int]]:
    """(sequence number, data records) of each data message."""
    decoder = SessionDecoder()
    out = []
    for m in messages:
        decoded = decoder.decode(m)
        if decoded.record_count:
            out.append((HEADER.unpack_from(m)[3], decoded.record_count))
    return out


def test_sequence_numbers_continue_across_sessions_from_the_first_one_given():
    delivery = core(first_sequence=2**32 - 3)
    add(delivery, *range(5))
    first = Session(delivery)
    first.send()
    delivery.closed(0.0)
    add(delivery, *range(5, 8))
    second = Session(delivery)
    second.send()
    ((a, count_a),) = sequences(first.messages)
    ((b, count_b),) = sequences(second.messages)
    assert (a, count_a, b, count_b) == (2**32 - 3, 5, 2, 3)
    # A session's templates carry the number of its first data record.
    assert HEADER.unpack_from(second.messages[0])[3] == 2


def test_what_the_host_did_not_acknowledge_goes_first_in_the_next_session():
    delivery = core()
    add(delivery, *range(60))
    session = Session(delivery)
    sent = session.send(3)
    assert len(sent) == 3
    first_end = len(session.messages[0]) + len(sent[0])  # templates + the first message
    requeued = delivery.failed(first_end, 0.0)
    assert requeued == len(numbers(sent[1:]))
    assert delivery.stats.records_requeued == requeued
    assert delivery.stats.records_sent == len(numbers(sent[:1]))
    again = Session(delivery)
    again.send()
    assert numbers(again.messages) == list(range(len(numbers(sent[:1])), 60))
    # The same messages, the same numbers.
    assert again.messages[1 : 1 + 2] == sent[1:]


def test_a_message_handed_out_but_not_written_goes_back_too():
    delivery = core()
    add(delivery, 1, 2, 3)
    session = Session(delivery)
    assert delivery.next_message(0.0) is not None  # the write fails half-way
    delivery.failed(session.written, 0.0)
    assert delivery.queued == 3 and delivery.stats.records_sent == 0
    again = Session(delivery)
    again.send()
    assert numbers(again.messages) == [1, 2, 3]


def test_acknowledged_messages_are_replayed_at_the_next_session_within_the_window():
    delivery = core(replay_window=60.0)
    add(delivery, *range(10))
    first = Session(delivery, now=100.0)
    sent = first.send()
    delivery.acknowledged(first.written, 100.0)
    delivery.failed(first.written, 100.0)  # all acknowledged: nothing requeued
    assert delivery.replay_held == 10 and delivery.queued == 0
    add(delivery, 10, 11)
    second = Session(delivery, now=150.0)
    second.send()
    # The replay first, byte for byte (same numbers, same export time), then the new ones.
    assert second.messages[1 : 1 + len(sent)] == sent
    assert numbers(second.messages) == list(range(12))
    assert delivery.stats.records_replayed == 10
    assert delivery.stats.records_sent == 12, "a replay is not a record sent"
    delivery.closed(150.0)
    third = Session(delivery, now=170.5)  # the first ten are over 60 s old now
    third.send()
    assert numbers(third.messages) == [10, 11]


def test_the_replay_keeps_at_most_replay_records():
    delivery = core(replay_window=60.0, replay_records=25, max_message_size=600)
    add(delivery, *range(40))
    session = Session(delivery)
    session.send()
    delivery.acknowledged(session.written, 0.0)
    assert 0 < delivery.replay_held <= 25
    delivery.closed(0.0)
    again = Session(delivery)
    again.send()
    replayed = numbers(again.messages)
    assert replayed == list(range(40 - len(replayed), 40))


def test_no_replay_over_udp_and_templates_come_again():
    delivery = core(reliable=False, replay_window=60.0, template_refresh=10.0)
    add(delivery, 1)
    session = Session(delivery, now=0.0)
    session.send()
    assert delivery.templates_due(0.0) == 10.0
    session.now = 10.0
    (refresh,) = session.send()
    assert SessionDecoder().decode(refresh).templates, "not the templates"
    delivery.closed(10.0)
    again = Session(delivery, now=11.0)
    again.send()
    assert numbers(again.messages) == []


def test_overflow_drops_the_oldest_requeued_messages_first():
    delivery = core(max_queue_records=30)
    add(delivery, *range(20))
    session = Session(delivery)
    session.send()
    delivery.failed(0, 0.0)  # nothing acknowledged: all 20 back, packed
    add(delivery, *range(20, 40))  # 10 too many
    dropped = delivery.stats.records_dropped["queue_full"]
    assert dropped >= 10 and delivery.queued == 40 - dropped
    again = Session(delivery)
    again.send()
    got = numbers(again.messages)
    assert got == sorted(got) and got[-1] == 39 and len(got) == 40 - dropped
    assert got[0] >= 10, "the newest were dropped instead of the oldest"


def test_drop_all_counts_what_was_left():
    delivery = core()
    add(delivery, 1, 2)
    assert delivery.drop_all("shutdown") == 2
    assert delivery.stats.records_dropped["shutdown"] == 2 and delivery.idle


@pytest.mark.parametrize("reliable", [True, False])
def test_records_that_cannot_go_are_counted_not_queued(reliable):
    delivery = core(reliable=reliable, max_message_size=200)
    assert not delivery.add_mapping(V4, {"sourcePodName": "x" * 300})
    assert not delivery.add_mapping(V4, {"sourceTransportPort": 70000})
    assert dict(delivery.stats.records_dropped) == {"too_large": 1, "encode_error": 1}
    assert delivery.queued == 0


@pytest.mark.parametrize("reliable", [True, False])
def test_records_settle_once_acknowledged_or_sent_over_udp_or_dropped(reliable):
    """What the aggregator's checkpoint reads to know a sink holds nothing it took."""
    delivery = core(reliable=reliable, max_queue_records=40)
    add(delivery, *range(30))
    session = Session(delivery)
    session.send()
    in_flight = 0 if not reliable else 30
    assert delivery.stats.records_settled == 30 - in_flight, "settled before acknowledged"
    delivery.acknowledged(session.written, 0.0)
    assert delivery.stats.records_settled == 30
    add(delivery, *range(30, 80))  # 10 over the bound: dropped, settled
    assert delivery.stats.records_settled == 40
    delivery.drop_all("shutdown")
    assert delivery.stats.records_settled == 80
