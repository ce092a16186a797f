"""The `lab` command: up, down, status, inventory, exec."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import yaml

from ..errors import UsageError
from .cluster import Cluster, build_cluster, load_cluster
from .dataplane import HTTP_PORT, IPERF_PORT, STATE_DIR, Dataplane, Names, namespaces, remove, run
from .rules import NOT_QUEUED_COMMENT

CLUSTER_FILE = "cluster.yaml"


def _saved(lab: str) -> Path:
    return STATE_DIR / lab / CLUSTER_FILE


def current_cluster(lab: str) -> Cluster:
    """The cluster lab `lab` was brought up with (the default one if it is not up)."""
    path = _saved(lab)
    if path.exists():
        return build_cluster(yaml.safe_load(path.read_text())["items"])
    return load_cluster()


def up(lab: str, config: str | None) -> Dataplane:
    cluster = load_cluster(config)
    dataplane = Dataplane(cluster, lab)
    saved = _saved(lab)
    if (
        _is_up(dataplane)
        and saved.exists()
        and yaml.safe_load(saved.read_text())["items"] == cluster.objects
    ):
        print(f"lab {lab} is already up")
        return dataplane
    dataplane.up()
    path = _saved(lab)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": cluster.objects}))
    print(f"lab {lab} is up: {len(cluster.nodes)} nodes, {len(cluster.pods)} pods")
    return dataplane


def _is_up(dataplane: Dataplane) -> bool:
    expected = {dataplane.names.underlay, dataplane.names.external}
    expected |= {dataplane.names.node(n) for n in dataplane.cluster.nodes}
    expected |= {dataplane.names.pod(p) for p in dataplane.cluster.pods}
    return expected <= set(namespaces(dataplane.names.prefix))


def down(lab: str | None) -> list[str]:
    """Remove lab `lab`, or every lab (None), whatever state it was left in."""
    prefix = Names(lab).prefix if lab else "afl-"
    removed = remove(prefix)
    for directory in [STATE_DIR / lab] if lab else STATE_DIR.glob("*"):
        shutil.rmtree(directory, ignore_errors=True)  # the saved cluster and server logs
    return removed


def status(lab: str) -> str:
    cluster = current_cluster(lab)
    names = Names(lab)
    present = set(namespaces(names.prefix))
    lines = [f"lab {lab}: {'up' if present else 'down'} ({len(present)} namespaces)"]
    if not present:
        return "\n".join(lines)
    lines.append(f"{'NODE':<10} {'POD CIDRS':<36} {'CONNTRACK':>9} {'DENIED NOT QUEUED':>18}")
    for node in cluster.nodes:
        ns = names.node(node)
        if ns not in present:
            lines.append(f"{node.name:<10} missing")
            continue
        count = run(["ip", "netns", "exec", ns, "conntrack", "-C"], check=False).strip()
        lines.append(
            f"{node.name:<10} {', '.join(map(str, node.pod_cidrs)):<36} {count:>9} "
            f"{_not_queued(ns):>18}"
        )
    lines.append(f"{'POD':<22} {'NODE':<8} {'IPS':<34} SERVERS")
    for pod in cluster.pods:
        ns = names.pod(pod)
        listening = (
            run(["ip", "netns", "exec", ns, "ss", "-Htln"], check=False) if ns in present else ""
        )
        servers = [str(p) for p in (HTTP_PORT, IPERF_PORT) if f":{p}" in listening]
        ips = ", ".join(pod.addresses[v] for v in sorted(pod.addresses))
        state = ", ".join(servers) if ns in present else "missing"
        lines.append(f"{pod.key:<22} {pod.node.name:<8} {ips:<34} {state}")
    external = f"{cluster.external_address(4)}, {cluster.external_address(6)}"
    lines.append(f"external host: {external} ({'up' if names.external in present else 'missing'})")
    return "\n".join(lines)


def _not_queued(netns: str) -> int:
    """Denied packets the Node did not hand to the agent (over the queue's rate)."""
    total = 0
    for command in ("iptables", "ip6tables"):
        out = run(
            ["ip", "netns", "exec", netns, command, "-t", "mangle", "-L", "-v", "-x", "-n"],
            check=False,
        )
        for line in out.splitlines():
            if NOT_QUEUED_COMMENT in line:
                total += int(line.split()[0])
    return total


def execute(lab: str, target: str, command: list[str]) -> None:
    """Replace this process with `command` inside the network namespace of Pod `target`."""
    if not command:
        raise UsageError(
            "lab exec: give a command after --, e.g. lab exec frontend/client-1 -- ip addr"
        )
    if target == "external":
        ns = Names(lab).external
    else:
        ns = Names(lab).pod(current_cluster(lab).pod(target))
    if ns not in namespaces(Names(lab).prefix):
        raise UsageError(f"lab exec: {target} is not running (lab {lab} is not up?)")
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", ns, *command])


def main(args) -> int:
    # `inventory` only reads the cluster (the default one, a file, or the one a lab saved).
    if args.lab_command != "inventory" and os.geteuid() != 0:
        raise UsageError(f"lab {args.lab_command} needs root (it works in network namespaces)")
    if args.lab_command == "up":
        up(args.name, args.config)
    elif args.lab_command == "down":
        removed = down(None if args.all else args.name)
        print(f"removed {len(removed)} namespaces" if removed else "nothing to remove")
    elif args.lab_command == "status":
        print(status(args.name))
    elif args.lab_command == "inventory":
        cluster = current_cluster(args.name) if args.config is None else load_cluster(args.config)
        sys.stdout.write(yaml.safe_dump(cluster.inventory(), sort_keys=False))
    elif args.lab_command == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        execute(args.name, args.target, argv)
    return 0
