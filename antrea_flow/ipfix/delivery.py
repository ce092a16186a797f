"""The exporting process's delivery logic, without IO: records in, messages out, stream
offsets and acknowledgements in, what to send again out.

Records are encoded when added and wait in a bounded queue. A session asks for messages
(`open_session`, then `next_message` until None) and reports where each one ends in its byte
stream once the kernel has all of it (`sent`), how much of the stream the collector's host
has acknowledged (`acknowledged`), and, if it fails, how much that was at the end (`failed`).

- Sequence numbers count the records of this exporting process, across sessions: a
  message keeps its number when it is sent again, so a collector can tell a record it has
  from one it missed (RFC 7011 counts per session; collectors only look at the differences).
- Over TCP and TLS a message whose session fails before the collector's host acknowledged
  all of it goes back to the front, to be the first of the next session: nothing is lost
  or repeated within what TCP can tell.
- What TCP cannot tell is what a collector did with bytes its host acknowledged: a collector
  killed with them in its receive buffer, or before it exported what it had read, lost them.
  So acknowledged messages are kept for `replay_window` seconds (and at most `replay_records`
  records) and sent again at the start of every session; a collector that tracks sequence
  numbers across sessions (the flow aggregator) drops the ones it has.
- Over UDP a message is done once sent; templates are announced again every
  `template_refresh` seconds.
- Overflow drops the oldest records (flow records carry running totals: a later record
  supersedes an earlier one but for its delta) and counts them.

All timing comes from the `now` the caller passes. Owned by one event loop.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..logutil import LogOnce
from .messages import (
    HEADER,
    SET_HEADER,
    MessagePacker,
    template_messages,
)
from .templates import Template

log = logging.getLogger(__name__)

DEFAULT_QUEUE_RECORDS = 65536
DEFAULT_TEMPLATE_REFRESH = 600.0

# The records of one message: runs of records of one template, each a data set.
Batch = list[tuple[int, list[bytes]]]


@dataclass(slots=True)
class ExporterStats:
    # Records whose message went to the kernel; when a TCP or TLS session fails, those the
    # collector's host had not acknowledged are taken back out (and counted below).
    records_sent: int = 0
    # Taken back out of records_sent into the queue, to go out again on the next session.
    records_requeued: int = 0
    # Records of acknowledged messages sent again at the start of a session.
    records_replayed: int = 0
    messages_sent: int = 0
    connections: int = 0  # successful (re)connections
    connect_failures: int = 0
    send_errors: int = 0
    records_dropped: Counter[str] = field(default_factory=Counter)  # by reason
    connected: bool = False
    # Records queued that the process holds no more: delivered (acknowledged by the
    # collector's host over TCP and TLS, sent over UDP) or dropped from the queue. Never
    # decreases; in queue order, except that records dropped while older ones are in
    # flight count before those.
    records_settled: int = 0

    @property
    def records_written(self) -> int:
        """Every record whose message went to the kernel, re-sent ones again (replays
        aside): never decreases, so it is what counters in metrics read."""
        return self.records_sent + self.records_requeued


@dataclass(slots=True)
class _Message:
    """A packed message and what it carries."""

    # Sent again as it was: its sequence number and export time tell a collector that it
    # is one it may have had.
    data: bytes
    records: int
    end: int = 0  # where it ends in the stream of the session that last sent it
    acknowledged_at: float = 0.0


class Delivery:
    """Queue, packing, acknowledgement accounting and replay of one exporting process."""

    def __init__(
        self,
        templates: Sequence[Template],
        observation_domain_id: int,
        *,
        max_message_size: int,
        reliable: bool,
        max_queue_records: int = DEFAULT_QUEUE_RECORDS,
        replay_window: float = 0.0,
        replay_records: int = DEFAULT_QUEUE_RECORDS,
        template_refresh: float = DEFAULT_TEMPLATE_REFRESH,
        first_sequence: int = 0,
    ):
        """`reliable`: TCP or TLS (acknowledgements, requeue, replay); UDP otherwise."""
        self.templates = {t.template_id: t for t in templates}
        # Looked up once: `Template.encode` compiles on first use, once is enough to ask.
        self._encoders = {t.template_id: t.encode for t in templates}
        self.observation_domain_id = observation_domain_id
        self.max_message_size = max_message_size
        self.reliable = reliable
        self.max_queue_records = max_queue_records
        self.replay_window = replay_window if reliable else 0.0
        self.replay_records = replay_records
        self.template_refresh = template_refresh
        self.stats = ExporterStats()
        self._packer = MessagePacker(observation_domain_id, max_message_size)
        self._packer.sequence_number = first_sequence % (1 << 32)
        self._max_record_size = self._packer.max_record_size
        self._queue: deque[tuple[int, bytes]] = deque()  # encoded, not packed yet
        self._outbox: deque[_Message] = deque()  # packed, to be sent first (requeued)
        self._outbox_records = 0
        self._in_flight: deque[_Message] = deque()  # in the kernel, not acknowledged
        self._replay: deque[_Message] = deque()  # acknowledged, kept for replay_window
        self._replay_held = 0  # records in _replay
        self._replaying: deque[_Message] = deque()  # of this session, still to send
        self._control: deque[bytes] = deque()  # template messages due (UDP refresh)
        # What next_message handed out and `sent` has not confirmed: a message of records
        # (new or requeued), a replayed one, or a template message (None).
        self._writing: _Message | None = None
        self._writing_replay = False
        self._writing_control = False
        self._refresh_at: float | None = None
        self._log_once = LogOnce(log)

    # -- producer side --------------------------------------------------------------------

    def add(self, template_id: int, values: Sequence[Any]) -> bool:
        """Queue one record given as values in template order; False if it was dropped."""
        try:
            record = self._encoders[template_id](values)
        except (
            ValueError,
            TypeError,
            OverflowError,
            AttributeError,
            OSError,
            struct.error,
        ) as exc:
            self._drop("encode_error", 1)
            self._log_once(
                ("encode", template_id),
                logging.ERROR,
                "dropping a record of template %d that cannot be encoded: %s (%s)",
                template_id,
                self.templates[template_id].explain_encode_error(values),
                exc,
            )
            return False
        if len(record) > self._max_record_size:
            self._drop("too_large", 1)
            self._log_once(
                ("too_large", template_id),
                logging.ERROR,
                "dropping a %d-byte record: larger than a %d-byte message allows",
                len(record),
                self.max_message_size,
            )
            return False
        self._queue.append((template_id, record))
        self._bound()
        return True

    def add_mapping(self, template_id: int, record: Mapping[str, Any]) -> bool:
        """Queue one record given as a dict of IE names; absent fields take zero values."""
        return self.add(template_id, self.templates[template_id].values_from(record))

    @property
    def queued(self) -> int:
        """Records waiting to go to the kernel (requeued ones included)."""
        return (
            len(self._queue)
            + self._outbox_records
            + (
                self._writing.records
                if self._writing is not None and not self._writing_replay
                else 0
            )
        )

    @property
    def idle(self) -> bool:
        """Nothing waits to be sent (replays aside)."""
        return (
            not self._queue and not self._outbox and (self._writing is None or self._writing_replay)
        )

    @property
    def next_sequence(self) -> int:
        """The sequence number the next record packed will get."""
        return self._packer.sequence_number

    @property
    def awaiting_acknowledgement(self) -> bool:
        """Messages of this session are in the kernel, not yet acknowledged (TCP, TLS)."""
        return bool(self._in_flight)

    @property
    def replay_held(self) -> int:
        """Records of acknowledged messages kept for replay."""
        return self._replay_held

    def _bound(self) -> None:
        excess = len(self._queue) + self._outbox_records - self.max_queue_records
        if excess <= 0:
            return
        dropped = 0
        # The oldest first: requeued messages (a gap in the sequence numbers, which the
        # collector counts as lost, as it is), then records not packed yet.
        while excess > 0 and self._outbox:
            message = self._outbox.popleft()
            self._outbox_records -= message.records
            excess -= message.records
            dropped += message.records
        while excess > 0:
            self._queue.popleft()
            excess -= 1
            dropped += 1
        self._drop("queue_full", dropped)
        self.stats.records_settled += dropped
        self._log_once(
            "queue_full",
            logging.WARNING,
            "export queue is full (%d records): dropping the oldest",
            self.max_queue_records,
        )

    def _drop(self, reason: str, count: int) -> None:
        self.stats.records_dropped[reason] += count

    def drop_all(self, reason: str) -> int:
        """Give up what waits (on shutdown); how many records that was."""
        count = self.queued
        self._queue.clear()
        self._outbox.clear()
        self._outbox_records = 0
        if self._writing is not None and not self._writing_replay:
            self._writing = None
        if count:
            self._drop(reason, count)
            self.stats.records_settled += count
        return count

    # -- a session ------------------------------------------------------------------------

    def open_session(self, now: float) -> list[bytes]:
        """The template messages a new session starts with; the acknowledged messages of
        the last `replay_window` seconds come next from `next_message`, then the rest."""
        assert not self._handed_out and not self._in_flight, "the last session is not over"
        self._expire_replay(now)
        self._replaying = deque(self._replay)
        self._refresh_at = None if self.reliable else now + self.template_refresh
        return self._template_messages(now)

    def _template_messages(self, now: float) -> list[bytes]:
        # They carry the number of the next data record the session sends.
        if self._replaying:
            sequence = _sequence_of(self._replaying[0].data)
        elif self._outbox:
            sequence = _sequence_of(self._outbox[0].data)
        else:
            sequence = self._packer.sequence_number
        messages = template_messages(
            list(self.templates.values()),
            int(now),
            sequence,
            self.observation_domain_id,
            self.max_message_size,
        )
        self.stats.messages_sent += len(messages)
        return messages

    def templates_due(self, now: float) -> float | None:
        """When the templates are due again (UDP); None over TCP and TLS."""
        return self._refresh_at

    def next_message(self, now: float) -> bytes | None:
        """The next message to write, or None when there is nothing to send. Report it with
        `sent` once the kernel has all of it (or `failed` if the session fails first)."""
        assert not self._handed_out, "the previous message was not reported sent"
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = now + self.template_refresh
            self._control.extend(self._template_messages(now))
        if self._control:
            self._writing_control = True
            return self._control.popleft()
        self._writing_replay = bool(self._replaying)
        if self._replaying:
            message = self._replaying.popleft()
        elif self._outbox:
            message = self._outbox.popleft()
            self._outbox_records -= message.records
        elif self._queue:
            batch = self._take_batch()
            data = self._packer.pack_sets(batch, int(now))
            message = _Message(data, sum(len(records) for _, records in batch))
        else:
            return None
        self._writing = message
        return message.data

    def sent(self, end: int, now: float) -> None:
        """The message from `next_message` is entirely in the kernel; over TCP and TLS it
        ends at byte `end` of the session's stream."""
        if self._writing_control:
            self._writing_control = False
            return  # counted when it was made
        message, self._writing = self._writing, None
        assert message is not None
        self.stats.messages_sent += 1
        if self._writing_replay:
            self.stats.records_replayed += message.records
            return  # it stays where it is in the replay buffer
        self.stats.records_sent += message.records
        if self.reliable:
            message.end = end
            self._in_flight.append(message)
        else:
            self.stats.records_settled += message.records

    def acknowledged(self, offset: int, now: float) -> None:
        """The collector's host has acknowledged the session's stream up to `offset`."""
        while self._in_flight and self._in_flight[0].end <= offset:
            self._delivered(self._in_flight.popleft(), now)
        self._expire_replay(now)

    def failed(self, acknowledged: int, now: float) -> int:
        """The session failed, its host having acknowledged its stream up to `acknowledged`:
        the messages it did not acknowledge entirely (a collector cannot decode part of one),
        and one handed out but not sent, go back to the front. How many records that was."""
        back: list[_Message] = []
        while self._in_flight:
            message = self._in_flight.popleft()
            if message.end <= acknowledged:
                self._delivered(message, now)
            else:
                back.append(message)
        requeued = sum(m.records for m in back)
        self.stats.records_sent -= requeued
        self.stats.records_requeued += requeued
        if self._writing is not None and not self._writing_replay:
            back.append(self._writing)
        self._writing = None
        self._writing_control = False
        self._replaying.clear()
        self._control.clear()
        for message in reversed(back):
            self._outbox.appendleft(message)
            self._outbox_records += message.records
        self._bound()
        return requeued

    def closed(self, now: float) -> None:
        """The session ended without failing (a stop): what it sent counts as delivered."""
        while self._in_flight:
            self._delivered(self._in_flight.popleft(), now)
        self._replaying.clear()
        self._control.clear()

    @property
    def _handed_out(self) -> bool:
        return self._writing is not None or self._writing_control

    # -- internals ------------------------------------------------------------------------

    def _delivered(self, message: _Message, now: float) -> None:
        """The collector's host has all of `message`: settled, and kept for replay."""
        self.stats.records_settled += message.records
        if self.replay_window <= 0:
            return
        message.acknowledged_at = now
        self._replay.append(message)
        self._replay_held += message.records

    def _expire_replay(self, now: float) -> None:
        replay = self._replay
        while replay and (
            now - replay[0].acknowledged_at > self.replay_window
            or self._replay_held > self.replay_records
        ):
            self._replay_held -= replay.popleft().records

    def _take_batch(self) -> Batch:
        """Remove and return the oldest records that fit one message, as runs of records
        of the same template (each run becomes one data set)."""
        queue = self._queue
        batch: Batch = []
        used = HEADER.size
        current = -1
        records: list[bytes] = []
        limit = self.max_message_size
        while queue:
            tid, record = queue[0]
            cost = len(record) + (SET_HEADER.size if tid != current else 0)
            if used + cost > limit:
                break
            queue.popleft()
            if tid != current:
                records = []
                batch.append((tid, records))
                current = tid
            records.append(record)
            used += cost
        return batch


def _sequence_of(message: bytes) -> int:
    return int.from_bytes(message[8:12], "big")
