"""Framing of a ctnetlink dump: the messages of each datagram found and grouped by length,
runs of one length at once, whatever the mix of lengths, datagram boundaries and ends."""

from __future__ import annotations

import errno
import random
import socket
import struct
import threading

import pytest

from antrea_flow.conntrack.netlink import (
    NLMSG_DONE,
    NLMSG_ERROR,
    ConntrackDumper,
    ConntrackError,
)

_HEADER = struct.Struct("=IHHII")
DATA = (1 << 8) | 0  # IPCTNL_MSG_CT_NEW: what a dump's entries are


def message(length: int, kind: int = DATA, payload: bytes = b"") -> bytes:
    body = payload.ljust(length - _HEADER.size, b"\xab")
    return (_HEADER.pack(length, kind, 2, 1, 0) + body).ljust((length + 3) & ~3, b"\0")


def done() -> bytes:
    return message(20, NLMSG_DONE, b"\0\0\0\0")


def dumper_reading(datagrams: list[bytes]) -> ConntrackDumper:
    """A dumper whose socket yields `datagrams`, as the kernel's netlink socket would."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def send():
        with theirs:
            for datagram in datagrams:
                theirs.send(datagram)

    threading.Thread(target=send, daemon=True).start()
    dumper = ConntrackDumper.__new__(ConntrackDumper)
    dumper._sock = ours
    dumper._capacity = 1 << 17  # small: the buffer grows while the dump is read
    return dumper


def one_at_a_time(datagrams: list[bytes]) -> dict[int, list[int]]:
    """The expected grouping: word offsets by length, walking message by message."""
    by_length: dict[int, list[int]] = {}
    buffer = b"".join(datagrams)
    offset = 0
    while True:
        length, kind = _HEADER.unpack_from(buffer, offset)[:2]
        if kind == NLMSG_DONE:
            return by_length
        by_length.setdefault(length, []).append(offset // 4)
        offset += (length + 3) & ~3


@pytest.mark.parametrize("seed", range(20))
def test_mixed_lengths_across_datagrams_are_framed_as_one_at_a_time(seed):
    rng = random.Random(seed)
    messages = []
    while len(messages) < 3000:
        # Runs of one layout (long and short), as a table of TCP and UDP entries gives.
        length = rng.choice((200, 212, 236, 258, 300))
        messages += [message(length)] * rng.choice((1, 2, 7, 8, 9, 50, 400))
    datagrams, at = [], 0
    while at < len(messages):
        size = rng.randint(1, 120)
        datagrams.append(b"".join(messages[at : at + size]))
        at += size
    datagrams[-1] += done()
    frames = dumper_reading(datagrams)._receive()
    assert frames.by_length == one_at_a_time(datagrams)
    assert frames.count == len(messages)
    assert bytes(frames.buffer) == b"".join(messages)


def test_an_error_inside_a_run_fails_the_dump():
    run = [message(200)] * 40
    failure = message(36, NLMSG_ERROR, struct.pack("=i", -errno.EBUSY) + b"\0" * 12)
    datagrams = [b"".join(run[:20]) + failure + b"".join(run[20:]) + done()]
    with pytest.raises(ConntrackError) as caught:
        dumper_reading(datagrams)._receive()
    assert caught.value.errno == errno.EBUSY


def test_the_end_inside_a_run_ends_the_dump():
    datagrams = [b"".join([message(200)] * 30) + done() + b"".join([message(200)] * 30)]
    frames = dumper_reading(datagrams)._receive()
    assert frames.count == 30 and list(frames.by_length) == [200]
