"""Benchmark: the netobserv paper's overhead experiment, side by side in one run.

Two network namespaces joined by a veth pair (created here, removed at the end, even on
failure): iperf3 sends as fast as one core can (pinned to CPU 0; its server to CPU 1) into
the receiver's interface, where each observer in turn watches:
- nothing (the baseline);
- the agent's eBPF counter path (the TC program and a process evicting every 5 s);
- tcpdump -w /dev/null; softflowd; pmacctd (memory plugin): the libpcap-based peers.
For UDP of 64 and of 1400 bytes per IP packet (8 flows), then TCP with -P 8, it prints the
packets per second the receiver's interface took in (rx, and tx for TCP), the loss against
the baseline, the observer's monitoring rate (packets it accounted / packets the interface
saw), its CPU (seconds per second) and peak RSS. Timings are printed, never asserted; the
last line is a JSON object. Root, BCC, iperf3, tcpdump, softflowd and pmacct needed.

    test/bench/bench_ebpf.py [--seconds S] [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchkit

SENDER_IP, RECEIVER_IP = "10.77.0.1", "10.77.0.2"
OBSERVERS = ("none", "ebpf", "tcpdump", "softflowd", "pmacctd")


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


class Pair:
    """A sender and a receiver namespace, joined by veth vs <-> vr."""

    def __init__(self) -> None:
        prefix = "afeb-" + secrets.token_hex(3)
        self.sender, self.receiver = f"{prefix}-snd", f"{prefix}-rcv"

    def __enter__(self) -> Pair:
        for ns in (self.sender, self.receiver):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.sender, "link", "add", "vs", "type", "veth", "peer", "name", "vr",
           "netns", self.receiver)  # fmt: skip
        sh("ip", "-n", self.sender, "addr", "add", f"{SENDER_IP}/24", "dev", "vs")
        sh("ip", "-n", self.receiver, "addr", "add", f"{RECEIVER_IP}/24", "dev", "vr")
        sh("ip", "-n", self.sender, "link", "set", "vs", "up")
        sh("ip", "-n", self.receiver, "link", "set", "vr", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.sender, self.receiver):
            for pid in sh("ip", "netns", "pids", ns, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)

    def counters(self) -> tuple[int, int]:
        """(rx, tx) packets of the receiver's interface."""
        (link,) = json.loads(sh("ip", "-n", self.receiver, "-s", "-j", "link", "show", "vr"))
        return link["stats64"]["rx"]["packets"], link["stats64"]["tx"]["packets"]

    def in_receiver(self, *args: str, **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.receiver, *args], **kwargs)


def proc_cpu(pid: int) -> float:
    """User and system seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Observer:
    """One observer process on the receiver's interface: start, then `finish` gives the
    packets it accounted, its CPU seconds and peak RSS."""

    def __init__(self, name: str, pair: Pair, workdir: Path):
        self.name, self.pair, self.workdir = name, pair, workdir
        self.process: subprocess.Popen | None = None
        self.cpu_at_start = 0.0

    def start(self) -> None:
        pair, work = self.pair, self.workdir
        if self.name == "none":
            return
        if self.name == "ebpf":
            self.process = pair.in_receiver(
                sys.executable, os.path.abspath(__file__), "--role=ebpf",
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert self.process.stdout is not None
            line = self.process.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"the eBPF observer did not start: {line!r}")
        elif self.name == "tcpdump":
            self.process = pair.in_receiver(
                "tcpdump", "-i", "vr", "-n", "-q", "-w", "/dev/null",
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            time.sleep(1.0)
        elif self.name == "softflowd":
            self.process = pair.in_receiver(
                "softflowd", "-i", "vr", "-d", "-n", "127.0.0.1:9996", "-c", str(work / "sf.ctl"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)
        elif self.name == "pmacctd":
            self.process = pair.in_receiver(
                "pmacctd", "-i", "vr", "-P", "memory", "-p", str(work / "pm.pipe"), "-c", "proto",
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)
        if self.process is not None:
            self.cpu_at_start = proc_cpu(self.process.pid)

    def finish(self) -> dict[str, Any]:
        process = self.process
        if process is None:
            return {"accounted": None, "cpu_seconds": 0.0, "peak_rss_mb": 0.0}
        cpu = proc_cpu(process.pid) - self.cpu_at_start
        rss = proc_peak_rss_mb(process.pid)
        accounted = None
        if self.name == "ebpf":
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write("stop\n")
            process.stdin.flush()
            report = json.loads(process.stdout.readline())
            accounted = report["packets"]
        elif self.name == "tcpdump":
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
            match = re.search(r"(\d+) packets captured", err)
            accounted = int(match.group(1)) if match else None
        elif self.name == "softflowd":
            out = sh("ip", "netns", "exec", self.pair.receiver, "softflowctl", "-c",
                     str(self.workdir / "sf.ctl"), "statistics")  # fmt: skip
            match = re.search(r"Packets processed: (\d+)", out)
            accounted = int(match.group(1)) if match else None
        elif self.name == "pmacctd":
            out = sh("ip", "netns", "exec", self.pair.receiver, "pmacct", "-p",
                     str(self.workdir / "pm.pipe"), "-s")  # fmt: skip
            accounted = sum(int(m.group(1)) for m in re.finditer(r"^\S+\s+(\d+)\s+\d+$", out, re.M))
        if process.poll() is None:
            process.kill()
        process.wait(30)
        return {"accounted": accounted, "cpu_seconds": cpu, "peak_rss_mb": rss}


def run_traffic(pair: Pair, mode: str, size: int, seconds: float) -> None:
    server = pair.in_receiver("taskset", "-c", "1", "iperf3", "-s", "-1",
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.5)
    args = ["ip", "netns", "exec", pair.sender, "taskset", "-c", "0", "iperf3", "-c",
            RECEIVER_IP, "-t", str(seconds), "-P", "8"]  # fmt: skip
    if mode == "udp":
        args += ["-u", "-b", "0", "-l", str(size - 28)]
    subprocess.run(args, check=True, capture_output=True, timeout=seconds + 60)
    server.wait(30)


def measure(pair: Pair, workdir: Path, mode: str, size: int, observer: str, seconds: float):
    watcher = Observer(observer, pair, workdir)
    watcher.start()
    rx0, tx0 = pair.counters()
    started = time.perf_counter()
    run_traffic(pair, mode, size, seconds)
    wall = time.perf_counter() - started
    rx1, tx1 = pair.counters()
    seen = (rx1 - rx0) + ((tx1 - tx0) if mode == "tcp" else 0)
    report = watcher.finish()
    accounted = report["accounted"]
    return {
        "mode": mode,
        "size": size,
        "observer": observer,
        "packets": seen,
        "pps": round(seen / wall),
        "monitoring": None if accounted is None else round(min(accounted, seen) / seen, 4),
        "accounted": accounted,
        "cpu_per_s": round(report["cpu_seconds"] / wall, 3),
        "peak_rss_mb": round(report["peak_rss_mb"], 1),
    }


def _median(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One case over its rounds: the median rate and monitoring, the mean CPU, the most RSS."""
    out = dict(rounds[0])
    out["pps"] = int(statistics.median(r["pps"] for r in rounds))
    out["pps_rounds"] = [r["pps"] for r in rounds]
    rates = [r["monitoring"] for r in rounds if r["monitoring"] is not None]
    out["monitoring"] = statistics.median(rates) if rates else None
    out["cpu_per_s"] = round(statistics.mean(r["cpu_per_s"] for r in rounds), 3)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    return out


# -- the eBPF observer's own process ------------------------------------------------------


def ebpf_role() -> None:
    """The counter path as the agent runs it, in the receiver's namespace: attached to vr,
    evicting every 5 s; on 'stop', the packets it counted (ingress of vr)."""
    from antrea_flow.ebpf.counter import PacketCounter

    counter = PacketCounter(None, 100_000, interfaces=("vr",))
    counter.start()
    print("ready", flush=True)
    packets = 0
    import select

    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 5.0)
        flows, _ = counter.evict()
        packets += int(flows["packets"].sum() + flows["rev_packets"].sum())
        if ready:
            sys.stdin.readline()
            break
    counter.stop()
    print(json.dumps({"packets": packets}), flush=True)


def main(args: argparse.Namespace) -> int:
    missing = [t for t in ("iperf3", "tcpdump", "softflowd", "pmacctd", "taskset")
               if shutil.which(t) is None]  # fmt: skip
    if os.geteuid() != 0 or missing:
        print(f"skipped: needs root and {', '.join(missing) or 'nothing else'}")
        return 0
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    with Pair() as pair, tempfile.TemporaryDirectory() as work:
        # Rounds of every case in turn: the VM's speed drifts; the median of each case's
        # rounds is what it reports.
        for _ in range(args.rounds):
            for mode, size in (("udp", 64), ("udp", 1400), ("tcp", 0)):
                for observer in OBSERVERS:
                    result = measure(pair, Path(work), mode, size, observer, args.seconds)
                    runs.setdefault((mode, size, observer), []).append(result)
    results = [_median(rounds) for rounds in runs.values()]
    print(f"observers on a veth under iperf3 at one sender core, median of {args.rounds} "
          f"round(s) of {args.seconds:g} s ({benchkit.machine()})")  # fmt: skip
    header = (f"  {'traffic':<12} {'observer':<10} {'pkts/s':>10} {'loss':>7} {'monitored':>10} "
              f"{'CPU s/s':>8} {'RSS MB':>7}")  # fmt: skip
    print(header)
    baseline = {}
    for r in results:
        traffic = f"{r['mode']} {r['size']}B" if r["mode"] == "udp" else "tcp -P 8"
        if r["observer"] == "none":
            baseline[traffic] = r["pps"]
        loss = 1 - r["pps"] / baseline[traffic] if baseline.get(traffic) else 0.0
        r["loss"] = round(loss, 4)
        monitored = "-" if r["monitoring"] is None else f"{r['monitoring']:.1%}"
        print(f"  {traffic:<12} {r['observer']:<10} {r['pps']:>10,} {loss:>7.1%} {monitored:>10} "
              f"{r['cpu_per_s']:>8.3f} {r['peak_rss_mb']:>7.1f}")  # fmt: skip
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", default="main", choices=("main", "ebpf"))
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--quick", action="store_true", help="one round of 3 s runs")
    arguments = parser.parse_args()
    benchkit.fill_sizes(arguments, seconds=(3.0, 8.0), rounds=(1, 3))
    if arguments.role == "ebpf":
        ebpf_role()
    else:
        sys.exit(main(arguments))
