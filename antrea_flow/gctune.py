"""The cyclic garbage collector's settings for the long-running components (agent,
aggregator), applied once they are built.

Their hot paths make and drop objects by the hundred thousand (a poll's connections, an
intake's flows and records), nearly all free of cycles: reference counting frees them, and
the collector's only work is the rare cycle (an exception's traceback, asyncio's
bookkeeping). With Python's defaults (a young collection every 700 new objects, a full one
every hundred of those) it walks every live connection or flow again and again while a
table is filled: a third of the aggregator's intake went to it (0.54 of 1.72 s in the
benchmark). Fewer, later collections still catch every cycle.
"""

from __future__ import annotations

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
