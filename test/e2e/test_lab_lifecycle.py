"""`antrea-flow lab up / status / exec / down` as a user runs them: subprocesses of the CLI,
checked against the kernel (`ip netns list`, namespace identities, the PIDs of the servers) and
the state directory. Every lab made here has its own name and is removed in a finally."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from antrea_flow.lab.command import current_cluster
from antrea_flow.lab.dataplane import STATE_DIR, Names

from .conftest import (
    PODS,
    Lab,
    alive,
    cli,
    lab_down,
    lab_namespaces,
    lab_up,
    netns_pids,
    sh,
    unique_lab_name,
)

pytestmark = pytest.mark.root


def expected_namespaces(lab: str) -> set[str]:
    prefix = Names(lab).prefix
    roles = ["underlay", "external", "node-1", "node-2"]
    roles += [pod.replace("/", "-") for pod in PODS]
    return {prefix + role for role in roles}


def netns_identity(namespaces: list[str]) -> dict[str, int]:
    """The nsfs inode behind each /run/netns entry: a rebuilt namespace gets a new one."""
    return {ns: os.stat(f"/run/netns/{ns}").st_ino for ns in namespaces}


def root_links() -> set[str]:
    """Interface names of the namespace the tests run in (read only)."""
    out = sh("ip", "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def assert_gone(lab: str, pids: dict[str, set[int]]) -> None:
    leftover = lab_namespaces(lab)
    assert not leftover, f"namespaces left behind: {leftover}"
    survivors = sorted(p for group in pids.values() for p in group if alive(p))
    assert not survivors, f"lab processes still running: {survivors}"
    assert not (STATE_DIR / lab).exists(), f"{STATE_DIR / lab} is still there"


def test_up_is_idempotent_and_down_removes_everything():
    name = unique_lab_name()
    links_before = root_links()
    try:
        started = time.monotonic()
        first = lab_up(name)
        print(f"antrea-flow lab up --name {name}: {time.monotonic() - started:.2f} s")
        assert f"lab {name} is up" in first.stdout

        namespaces = lab_namespaces(name)
        assert set(namespaces) == expected_namespaces(name)
        identity = netns_identity(namespaces)
        pids = netns_pids(namespaces)
        for pod in PODS:
            servers = pids[Names(name).prefix + pod.replace("/", "-")]
            assert len(servers) >= 2, f"{pod} runs {servers}: expected HTTP and iperf3 servers"
        assert len(pids[Names(name).external]) >= 2

        second = lab_up(name)
        assert "already up" in second.stdout, second.stdout
        assert lab_namespaces(name) == namespaces
        assert netns_identity(namespaces) == identity, "a second up rebuilt namespaces"
        assert netns_pids(namespaces) == pids, "a second up restarted servers"

        down = lab_down(name)
        assert down.returncode == 0, down.stderr
        assert f"removed {len(namespaces)} namespaces" in down.stdout
        assert_gone(name, pids)
        leaked = root_links() - links_before
        assert not leaked, f"interfaces appeared in the test's own namespace: {leaked}"
    finally:
        lab_down(name)


def test_status_lists_every_pod_with_ips_and_servers():
    name = unique_lab_name()
    try:
        lab_up(name)
        result = cli("lab", "status", "--name", name)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith(f"lab {name}: up (9 namespaces)"), lines[0]
        lab = Lab(name, current_cluster(name))
        for pod in PODS:
            (line,) = [line for line in lines if line.split()[:1] == [pod]]
            info = lab.cluster.pod(pod)
            assert info.node.name in line.split()
            assert f"{info.addresses[4]}, {info.addresses[6]}" in line
            assert line.rstrip().endswith("8080, 5201"), line
        for node in ("node-1", "node-2"):
            assert any(line.split()[:1] == [node] for line in lines), result.stdout
        assert "external host: 192.168.77.254, fd00:77::fe (up)" in result.stdout

        lab_down(name)
        after = cli("lab", "status", "--name", name)
        assert after.returncode == 0
        assert after.stdout.startswith(f"lab {name}: down (0 namespaces)"), after.stdout
    finally:
        lab_down(name)


def test_down_after_a_crash_removes_the_namespaces_by_prefix():
    """The state directory is gone (as after a crash or a reboot of /run): down still finds
    the lab's namespaces by name and kills what runs in them."""
    name = unique_lab_name()
    try:
        lab_up(name)
        namespaces = lab_namespaces(name)
        pids = netns_pids(namespaces)
        shutil.rmtree(STATE_DIR / name)
        assert lab_namespaces(name) == namespaces

        down = lab_down(name)
        assert down.returncode == 0, down.stderr
        assert f"removed {len(namespaces)} namespaces" in down.stdout
        assert_gone(name, pids)
    finally:
        lab_down(name)


def test_labs_whose_names_share_a_prefix_leave_each_other_alone():
    """Several labs run side by side: bringing lab N up or down must not touch lab N-b,
    whose namespaces also start with afl-N-. (A lab may instead refuse names with '-'.)"""
    name = unique_lab_name()
    other = f"{name}-b"
    try:
        result = cli("lab", "up", "--name", other)
        if result.returncode == 2 and other in result.stderr:
            return  # the name is refused with a usage error: no ambiguous prefix
        assert result.returncode == 0, result.stderr
        other_namespaces = lab_namespaces(other)
        assert set(other_namespaces) == expected_namespaces(other)
        other_pids = netns_pids(other_namespaces)

        def assert_other_intact(action: str) -> None:
            assert lab_namespaces(other) == other_namespaces, (
                f"{action} removed namespaces of lab {other}"
            )
            dead = sorted(p for group in other_pids.values() for p in group if not alive(p))
            assert not dead, f"{action} killed processes of lab {other}: {dead}"

        lab_up(name)
        assert_other_intact(f"lab up --name {name}")
        assert set(lab_namespaces(name)) - set(other_namespaces) == expected_namespaces(name)
        assert lab_down(name).returncode == 0
        assert_other_intact(f"lab down --name {name}")
    finally:
        lab_down(other)
        lab_down(name)


def test_exec_runs_a_command_in_a_pod(lab: Lab):
    result = cli("lab", "exec", "--name", lab.name, "frontend/client-1", "--", "ip", "-br", "addr")
    assert result.returncode == 0, result.stderr
    (eth0,) = [line for line in result.stdout.splitlines() if line.startswith("eth0")]
    assert f"{lab.ip('frontend/client-1', 4)}/32" in eth0.split()
    assert f"{lab.ip('frontend/client-1', 6)}/128" in eth0.split()


def test_exec_of_an_unknown_pod_is_a_one_line_error(lab: Lab):
    result = cli("lab", "exec", "--name", lab.name, "frontend/nope", "--", "true")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "frontend/nope" in lines[0]
