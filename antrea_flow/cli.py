"""The antrea-flow command line: one sub-command per deployable role."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import UsageError
from .ipfix.address import AddressError


def _aggregator(sub) -> None:
    p = sub.add_parser(
        "aggregator",
        help="the flow aggregator: join both Nodes' records, export to collectors",
        description="Receive the agents' records (mutual TLS by default), correlate the two "
        "halves of inter-node flows, aggregate, and export to an IPFIX collector and/or a "
        "JSON-lines file.",
    )
    p.add_argument("--config", required=True, help="flow-aggregator.conf (YAML)")


def _collector(sub) -> None:
    p = sub.add_parser(
        "collector",
        help="receive IPFIX and print one line per data record",
        description="Listen for IPFIX (TCP, UDP or mutual TLS) and print each decoded data "
        "record on one line.",
    )
    p.add_argument(
        "--address",
        default="0.0.0.0:4739:tcp",
        help="HOST:PORT[:tcp|udp|tls] to listen on (default 0.0.0.0:4739:tcp)",
    )
    p.add_argument("--ca", help="CA certificate that signs accepted client certificates (tls)")
    p.add_argument("--cert", help="server certificate (tls)")
    p.add_argument("--key", help="server private key (tls)")
    p.add_argument("--output", choices=("json", "text"), default="json")


def _agent(sub) -> None:
    p = sub.add_parser(
        "agent",
        help="the node agent: poll conntrack and export flow records",
        description="Poll a network namespace's conntrack table every flowPollInterval and "
        "export flow records over IPFIX to the flow aggregator.",
    )
    p.add_argument("--config", required=True, help="antrea-agent.conf (YAML)")
    p.add_argument("--node-name", help="this node's name (default: the host name)")
    p.add_argument("--netns", help="network namespace (as in `ip netns`) whose conntrack to poll")


def _lab(sub) -> None:
    p = sub.add_parser(
        "lab",
        help="a two-node dual-stack cluster in network namespaces (the product's dataplane)",
        description="Pods, Services, Kubernetes and Antrea-native NetworkPolicies, built in "
        "network namespaces of this machine; nothing outside them is touched.",
    )
    lab = p.add_subparsers(dest="lab_command", required=True)
    name_help = "the lab's name: several labs can run side by side (default: lab)"
    up = lab.add_parser("up", help="build the cluster (again, if it is up with another config)")
    up.add_argument("--config", help="a cluster file (a Kubernetes List, like the default)")
    down = lab.add_parser("down", help="remove everything the lab created")
    down.add_argument("--all", action="store_true", help="remove every lab")
    status = lab.add_parser("status", help="namespaces, Pods, servers, conntrack")
    inventory = lab.add_parser(
        "inventory", help="print the cluster as a Kubernetes List (the agent's inventoryFile)"
    )
    inventory.add_argument("--config", help="render this cluster file instead of the running one")
    exec_ = lab.add_parser("exec", help="run a command in a Pod's network namespace")
    exec_.add_argument("target", metavar="NAMESPACE/POD", help="a Pod, or 'external'")
    exec_.add_argument("argv", metavar="CMD", nargs=argparse.REMAINDER, help="-- CMD...")
    for command in (up, down, status, inventory, exec_):
        command.add_argument("--name", default="lab", help=name_help)


def _quickstart(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="the whole pipeline on the lab: agents, aggregator, collector, traffic",
    )
    p.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    p.add_argument("--output", default="out/quickstart", help="directory for flows.jsonl")


def _observe(sub) -> None:
    from . import observe

    observe.add_parser(sub)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="antrea-flow", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    _agent(sub)
    _aggregator(sub)
    _collector(sub)
    _lab(sub)
    _quickstart(sub)
    _observe(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "agent":
            from .exporter import agent

            return agent.main(args)
        if args.command == "aggregator":
            from .aggregator import service

            return service.main(args)
        if args.command == "collector":
            from . import collector

            return collector.main(args)
        if args.command == "lab":
            from .lab import command

            return command.main(args)
        if args.command == "observe":
            from . import observe

            return observe.main(args)
        if args.command == "quickstart":
            from . import quickstart

            return quickstart.main(args)
    except (AddressError, UsageError, OSError) as exc:
        print(f"antrea-flow {args.command}: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
