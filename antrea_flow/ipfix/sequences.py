"""Which data records of an exporter's stream arrived, from IPFIX sequence numbers.

A message's sequence number is the number of data records its exporter sent before it in the
stream (modulo 2**32), so a collector knows which records each message carries and which
never came. The tracker turns that into three counts:

- lost: records skipped by a forward jump no larger than `max_gap`. A larger jump is no
  loss anyone can have had (a hostile or broken peer could otherwise push the count to
  1e12): it is an exporter that restarted its numbering, counted as a reset;
- repeated: records a message carries again (an exporter re-sending what the collector may
  not have got, after a reconnect). With `replays` the tracker says how many leading records
  of such a message were received already, so the caller can drop them;
- resets: jumps, either way, beyond `max_gap`.

Without `replays` (UDP, where datagrams are reordered), a message behind the expectation is a
late one: delivered, never counted as lost again, and the expectation only moves forward.

Sans-IO: state is keyed by whatever identifies a stream for the caller (a session's
observation domain, or an exporter's address and domain across sessions).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

MODULO = 1 << 32
# Larger than anything one exporter loses between two messages it gets through: our agent's
# export queue holds 65536 records, a UDP collector's socket buffer a few thousand datagrams.
MAX_GAP = 1 << 20


@dataclass(slots=True)
class SequenceCounts:
    lost: int = 0
    repeated: int = 0
    resets: int = 0


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
        self._expected: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._expected)

    def expected(self, stream: Hashable) -> int | None:
        """The sequence number the stream's next message should carry (None: unknown)."""
        return self._expected.get(stream)

    def resume(self, stream: Hashable, expected: int) -> None:
        """Expect `expected` next on `stream` (state kept from before, e.g. across a restart)."""
        self._remember(stream, expected % MODULO)

    def forget(self, stream: Hashable) -> None:
        self._expected.pop(stream, None)

    def observe(self, stream: Hashable, sequence: int, records: int) -> int:
        """A message with `records` data records numbered from `sequence` arrived; how many
        of its first records were received before (always 0 without `replays`)."""
        end = (sequence + records) % MODULO
        expected = self._expected.get(stream)
        if expected is None:
            if records:
                self._remember(stream, end)
            return 0
        ahead = (sequence - expected) % MODULO
        if ahead == 0:
            self._expected[stream] = end
            return 0
        if ahead <= self.max_gap:
            self.counts.lost += ahead
            self._expected[stream] = end
            return 0
        behind = MODULO - ahead
        if behind <= self.max_gap:
            if not self.replays:
                if (end - expected) % MODULO <= self.max_gap and end != expected:
                    self._expected[stream] = end  # a late message reaching past the others
                return 0
            seen = min(behind, records)
            self.counts.repeated += seen
            if records > behind:
                self._expected[stream] = end
            return seen
        self.counts.resets += 1
        self._expected[stream] = end
        return 0

    def _remember(self, stream: Hashable, expected: int) -> None:
        if stream not in self._expected and len(self._expected) >= self.max_streams:
            del self._expected[next(iter(self._expected))]  # the longest known
        self._expected[stream] = expected
