"""Which data records of an exporter's stream arrived, from IPFIX sequence numbers.

A message's sequence number is the number of data records its exporter sent before it in the
stream (modulo 2**32), so a collector knows which records each message carries and which
never came. The tracker turns that into counts:

- lost: records skipped by a forward jump no larger than `max_gap`. A larger jump is no
  loss anyone can have had (a hostile or broken peer could otherwise push the count to
  1e12): it is an exporter that restarted its numbering, counted as a reset;
- repeated: with `replays`, records a message carries again: an exporter re-sending, after
  a reconnect, messages the collector may not have got. Such a message keeps its original
  export time, so one behind the expectation with an export time no later than the latest
  seen is a replay, and the tracker says how many of its first records were received
  before, for the caller to drop; one with a later export time is an exporter that started
  numbering afresh (a reset);
- resets: jumps beyond `max_gap`, or restarted numberings;
- recovered: records the caller said were still wanted although they are behind the
  expectation (`resume`: records a restarted collector had received but not yet passed
  on when it stopped), that a replay brought back. Wanted records a replay skipped, or
  still wanted when the stream's new records arrive, are lost.

Without `replays` (UDP, where datagrams are reordered), a message behind the expectation is a
late one: delivered, never counted as lost again, and the expectation only moves forward.

Sans-IO: state is keyed by whatever identifies a stream for the caller (a session's
observation domain, or an exporter's address and domain across sessions).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

MODULO = 1 << 32
# Larger than anything one exporter loses between two messages it gets through: our agent's
# export queue holds 65536 records, a UDP collector's socket buffer a few thousand datagrams.
MAX_GAP = 1 << 20


@dataclass(slots=True)
class SequenceCounts:
    lost: int = 0
    repeated: int = 0
    resets: int = 0
    recovered: int = 0


class Seen(NamedTuple):
    """What a message holds that the collector has: its first `received` records came
    before, but for those at `wanted` (positions in the message), still to be taken."""

    # Not `count`: a NamedTuple field of that name would hide tuple.count.
    received: int = 0
    wanted: tuple[int, ...] = ()


NOTHING_SEEN = Seen()


class _Stream:
    __slots__ = ("expected", "export_time", "wanted")

    def __init__(self, expected: int, export_time: int, wanted: set[int] | None = None):
        self.expected = expected
        self.export_time = export_time  # the latest export time seen
        self.wanted = wanted  # sequence numbers behind `expected` still to be taken


class SequenceTracker:
    """Sequence numbers of many streams. Owned by one thread (a collector's event loop)."""

    def __init__(
        self,
        *,
        replays: bool = False,
        max_gap: int = MAX_GAP,
        max_streams: int = 65536,
        counts: SequenceCounts | None = None,
    ):
        """`counts` may be shared by several trackers (a collector's sessions)."""
        self.replays = replays
        self.max_gap = max_gap
        self.max_streams = max_streams
        self.counts = counts if counts is not None else SequenceCounts()
        self._streams: dict[Hashable, _Stream] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def expected(self, stream: Hashable) -> int | None:
        """The sequence number the stream's next message should carry (None: unknown)."""
        state = self._streams.get(stream)
        return state.expected if state is not None else None

    def state(self) -> list[tuple[Hashable, int, int]]:
        """(stream, expected, latest export time) of every stream, to keep across a restart."""
        return [(key, s.expected, s.export_time) for key, s in self._streams.items()]

    def resume(
        self, stream: Hashable, expected: int, export_time: int, wanted: Iterable[int] = ()
    ) -> None:
        """Continue a stream as it was (across a restart of the collector): `expected` next,
        and the records numbered `wanted` (behind it) still to be taken from a replay."""
        wanted_set = {w % MODULO for w in wanted} or None
        self._remember(stream, _Stream(expected % MODULO, export_time, wanted_set))

    def forget(self, stream: Hashable) -> None:
        self._streams.pop(stream, None)

    def observe(self, stream: Hashable, sequence: int, records: int, export_time: int = 0) -> Seen:
        """A message with `records` data records numbered from `sequence` arrived: which of
        its first records were received before (none without `replays`)."""
        if not records:
            # Templates only: a session's first message, dated when it went, whatever its
            # data messages are (replays keep their date). It tells nothing about records.
            return NOTHING_SEEN
        end = (sequence + records) % MODULO
        state = self._streams.get(stream)
        if state is None:
            self._remember(stream, _Stream(end, export_time))
            return NOTHING_SEEN
        expected = state.expected
        ahead = (sequence - expected) % MODULO
        behind = MODULO - ahead if ahead else 0
        if behind and behind <= self.max_gap:
            if not self.replays:
                if (end - expected) % MODULO <= self.max_gap and end != expected:
                    state.expected = end  # a late message reaching past the others
                return NOTHING_SEEN
            if export_time <= state.export_time:
                seen = min(behind, records)
                wanted = self._take_wanted(state, sequence, behind, seen)
                self.counts.repeated += seen - len(wanted)
                if records > behind:
                    self._advance(state, end, export_time)
                return Seen(seen, wanted)
            ahead = self.max_gap + 1  # a later export time: the numbering started again
        if ahead <= self.max_gap:
            self.counts.lost += ahead
        else:
            self.counts.resets += 1
        self._advance(state, end, export_time)
        return NOTHING_SEEN

    def lose_wanted(self) -> int:
        """Give up the records still wanted (their exporters did not come back in time):
        counted as lost; how many."""
        lost = 0
        for state in self._streams.values():
            if state.wanted:
                lost += len(state.wanted)
                state.wanted = None
        self.counts.lost += lost
        return lost

    def _advance(self, state: _Stream, end: int, export_time: int) -> None:
        state.expected = end
        state.export_time = max(state.export_time, export_time)
        if state.wanted:
            # The stream's new records came: a wanted record not replayed by now never will.
            self.counts.lost += len(state.wanted)
            state.wanted = None

    def _take_wanted(
        self, state: _Stream, sequence: int, behind: int, seen: int
    ) -> tuple[int, ...]:
        """Positions among a replayed message's first `seen` records that are wanted; those
        wanted records older than the message's start were skipped by the replay: lost."""
        wanted = state.wanted
        if not wanted:
            return ()
        expected = state.expected
        older = [w for w in wanted if (expected - w) % MODULO > behind]
        for w in older:
            wanted.discard(w)
        self.counts.lost += len(older)
        positions = tuple(i for i in range(seen) if (sequence + i) % MODULO in wanted)
        for i in positions:
            wanted.discard((sequence + i) % MODULO)
        self.counts.recovered += len(positions)
        return positions

    def _remember(self, stream: Hashable, state: _Stream) -> None:
        if stream not in self._streams and len(self._streams) >= self.max_streams:
            del self._streams[next(iter(self._streams))]  # the longest known
        self._streams[stream] = state
