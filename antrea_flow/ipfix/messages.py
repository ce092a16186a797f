"""IPFIX messages (RFC 7011): encoding, stream framing and per-session decoding.

Sans-IO: nothing here touches a socket or an event loop, so TCP, UDP and TLS transports all
reuse it and it is tested with plain bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .elements import REGISTRY, Registry
from .sequences import SequenceCounts, SequenceTracker
from .templates import MIN_TEMPLATE_ID, Field, Template, TemplateError

VERSION = 10
HEADER = struct.Struct(">HHIII")  # version, length, export time, sequence number, domain id
SET_HEADER = struct.Struct(">HH")  # set id, length
TEMPLATE_SET_ID = 2
OPTIONS_TEMPLATE_SET_ID = 3
MAX_MESSAGE_SIZE = 0xFFFF
# Default for UDP: the largest message that fits a 1500-byte MTU behind IPv6 and UDP
# headers (1500 - 40 - 8), so the same default is safe for both address families.
DEFAULT_UDP_MESSAGE_SIZE = 1452

_FIELD_SPEC = struct.Struct(">HH")
_PEN = struct.Struct(">I")
_TEMPLATE_HEADER = struct.Struct(">HH")
_OPTIONS_TEMPLATE_HEADER = struct.Struct(">HHH")
_VERSION_LENGTH = struct.Struct(">HH")
_SEQUENCE_MODULO = 1 << 32


class MessageError(ValueError):
    """Malformed IPFIX input. `reason` is a short stable label used in metrics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class LimitError(MessageError):
    """Valid IPFIX that asks a collector to hold more than its limits allow."""


@dataclass(frozen=True, slots=True)
class TemplateLimits:
    """What one exporter may make a collector hold in templates. Memory is estimated (see
    `template_cost`); the total is shared by all sessions of a collecting process."""

    max_fields: int = 512  # fields of one template
    max_templates: int = 1024  # templates of one observation domain of a session
    max_domains: int = 256  # observation domains of one session
    max_session_bytes: int = 4 << 20  # template memory of one session
    max_total_bytes: int = 256 << 20  # template memory of all sessions


def template_cost(field_count: int) -> int:
    """Bytes a template of `field_count` fields costs a collector, at most: the template
    and its interpreted plan (about 180 bytes a field, measured), plus its share of a compiled
    codec (about 320 more), rounded up."""
    return 512 + 512 * field_count


class TemplateBudget:
    """Template memory of the sessions of one collecting process (owned by its event loop)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def fits(self, more: int) -> bool:
        return self.used + more <= self.limit

    def charge(self, amount: int) -> None:
        self.used += amount


# -- encoding ---------------------------------------------------------------------------


def encode_template_record(template: Template) -> bytes:
    parts = []
    if template.is_options:
        parts.append(
            _OPTIONS_TEMPLATE_HEADER.pack(
                template.template_id, len(template.fields), template.scope_field_count
            )
        )
    else:
        parts.append(_TEMPLATE_HEADER.pack(template.template_id, len(template.fields)))
    for f in template.fields:
        ie = f.element
        if ie.enterprise:
            parts.append(_FIELD_SPEC.pack(ie.element_id | 0x8000, f.length))
            parts.append(_PEN.pack(ie.enterprise))
        else:
            parts.append(_FIELD_SPEC.pack(ie.element_id, f.length))
    return b"".join(parts)


def encode_set(set_id: int, records: Iterable[bytes]) -> bytes:
    body = b"".join(records)
    return SET_HEADER.pack(set_id, SET_HEADER.size + len(body)) + body


def encode_message(
    sets: Sequence[bytes], export_time: int, sequence_number: int, observation_domain_id: int
) -> bytes:
    length = HEADER.size + sum(len(s) for s in sets)
    if length > MAX_MESSAGE_SIZE:
        raise ValueError(f"IPFIX message of {length} bytes exceeds {MAX_MESSAGE_SIZE}")
    header = HEADER.pack(
        VERSION, length, export_time, sequence_number % _SEQUENCE_MODULO, observation_domain_id
    )
    return header + b"".join(sets)


def template_messages(
    templates: Sequence[Template],
    export_time: int,
    sequence_number: int,
    observation_domain_id: int,
    max_message_size: int = MAX_MESSAGE_SIZE,
) -> list[bytes]:
    """Messages announcing `templates`, as few as `max_message_size` allows."""
    messages = []
    sets: dict[int, list[bytes]] = {}
    size = HEADER.size

    def flush() -> None:
        encoded = [encode_set(set_id, records) for set_id, records in sets.items()]
        messages.append(
            encode_message(encoded, export_time, sequence_number, observation_domain_id)
        )
        sets.clear()

    for template in templates:
        set_id = OPTIONS_TEMPLATE_SET_ID if template.is_options else TEMPLATE_SET_ID
        record = encode_template_record(template)
        cost = len(record) + (0 if set_id in sets else SET_HEADER.size)
        if sets and size + cost > max_message_size:
            flush()
            size = HEADER.size
            cost = len(record) + SET_HEADER.size
        if size + cost > max_message_size:
            raise ValueError(f"template {template.template_id} does not fit one message")
        sets.setdefault(set_id, []).append(record)
        size += cost
    if sets:
        flush()
    return messages


def withdrawal_message(
    template_ids: Sequence[int], export_time: int, sequence_number: int, observation_domain_id: int
) -> bytes:
    """A template withdrawal (field count 0) for each id; id 2 withdraws all templates."""
    records = [_TEMPLATE_HEADER.pack(tid, 0) for tid in template_ids]
    return encode_message(
        [encode_set(TEMPLATE_SET_ID, records)], export_time, sequence_number, observation_domain_id
    )


class MessagePacker:
    """Packs encoded data records into as few messages as `max_message_size` allows.

    Tracks the sequence number of one observation domain in one transport session: the
    number of data records sent before each message.
    """

    def __init__(self, observation_domain_id: int, max_message_size: int = MAX_MESSAGE_SIZE):
        if not HEADER.size + SET_HEADER.size < max_message_size <= MAX_MESSAGE_SIZE:
            raise ValueError(f"max message size {max_message_size} is out of range")
        self.observation_domain_id = observation_domain_id
        self.max_message_size = max_message_size
        self.sequence_number = 0

    @property
    def max_record_size(self) -> int:
        return self.max_message_size - HEADER.size - SET_HEADER.size

    def pack(
        self, template_id: int, records: Sequence[bytes], export_time: int
    ) -> tuple[bytes, int]:
        """One message holding as many of `records` as fit, and how many it holds.

        Records must each fit `max_record_size`; the caller drops (and counts) the ones
        that do not.
        """
        budget = self.max_record_size
        used = 0
        count = 0
        for record in records:
            if used + len(record) > budget:
                break
            used += len(record)
            count += 1
        if count == 0:
            raise ValueError(f"record of {len(records[0])} bytes exceeds {budget}")
        return self.pack_sets([(template_id, records[:count])], export_time), count

    def pack_sets(self, runs: Sequence[tuple[int, Sequence[bytes]]], export_time: int) -> bytes:
        """One message with a data set per (template id, records) run; they must fit."""
        sets = [encode_set(template_id, records) for template_id, records in runs]
        message = encode_message(
            sets, export_time, self.sequence_number, self.observation_domain_id
        )
        if len(message) > self.max_message_size:
            raise ValueError(f"{len(message)}-byte message exceeds {self.max_message_size}")
        count = sum(len(records) for _, records in runs)
        self.sequence_number = (self.sequence_number + count) % _SEQUENCE_MODULO
        return message


# -- decoding ---------------------------------------------------------------------------


@dataclass(slots=True)
class DataSet:
    """The records of one data set, decoded with `template`; the first is numbered
    `first_sequence` in its exporter's stream, the others follow."""

    template: Template
    records: list[dict[str, Any]]
    first_sequence: int = 0


@dataclass(slots=True)
class Message:
    export_time: int
    sequence_number: int
    observation_domain_id: int
    data_sets: list[DataSet] = field(default_factory=list)
    templates: list[Template] = field(default_factory=list)  # announced in this message
    withdrawn: list[int] = field(default_factory=list)

    @property
    def record_count(self) -> int:
        return sum(len(ds.records) for ds in self.data_sets)

    def without_seen(self, seen: int, wanted: Sequence[int] = ()) -> Message:
        """The message without its first `seen` records (received before), but for those
        at the positions `wanted`: data sets cut so that their records stay consecutive."""
        keep = set(wanted)
        out = Message(
            self.export_time,
            (self.sequence_number + seen) % _SEQUENCE_MODULO,
            self.observation_domain_id,
            templates=self.templates,
            withdrawn=self.withdrawn,
        )
        position = 0
        for data_set in self.data_sets:
            records = data_set.records
            start = position
            position += len(records)
            for i in sorted(p - start for p in keep if start <= p < position):
                out.data_sets.append(
                    DataSet(data_set.template, [records[i]], data_set.first_sequence + i)
                )
            skip = max(0, min(len(records), seen - start))
            if skip < len(records):
                out.data_sets.append(
                    DataSet(
                        data_set.template,
                        records[skip:],
                        (data_set.first_sequence + skip) % _SEQUENCE_MODULO,
                    )
                )
        return out


def check_header(data: bytes | bytearray) -> int:
    """The message length announced by a header, or MessageError if it cannot be IPFIX."""
    version, length = _VERSION_LENGTH.unpack_from(data, 0)
    if version != VERSION:
        hint = ""
        if data[:2] == b"\x16\x03":
            hint = " (this is a TLS handshake: the exporter uses TLS, this collector does not)"
        elif version in (5, 9):
            hint = f" (NetFlow v{version}, not IPFIX)"
        raise MessageError("bad_version", f"version {version:#06x}, expected 10{hint}")
    if length < HEADER.size:
        raise MessageError("bad_length", f"message length {length} is shorter than its header")
    return length


class StreamFramer:
    """Splits a TCP/TLS byte stream into whole IPFIX messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buffer
        buf += data
        messages: list[bytes] = []
        start = 0
        end = len(buf)
        while end - start >= 4:
            try:
                length = check_header(buf[start : start + 4])
            except MessageError:
                if messages:
                    break  # deliver these; the bad bytes stay and raise on the next feed
                raise
            if end - start < length:
                break
            messages.append(bytes(buf[start : start + length]))
            start += length
        if start:
            del buf[:start]
        return messages

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)


@dataclass(slots=True)
class _DomainState:
    templates: dict[int, Template] = field(default_factory=dict)
    template_expiry: dict[int, float] = field(default_factory=dict)


class SessionDecoder:
    """Template state of one transport session, and decoding of its messages.

    Templates are kept per observation domain, within `limits` (a template or message that
    would exceed them raises LimitError and changes nothing); their memory is charged to
    `budget`, shared with the collector's other sessions, until they are withdrawn, expire
    or the session is `close`d. `template_timeout` (UDP) makes templates expire unless
    refreshed; None (TCP, TLS) keeps them for the life of the session. `sequences` counts
    the data records missing according to sequence numbers, per observation domain (into
    `sequence_counts` when given, shared with other sessions).
    Owned by the thread that feeds it (a collector's event loop).
    """

    def __init__(
        self,
        template_timeout: float | None = None,
        registry: Registry = REGISTRY,
        limits: TemplateLimits | None = None,
        budget: TemplateBudget | None = None,
        sequence_counts: SequenceCounts | None = None,
        track_sequences: bool = True,
    ):
        """`track_sequences`: False where the caller tracks sequence numbers itself (across
        the sessions of an exporter)."""
        self.template_timeout = template_timeout
        self.track_sequences = track_sequences
        self.registry = registry
        self.limits = limits or TemplateLimits()
        self.budget = budget or TemplateBudget(self.limits.max_total_bytes)
        self.sequences = SequenceTracker(
            max_streams=self.limits.max_domains, counts=sequence_counts
        )
        self.cost = 0  # template memory this session holds (charged to `budget`)
        self._domains: dict[int, _DomainState] = {}

    @property
    def lost_records(self) -> int:
        return self.sequences.counts.lost

    def template_count(self) -> int:
        return sum(len(d.templates) for d in self._domains.values())

    def templates(self, observation_domain_id: int) -> dict[int, Template]:
        state = self._domains.get(observation_domain_id)
        return dict(state.templates) if state else {}

    def close(self) -> None:
        """The session ended: give its template memory back to the budget."""
        self.budget.charge(-self.cost)
        self.cost = 0
        self._domains.clear()

    def expire_templates(self, now: float) -> int:
        """Drop templates not refreshed within `template_timeout`; how many were dropped."""
        dropped = 0
        for state in self._domains.values():
            for tid, deadline in list(state.template_expiry.items()):
                if deadline <= now:
                    del state.template_expiry[tid]
                    self._release(state.templates.pop(tid))
                    dropped += 1
        return dropped

    def _release(self, template: Template) -> None:
        cost = template_cost(len(template.fields))
        self.cost -= cost
        self.budget.charge(-cost)

    def decode(self, data: bytes, now: float = 0.0) -> Message:
        """Decode one whole message. On MessageError no state has changed."""
        if len(data) < HEADER.size:
            raise MessageError("truncated", f"{len(data)} bytes is shorter than a header")
        check_header(data)
        _, length, export_time, sequence, domain = HEADER.unpack_from(data, 0)
        if length != len(data):
            raise MessageError("bad_length", f"header says {length} bytes, got {len(data)}")
        state = self._domains.get(domain)
        known = state.templates if state else {}
        # Template changes are staged and applied only if the whole message is valid.
        staged: dict[int, Template | None] = {}
        message = Message(export_time, sequence, domain)
        offset = HEADER.size
        while offset < length:
            if length - offset < SET_HEADER.size:
                raise MessageError("truncated", f"{length - offset} stray bytes after the last set")
            set_id, set_length = SET_HEADER.unpack_from(data, offset)
            if set_length < SET_HEADER.size or offset + set_length > length:
                raise MessageError(
                    "bad_set_length", f"set {set_id} length {set_length} at offset {offset}"
                )
            body_start, set_end = offset + SET_HEADER.size, offset + set_length
            if set_id in (TEMPLATE_SET_ID, OPTIONS_TEMPLATE_SET_ID):
                self._read_templates(data, body_start, set_end, set_id, staged, message)
            elif set_id >= MIN_TEMPLATE_ID:
                template = staged.get(set_id) if set_id in staged else known.get(set_id)
                if template is None:
                    raise MessageError(
                        "unknown_template",
                        f"data set for template {set_id} of domain {domain}, not announced",
                    )
                first = (sequence + message.record_count) % _SEQUENCE_MODULO
                message.data_sets.append(
                    DataSet(template, _read_records(data, body_start, set_end, template), first)
                )
            else:
                raise MessageError("bad_set_id", f"reserved set id {set_id}")
            offset = set_end
        if staged:
            self._check_limits(domain, staged)
            self._commit(domain, staged, now)
        if self.track_sequences and (message.record_count or domain in self._domains):
            self.sequences.observe(domain, sequence, message.record_count)
        return message

    def _read_templates(
        self,
        data: bytes,
        offset: int,
        end: int,
        set_id: int,
        staged: dict[int, Template | None],
        message: Message,
    ) -> None:
        options = set_id == OPTIONS_TEMPLATE_SET_ID
        header = _OPTIONS_TEMPLATE_HEADER if options else _TEMPLATE_HEADER
        # Fewer bytes than a template record header are padding (RFC 7011 3.3.1).
        limit = self.limits.max_fields
        while end - offset >= _TEMPLATE_HEADER.size:
            template_id, field_count = _TEMPLATE_HEADER.unpack_from(data, offset)
            if field_count > limit:
                raise LimitError(
                    "template_fields",
                    f"template {template_id} has {field_count} fields, more than {limit}",
                )
            if field_count == 0:
                offset += _TEMPLATE_HEADER.size
                if template_id == set_id:  # withdraws all (options) templates of the domain
                    self._withdraw_all(message.observation_domain_id, options, staged)
                    message.withdrawn.append(template_id)
                elif template_id >= MIN_TEMPLATE_ID:
                    staged[template_id] = None
                    message.withdrawn.append(template_id)
                elif template_id == 0 and not any(data[offset - 4 : end]):
                    break  # zero padding that happens to be 4 bytes or more
                else:
                    raise MessageError("bad_template", f"withdrawal of reserved id {template_id}")
                continue
            scope_count = 0
            if options:
                if end - offset < header.size:
                    raise MessageError("truncated", "options template header")
                template_id, field_count, scope_count = header.unpack_from(data, offset)
                if scope_count == 0:
                    raise MessageError(
                        "bad_template", f"options template {template_id} has no scope"
                    )
            offset += header.size
            fields = []
            for _ in range(field_count):
                if end - offset < 4:
                    raise MessageError("truncated", f"template {template_id} field list")
                element_id, field_length = _FIELD_SPEC.unpack_from(data, offset)
                offset += 4
                enterprise = 0
                if element_id & 0x8000:
                    if end - offset < 4:
                        raise MessageError("truncated", f"template {template_id} enterprise number")
                    (enterprise,) = _PEN.unpack_from(data, offset)
                    offset += 4
                    element_id &= 0x7FFF
                fields.append(Field(self.registry.by_id(enterprise, element_id), field_length))
            try:
                template = Template(template_id, fields, scope_count)
            except TemplateError as exc:
                raise MessageError("bad_template", str(exc)) from None
            staged[template_id] = template
            message.templates.append(template)

    def _withdraw_all(self, domain: int, options: bool, staged: dict[int, Template | None]) -> None:
        state = self._domains.get(domain)
        current: dict[int, Template | None] = dict(state.templates) if state else {}
        current.update(staged)
        for tid, template in current.items():
            if template is not None and template.is_options == options:
                staged[tid] = None

    def _check_limits(self, domain: int, staged: dict[int, Template | None]) -> None:
        """Raise LimitError if committing `staged` would exceed a limit; changes nothing."""
        limits = self.limits
        state = self._domains.get(domain)
        if state is None and len(self._domains) >= limits.max_domains:
            raise LimitError(
                "domains", f"observation domain {domain} is one more than {limits.max_domains}"
            )
        current = state.templates if state else {}
        count = len(current)
        cost = 0
        for tid, template in staged.items():
            old = current.get(tid)
            if old is not None:
                count -= 1
                cost -= template_cost(len(old.fields))
            if template is not None:
                count += 1
                cost += template_cost(len(template.fields))
        if count > limits.max_templates:
            raise LimitError(
                "templates",
                f"{count} templates in observation domain {domain}, more than "
                f"{limits.max_templates}",
            )
        if cost > 0 and self.cost + cost > limits.max_session_bytes:
            raise LimitError(
                "session_template_memory",
                f"templates of {self.cost + cost} bytes in one session, more than "
                f"{limits.max_session_bytes}",
            )
        if cost > 0 and not self.budget.fits(cost):
            raise LimitError(
                "template_memory",
                f"the collector holds {self.budget.used} bytes of templates; {cost} more "
                f"would exceed {self.budget.limit}",
            )

    def _commit(self, domain: int, staged: dict[int, Template | None], now: float) -> None:
        state = self._domains.setdefault(domain, _DomainState())
        for tid, template in staged.items():
            old = state.templates.pop(tid, None)
            if old is not None:
                self._release(old)
            state.template_expiry.pop(tid, None)
            if template is not None:
                state.templates[tid] = template
                cost = template_cost(len(template.fields))
                self.cost += cost
                self.budget.charge(cost)
                if self.template_timeout is not None:
                    state.template_expiry[tid] = now + self.template_timeout


def _read_records(data: bytes, offset: int, end: int, template: Template) -> list[dict[str, Any]]:
    decode = template.decoder_now()
    min_length = template.min_record_length
    records = []
    try:
        while end - offset >= min_length:
            record, offset = decode(data, offset)
            records.append(record)
    except (IndexError, struct.error):
        offset = end + 1
    if offset > end or any(data[offset:end]):
        raise MessageError(
            "truncated_record", f"record of template {template.template_id} overruns its set"
        )
    template.decoded(len(records))
    return records
