"""The aggregator's checkpoint: what a restarted aggregator needs to take, from the agents'
replays, exactly the records it lacks.

Per exporter (address and observation domain): the sequence number it was expected to send
next, the latest export time seen (to tell its replays from a restarted numbering), and the
sequence numbers of the records received but not yet carried by an export that every sink
settled (wrote, delivered, or dropped and counted). After a crash, a replayed record behind
the expectation was either exported (dropped again) or pending (taken again); records after
the expectation are new. What happened between the last checkpoint and the crash is the
margin: records exported since then, or settled by the sinks since then, come again.

One JSON document, written to a temporary file and renamed over the last one, so a crash
while writing leaves the previous checkpoint.
"""

from __future__ import annotations

import array
import asyncio
import base64
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

from ..ipfix.sequences import SequenceTracker
from ..logutil import LogOnce
from .aggregation import AggregationStore

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_FILE = "exporters.checkpoint"


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ExporterState:
    address: str
    domain: int
    expected: int
    export_time: int
    pending: tuple[int, ...]


def _pack(numbers: Iterable[int]) -> str:
    packed = array.array("I", sorted(numbers))
    if packed.itemsize != 4:  # "I" is 4 bytes on every platform we run on; say so if not
        raise CheckpointError("array('I') is not 32-bit here")
    return base64.b64encode(packed.tobytes()).decode("ascii")


def _unpack(text: str) -> tuple[int, ...]:
    packed = array.array("I")
    packed.frombytes(base64.b64decode(text, validate=True))
    return tuple(packed)


def write(path: Path, states: Iterable[ExporterState], written_at: float) -> int:
    """Replace the checkpoint at `path`; how many bytes it holds."""
    document = {
        "version": FORMAT_VERSION,
        "written": written_at,
        "exporters": [
            {
                "address": s.address,
                "domain": s.domain,
                "expected": s.expected,
                "exportTime": s.export_time,
                "pending": _pack(s.pending),
            }
            for s in states
        ],
    }
    data = json.dumps(document, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)
    return len(data)


def read(path: Path) -> list[ExporterState]:
    """The checkpoint at `path`; CheckpointError saying what is wrong with it."""
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc}") from None
    if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a version {FORMAT_VERSION} checkpoint")
    try:
        return [
            ExporterState(
                str(e["address"]),
                int(e["domain"]),
                int(e["expected"]),
                int(e["exportTime"]),
                _unpack(e["pending"]),
            )
            for e in document["exporters"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed exporter entry: {exc!r}") from None


class Sink(Protocol):
    """What the checkpoint reads of a sink (see `sinks`)."""

    @property
    def accepted(self) -> int: ...

    @property
    def settled(self) -> int: ...


class Checkpointer:
    """Restores an aggregator's checkpoint at start and writes it as it goes. Owned by the
    aggregator's event loop: the state is taken there, only the file write runs in a thread.

    `tracker` follows the agents' sequence numbers (the collector's, per exporter), `store`
    knows which received records no export carried yet, and `sinks` say how much of what
    they took they have settled."""

    def __init__(
        self,
        path: Path,
        tracker: SequenceTracker,
        store: AggregationStore,
        sinks: Sequence[Sink],
        *,
        interval: float = 1.0,
        grace: float = 600.0,
    ):
        """`grace`: how long a restored exporter has to come back with its replay before
        the records it still owed are counted as lost."""
        self.path = path
        self.tracker = tracker
        self.store = store
        self.sinks = sinks
        self.interval = interval
        self.grace = grace
        self.writes = 0
        self.last_size = 0
        self.write_seconds = 0.0  # time spent writing, in all
        self._last_write: float | None = None
        self._written_progress: tuple[int, int] | None = None
        self._give_up_at: float | None = None
        # Exports not yet settled by every sink: what they carried, and what each sink had
        # accepted once they were handed over. Oldest first.
        self._unsettled: deque[tuple[list[tuple[tuple[str, int], int]], list[int]]] = deque()
        self._log_once = LogOnce(log)

    def restore(self, now: float) -> tuple[int, int]:
        """Resume the exporters of the last checkpoint, if there is one: (exporters, records
        still owed by their replays). An unreadable checkpoint is reported and ignored."""
        if not self.path.exists():
            return 0, 0
        try:
            states = read(self.path)
        except CheckpointError as exc:
            log.warning("starting without the checkpoint: %s", exc)
            return 0, 0
        owed = 0
        for state in states:
            self.tracker.resume(
                (state.address, state.domain), state.expected, state.export_time, state.pending
            )
            owed += len(state.pending)
        if owed:
            self._give_up_at = now + self.grace
        return len(states), owed

    def _progress(self) -> tuple[int, int]:
        stats = self.store.stats
        return stats.received, stats.exported

    async def tick(self, now: float) -> None:
        """Write the checkpoint if `interval` passed and anything was received or exported."""
        if self._give_up_at is not None and now >= self._give_up_at:
            self._give_up_at = None
            lost = self.tracker.lose_wanted()
            if lost:
                log.warning(
                    "%d records received before the restart, not exported, never came back "
                    "in a replay within %ss: counted as lost",
                    lost,
                    self.grace,
                )
        if self._last_write is not None and now - self._last_write < self.interval:
            return
        if self._progress() == self._written_progress and not self._unsettled:
            return
        await self.save(now)

    def _settle(self) -> None:
        """Count as exported what every sink settled since it was handed over."""
        self._unsettled.append((self.store.take_carried(), [s.accepted for s in self.sinks]))
        while self._unsettled and all(
            sink.settled >= accepted
            for sink, accepted in zip(self.sinks, self._unsettled[0][1], strict=True)
        ):
            self.store.settle(self._unsettled.popleft()[0])

    async def save(self, now: float) -> None:
        self._settle()
        pending = self.store.pending()
        states = []
        for stream, expected, export_time in self.tracker.state():
            address, domain = cast(tuple[str, int], stream)  # the collector's exporter key
            held = tuple(pending.get((address, domain), ()))
            states.append(ExporterState(address, domain, expected, export_time, held))
        progress = self._progress()
        started = time.perf_counter()
        try:
            self.last_size = await asyncio.to_thread(write, self.path, states, now)
        except OSError as exc:
            self._log_once(
                ("write", exc.errno),
                logging.WARNING,
                "cannot write the checkpoint %s: %s",
                self.path,
                exc,
            )
            return
        finally:
            self.write_seconds += time.perf_counter() - started
            self._last_write = now
        self.writes += 1
        self._written_progress = progress
