"""The flow API's window of exported records: a bounded ring read by sequence number, a
reader that falls behind told how many records it lost, and readers woken by `published`."""

from __future__ import annotations

import gc
import threading
import weakref

from antrea_flow.aggregator.window import FlowWindow

WAIT = 10.0  # a liveness bound, never a timing assertion


class Rec(dict):
    """A record that can be watched with a weak reference."""


def filled(capacity: int, count: int) -> FlowWindow:
    window = FlowWindow(capacity)
    for i in range(count):
        window.append(Rec(n=i))
    return window


def seqs(entries) -> list[int]:
    return [e.seq for e in entries]


def test_an_empty_window():
    window = FlowWindow(4)
    assert len(window) == 0 and window.next_seq == 0
    assert window.read(0) == ([], 0, 0)
    assert list(window.newest()) == []


def test_append_then_read_in_order_and_newest_in_reverse():
    window = filled(8, 3)
    entries, cursor, lost = window.read(0)
    assert seqs(entries) == [0, 1, 2] and cursor == 3 and lost == 0
    assert [e.record["n"] for e in entries] == [0, 1, 2]
    assert window.read(cursor) == ([], 3, 0)
    assert seqs(window.newest()) == [2, 1, 0]
    window.append(Rec(n=3))
    entries, cursor, lost = window.read(cursor)
    assert seqs(entries) == [3] and cursor == 4 and lost == 0


def test_read_takes_at_most_limit_and_goes_on_from_its_cursor():
    window = filled(16, 10)
    entries, cursor, lost = window.read(0, limit=4)
    assert seqs(entries) == [0, 1, 2, 3] and cursor == 4 and lost == 0
    entries, cursor, lost = window.read(cursor, limit=4)
    assert seqs(entries) == [4, 5, 6, 7] and cursor == 8
    entries, cursor, lost = window.read(cursor, limit=4)
    assert seqs(entries) == [8, 9] and cursor == 10


def test_the_window_holds_at_most_its_capacity():
    window = filled(4, 10)
    assert len(window) == 4
    assert window.next_seq == 10 and len(window) == 4
    assert seqs(window.newest()) == [9, 8, 7, 6]
    assert [e.record["n"] for e in window.read(6)[0]] == [6, 7, 8, 9]


def test_records_pushed_out_of_the_window_are_not_kept():
    window = FlowWindow(4)
    refs = []
    for i in range(10):
        record = Rec(n=i)
        refs.append(weakref.ref(record))
        window.append(record)
    del record
    gc.collect()
    assert [ref() is not None for ref in refs] == [False] * 6 + [True] * 4


def test_a_cursor_that_fell_behind_is_told_how_many_records_it_lost():
    window = filled(4, 10)
    entries, cursor, lost = window.read(2)
    assert lost == 4  # records 2..5 were overwritten
    assert seqs(entries) == [6, 7, 8, 9] and cursor == 10
    assert window.read(0)[2] == 6
    assert window.read(6)[2] == 0  # the oldest still held: nothing lost


def test_subscribers_are_told_of_every_publish_until_they_leave():
    window = FlowWindow(4)
    told: list[str] = []
    first, second = (lambda: told.append("first")), (lambda: told.append("second"))
    window.subscribe(first)
    window.subscribe(second)
    window.append(Rec(n=0))
    window.published()
    window.unsubscribe(first)
    window.published()
    assert told == ["first", "second", "second"]


def test_a_reader_racing_the_writer_sees_every_record_in_order_or_counts_it_lost():
    """The ring has no lock: each read is contiguous, and what it skipped is in `lost`."""
    window = FlowWindow(64)
    total = 50_000
    seen, lost_total, errors = [0], [0], []
    woke = threading.Event()
    window.subscribe(woke.set)

    def read() -> None:
        cursor = 0
        while cursor < total:
            entries, next_cursor, lost = window.read(cursor, limit=16)
            expected = list(range(cursor + lost, cursor + lost + len(entries)))
            if seqs(entries) != expected or [e.record["n"] for e in entries] != expected:
                errors.append((cursor, lost, seqs(entries)))
                return
            seen[0] += len(entries)
            lost_total[0] += lost
            if next_cursor < cursor + lost + len(entries):
                errors.append(("cursor went back", cursor, next_cursor))
                return
            # a read cut short by an overwrite resumes where it stopped: counted next time
            cursor = next_cursor
            if not entries and not lost:
                woke.wait(1.0)
                woke.clear()

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(total):
        window.append(Rec(n=i))
        if i % 1000 == 999:
            window.published()
    window.published()
    reader.join(WAIT * 3)
    assert not reader.is_alive()
    assert errors == []
    assert seen[0] + lost_total[0] == total
