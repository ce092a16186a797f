"""Taking the counted flows out of the kernel: batched lookup-and-delete of the per-CPU
hash into buffers of our own, merged across CPUs with numpy; and the fallback records of
packets the map had no room for.

BCC's own batch helper cannot be used on per-CPU maps: it deletes in the kernel, then
fails to convert the per-CPU values (TypeError) and the flows are lost. Ours calls
BPF_MAP_LOOKUP_AND_DELETE_BATCH with buffers sized once and reads them as numpy arrays: no
per-flow Python work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bpfsys import lookup_and_delete_batch
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
        self._fd = map_fd
        self._capacity = max_entries
        self._keys = np.zeros(max_entries, KEY_DTYPE)
        self._values = np.zeros((max_entries, cpus), COUNTS_DTYPE)

    def take_all(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, per-CPU values) of every entry, which the kernel deletes; copies."""
        total = lookup_and_delete_batch(
            self._fd,
            self._keys.ctypes.data,
            self._values.ctypes.data,
            KEY_DTYPE.itemsize,
            self._values.strides[0],
            self._capacity,
        )
        return self._keys[:total].copy(), self._values[:total].copy()


def records_from_bytes(chunks: list[bytes]) -> np.ndarray:
    """Ring-buffer records as one array."""
    if not chunks:
        return np.zeros(0, FALLBACK_DTYPE)
    return np.frombuffer(b"".join(chunks), FALLBACK_DTYPE).copy()
