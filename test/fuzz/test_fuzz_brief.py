"""Each fuzz harness, briefly: a fixed number of libFuzzer runs from a copy of its seed corpus.

`make fuzz` runs them at length; this keeps the harnesses working and catches what a few
thousand mutations of the seeds find. A crash fails the test with libFuzzer's report (the
input's path under out/fuzz/crashes/ and the traceback).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="needs atheris (pip install atheris, or make setup: it is in the dev extras)",
)

# Runs per harness, for about 10 s each on a 2-core machine (their exec/s: decoder ~1400,
# framing ~2400, config ~450); the time limit bounds a slower machine.
RUNS = {"decoder": 12000, "framing": 20000, "config": 3000}
MAX_SECONDS = 20


@pytest.mark.parametrize("target", sorted(RUNS))
def test_harness_runs_without_a_crash(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(HERE / "corpus" / target, corpus)  # libFuzzer adds to it
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / f"fuzz_{target}.py"),
            f"-runs={RUNS[target]}",
            f"-max_total_time={MAX_SECONDS}",
            "-seed=1",
            "-print_final_stats=1",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=MAX_SECONDS * 6,
    )
    report = result.stderr + result.stdout
    assert result.returncode == 0, report[-6000:]
    executed = re.search(r"stat::number_of_executed_units: (\d+)", report)
    assert executed and int(executed.group(1)) > 0, report[-2000:]
