"""Process settings for the long-running components (agent, aggregator), applied once they
are built: the cyclic garbage collector's and glibc's allocator's.

The collector: their hot paths make and drop objects by the hundred thousand (a poll's
entries, an intake's flows and records), nearly all free of cycles: reference counting frees
them, and the collector's only work is the rare cycle (an exception's traceback, asyncio's
bookkeeping). With Python's defaults (a young collection every 700 new objects, a full one
every hundred of those) it walks every live connection or flow again and again while a
table is filled: a third of the aggregator's intake went to it (0.54 of 1.72 s in the
benchmark). Fewer, later collections still catch every cycle.

The allocator: a poll's columns are numpy arrays of a few hundred kilobytes to tens of
megabytes, made and freed every poll. glibc serves such blocks with mmap and gives them back
on free, but after the first free it raises its mmap threshold to the freed block's size
(up to 32 MB), so later blocks come from the heap, whose freed pages it keeps: the agent
then held 80 MB more than it used after two polls of 100k entries. A fixed threshold keeps
every large block returnable.
"""

from __future__ import annotations

import ctypes
import gc

YOUNG = 50_000  # new objects between young collections (Python: 700)
MIDDLE = 20  # young collections between middle ones (Python: 10)
OLD = 100  # middle collections between full ones (Python: 10; still bounded by Python's
# rule that a full collection waits for a quarter of the old objects to be new)

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept (setting it stops its raising)


def tune() -> None:
    """Everything made so far (modules, configuration, metadata) lives as long as the
    process: moved out of the collector's sight; later objects collected less often; large
    blocks returned to the system when freed (glibc only: elsewhere, nothing changes)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, MIDDLE, OLD)
    pin_mmap_threshold()


def pin_mmap_threshold() -> bool:
    """Whether glibc's mmap threshold is now fixed at MMAP_THRESHOLD."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
