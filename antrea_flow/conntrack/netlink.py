"""ctnetlink: dump one network namespace's conntrack table, filtered by zone in the kernel."""

from __future__ import annotations

import errno
import socket
import struct

import numpy as np

from . import netns

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
CTA_ZONE = 18
SO_RCVBUFFORCE = 33

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NFGEN = struct.Struct("=BBH")  # family, version, resource id (big endian, unused)
_NLA = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")
_RECV_SIZE = 1 << 17
_SOCKET_BUFFER = 8 << 20


_HEADER = np.dtype([("length", "=u4"), ("type", "=u2")])
# Shorter runs are framed one message at a time: numpy would cost more than it saves.
_MIN_RUN = 8


class ConntrackError(OSError):
    pass


class Frames:
    """The data messages of one dump: one contiguous buffer, and the word offsets of the
    messages grouped by message length (what the parser needs to find shapes)."""

    __slots__ = ("buffer", "by_length", "count")

    def __init__(self, buffer: bytearray, by_length: dict[int, list[int]], count: int):
        self.buffer = buffer
        self.by_length = by_length
        self.count = count


class ConntrackDumper:
    """Dumps the conntrack entries of one zone in one network namespace."""

    def __init__(self, netns_name: str | None, zone: int):
        self.netns_name = netns_name
        self.zone = zone
        self._sock = netns.socket_in(
            netns_name, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER
        )
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _SOCKET_BUFFER)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        self._sock.bind((0, 0))
        self._sequence = 0
        self._capacity = 1 << 20  # grows to the largest dump seen

    def close(self) -> None:
        self._sock.close()

    def _request(self) -> bytes:
        # The zone attribute asks the kernel to filter (for IPv4 and IPv6 alike); kernels
        # without dump filters ignore it, which is why the agent checks the zone again.
        zone = _NLA.pack(6, CTA_ZONE) + struct.pack(">H", self.zone) + b"\0\0"
        payload = _NFGEN.pack(socket.AF_UNSPEC, 0, 0) + zone
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        header = _NLMSG.pack(
            _NLMSG.size + len(payload),
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            self._sequence,
            0,
        )
        return header + payload

    def dump(self) -> Frames:
        """Dump the table once, completely (a failed dump raises: never half a table)."""
        for attempt in range(3):
            try:
                self._sock.send(self._request())
                return self._receive()
            except ConntrackError as exc:
                # EBUSY/EINTR: the table changed under a dump that has to restart.
                if exc.errno not in (errno.EINTR, errno.EBUSY) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _receive(self) -> Frames:
        buffer = bytearray(self._capacity)
        by_length: dict[int, list[int]] = {}
        count = 0
        end = 0
        unpack = _NLMSG.unpack_from
        while True:
            if len(buffer) - end < _RECV_SIZE:
                buffer.extend(bytes(len(buffer)))
            view = memoryview(buffer)
            try:
                size = self._sock.recv_into(view[end:], _RECV_SIZE)
            finally:
                view.release()
            offset, stop = end, end + size
            while offset < stop:
                taken, offset = _same_length_run(buffer, offset, stop, by_length)
                count += taken
                if offset >= stop:
                    break
                length, kind = unpack(buffer, offset)[:2]
                if kind == NLMSG_DONE:
                    del buffer[offset:]
                    self._capacity = max(self._capacity, len(buffer) + _RECV_SIZE)
                    return Frames(buffer, by_length, count)
                if kind == NLMSG_ERROR:
                    (code,) = _ERRNO.unpack_from(buffer, offset + _NLMSG.size)
                    name = errno.errorcode.get(-code, str(code))
                    raise ConntrackError(-code, f"conntrack dump failed: {name}")
                if length < _NLMSG.size:
                    raise ConntrackError(errno.EPROTO, "malformed netlink message")
                rows = by_length.get(length)
                if rows is None:
                    rows = by_length[length] = []
                rows.append(offset >> 2)
                count += 1
                offset += (length + 3) & ~3
            end = stop


def _same_length_run(
    buffer: bytearray, offset: int, stop: int, by_length: dict[int, list[int]]
) -> tuple[int, int]:
    """Frame at once the data messages from `offset` on that have the length of the first,
    up to the first one that has not (or is not a data message) or `stop`: most of a dump
    is runs of entries of one layout. How many it took, and where the rest begins."""
    length, kind = _NLMSG.unpack_from(buffer, offset)[:2]
    step = (length + 3) & ~3
    if kind in (NLMSG_DONE, NLMSG_ERROR) or length < _NLMSG.size:
        return 0, offset
    fits = (stop - offset) // step
    if fits < _MIN_RUN:
        return 0, offset
    headers = np.ndarray((fits,), _HEADER, buffer, offset, (step,))
    same = (headers["length"] == length) & (headers["type"] != NLMSG_DONE)
    same &= headers["type"] != NLMSG_ERROR
    del headers  # a view: the buffer cannot grow while it lives
    taken = fits if same.all() else int(same.argmin())
    by_length.setdefault(length, []).extend(range(offset >> 2, (offset + taken * step) >> 2,
                                                  step >> 2))  # fmt: skip
    return taken, offset + taken * step
