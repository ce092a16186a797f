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
# unless the threshold stayed where tuning put it. Prints the MB kept after the free.
ALLOCATOR = """
import sys
import numpy as np
from antrea_flow import tuning
def rss_mb():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) // 1024
pinned = tuning.pin_mmap_threshold() if sys.argv[1] == "tuned" else True
big = np.ones(2 << 20)
del big
before = rss_mb()
blocks, kept = [], []
for _ in range(100):
    blocks.append(np.ones(1 << 17))
    kept.append(np.ones(64))
del blocks
print(pinned, rss_mb() - before)
"""


def run(script: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()  # fmt: skip


def test_start_up_is_frozen_and_collections_come_less_often():
    assert run(COLLECTOR) == "(50000, 20, 100) True"


def test_large_blocks_freed_go_back_to_the_system():
    pinned, kept = run(ALLOCATOR, "tuned").split()
    if pinned != "True":
        pytest.skip("not glibc: no mallopt to pin the mmap threshold with")
    assert int(kept) < 20
    # Without it, glibc keeps them: what makes the test mean something.
    assert int(run(ALLOCATOR, "default").split()[1]) >= 80
