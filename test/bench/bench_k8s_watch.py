"""Benchmark: the Kubernetes API metadata source under churn, beside kubectl.

A fake API server (test/integration/fakeapi.py, in a child process of its own, so its work
is not counted here) holds 10,000 Pods, 1,000 Services, 100 Nodes and 500 NetworkPolicies.
This process runs the real `kubernetes` client through the ApiSource, as a component does:
- list-to-ready: from start until every kind is listed and indexed, beside
  `kubectl get pods -A -o json` listing the same Pods (the peer, same run, same server);
- then the server makes 1,000 Pod events per second for 30 s (new Pods, label changes,
  deletions): events applied per second, the backlog when the churn stops (events the
  store had not applied yet, and how long it took to catch up), and the CPU this process
  spent per wall-clock second of churn (1.0 = one core);
- the lookup rate of a thread doing what enrichment does (a Pod by IP, a Service by
  address) before the churn and during it;
- peak RSS of this process.
Timings are printed, never asserted; the last line is a JSON object.

    test/bench/bench_k8s_watch.py [--pods N] [--rate EVENTS_PER_S] [--seconds S] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # test/: the fake API server

import benchkit  # noqa: E402  (this folder is on sys.path: the script's own)
from integration.fakeapi import FakeApiServer  # noqa: E402

from antrea_flow.k8s.client import api_connection  # noqa: E402
from antrea_flow.k8s.stores import MetadataStore, pack_ip  # noqa: E402
from antrea_flow.k8s.watch import (  # noqa: E402
    NETWORK_POLICIES,
    NODES,
    PODS,
    SERVICES,
    ApiSource,
)

RESOURCES = (PODS, NODES, SERVICES, NETWORK_POLICIES)


# -- the objects -------------------------------------------------------------------------


def pod_ip(index: int) -> str:
    return f"10.{16 + index // 65536}.{index // 256 % 256}.{index % 256}"


def pod(index: int, generation: int = 0) -> dict[str, Any]:
    """A Pod with the fields a real one has (about 2 KB of JSON)."""
    name = f"web-{index}"
    node = f"node-{index % 100}"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": f"ns-{index % 50}",
            "labels": {"app": "web", "pod-template-hash": "5d4f8c7b9", "gen": str(generation)},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-01T00:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": "web-5d4f8c7b9", "uid": f"rs-{index % 50}",
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": "default",
            "containers": [{"name": "web", "image": "nginx:1.27",
                            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}],
        },
        "status": {
            "phase": "Running",
            "hostIP": f"192.168.{index % 100 // 250}.{index % 100 + 1}",
            "podIP": pod_ip(index),
            "podIPs": [{"ip": pod_ip(index)}],
            "conditions": [{"type": t, "status": "True",
                            "lastTransitionTime": "2026-12-01T00:00:00Z"}
                           for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
            "containerStatuses": [{"name": "web", "ready": True, "restartCount": 0,
                                   "image": "nginx:1.27", "imageID": "sha256:" + "0" * 64,
                                   "containerID": "containerd://" + f"{index:064x}"}],
        },
    }  # fmt: skip


def cluster(pods: int) -> list[dict[str, Any]]:
    objects = [pod(i) for i in range(pods)]
    objects += [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"node-{i}"},
         "spec": {"podCIDRs": [f"10.{16 + i // 256}.{i % 256}.0/24"]},
         "status": {"addresses": [{"type": "InternalIP", "address": f"192.168.0.{i + 1}"}]}}
        for i in range(100)
    ]  # fmt: skip
    objects += [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": f"svc-{i}", "namespace": f"ns-{i % 50}"},
         "spec": {"clusterIP": f"10.96.{i // 256}.{i % 256}",
                  "clusterIPs": [f"10.96.{i // 256}.{i % 256}"],
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
        for i in range(1000)
    ]  # fmt: skip
    objects += [
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": f"np-{i}", "namespace": f"ns-{i % 50}",
                      "annotations": {"antrea-flow.io/rule-ids":
                                      json.dumps({"ingress": [2 * i + 1], "egress": [2 * i + 2]})}},
         "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                  "ingress": [{"from": [{"podSelector": {}}]}], "egress": [{}]}}
        for i in range(500)
    ]  # fmt: skip
    return objects


# -- the server's process ----------------------------------------------------------------


def serve(args: argparse.Namespace) -> None:
    """Holds the cluster; on 'churn' makes Pod events at args.rate for args.seconds."""
    server = FakeApiServer().start()
    server.bookmark_interval = 60.0  # as a real server: seldom
    # kubectl sends no bearer token over plain HTTP: the peer's requests go anonymous.
    server.tokens[""] = "system:anonymous"
    server.put_all(cluster(args.pods))
    print(json.dumps({"port": server.port}), flush=True)
    for line in sys.stdin:
        if line.strip() != "churn":
            break
        events, started = 0, time.monotonic()
        live = list(range(args.pods))
        next_index = args.pods
        rng = random.Random(7)
        while (elapsed := time.monotonic() - started) < args.seconds:
            due = int(elapsed * args.rate) - events
            for _ in range(max(0, due)):
                choice = events % 3
                if choice == 0:  # a new Pod
                    server.put(pod(next_index))
                    live.append(next_index)
                    next_index += 1
                elif choice == 1:  # a changed one (its labels: a change lookups see)
                    server.put(pod(rng.choice(live), generation=events))
                else:  # one deleted
                    server.delete(pod(live.pop(rng.randrange(len(live)))))
                events += 1
            time.sleep(0.002)
        print(json.dumps({"events": events, "seconds": time.monotonic() - started}), flush=True)
    server.stop()


# -- this process ------------------------------------------------------------------------


def kubectl_list(kubeconfig: Path) -> float | None:
    """Seconds `kubectl get pods -A -o json` takes against the server (None without kubectl)."""
    if shutil.which("kubectl") is None:
        return None
    started = time.perf_counter()
    result = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "get", "pods", "-A", "-o", "json",
         "--request-timeout=60s"],
        capture_output=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        print(f"kubectl failed: {result.stderr.decode()[-300:]}", file=sys.stderr)
        return None
    return seconds


class Lookups:
    """A thread looking up Pods by IP and Services by address, as enrichment does."""

    def __init__(self, store: MetadataStore, pods: int):
        self.store = store
        self.ips = [pack_ip(pod_ip(i)) for i in range(0, pods, 7)]
        self.services = [pack_ip(f"10.96.{i // 256}.{i % 256}") for i in range(0, 1000, 3)]
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        store, ips, services = self.store, self.ips, self.services
        while not self._stop.is_set():
            for ip in ips:
                store.pod(ip)
            for ip in services:
                store.service(ip, 80, 6)
            self.count += len(ips) + len(services)

    def rate(self, seconds: float) -> float:
        before, started = self.count, time.perf_counter()
        time.sleep(seconds)
        return (self.count - before) / (time.perf_counter() - started)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


async def measure(args: argparse.Namespace, server: subprocess.Popen, port: int) -> dict:
    directory = Path(tempfile.mkdtemp(prefix="bench-k8s-"))
    fake = FakeApiServer(port)  # only for its kubeconfig
    kubeconfig = fake.kubeconfig(directory / "kubeconfig")
    peer = kubectl_list(kubeconfig)
    connection = api_connection(str(kubeconfig))
    assert connection is not None
    store = MetadataStore()
    source = ApiSource(connection, RESOURCES, store)
    started = time.perf_counter()
    source.start()
    try:
        assert await source.wait_synced(300), "not synced"
        ready = time.perf_counter() - started
        counts = store.counts
        rss_ready = benchkit.peak_rss_mb()
        lookups = Lookups(store, args.pods)
        lookups.start()
        idle_rate = await asyncio.to_thread(lookups.rate, 2.0)
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write("churn\n")
        server.stdin.flush()
        churn_started = time.perf_counter()
        # The first third with the lookups running, the rest without: this process's CPU
        # then is what applying the events costs.
        churn_rate = await asyncio.to_thread(lookups.rate, args.seconds / 3)
        lookups.stop()
        cpu_before, cpu_started = benchkit.cpu_seconds(), time.perf_counter()
        done = json.loads(await asyncio.to_thread(server.stdout.readline))
        churn_end = time.perf_counter()
        applied_at_end = source.stats.events.get("pods", 0)
        cpu_churn = (benchkit.cpu_seconds() - cpu_before) / (churn_end - cpu_started)
        while source.stats.events.get("pods", 0) < done["events"]:
            await asyncio.sleep(0.01)
            if time.perf_counter() - churn_end > 60:
                break
        caught_up = time.perf_counter() - churn_end
        applied = source.stats.events.get("pods", 0)
    finally:
        await source.stop()
        shutil.rmtree(directory, ignore_errors=True)
    wall = churn_end - churn_started
    return {
        "pods": args.pods,
        "index": {"nodes": counts.nodes, "pod_ips": counts.pod_ips,
                  "service_ports": counts.services, "policy_rules": counts.rules},
        "list_to_ready_s": round(ready, 3),
        "kubectl_list_pods_s": None if peer is None else round(peer, 3),
        "events_made": done["events"],
        "events_per_s_made": round(done["events"] / done["seconds"]),
        "events_applied": applied,
        "backlog_at_churn_end": done["events"] - applied_at_end,
        "caught_up_after_s": round(caught_up, 3),
        "events_per_s_applied": round(applied / (wall + caught_up)),
        "cpu_per_wall_s_during_churn": round(cpu_churn, 3),
        "lookups_per_s_idle": round(idle_rate),
        "lookups_per_s_churn": round(churn_rate),
        "rss_at_ready_mb": round(rss_ready, 1),
        "peak_rss_mb": round(benchkit.peak_rss_mb(), 1),
        "relists": dict(source.stats.relists),
        "failures": dict(source.stats.failures),
    }  # fmt: skip


def main(args: argparse.Namespace) -> int:
    benchkit.log_warnings()
    server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--role=server", f"--pods={args.pods}",
         f"--rate={args.rate}", f"--seconds={args.seconds}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        result = asyncio.run(measure(args, server, port))
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(30)
    print(f"metadata source under churn ({benchkit.machine()})")
    print(f"  initial list: {args.pods:,} Pods, 1,000 Services, 100 Nodes, 500 NetworkPolicies")
    print(f"    list to ready (antrea-flow)     {result['list_to_ready_s']:>8.2f} s")
    peer = result["kubectl_list_pods_s"]
    print(f"    kubectl get pods -A -o json     {'n/a' if peer is None else f'{peer:>8.2f} s'}")
    print(f"  churn: {result['events_made']:,} Pod events at {result['events_per_s_made']:,}/s")
    print(f"    applied                         {result['events_per_s_applied']:>8,}/s")
    print(f"    backlog when the churn stopped  {result['backlog_at_churn_end']:>8,} events "
          f"(caught up {result['caught_up_after_s']:.2f} s later)")  # fmt: skip
    print(f"    CPU during churn                {result['cpu_per_wall_s_during_churn']:>8.2f} "
          "cores")  # fmt: skip
    print("  lookups (Pod by IP, Service by address), another thread:")
    print(f"    before the churn                {result['lookups_per_s_idle']:>12,}/s")
    print(f"    during the churn                {result['lookups_per_s_churn']:>12,}/s")
    print(f"  RSS at ready {result['rss_at_ready_mb']} MB, peak {result['peak_rss_mb']} MB")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", default="main", choices=("main", "server"))
    parser.add_argument("--pods", type=int)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--quick", action="store_true", help="1,000 Pods for 5 s")
    arguments = parser.parse_args()
    benchkit.fill_sizes(arguments, pods=(1000, 10_000), seconds=(5.0, 30.0))
    if arguments.role == "server":
        serve(arguments)
    else:
        sys.exit(main(arguments))
