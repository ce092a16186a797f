"""The process settings the agent and the aggregator take once built (each in a process of
its own: the test run keeps Python's and glibc's)."""

from __future__ import annotations

import subprocess
import sys

import pytest

COLLECTOR = """
import gc
from antrea_flow import tuning
kept = [object() for _ in range(1000)]
tuning.tune()
print(gc.get_threshold(), gc.get_freeze_count() >= 1000)
"""

# A 16 MB block freed raises glibc's mmap threshold past 1 MB; then 100 blocks of 1 MB come
# from the heap, each followed by a small block kept, so that freeing them returns nothing
# by itself. Prints the MB kept after the free (and the release, when asked for).
ALLOCATOR = """
import sys
import numpy as np
from antrea_flow import tuning
def rss_mb():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) // 1024
big = np.ones(2 << 20)
del big
before = rss_mb()
blocks, kept = [], []
for _ in range(100):
    blocks.append(np.ones(1 << 17))
    kept.append(np.ones(64))
del blocks
released = tuning.release_free_memory() if sys.argv[1] == "released" else True
print(released, rss_mb() - before)
"""


def run(script: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()  # fmt: skip


def test_start_up_is_frozen_and_collections_come_less_often():
    assert run(COLLECTOR) == "(50000, 20, 100) True"


def test_freed_blocks_go_back_to_the_system_when_released():
    released, kept = run(ALLOCATOR, "released").split()
    if released != "True":
        pytest.skip("not glibc: no malloc_trim")
    assert int(kept) < 20
    # Without it, glibc keeps them: what makes the test mean something.
    assert int(run(ALLOCATOR, "kept").split()[1]) >= 80
