"""Benchmark: one full agent poll cycle (dump, parse, store update) against `conntrack -L`.

Fills a fresh network namespace's conntrack table with N UDP entries in zone 65520, each a
flow from a local Pod to a Pod-subnet address (so the agent enriches and stores every one,
as on a busy node), then times in the same run:
- `conntrack -L -w 65520` (conntrack-tools, C) printing the same table to /dev/null;
- the raw kernel dump (netlink and framing, no parsing), of the table at rest and just
  after a tenth of its entries carried a packet (the state the busy poll sees);
- the agent's first poll (every connection new), a steady-state poll (all present, none
  changed) and a busy poll (a tenth of the entries carried new packets since the last);
- the agent's CPU share over several polls at a 5 s interval.
The agent runs in a child process so its RSS is its own. Timings are printed, never asserted;
the last line is a JSON object.

A table larger than the host's `nf_conntrack_max` (262,144 by default) needs that limit
raised: a network namespace other than the host's cannot raise it (its copy is read-only),
and every namespace's table counts against it. `--raise-host-max` raises it for the run (to
the entries plus a tenth) and puts it back afterwards.

    test/bench/bench_conntrack.py [--entries N] [--cpu-seconds S] [--raise-host-max]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

NS_PREFIX = "afxb-"
ROUNDS = 5  # timings are the best of this many: the VM's neighbours come and go
CLIENT_IP = "10.10.0.5"


def sh(*args: str, input: bytes | None = None) -> None:
    subprocess.run(args, check=True, input=input, stdout=subprocess.DEVNULL)


def ns_sh(ns: str, *args: str, input: bytes | None = None) -> None:
    sh("ip", "netns", "exec", ns, *args, input=input)


def make_namespace(entries: int) -> str:
    ns = NS_PREFIX + uuid.uuid4().hex[:8]
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "add", "pods", "type", "bridge")
        sh("ip", "-n", ns, "addr", "add", f"{CLIENT_IP}/16", "dev", "pods")
        # No ARP: datagrams leave at once instead of waiting for neighbours that never answer.
        sh("ip", "-n", ns, "link", "set", "pods", "arp", "off", "up")
        # Entries are confirmed at POSTROUTING, before the port-less bridge drops the packet.
        ns_sh(
            ns,
            "nft",
            "-f",
            "-",
            input=b"""
table inet bench {
  chain zone { type filter hook output priority raw; ct zone set 65520; }
  chain commit { type filter hook output priority mangle; ct state new ct mark set 0x2; }
}""",
        )
        for key, value in (
            ("nf_conntrack_acct", "1"),
            ("nf_conntrack_timestamp", "1"),
            ("nf_conntrack_udp_timeout", "3600"),
        ):
            ns_sh(ns, "sysctl", "-qw", f"net.netfilter.{key}={value}")
        fill = (
            f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            f"import bench_conntrack; bench_conntrack.send(range({entries}))\n"
        )
        ns_sh(ns, sys.executable, "-c", fill)
    except BaseException:
        subprocess.run(["ip", "netns", "del", ns])
        raise
    return ns


def send(flows, sock=None) -> None:
    """One datagram on each of `flows` (numbers of flows: each its own conntrack entry),
    from the namespace the socket was made in."""
    sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind((CLIENT_IP, 40000))
        for i in flows:
            host = 1 + i // 60000
            sock.sendto(b"x" * 64, (f"10.10.{host}.{1 + (i // 250) % 250}", 1024 + i % 60000))


def inventory(path: str) -> None:
    path_text = f"""apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {{name: bench-node}}
  spec: {{podCIDRs: [10.10.0.0/16]}}
- apiVersion: v1
  kind: Pod
  metadata: {{name: client, namespace: bench}}
  spec: {{nodeName: bench-node}}
  status: {{podIPs: [{{ip: {CLIENT_IP}}}]}}
"""
    with open(path, "w") as f:
        f.write(path_text)


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def conntrack_cli(ns: str) -> float:
    def run():
        subprocess.run(
            ["ip", "netns", "exec", ns, "conntrack", "-L", "-w", "65520"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )

    return best_of(3, run)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def agent_role(ns: str, inventory_file: str, cpu_seconds: float, profile: bool) -> None:
    """Child process: the agent's own poll cycles, CPU share and memory (with `profile`,
    where the first poll's time goes, to stderr)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from antrea_flow import tuning
    from antrea_flow.conntrack import netns
    from antrea_flow.conntrack.netlink import ConntrackDumper
    from antrea_flow.exporter.agent import Agent
    from antrea_flow.exporter.config import AgentConfig
    from antrea_flow.ipfix.address import TransportAddress

    config = AgentConfig(
        flow_exporter_enabled=True,
        collector=TransportAddress("127.0.0.1", 9, "tcp"),
        poll_interval=5.0,
        active_timeout=60.0,
        idle_timeout=15.0,
        conntrack_zone=65520,
        inventory_file=inventory_file,
        tls_cert_dir="",
        metrics_address=None,
        protocol_filter=None,
    )
    agent = Agent(config, "bench-node", ns)
    agent.refresh_metadata()
    tuning.tune()  # as `antrea-flow agent` does once it is built
    rss_before = rss_mb()

    dumper = ConntrackDumper(ns, 65520)
    count = [0]

    def raw_dump():
        count[0] = dumper.dump().count

    raw = best_of(ROUNDS, raw_dump)
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    entries = agent.poll()
    first = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(25)
    steady = best_of(ROUNDS, agent.poll)
    stored = len(agent.store)

    def traffic():  # a tenth of the flows carry a packet before each busy poll
        send(range(0, stored, 10), netns.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM))

    busy_times, busy_raw_times = [], []
    for _ in range(ROUNDS):
        traffic()
        start = time.perf_counter()
        agent.poll()
        busy_times.append(time.perf_counter() - start)
        # The kernel's own dump of the table in the same state: just after the same traffic.
        traffic()
        start = time.perf_counter()
        raw_dump()
        busy_raw_times.append(time.perf_counter() - start)
    busy, busy_raw = min(busy_times), min(busy_raw_times)

    # CPU share: busy polls every 5 s (as the default flowPollInterval) for cpu_seconds;
    # the CPU of polling only, not of making the traffic.
    cpu = 0.0
    wall_start = time.monotonic()
    polls = 0
    while time.monotonic() - wall_start < cpu_seconds:
        traffic()
        cpu_start = time.process_time()
        agent.poll()
        cpu += time.process_time() - cpu_start
        polls += 1
        time.sleep(max(0.0, wall_start + polls * 5.0 - time.monotonic()))
    wall = time.monotonic() - wall_start
    print(
        json.dumps(
            {
                "entries": entries,
                "stored": stored,
                "raw_dump_seconds": raw,
                "agent_first_poll_seconds": first,
                "agent_steady_poll_seconds": steady,
                "agent_busy_poll_seconds": busy,
                "raw_busy_dump_seconds": busy_raw,
                "cpu_share_percent": 100.0 * cpu / wall if polls else None,
                "cpu_polls": polls,
                "rss_mb": rss_mb(),
                "rss_mb_before_poll": rss_before,
            }
        )
    )


HOST_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"


@contextlib.contextmanager
def host_max_at_least(entries: int, allowed: bool):
    """The host's conntrack limit admits `entries` in our namespace for the block: raised
    (when `allowed`) and put back after."""
    with open(HOST_MAX) as f:
        before = int(f.read())
    if entries < before:
        yield
        return
    if not allowed:
        raise SystemExit(
            f"bench_conntrack: --entries {entries:,} exceeds the host's nf_conntrack_max "
            f"({before:,}), which only the host namespace can raise; give --raise-host-max "
            "to raise it for the run"
        )
    with open(HOST_MAX, "w") as f:
        f.write(str(entries + entries // 10))
    try:
        yield
    finally:
        with open(HOST_MAX, "w") as f:
            f.write(str(before))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--cpu-seconds", type=float, default=30.0)
    parser.add_argument("--role", choices=("main", "agent"), default="main")
    parser.add_argument("--netns")
    parser.add_argument("--inventory")
    parser.add_argument(
        "--profile", action="store_true", help="print where the first poll's time goes (cProfile)"
    )
    parser.add_argument(
        "--raise-host-max",
        action="store_true",
        help="raise the host's nf_conntrack_max for the run when --entries needs it",
    )
    args = parser.parse_args()
    if args.role == "agent":
        agent_role(args.netns, args.inventory, args.cpu_seconds, args.profile)
        return 0
    if os.geteuid() != 0 or not shutil.which("conntrack"):
        print("bench_conntrack: needs root and conntrack-tools; skipped")
        print(json.dumps({"entries": args.entries, "skipped": True}))
        return 0
    with host_max_at_least(args.entries, args.raise_host_max):
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    ns = make_namespace(args.entries)
    tmp = tempfile.mkdtemp(prefix="afxb-")
    try:
        fill_seconds = time.perf_counter() - start
        inventory_file = os.path.join(tmp, "inventory.yaml")
        inventory(inventory_file)
        cli = conntrack_cli(ns)
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--role",
                "agent",
                "--netns",
                ns,
                "--inventory",
                inventory_file,
                "--cpu-seconds",
                str(args.cpu_seconds),
                *(["--profile"] if args.profile else []),
            ],
            capture_output=True,
            text=True,
        )
        if child.returncode:
            raise RuntimeError(f"agent role failed:\n{child.stderr}")
        if args.profile:
            print("the agent's first poll under cProfile (a slower poll than the timed one):")
            print(child.stderr.rstrip())
        agent = json.loads(child.stdout.strip().splitlines()[-1])
        cli_after = conntrack_cli(ns)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
        shutil.rmtree(tmp, ignore_errors=True)
    cli = min(cli, cli_after)
    n = agent["entries"]
    print(
        f"bench_conntrack: {n} entries in zone 65520 (filled in {fill_seconds:.1f} s), "
        f"{os.cpu_count()} CPUs, kernel {os.uname().release}"
    )
    print(f"  conntrack -L (C, conntrack-tools)   {cli:7.3f} s")
    print(f"  raw kernel dump (netlink only)      {agent['raw_dump_seconds']:7.3f} s")
    print(f"  raw dump just after a tenth changed {agent['raw_busy_dump_seconds']:7.3f} s")
    for label, key, raw in (
        ("first poll, all new", "agent_first_poll_seconds", agent["raw_dump_seconds"]),
        ("steady poll, all present", "agent_steady_poll_seconds", agent["raw_dump_seconds"]),
        ("busy poll, a tenth changed", "agent_busy_poll_seconds", agent["raw_busy_dump_seconds"]),
    ):
        value = agent[key]
        print(
            f"  agent {label:<29} {value:7.3f} s  ({value / cli:.2f}x conntrack -L, "
            f"{value / raw:.2f}x the raw dump, {value / n * 1e6:.2f} us/entry)"
        )
    if agent["cpu_share_percent"] is not None:
        print(
            f"  agent CPU share, busy polls every 5 s {agent['cpu_share_percent']:4.1f} % of one "
            f"core ({agent['cpu_polls']} polls)"
        )
    share = agent["rss_mb"] - agent["rss_mb_before_poll"]
    print(
        f"  agent RSS with {agent['stored']} connections: {agent['rss_mb']:.0f} MB: "
        f"{agent['rss_mb_before_poll']:.0f} MB before the first poll (Python and what the "
        f"agent imports: numpy, the kubernetes client, cryptography), {share:.0f} MB since "
        f"({share * 2**20 / max(1, agent['stored']):.0f} bytes a connection)"
    )
    print(
        "  goals: first poll no slower than conntrack -L, every poll within 1.3x the raw "
        "dump, RSS at 100,000 connections <= 80 MB"
    )
    print(
        json.dumps(
            {
                "entries": n,
                # the poll cycle that recurs every flowPollInterval over a busy table (a
                # tenth of the connections carried traffic since the last poll); the first
                # poll also creates every connection once, at agent start
                "agent_poll_seconds": round(agent["agent_busy_poll_seconds"], 4),
                "agent_steady_poll_seconds": round(agent["agent_steady_poll_seconds"], 4),
                "agent_first_poll_seconds": round(agent["agent_first_poll_seconds"], 4),
                "conntrack_cli_seconds": round(cli, 4),
                "raw_dump_seconds": round(agent["raw_dump_seconds"], 4),
                "raw_busy_dump_seconds": round(agent["raw_busy_dump_seconds"], 4),
                "cpu_share_percent": agent["cpu_share_percent"]
                and round(agent["cpu_share_percent"], 2),
                "agent_rss_mb": round(agent["rss_mb"], 1),
                "agent_rss_mb_before_poll": round(agent["rss_mb_before_poll"], 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
