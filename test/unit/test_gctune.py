"""The collector settings the agent and the aggregator take once built (in a process of its
own: the test run keeps Python's)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import gc
from antrea_flow import gctune
kept = [object() for _ in range(1000)]
gctune.tune()
print(gc.get_threshold(), gc.get_freeze_count() >= 1000)
"""


def test_start_up_is_frozen_and_collections_come_less_often():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True, timeout=60).stdout  # fmt: skip
    assert out.strip() == "(50000, 20, 100) True"
