"""The harness shared by bench_ipfix.py and bench_aggregator.py.

Both measure an IPFIX intake fed by many `ExportingProcess`es over mutual TLS, each variant
in a fresh copy of the script (so its peak RSS is its own), with the exporters in a child
process of that copy: `--role=exporters` connects, prints a 'ready' line, waits for 'go' on
stdin, sends, and reports one JSON line. This module holds that protocol, process-level
accounting (peak RSS, CPU time), the formatting of rates and the NetworkPolicy columns both
record generators fill alike; what each benchmark sends and measures stays in its script.
The scripts import it as a sibling module (`python test/bench/bench_x.py` puts this folder
first on sys.path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from antrea_flow.ipfix import antrea
from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.collecting import CollectingProcess
from antrea_flow.ipfix.exporting import ExportingProcess
from antrea_flow.tls import client_context

GOAL_INTAKE = 67_000  # go-ipfix BenchmarkMultipleExportersToCollector: 100k records in 1.5 s
INTAKE_TIMEOUT = 300.0


# -- the process and its output ---------------------------------------------------------


def log_warnings() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")


def machine() -> str:
    return f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs"


def fill_sizes(args: argparse.Namespace, **sizes: tuple[int, int]) -> None:
    """Each option left unset gets its (quick, full) size, by --quick."""
    for name, (quick, full) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB.

    VmHWM rather than getrusage's ru_maxrss: Linux carries ru_maxrss across exec, and
    subprocess spawns with vfork, so a child started by a big parent would report the
    parent's peak (the calling script's encode/decode data) as its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def fmt_rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:>12,.0f} records/s"


def versus(value: float | None, goal: float) -> str:
    if value is None:
        return ""
    return f"(goal >= {goal:,.0f}: {'met' if value >= goal else 'NOT met'}, {value / goal:.2f}x)"


def maybe_round(value: float | None) -> int | None:
    return None if value is None else round(value)


def dispatch(
    args: argparse.Namespace,
    main: Callable[[argparse.Namespace], int],
    exporters: Callable[[argparse.Namespace], Coroutine[Any, Any, None]],
    intake_role: str,
    intake: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
) -> None:
    """Run the script as args.role says: the exporters' child (which reports for itself),
    the intake variant (its result printed as one JSON line), or main (its exit status)."""
    if args.role == "exporters":
        asyncio.run(exporters(args))
    elif args.role == intake_role:
        log_warnings()
        result = asyncio.run(intake(args))
        print(json.dumps(result), flush=True)
    else:
        sys.exit(main(args))


def run_variant(
    script: str, role: str, mode: str, options: list[str], timeout: float
) -> dict[str, Any]:
    """Run `script --role=<role> --mode=<mode> *options` in a fresh process and return the
    JSON object on its last line (or the mode and an error)."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), f"--role={role}", f"--mode={mode}", *options],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        timeout=timeout,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"mode": mode, "error": f"{role} process exited {proc.returncode}"}
    return json.loads(lines[-1])


# -- records ---------------------------------------------------------------------------


def policy_values(ingress: bool, egress: bool, egress_policy: str) -> list[Any]:
    """The ten NetworkPolicy columns of an exporter record (template 256 order) of a
    frontend -> backend flow: the ingress rule of a K8s NetworkPolicy, the egress rule of an
    Antrea NetworkPolicy named egress_policy, both allowing; empty where a side has none."""
    return [
        "allow-frontend-to-web" if ingress else "",  # ingressNetworkPolicyName
        "backend" if ingress else "",  # ingressNetworkPolicyNamespace
        1 if ingress else 0,  # ingressNetworkPolicyType: K8s NetworkPolicy
        "ingress-rule-0" if ingress else "",  # ingressNetworkPolicyRuleName
        1 if ingress else 0,  # ingressNetworkPolicyRuleAction: allow
        egress_policy if egress else "",  # egressNetworkPolicyName
        "frontend" if egress else "",  # egressNetworkPolicyNamespace
        2 if egress else 0,  # egressNetworkPolicyType: Antrea NetworkPolicy
        "egress-rule-1" if egress else "",  # egressNetworkPolicyRuleName
        1 if egress else 0,  # egressNetworkPolicyRuleAction: allow
    ]


# -- exporters --------------------------------------------------------------------------


def make_exporters(
    port: int, cert_dir: Path, count: int, server_hostname: str | None = None
) -> list[ExportingProcess]:
    """`count` exporters of the Antrea templates to 127.0.0.1:port over TLS, with the client
    certificate in cert_dir (ca.crt, tls.crt, tls.key), observation domains 1..count."""
    ctx = client_context(cert_dir / "ca.crt", cert_dir / "tls.crt", cert_dir / "tls.key")
    address = TransportAddress("127.0.0.1", port, "tls")
    templates = antrea.exporter_templates()
    return [
        ExportingProcess(
            address,
            templates,
            observation_domain_id=i + 1,
            ssl_context=ctx,
            server_hostname=server_hostname,
            max_queue_records=1 << 20,
        )
        for i in range(count)
    ]


async def connect(exporters: list[ExportingProcess], timeout: float = 60.0) -> float:
    """Start every exporter; the seconds until all are connected (handshakes included)."""
    t0 = time.perf_counter()
    for exporter in exporters:
        exporter.start()
    deadline = t0 + timeout
    while not all(e.stats.connected for e in exporters):
        if time.perf_counter() > deadline:
            up = sum(e.stats.connected for e in exporters)
            raise RuntimeError(f"only {up} of {len(exporters)} exporters connected in {timeout}s")
        await asyncio.sleep(0.01)
    return time.perf_counter() - t0


async def run_exporters_child(
    exporters: list[ExportingProcess],
    send: Callable[[list[ExportingProcess]], Awaitable[None]],
    count_dropped: bool = False,
) -> None:
    """--role exporters: connect, say 'ready', wait for 'go', send(exporters), wait until
    every exporter is idle, report (with the records dropped if count_dropped), exit."""
    connect_s = await connect(exporters)
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": True, "connect_s": connect_s}), flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit(f"expected 'go', got {line!r}")
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    await send(exporters)
    idle = await asyncio.gather(*(e.wait_idle(INTAKE_TIMEOUT) for e in exporters))
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    report: dict[str, Any] = {"sent": sum(e.stats.records_sent for e in exporters)}
    if count_dropped:
        report["dropped"] = sum(sum(e.stats.records_dropped.values()) for e in exporters)
    await asyncio.gather(*(e.stop() for e in exporters))
    report.update(all_idle=all(idle), elapsed_s=elapsed, cpu_s=cpu, rss_mb=peak_rss_mb())
    print(json.dumps(report), flush=True)


# -- the intake's side ------------------------------------------------------------------


async def start_exporters_child(
    script: str, port: int, options: list[str]
) -> tuple[asyncio.subprocess.Process, float]:
    """`script --role=exporters --port=<port> *options` as a child with pipes on stdin and
    stdout, once it reports its exporters connected: (the child, their connect time)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        os.path.abspath(script),
        "--role=exporters",
        f"--port={port}",
        *options,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 120)
        if not line:
            raise RuntimeError("the exporters' process exited before connecting")
        return child, json.loads(line)["connect_s"]
    except BaseException:
        await stop_child(child)
        raise


async def send_go(child: asyncio.subprocess.Process) -> None:
    assert child.stdin is not None
    child.stdin.write(b"go\n")
    await child.stdin.drain()


async def stop_child(child: asyncio.subprocess.Process | None) -> None:
    """Kill the child if it is still running (a failed or timed-out run)."""
    if child is not None and child.returncode is None:
        child.kill()
        await child.wait()


async def wait_for_sessions(collector: CollectingProcess, count: int, timeout: float = 30) -> None:
    deadline = time.perf_counter() + timeout
    while collector.stats.sessions_open < count:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{collector.stats.sessions_open} sessions open")
        await asyncio.sleep(0.01)
