"""Coverage-guided fuzzing of the collector's stream framing (`StreamFramer`), with atheris.

An input is one TCP session's bytes and where the network cut them:

    cut count (1 byte, low 4 bits), cuts (2 bytes each, big-endian), stream

The stream, cut into chunks at those offsets (modulo its length), goes through a framer
and a session decoder exactly as `_StreamSession._frames` does (each chunk's whole messages
decoded in turn, then an empty feed, the session closed at the first MessageError), and
must give the same messages as the whole stream fed at once, up to the first error.

    python test/fuzz/fuzz_framing.py [libFuzzer flags] CORPUS_DIR
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence

import atheris
import fuzzkit

with atheris.instrument_imports(include=["antrea_flow"]):
    from ipfixcheck import CheckedSession

    from antrea_flow.ipfix.messages import (
        HEADER,
        VERSION,
        MessageError,
        SessionDecoder,
        StreamFramer,
    )

_CUT = struct.Struct(">H")
_VERSION_LENGTH = struct.Struct(">HH")


def encode_input(cuts: Sequence[int], stream: bytes) -> bytes:
    """An input of this harness: at most 15 cut offsets, then the stream."""
    return bytes([len(cuts)]) + b"".join(_CUT.pack(c) for c in cuts) + stream


def _chunks(data: bytes) -> list[bytes]:
    head = 1 + (data[0] & 0x0F) * _CUT.size
    stream = data[head:]
    if not stream:
        return []
    cuts = {cut % len(stream) for (cut,) in _CUT.iter_unpack(data[1:head])}
    bounds = [0, *sorted(cuts - {0}), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def _frame(chunks: list[bytes]) -> tuple[list[bytes], bool, int]:
    """The messages framed from `chunks`, whether framing then failed, and the bytes left
    (unless it failed: then they depend on how much of the stream had come)."""
    framer = StreamFramer()
    messages: list[bytes] = []
    try:
        for chunk in chunks:
            messages += framer.feed(chunk)
            messages += framer.feed(b"")
    except MessageError:
        return messages, True, -1
    return messages, False, framer.pending_bytes


def _collect(chunks: list[bytes], session: CheckedSession) -> None:
    """What the collector does with a session's chunks (`_StreamSession._frames`)."""
    framer = StreamFramer()
    for chunk in chunks:
        try:
            for raw in framer.feed(chunk):
                version, length = _VERSION_LENGTH.unpack_from(raw, 0)
                assert version == VERSION and length == len(raw) >= HEADER.size
                if session.decode(raw, 0.0) is None:
                    return  # a MessageError: the collector closes the session
            framer.feed(b"")
        except MessageError:
            return


def test_one_input(data: bytes) -> None:
    if not data:
        return
    chunks = _chunks(data)
    whole = _frame([b"".join(chunks)])
    assert _frame(chunks) == whole, "framing depends on where the stream was cut"
    session = CheckedSession(SessionDecoder())
    _collect(chunks, session)
    session.close()


if __name__ == "__main__":
    fuzzkit.run("framing", test_one_input)
