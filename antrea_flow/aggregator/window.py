"""The latest exported records, kept for the flow API: a ring that the aggregator's loop
appends to and that API threads read by sequence number, without a lock.

A follow stream keeps the sequence number of the next record it wants. A stream that falls
so far behind that the ring has overwritten what it wants has lost those records: it is
told how many and cut off. Appending costs the same with no reader or with a hundred, so
readers can never slow the aggregator down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import orjson

from ..ipfix.antrea import FlowRecord
from ..ipfix.render import json_value

KEPT_RUNS = 32  # runs of NDJSON kept for readers in step (of up to a read's limit each)


class Entry:
    """One exported record and its number. `encoded` is its line of the API's NDJSON, made
    by the first API thread that needs it (any thread may; they all make the same bytes)."""

    __slots__ = ("seq", "record", "encoded")

    def __init__(self, seq: int, record: FlowRecord):
        self.seq = seq
        self.record = record
        self.encoded: bytes | None = None

    def line(self) -> bytes:
        encoded = self.encoded
        if encoded is None:
            encoded = self.encoded = encode(self.record)
        return encoded


def encode(record: Mapping[str, Any]) -> bytes:
    """A record as the API sends it: {"flow": compact JSON keyed by IE names}, a newline."""
    return b'{"flow":%s}\n' % orjson.dumps(record, default=json_value)


class FlowWindow:
    """Owner: the aggregator's loop, the one writer (`append`, `published`). Readers on other
    threads call `read`, `newest` and `lines`: the ring's slots are replaced whole and each
    entry carries its number, so a reader sees either the entry it wants or a newer one,
    which tells it that it fell behind. Records are never changed once appended."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._ring: list[Entry | None] = [None] * capacity
        self.next_seq = 0  # the number the next record gets
        self._subscribers: list[Callable[[], None]] = []  # told of every publish
        # The NDJSON of runs of entries, shared by the readers that send the same run: the
        # API's threads all write it, each change under `_runs_lock`.
        self._runs: dict[tuple[int, int], bytes] = {}
        self._runs_lock = threading.Lock()

    def append(self, record: FlowRecord) -> None:
        seq = self.next_seq
        self._ring[seq % self.capacity] = Entry(seq, record)
        self.next_seq = seq + 1

    def published(self) -> None:
        """Tell the subscribers that records came (once per batch of appends)."""
        for wake in self._subscribers:
            wake()

    def subscribe(self, wake: Callable[[], None]) -> None:
        """`wake()` after each publish, on the writer's thread: it must not block."""
        self._subscribers = [*self._subscribers, wake]  # replaced whole: read lock-free

    def unsubscribe(self, wake: Callable[[], None]) -> None:
        self._subscribers = [w for w in self._subscribers if w is not wake]

    def __len__(self) -> int:
        return min(self.next_seq, self.capacity)

    def read(self, cursor: int, limit: int = 4096) -> tuple[list[Entry], int, int]:
        """Up to `limit` entries from number `cursor` on, ending at a multiple of `limit` so
        that readers in step read the same runs: (entries, the next cursor, how many wanted
        records the ring no longer holds)."""
        head = self.next_seq
        start = max(cursor, head - self.capacity)
        end = min(head, (start // limit + 1) * limit)
        if start >= end:
            return [], start, start - cursor
        ring, capacity = self._ring, self.capacity
        first, last = start % capacity, (end - 1) % capacity
        # One slice, or two when the run wraps around the ring's end.
        entries = ring[first : last + 1] if first <= last else ring[first:] + ring[: last + 1]
        # Slots are overwritten oldest first: while the first is still ours, all are. If it
        # is not, the loop wrote meanwhile: the next read starts again and counts the loss.
        if entries[0] is None or entries[0].seq != start:
            return [], cursor, 0
        return cast(list[Entry], entries), end, start - cursor

    def lines(self, entries: list[Entry]) -> bytes:
        """The NDJSON of consecutive `entries`, made once for every reader of that run."""
        if not entries:
            return b""
        key = (entries[0].seq, entries[-1].seq)
        with self._runs_lock:
            run = self._runs.get(key)
        if run is None:
            run = b"".join([entry.line() for entry in entries])
            with self._runs_lock:
                self._runs[key] = run
                if len(self._runs) > KEPT_RUNS:
                    del self._runs[next(iter(self._runs))]  # the oldest
        return run

    def newest(self) -> Iterator[Entry]:
        """Entries from the newest back to the oldest the ring still holds."""
        ring, capacity = self._ring, self.capacity
        seq = self.next_seq - 1
        while seq >= 0:
            entry = ring[seq % capacity]
            if entry is None or entry.seq != seq:
                return  # the rest was overwritten while we read
            yield entry
            seq -= 1
