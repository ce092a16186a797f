"""Coverage-guided fuzzing of IPFIX message decoding (`SessionDecoder`), with atheris.

An input is a short life of two sessions sharing one template budget, so that templates
announced by one message are used, refreshed, withdrawn or expired by the next:

    flags (1 byte), then steps: op (1 byte), length (2 bytes, big-endian), message

flags: bit 0 makes the sessions UDP ones (templates expire after TEMPLATE_TIMEOUT), bit 1
gives them tight limits, so that limits are met. op: bits 0-1 say what the step does
(DECODE; COMPILE_ANNOUNCED, decode and compile the templates the message announced;
COMPILE_USED, decode, compile the templates its data sets used and compare both codecs;
EXPIRE, expire templates, the message ignored), bit 2 picks the second session, and bits
3-7 advance the clock by that many CLOCK_STEP seconds first. At the end both sessions
close and must give all their template memory back.

    python test/fuzz/fuzz_decoder.py [libFuzzer flags] CORPUS_DIR
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

import atheris
import fuzzkit

with atheris.instrument_imports(include=["antrea_flow"]):
    from ipfixcheck import CheckedSession

    from antrea_flow.ipfix.messages import SessionDecoder, TemplateBudget, TemplateLimits

UDP = 0x01
TIGHT_LIMITS = 0x02
DECODE, COMPILE_ANNOUNCED, COMPILE_USED, EXPIRE = range(4)
SECOND_SESSION = 0x04
CLOCK_STEP = 8.0  # seconds per unit of an op's bits 3-7: up to 248 s a step
TEMPLATE_TIMEOUT = 60.0
_STEP = struct.Struct(">BH")

# Small enough that a short input meets each limit: the fields of one template, the
# templates and domains of one session, one session's memory and the shared budget.
_TIGHT = TemplateLimits(
    max_fields=8,
    max_templates=4,
    max_domains=2,
    max_session_bytes=16 << 10,
    max_total_bytes=24 << 10,
)


def encode_input(flags: int, steps: Sequence[tuple[int, bytes]]) -> bytes:
    """An input of this harness: `steps` are (op, message) pairs."""
    return bytes([flags]) + b"".join(_STEP.pack(op, len(m)) + m for op, m in steps)


def _steps(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 1
    while len(data) - offset >= _STEP.size:
        op, length = _STEP.unpack_from(data, offset)
        offset += _STEP.size
        yield op, data[offset : offset + length]
        offset += length


def test_one_input(data: bytes) -> None:
    if not data:
        return
    flags = data[0]
    limits = _TIGHT if flags & TIGHT_LIMITS else TemplateLimits()
    timeout = TEMPLATE_TIMEOUT if flags & UDP else None
    budget = TemplateBudget(limits.max_total_bytes)
    sessions = [CheckedSession(SessionDecoder(timeout, limits=limits, budget=budget)) for _ in "ab"]
    now = 0.0
    for op, message in _steps(data):
        session = sessions[1 if op & SECOND_SESSION else 0]
        now += (op >> 3) * CLOCK_STEP
        action = op & 0x03
        if action == EXPIRE:
            session.expire(now)
        elif (decoded := session.decode(message, now)) is None:
            pass  # a MessageError, checked to have changed nothing
        elif action == COMPILE_ANNOUNCED:
            for template in decoded.templates:
                template.compile()
        elif action == COMPILE_USED:
            session.compile_and_compare(message, decoded)
        assert budget.used == sum(s.decoder.cost for s in sessions)
    for session in sessions:
        session.close()
    assert budget.used == 0, f"{budget.used} bytes of templates left after closing"


if __name__ == "__main__":
    fuzzkit.run("decoder", test_one_input)
