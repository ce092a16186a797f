"""A columnar parser for ctnetlink dumps: every field the agent needs, for every entry, as
numpy arrays, without a Python loop over attributes.

The kernel lays out every conntrack entry of the same kind (family, protocol, which
extensions it carries) identically: same attributes, same order, same offsets. The parser
walks the attributes of the first entry of each such *shape* once and compiles a plan: the
positions of all attribute headers and of every needed value. Netlink attributes are 4-byte
aligned, so the dump is read as 32-bit words and each plan gathers the words of all entries of
that length at once. An entry is accepted by a shape only if all its attribute headers equal
the shape's, so a different layout can never be misread; entries matching no known shape teach
the parser a new one.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .netlink import Frames

NLMSG_HEADER = 16
NFGEN_HEADER = 4
_PAYLOAD = NLMSG_HEADER + NFGEN_HEADER
_NLA_F_NESTED = 0x8000
_NLA_TYPE_MASK = 0x3FFF
MAX_SHAPES = 4096
_CHECK_ROWS = 8192  # entries whose attribute headers are checked at once

# Attribute numbers (linux/netfilter/nfnetlink_conntrack.h).
_ORIG, _REPLY = 1, 2
_TUPLE_IP, _TUPLE_PROTO = 1, 2
_V4_SRC, _V4_DST, _V6_SRC, _V6_DST = 1, 2, 3, 4
_PROTO_NUM, _SRC_PORT, _DST_PORT = 1, 2, 3
_ICMP_TYPE, _ICMP_CODE, _ICMPV6_TYPE, _ICMPV6_CODE = 5, 6, 8, 9
_STATUS, _PROTOINFO, _MARK, _COUNTERS_ORIG, _COUNTERS_REPLY = 3, 4, 8, 9, 10
_ID, _ZONE, _TIMESTAMP, _LABELS = 12, 18, 20, 22
_PACKETS, _BYTES, _PACKETS32, _BYTES32 = 1, 2, 3, 4
_PROTOINFO_TCP, _TCP_STATE = 1, 1
_TS_START, _TS_STOP = 1, 2

TCP_STATES = (
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
)
TCP_TIME_WAIT = 7
TCP_CLOSE = 8
IPS_DYING = 1 << 9


class Entry(NamedTuple):
    """One conntrack entry. Addresses are packed bytes (4 or 16); for ICMP the source port
    is 0 and the destination port is type * 256 + code, as NetFlow/IPFIX collectors expect."""

    proto: int
    orig_src: bytes
    orig_dst: bytes
    orig_sport: int
    orig_dport: int
    reply_src: bytes
    reply_dst: bytes
    reply_sport: int
    reply_dport: int
    zone: int
    status: int
    mark: int
    labels: bytes  # raw CTA_LABELS (16 bytes), b"" when the entry has none
    orig_packets: int
    orig_bytes: int
    reply_packets: int
    reply_bytes: int
    start_ns: int  # 0 without nf_conntrack_timestamp
    stop_ns: int  # set once the entry is dying
    tcp_state: int  # index into TCP_STATES; -1 for other protocols
    id: int


# The numeric columns every dump has, for every entry (vectorised filtering and diffing).
NUMERIC = (
    "proto",
    "orig_sport",
    "orig_dport",
    "reply_sport",
    "reply_dport",
    "zone",
    "status",
    "mark",
    "orig_packets",
    "orig_bytes",
    "reply_packets",
    "reply_bytes",
    "start_ns",
    "stop_ns",
    "tcp_state",
    "id",
)
_BYTE_FIELDS = ("orig_src", "orig_dst", "reply_src", "reply_dst", "labels")


class ParseError(ValueError):
    pass


def _walk(buf, offset: int, end: int, path: tuple[int, ...], out: list) -> None:
    """Append (offset, path, length) of every attribute in buf[offset:end], depth first."""
    while end - offset >= 4:
        length, kind = struct.unpack_from("=HH", buf, offset)
        if length < 4 or offset + length > end:
            raise ParseError(f"attribute of length {length} overruns its container")
        here = (*path, kind & _NLA_TYPE_MASK)
        out.append((offset, here, length))
        if kind & _NLA_F_NESTED:
            _walk(buf, offset + 4, offset + length, here, out)
        offset += (length + 3) & ~3


@dataclass(frozen=True, slots=True)
class _Read:
    """Where one value is: "int" (`size` bits at the start of `word`), "u64" (two words),
    "bytes" (`size` bytes from `word`), "icmp" (type byte in `word`, code byte in
    `second`), or "const" (`value`: the entry does not carry the attribute)."""

    kind: str
    word: int = 0
    size: int = 0
    value: int = 0
    second: int = 0


def _plan(attributes: list, start: int) -> dict[str, _Read]:
    """Where each Entry field is in a message whose attributes are `attributes`."""
    at = {path: (offset - start + 4) // 4 for offset, path, _ in attributes}
    sizes = {path: length - 4 for _, path, length in attributes}

    def integer(path: tuple[int, ...], width: int, default: int = 0) -> _Read:
        if path not in at:
            return _Read("const", value=default)
        return _Read("int", at[path], width)

    def counter(direction: int, kind: int, kind32: int) -> _Read:
        if (direction, kind) in at:
            return _Read("u64", at[(direction, kind)])
        return integer((direction, kind32), 32)

    def address(root: int, v4: int, v6: int) -> _Read:
        for leaf, size in ((v4, 4), (v6, 16)):
            path = (root, _TUPLE_IP, leaf)
            if path in at:
                return _Read("bytes", at[path], size)
        return _Read("bytes", 0, 0)

    def dport(root: int) -> _Read:
        pr = (root, _TUPLE_PROTO)
        if (*pr, _DST_PORT) in at:
            return _Read("int", at[(*pr, _DST_PORT)], 16)
        for type_leaf, code_leaf in ((_ICMP_TYPE, _ICMP_CODE), (_ICMPV6_TYPE, _ICMPV6_CODE)):
            if (*pr, type_leaf) in at:
                return _Read("icmp", at[(*pr, type_leaf)], second=at.get((*pr, code_leaf), 0))
        return _Read("const", value=0)

    labels_path = (_LABELS,)
    return {
        "proto": integer((_ORIG, _TUPLE_PROTO, _PROTO_NUM), 8),
        "orig_src": address(_ORIG, _V4_SRC, _V6_SRC),
        "orig_dst": address(_ORIG, _V4_DST, _V6_DST),
        "orig_sport": integer((_ORIG, _TUPLE_PROTO, _SRC_PORT), 16),
        "orig_dport": dport(_ORIG),
        "reply_src": address(_REPLY, _V4_SRC, _V6_SRC),
        "reply_dst": address(_REPLY, _V4_DST, _V6_DST),
        "reply_sport": integer((_REPLY, _TUPLE_PROTO, _SRC_PORT), 16),
        "reply_dport": dport(_REPLY),
        "zone": integer((_ZONE,), 16),
        "status": integer((_STATUS,), 32),
        "mark": integer((_MARK,), 32),
        "labels": (
            _Read("bytes", at[labels_path], sizes[labels_path])
            if labels_path in at
            else _Read("bytes", 0, 0)
        ),
        "orig_packets": counter(_COUNTERS_ORIG, _PACKETS, _PACKETS32),
        "orig_bytes": counter(_COUNTERS_ORIG, _BYTES, _BYTES32),
        "reply_packets": counter(_COUNTERS_REPLY, _PACKETS, _PACKETS32),
        "reply_bytes": counter(_COUNTERS_REPLY, _BYTES, _BYTES32),
        "start_ns": (
            _Read("u64", at[(_TIMESTAMP, _TS_START)])
            if (_TIMESTAMP, _TS_START) in at
            else _Read("const")
        ),
        "stop_ns": (
            _Read("u64", at[(_TIMESTAMP, _TS_STOP)])
            if (_TIMESTAMP, _TS_STOP) in at
            else _Read("const")
        ),
        "tcp_state": integer((_PROTOINFO, _PROTOINFO_TCP, _TCP_STATE), 8, default=-1),
        "id": integer((_ID,), 32),
    }


class _Shape:
    """One message layout: its length, attribute headers and value plan."""

    def __init__(self, words: np.ndarray, word_offset: int, length: int, buf):
        attributes: list = []
        start = word_offset * 4
        _walk(buf, start + _PAYLOAD, start + length, (), attributes)
        self.length = length
        self.header_words = np.array([(o - start) // 4 for o, _, _ in attributes], dtype=np.int64)
        self.expected = words[word_offset + self.header_words]
        self.plan = _plan(attributes, start)


def _swap(column: np.ndarray) -> np.ndarray:
    """Big-endian 32-bit words read as little-endian, back to their values."""
    return column.byteswap()


class _Group:
    """The entries of one shape: gathered words, and their values on demand."""

    def __init__(self, shape: _Shape, rows: np.ndarray, words: np.ndarray):
        self.shape = shape
        self.rows = rows  # word offsets of the messages
        self.words = words

    def column(self, name: str) -> np.ndarray:
        read = self.shape.plan[name]
        n = len(self.rows)
        if read.kind == "const":
            return np.full(n, read.value, dtype=np.int64)
        if read.kind == "int":
            value = _swap(self.words[self.rows + read.word]).astype(np.int64)
            return value >> (32 - read.size) if read.size < 32 else value
        if read.kind == "icmp":
            kind = _swap(self.words[self.rows + read.word]).astype(np.int64) >> 24
            code = (
                _swap(self.words[self.rows + read.second]).astype(np.int64) >> 24
                if read.second
                else 0
            )
            return kind << 8 | code
        if read.kind == "u64":
            # int64 like every column (counters and nanosecond times stay below 2**63)
            high = _swap(self.words[self.rows + read.word]).astype(np.int64)
            low = _swap(self.words[self.rows + read.word + 1]).astype(np.int64)
            return (high << 32) | low
        raise AssertionError(read.kind)

    def byte_column(self, name: str) -> list[bytes]:
        read = self.shape.plan[name]
        if read.size == 0:
            return [b""] * len(self.rows)
        count = read.size // 4
        block = self.words[self.rows[:, None] + (read.word + np.arange(count))]
        return np.ascontiguousarray(block).view(f"V{read.size}").ravel().tolist()


class _Columns(dict):
    """A dump's numeric columns by name, each made when first read: a poll of a table
    that did not change reads a few of them."""

    def __init__(self, make: Callable[[str], np.ndarray]):
        super().__init__()
        self._make = make

    def __missing__(self, name: str) -> np.ndarray:
        if name not in NUMERIC:
            raise KeyError(name)
        column = self[name] = self._make(name)
        return column


def _column(groups: list[_Group], entries: list[Entry] | None, name: str) -> np.ndarray:
    if entries is not None:
        return np.array([getattr(e, name) for e in entries], dtype=np.int64)
    parts = [g.column(name) for g in groups]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class Dump:
    """One complete dump: numeric columns over all entries (numpy, in entry order, made
    when first read), and the entries themselves on demand."""

    def __init__(self, groups: list[_Group], entries: list[Entry] | None = None):
        self._groups = groups
        self._entries = entries
        # Not a method of the dump: that would be a reference cycle, and a dump (its whole
        # buffer) would then live until the garbage collector's next full pass.
        self.columns: dict[str, np.ndarray] = _Columns(functools.partial(_column, groups, entries))
        if entries is not None:
            self.size = len(entries)
            return
        self.size = sum(len(g.rows) for g in groups)
        self._starts = np.cumsum([0] + [len(g.rows) for g in groups])

    @classmethod
    def of(cls, entries: list[Entry]) -> Dump:
        """A dump holding `entries` (for building tables by hand)."""
        return cls([], list(entries))

    def __len__(self) -> int:
        return self.size

    def packed(self, name: str, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The field `name` (an address, or the labels) of the entries at `index`, as
        16-byte values (an IPv4 address in the first 4, zeros where there are no labels) and
        whether each has all 16: columns, without a Python object per entry."""
        out = np.zeros((len(index), 4), np.uint32)
        wide = np.zeros(len(index), bool)
        if self._entries is not None:
            for i, number in enumerate(index.tolist()):
                raw = getattr(self._entries[number], name)
                out[i, : len(raw) // 4] = np.frombuffer(raw, np.uint32)
                wide[i] = len(raw) == 16
            return out.view("V16").ravel(), wide
        for number, group in enumerate(self._groups):
            lo, hi = int(self._starts[number]), int(self._starts[number + 1])
            mine = np.flatnonzero((index >= lo) & (index < hi))
            read = group.shape.plan[name]
            if not len(mine) or read.size == 0:
                continue
            count = read.size // 4
            rows = group.rows[index[mine] - lo]
            out[mine, :count] = group.words[rows[:, None] + (read.word + np.arange(count))]
            wide[mine] = read.size == 16
        return out.view("V16").ravel(), wide

    def entries(self, index: np.ndarray | None = None) -> list[Entry]:
        """The entries at `index` (all by default), in index order, as Python tuples."""
        if index is None:
            index = np.arange(self.size)
        if self._entries is not None:
            return [self._entries[i] for i in index.tolist()]
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        rows: list[tuple] = []
        for number, group in enumerate(self._groups):
            lo, hi = int(self._starts[number]), int(self._starts[number + 1])
            left, right = np.searchsorted(ordered, [lo, hi])
            local = ordered[left:right] - lo
            if not len(local):
                continue
            sub = _Group(group.shape, group.rows[local], group.words)
            columns = [
                sub.byte_column(name)
                if name in _BYTE_FIELDS
                else self.columns[name][local + lo].tolist()
                for name in Entry._fields
            ]
            rows.extend(zip(*columns, strict=True))
        new = tuple.__new__
        out: list[Entry] = [None] * len(rows)  # type: ignore[list-item]
        for position, row in zip(order.tolist(), rows, strict=True):
            out[position] = new(Entry, row)
        return out


class Parser:
    """Turns the raw bytes of a dump into a Dump; keeps the learnt shapes across polls."""

    def __init__(self) -> None:
        self._shapes: dict[int, list[_Shape]] = {}
        self._shape_count = 0

    @property
    def shape_count(self) -> int:
        return self._shape_count

    def parse(self, frames: Frames) -> Dump:
        """Parse the framed messages of one dump."""
        buf = frames.buffer
        if len(buf) % 4:
            raise ParseError(f"dump of {len(buf)} bytes is not a whole number of words")
        words = np.frombuffer(buf, dtype="<u4")
        groups: list[_Group] = []
        for length, offsets in frames.by_length.items():
            if length < _PAYLOAD:
                raise ParseError(f"netlink message of length {length}")
            remaining = np.array(offsets, dtype=np.int64)
            for shape in self._shapes.get(length, []):
                remaining = self._take(shape, remaining, words, groups)
                if not len(remaining):
                    break
            while len(remaining):
                if self._shape_count >= MAX_SHAPES:
                    raise ParseError(f"more than {MAX_SHAPES} distinct conntrack entry layouts")
                shape = _Shape(words, int(remaining[0]), length, buf)
                self._shapes.setdefault(length, []).append(shape)
                self._shape_count += 1
                remaining = self._take(shape, remaining, words, groups)
        return Dump(groups)

    @staticmethod
    def _take(shape: _Shape, rows: np.ndarray, words: np.ndarray, groups: list) -> np.ndarray:
        """Add the rows that match `shape` as a group; return the others."""
        match = np.empty(len(rows), bool)
        # In blocks: all rows at once would gather a row-by-header table of a million
        # entries (hundreds of MB, every page of it a fault).
        for first in range(0, len(rows), _CHECK_ROWS):
            block = rows[first : first + _CHECK_ROWS]
            headers = words[block[:, None] + shape.header_words]
            match[first : first + len(block)] = (headers == shape.expected).all(axis=1)
        if match.all():
            groups.append(_Group(shape, rows, words))
            return rows[:0]
        if match.any():
            groups.append(_Group(shape, rows[match], words))
        return rows[~match]
