"""A SessionDecoder driven by a fuzz harness, with what must hold whatever the input checked.

Only MessageError (or its LimitError) may come out of decoding, and it must leave the
session's templates, memory and sequence counts as they were. A decoded message has records
keyed by str with plain values, a compiled and an interpreted codec decode its data sets
alike, and the memory a session says it holds is what its templates cost. Anything else
raises (an AssertionError or the product's own exception), which libFuzzer reports as a
crash with the input.

Imported by the harnesses inside `atheris.instrument_imports()`, so that the antrea_flow
modules it imports first are instrumented.
"""

from __future__ import annotations

import struct
from typing import Any

from antrea_flow.ipfix.messages import (
    HEADER,
    MIN_TEMPLATE_ID,
    OPTIONS_TEMPLATE_SET_ID,
    SET_HEADER,
    TEMPLATE_SET_ID,
    Message,
    MessageError,
    SessionDecoder,
    template_cost,
)
from antrea_flow.ipfix.templates import _interpreted_decoder

_PLAIN_VALUES = (int, float, str, bytes)  # bool is an int
_DOUBLE = struct.Struct(">d")
_WITHDRAW_ALL = (TEMPLATE_SET_ID, OPTIONS_TEMPLATE_SET_ID)


class CheckedSession:
    """One session's decoder and the observation domains its messages named.

    Owned by the harness's single thread.
    """

    def __init__(self, decoder: SessionDecoder):
        self.decoder = decoder
        # Every domain that may hold templates: they are only created by a decoded message.
        self.domains: set[int] = set()

    def decode(self, data: bytes, now: float) -> Message | None:
        """The decoded message, or None for a MessageError (after checking it changed
        nothing)."""
        decoder = self.decoder
        before = self._state()
        try:
            message = decoder.decode(data, now)
        except MessageError:
            assert self._state() == before, "a MessageError changed the session's state"
            return None
        self.domains.add(message.observation_domain_id)
        _check_records(message)
        _check_withdrawals(decoder, message)
        self.check_accounting()
        return message

    def compile_and_compare(self, data: bytes, message: Message) -> None:
        """Compile the templates `message` used and check that both codecs decode its data
        sets to the records it holds."""
        spans = _data_set_spans(data)
        assert len(spans) == len(message.data_sets), "data sets decoded != data sets sent"
        for data_set, (start, end) in zip(message.data_sets, spans, strict=True):
            template = data_set.template
            compiled = template.compile().decode
            interpreted = _interpreted_decoder(template.fields, template.keys)
            expected = _comparable(data_set.records)
            for decode in (interpreted, compiled):
                records = _walk(decode, data, start, end, template.min_record_length)
                assert _comparable(records) == expected, (
                    f"codecs disagree on template {template.template_id}: {template.fields}"
                )

    def expire(self, now: float) -> None:
        before = self.decoder.template_count()
        dropped = self.decoder.expire_templates(now)
        assert dropped == before - self.decoder.template_count()
        if self.decoder.template_timeout is None:
            assert dropped == 0, "templates of a TCP session expired"
        self.check_accounting()

    def check_accounting(self) -> None:
        """The memory the session holds is what its templates cost, within its limits."""
        decoder = self.decoder
        limits = decoder.limits
        count = cost = 0
        for domain in self.domains:
            templates = decoder.templates(domain)
            assert len(templates) <= limits.max_templates
            count += len(templates)
            cost += sum(template_cost(len(t.fields)) for t in templates.values())
        assert decoder.template_count() == count
        assert decoder.cost == cost, f"session holds {cost} bytes of templates, says {decoder.cost}"
        assert cost <= limits.max_session_bytes
        assert 0 <= decoder.budget.used <= decoder.budget.limit

    def close(self) -> None:
        self.decoder.close()
        assert self.decoder.cost == 0
        assert self.decoder.template_count() == 0

    def _state(self) -> tuple:
        decoder = self.decoder
        templates = {d: decoder.templates(d) for d in self.domains}
        counts = (decoder.template_count(), decoder.cost, decoder.budget.used)
        return templates, counts, decoder.lost_records


def _check_records(message: Message) -> None:
    for data_set in message.data_sets:
        for record in data_set.records:
            assert len(record) == len(data_set.template.fields)
            for key, value in record.items():
                assert type(key) is str, f"record key {key!r}"
                assert isinstance(value, _PLAIN_VALUES), f"{key}: {type(value).__name__}"


def _check_withdrawals(decoder: SessionDecoder, message: Message) -> None:
    """A withdrawn template is gone unless the same message announced it too."""
    held = decoder.templates(message.observation_domain_id)
    announced = {t.template_id for t in message.templates}
    for tid in message.withdrawn:
        if tid >= MIN_TEMPLATE_ID:
            assert tid not in held or tid in announced, f"template {tid} survived withdrawal"
            continue
        assert tid in _WITHDRAW_ALL, f"withdrawal of reserved id {tid}"
        options = tid == OPTIONS_TEMPLATE_SET_ID  # all options templates, or all data ones
        for template in held.values():
            if template.is_options == options:
                assert template.template_id in announced, f"{template} survived withdrawal {tid}"


def _data_set_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the body of each data set of a message that decoded."""
    spans = []
    offset = HEADER.size
    while offset < len(data):
        set_id, length = SET_HEADER.unpack_from(data, offset)
        if set_id >= MIN_TEMPLATE_ID:
            spans.append((offset + SET_HEADER.size, offset + length))
        offset += length
    return spans


def _walk(decode, data: bytes, offset: int, end: int, min_length: int) -> list[dict[str, Any]]:
    records = []
    while end - offset >= min_length:
        record, offset = decode(data, offset)
        records.append(record)
    return records


def _comparable(records: list[dict[str, Any]]) -> list[list[tuple[str, Any]]]:
    """Records as lists of items, floats as their bits so that NaN equals NaN."""
    return [
        [(k, _DOUBLE.pack(v) if type(v) is float else v) for k, v in record.items()]
        for record in records
    ]
