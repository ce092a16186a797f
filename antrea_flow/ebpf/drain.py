"""Taking the counted flows out of the kernel: batched lookup-and-delete of the per-CPU
hash into buffers of our own, merged across CPUs with numpy; and the fallback records of
packets the map had no room for.

BCC's own batch helper cannot be used on per-CPU maps: it deletes in the kernel, then
fails to convert the per-CPU values (TypeError) and the flows are lost. Ours calls libbcc's
`bpf_lookup_and_delete_batch` with ctypes buffers sized once and reads them as numpy
arrays: no per-flow Python work.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass

import numpy as np

from .program import COUNTS_DTYPE, FALLBACK_DTYPE, KEY_DTYPE

# The merged flow of one eviction: its key, and its counters summed over the CPUs.
FLOW_DTYPE = np.dtype(
    [("key", KEY_DTYPE), ("packets", "=u8"), ("bytes", "=u8"), ("rev_packets", "=u8"),
     ("rev_bytes", "=u8"), ("first_ns", "=u8"), ("last_ns", "=u8"), ("flags", "=u4")]
)  # fmt: skip
# A per-CPU slot last written this long before the previous eviction began is stale: a
# kernel older than 5.10 may leave the values of a deleted entry in the slots of other
# CPUs when it reuses the entry. The margin keeps a packet counted just as that eviction
# began (its time read before, its slot written after) from being taken for one.
STALE_MARGIN_NS = 1_000_000_000


@dataclass
class MergeResult:
    flows: np.ndarray  # FLOW_DTYPE
    stale_slots: int  # per-CPU slots discarded as stale


def merge_cpus(keys: np.ndarray, values: np.ndarray, stale_before_ns: int) -> MergeResult:
    """One flow per key: `values` is (len(keys), cpus) of COUNTS_DTYPE; counters summed,
    the first packet the earliest non-zero time, the last the latest, flags OR-ed. A slot
    whose last packet is older than `stale_before_ns` (less the margin) is left out."""
    n = len(keys)
    out = np.zeros(n, FLOW_DTYPE)
    out["key"] = keys
    if n == 0:
        return MergeResult(out, 0)
    used = values["last_ns"] != 0
    stale = used & (values["last_ns"].astype(np.int64) < stale_before_ns - STALE_MARGIN_NS)
    live = used & ~stale
    for field in ("packets", "bytes", "rev_packets", "rev_bytes"):
        out[field] = np.where(live, values[field], 0).sum(axis=1)
    first = np.where(live, values["first_ns"], np.iinfo(np.uint64).max)
    out["first_ns"] = np.where(live.any(axis=1), first.min(axis=1), 0)
    out["last_ns"] = np.where(live, values["last_ns"], 0).max(axis=1)
    out["flags"] = np.bitwise_or.reduce(np.where(live, values["flags"], 0), axis=1)
    keep = live.any(axis=1)
    return MergeResult(out[keep], int(stale.sum()))


def fallback_flows(records: np.ndarray) -> np.ndarray:
    """Ring-buffer records (one per packet the map had no room for) as flows."""
    if len(records) == 0:
        return np.zeros(0, FLOW_DTYPE)
    keys, inverse = np.unique(records["key"].view(np.void(KEY_DTYPE.itemsize)),
                              return_inverse=True)  # fmt: skip
    out = np.zeros(len(keys), FLOW_DTYPE)
    out["key"] = keys.view(KEY_DTYPE).reshape(-1)
    forward = records["reverse"] == 0
    length = records["bytes"].astype(np.uint64)
    np.add.at(out["packets"], inverse[forward], 1)
    np.add.at(out["bytes"], inverse[forward], length[forward])
    np.add.at(out["rev_packets"], inverse[~forward], 1)
    np.add.at(out["rev_bytes"], inverse[~forward], length[~forward])
    out["first_ns"] = np.iinfo(np.uint64).max
    np.minimum.at(out["first_ns"], inverse, records["ns"])
    np.maximum.at(out["last_ns"], inverse, records["ns"])
    np.bitwise_or.at(out["flags"], inverse, records["flags"])
    return out


class BatchReader:
    """Lookup-and-delete of a whole per-CPU hash map into buffers allocated once."""

    def __init__(self, map_fd: int, max_entries: int, cpus: int):
        from bcc import libbcc

        self._batch = libbcc.lib.bpf_lookup_and_delete_batch
        self._fd = map_fd
        self._capacity = max_entries
        self._cpus = cpus
        self._keys = np.zeros(max_entries, KEY_DTYPE)
        self._values = np.zeros((max_entries, cpus), COUNTS_DTYPE)

    def take_all(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, per-CPU values) of every entry, which the kernel deletes; copies."""
        total = 0
        token = ctypes.c_uint32(0)
        count = ctypes.c_uint32(0)
        keys_at = self._keys.ctypes.data
        values_at = self._values.ctypes.data
        key_size, value_size = KEY_DTYPE.itemsize, COUNTS_DTYPE.itemsize * self._cpus
        while total < self._capacity:
            count.value = self._capacity - total
            result = self._batch(
                self._fd,
                ctypes.byref(token) if total else None,
                ctypes.byref(token),
                ctypes.c_void_p(keys_at + key_size * total),
                ctypes.c_void_p(values_at + value_size * total),
                ctypes.byref(count),
            )
            code = ctypes.get_errno()
            total += count.value
            if result != 0:
                if code == errno.ENOENT or code == 0:
                    break  # the end of the map
                raise OSError(code, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH: {errno.errorcode.get(code)}")
            if count.value == 0:
                break
        return self._keys[:total].copy(), self._values[:total].copy()


def records_from_bytes(chunks: list[bytes]) -> np.ndarray:
    """Ring-buffer records as one array."""
    if not chunks:
        return np.zeros(0, FALLBACK_DTYPE)
    return np.frombuffer(b"".join(chunks), FALLBACK_DTYPE).copy()
