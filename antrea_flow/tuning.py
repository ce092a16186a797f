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
megabytes, made and freed every poll. After the first large free, glibc serves such blocks
from its heap and keeps what is freed there: two polls of 100k entries held 80 MB more than
they used (and 250k entries 86 MB). Handing the free pages back after each poll
(`release_free_memory`) costs 3-4 ms; pinning glibc's mmap threshold instead, so that every
large block is a fresh mapping, kept the same RSS but cost the first poll of 250k entries
0.3-0.8 s in page faults.
"""

from __future__ import annotations

import ctypes
import gc

YOUNG = 50_000  # new objects between young collections (Python: 700)
MIDDLE = 20  # young collections between middle ones (Python: 10)
OLD = 100  # middle collections between full ones (Python: 10; still bounded by Python's
# rule that a full collection waits for a quarter of the old objects to be new)


def tune() -> None:
    """Everything made so far (modules, configuration, metadata) lives as long as the
    process: moved out of the collector's sight; later objects collected less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, MIDDLE, OLD)


_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)


def release_free_memory() -> bool:
    """Give the allocator's free pages back to the system (glibc's malloc_trim); False
    where there is no glibc, which changes nothing else."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
