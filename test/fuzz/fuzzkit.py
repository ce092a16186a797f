"""The libFuzzer entry point the harnesses share: flags, where crashes go, quiet logging.

Each harness calls `run` from its `__main__` with its test function; libFuzzer's own flags
and corpus directories come from the command line, as with any libFuzzer binary.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parents[2]
CRASH_DIR = REPO / "out" / "fuzz" / "crashes"


def run(
    target: str,
    test_one_input: Callable[[bytes], None],
    custom_mutator: Callable[[bytes, int, int], bytes] | None = None,
) -> None:
    """Fuzz `test_one_input` with the command line's libFuzzer flags and corpus.

    Without -artifact_prefix, crashing inputs go to out/fuzz/crashes/<target>/ rather than
    libFuzzer's default (the working directory, which may be the repository).
    """
    argv = list(sys.argv)
    if not any(arg.startswith("-artifact_prefix=") for arg in argv[1:]):
        crashes = CRASH_DIR / target
        crashes.mkdir(parents=True, exist_ok=True)
        argv.insert(1, f"-artifact_prefix={crashes}/")
    # The code under test logs warnings for bad input; a million of them on stderr would
    # cost more than the fuzzing and hide libFuzzer's reports.
    logging.disable(logging.CRITICAL)
    kwargs = {"custom_mutator": custom_mutator} if custom_mutator else {}
    atheris.Setup(argv, test_one_input, **kwargs)
    atheris.Fuzz()
