"""Sequence numbers: what a stream lost, repeated or restarted, within plausible bounds."""

from __future__ import annotations

import random

from antrea_flow.ipfix.sequences import MAX_GAP, MODULO, Seen, SequenceTracker


def test_in_order_messages_lose_nothing():
    tracker = SequenceTracker()
    seq = 5
    for count in (3, 0, 7, 1):
        assert tracker.observe("a", seq, count) == Seen()
        seq += count
    assert (tracker.counts.lost, tracker.counts.resets) == (0, 0)
    assert tracker.expected("a") == seq


def test_a_gap_within_the_bound_is_lost_records():
    tracker = SequenceTracker()
    tracker.observe("a", 0, 10)
    tracker.observe("a", 10 + MAX_GAP, 1)
    assert tracker.counts.lost == MAX_GAP and tracker.counts.resets == 0


def test_a_jump_beyond_the_bound_is_a_reset_not_a_loss():
    # Any peer can put any number in its header: a jump of 2**31 is no loss anyone had.
    tracker = SequenceTracker()
    tracker.observe("a", 0, 10)
    tracker.observe("a", 10 + MAX_GAP + 1, 1)
    tracker.observe("a", 2**31, 1)
    assert tracker.counts.lost == 0
    assert tracker.counts.resets == 2
    assert tracker.expected("a") == 2**31 + 1


def test_random_sequence_numbers_cannot_inflate_the_loss():
    # What the fuzzer did to records_lost_total (1.15e12): every message a random number.
    tracker = SequenceTracker()
    rng = random.Random(9)
    messages = 20_000
    for _ in range(messages):
        tracker.observe("a", rng.randrange(MODULO), rng.randrange(1, 30))
    assert tracker.counts.lost <= messages * MAX_GAP * 2 // 4096 + MAX_GAP
    assert tracker.counts.resets >= messages * 0.99


def test_a_restarted_numbering_is_one_reset():
    tracker = SequenceTracker()
    tracker.observe("a", 3_000_000_000, 10)
    tracker.observe("a", 0, 0)  # the restarted exporter's templates
    tracker.observe("a", 0, 5)
    assert (tracker.counts.lost, tracker.counts.resets) == (0, 1)


def test_without_replays_a_late_message_is_delivered_and_never_lost_twice():
    tracker = SequenceTracker()
    tracker.observe("a", 0, 5)
    tracker.observe("a", 10, 5)  # 5..9 missing so far
    assert tracker.counts.lost == 5
    assert tracker.observe("a", 5, 5) == Seen()  # arrives late (UDP): all of it delivered
    assert tracker.counts.lost == 5 and tracker.expected("a") == 15


def test_with_replays_the_records_received_before_are_said_so():
    tracker = SequenceTracker(replays=True)
    tracker.observe("a", 100, 50)  # expect 150
    assert tracker.observe("a", 120, 10) == Seen(10)  # all seen
    assert tracker.observe("a", 140, 20) == Seen(10)  # 140..149 seen, 150..159 new
    assert tracker.expected("a") == 160
    assert tracker.counts.repeated == 20 and tracker.counts.lost == 0


def test_replays_across_the_wrap():
    tracker = SequenceTracker(replays=True)
    tracker.observe("a", MODULO - 5, 10)  # expect 5
    assert tracker.observe("a", MODULO - 2, 4) == Seen(4)
    assert tracker.observe("a", 3, 4) == Seen(2)
    assert tracker.expected("a") == 7


def test_resume_and_forget():
    tracker = SequenceTracker(replays=True)
    tracker.resume("a", 1000, export_time=0)
    assert tracker.observe("a", 990, 20) == Seen(10)
    tracker.forget("a")
    assert tracker.expected("a") is None
    assert tracker.observe("a", 5, 1) == Seen()


def test_streams_are_bounded():
    tracker = SequenceTracker(max_streams=3)
    for stream in range(10):
        tracker.observe(stream, 0, 1)
    assert len(tracker) == 3
    assert tracker.expected(9) == 1 and tracker.expected(0) is None


def test_a_restarted_exporter_behind_the_expectation_is_a_reset_not_a_replay():
    # Its first message is numbered just behind what the stream expects, but it is new:
    # a later export time than any seen, where a replay keeps its original one.
    tracker = SequenceTracker(replays=True)
    tracker.observe("a", 5000, 100, export_time=1_000)
    assert tracker.observe("a", 4990, 20, export_time=1_001) == Seen()
    assert tracker.counts.resets == 1 and tracker.counts.repeated == 0
    assert tracker.expected("a") == 5010
    assert tracker.observe("a", 4990, 20, export_time=1_001) == Seen(20)  # this one a replay


def test_a_resumed_stream_takes_back_the_wanted_records_of_a_replay():
    # After a restart: 100..149 had been received, 110, 120 and 140 not passed on yet.
    tracker = SequenceTracker(replays=True)
    tracker.resume("a", 150, export_time=1_000, wanted=[104, 110, 120, 140])
    # The exporter replays from 108 (104 fell out of its replay window), then goes on.
    assert tracker.observe("a", 108, 20, export_time=990) == Seen(20, (2, 12))  # 110, 120
    assert tracker.counts.lost == 1  # 104
    # 128..157: 140 wanted, 150.. new
    assert tracker.observe("a", 128, 30, export_time=995) == Seen(22, (12,))
    assert tracker.observe("a", 158, 5, export_time=1_010) == Seen()
    counts = tracker.counts
    assert (counts.recovered, counts.lost) == (3, 1)
    assert counts.repeated == 20 + 22 - 3


def test_wanted_records_not_replayed_before_new_ones_are_lost():
    tracker = SequenceTracker(replays=True)
    tracker.resume("a", 150, export_time=1_000, wanted=[140, 145])
    tracker.observe("a", 150, 10, export_time=1_005)  # no replay: straight to new records
    assert tracker.counts.lost == 2 and tracker.counts.recovered == 0
    tracker.resume("b", 10, export_time=1_000, wanted=[5])
    assert tracker.lose_wanted() == 1 and tracker.counts.lost == 3


def test_a_sessions_template_message_does_not_make_its_replay_look_like_a_reset():
    tracker = SequenceTracker(replays=True)
    tracker.observe("a", 100, 50, export_time=1_000)
    # Reconnected: templates dated now, numbered as the replay that follows them.
    assert tracker.observe("a", 120, 0, export_time=1_060) == Seen()
    assert tracker.observe("a", 120, 30, export_time=1_000) == Seen(30)
    assert tracker.counts.resets == 0 and tracker.counts.repeated == 30
