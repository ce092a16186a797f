"""The few bpf(2) calls the agent makes on maps it holds by file descriptor, and the
reader of a BPF ring buffer, through ctypes: no BCC (and no LLVM) in the agent's process.

The program is compiled and loaded by a helper process (compile.py) that hands over its
file descriptors and exits; the agent keeps only those.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct

_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280}
_LOOKUP_ELEM, _UPDATE_ELEM, _DELETE_ELEM = 1, 2, 3
_LOOKUP_AND_DELETE_BATCH = 25
_RINGBUF_BUSY, _RINGBUF_DISCARD, _RINGBUF_HEADER = 1 << 31, 1 << 30, 8

_libc = ctypes.CDLL(None, use_errno=True)


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),
                ("flags", ctypes.c_uint64)]  # fmt: skip


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64),
                ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]  # fmt: skip


def _bpf(command: int, attr: ctypes.Structure) -> int:
    number = _SYSCALL_BPF.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"bpf(2) on {platform.machine()}: not known here")
    result = _libc.syscall(number, command, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def possible_cpus() -> int:
    """CPUs a per-CPU map has a value for (/sys/devices/system/cpu/possible: "0-7")."""
    with open("/sys/devices/system/cpu/possible") as f:
        total = 0
        for part in f.read().strip().split(","):
            low, _, high = part.partition("-")
            total += int(high or low) - int(low) + 1
        return total


def update(map_fd: int, key: bytes, value: bytes) -> None:
    k, v = ctypes.create_string_buffer(key), ctypes.create_string_buffer(value)
    _bpf(_UPDATE_ELEM, _ElemAttr(map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))


def delete(map_fd: int, key: bytes) -> bool:
    """False when there was no such key."""
    k = ctypes.create_string_buffer(key)
    try:
        _bpf(_DELETE_ELEM, _ElemAttr(map_fd, 0, ctypes.addressof(k), 0, 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    k, v = ctypes.create_string_buffer(key), ctypes.create_string_buffer(value_size)
    try:
        _bpf(_LOOKUP_ELEM, _ElemAttr(map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def lookup_and_delete_batch(
    map_fd: int, keys_at: int, values_at: int, key_size: int, value_size: int, capacity: int
) -> int:
    """Move every entry of a hash map into the buffers at `keys_at` and `values_at` (room
    for `capacity`), deleting them; how many. `value_size`: of one entry (all CPUs)."""
    total = 0
    token = ctypes.c_uint64(0)
    while total < capacity:
        attr = _BatchAttr(
            ctypes.addressof(token) if total else 0, ctypes.addressof(token),
            keys_at + key_size * total, values_at + value_size * total,
            capacity - total, map_fd, 0, 0,
        )  # fmt: skip
        try:
            _bpf(_LOOKUP_AND_DELETE_BATCH, attr)
        except OSError as exc:
            total += attr.count  # the last call's entries are in the buffers too
            if exc.errno == errno.ENOENT:
                return total  # the end of the map
            raise
        total += attr.count
        if attr.count == 0:
            break
    return total


class RingBuffer:
    """The consumer side of a BPF_MAP_TYPE_RINGBUF: the consumer page mapped writable, the
    producer page and the data area (mapped twice by the kernel, for records that wrap)
    read-only. Owned by the thread that calls `read`."""

    def __init__(self, map_fd: int, size: int):
        page = mmap.PAGESIZE
        self.fd = map_fd
        self._mask = size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._producer = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)  # fmt: skip
        self._page = page

    def read(self) -> list[bytes]:
        """The records written since the last read (none while one is being written)."""
        out = []
        (consumer,) = struct.unpack_from("=Q", self._consumer, 0)
        (producer,) = struct.unpack_from("=Q", self._producer, 0)
        data = self._page
        while consumer < producer:
            at = data + (consumer & self._mask)
            (length,) = struct.unpack_from("=I", self._producer, at)
            if length & _RINGBUF_BUSY:
                break
            size = length & ~(_RINGBUF_BUSY | _RINGBUF_DISCARD)
            if not length & _RINGBUF_DISCARD:
                start = at + _RINGBUF_HEADER
                out.append(bytes(self._producer[start : start + size]))
            consumer += (size + _RINGBUF_HEADER + 7) & ~7
            struct.pack_into("=Q", self._consumer, 0, consumer)
        return out

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
