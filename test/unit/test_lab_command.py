"""`antrea-flow lab inventory` reads the cluster and nothing else: it runs without root,
while the subcommands that build or enter network namespaces refuse to."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from antrea_flow.lab.cluster import load_cluster

NOBODY = 65534


def unprivileged(*args: str) -> subprocess.CompletedProcess:
    """`antrea-flow ARGS` as an unprivileged user (as nobody when the tests run as root)."""
    command = [sys.executable, "-m", "antrea_flow.cli", *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing to drop it")
        command = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    return subprocess.run(
        command,
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_inventory_runs_without_root():
    # A lab name nobody brought up: the default cluster, as `lab up` would build it.
    result = unprivileged("lab", "inventory", "--name", f"nobody{os.getpid()}")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == load_cluster().inventory()


def test_status_still_needs_root():
    result = unprivileged("lab", "status", "--name", f"nobody{os.getpid()}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "antrea-flow lab: lab status needs root (it works in network namespaces)"
    ]
