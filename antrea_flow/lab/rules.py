"""A Node's netfilter rules, as iptables-restore documents (one per IP family).

- raw: Pod traffic (from Pods, or from the uplink to Pods or to the Pod SNAT address) is
  tracked in conntrack zone 65520, as Antrea's OVS does; UDP to or from port 5201
  (iperf3's) is not tracked at all, as operators exempt high-rate UDP from conntrack.
- mangle: new connections get Antrea's connection-source mark bits (0x2 from a local Pod,
  0x1 from the uplink) and the Service bit (0x10) when DNATed. Policies are evaluated for
  every packet the filter evaluates them for (neither ESTABLISHED nor RELATED: new
  connections, and invalid packets); a denied packet gets its rule id as packet mark and
  goes to the Node's one packet-in chain, which hands it to the agent on NFQUEUE through
  the Node's only rate limit (like Antrea's packet-in meter, one per Node; iptables keeps
  a limit per address family, so one for IPv4 and one for IPv6) and bypasses the queue
  when no agent listens.
- nat: Services as kube-proxy implements them (random choice among endpoints, DNAT), and
  SNAT of Pod traffic leaving the cluster to the Node's Pod SNAT address.
- filter: the same policy evaluation enforces the decision whatever the agent answered:
  Drop drops, Reject answers TCP RST (ICMP port unreachable otherwise); an allowing rule
  writes its id into the connection's ct labels (ingress in bytes 12..15, egress in 8..11,
  big endian), where the agent reads it.

Evaluation per direction (egress for the source Pod, ingress for the destination Pod, each
on its own Node): Antrea-native rules by Tier then priority, first match decides (Allow ends
the direction, Pass skips to Kubernetes NetworkPolicies); then, if the Pod is isolated by
a Kubernetes NetworkPolicy, its allow rules, else the isolation drop.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from ..codes import ANTREA_POD_ZONE
from .cluster import (
    ISOLATION_EGRESS_ID,
    ISOLATION_INGRESS_ID,
    Cluster,
    Node,
    Pod,
    Rule,
    rule_id,
)

MARK_FROM_UPLINK = 0x1
MARK_FROM_POD = 0x2
MARK_SERVICE = 0x10
# Packet mark bit for "an ipBlock exception matched": rules with exceptions are compiled as
# set-flag / match-unless-flag / clear-flag. Rule ids use the low 30 bits.
EXCEPT_FLAG = 0x40000000
DENY_QUEUE = 1
PACKET_IN_CHAIN = "AFL-PACKET-IN"
DENY_RATE = 5000  # packets/s handed to the agent per address family (Antrea's packetInRate)
# Antrea's meter allows bursts of twice the rate, but a packet that finds the agent's queue
# full (4096, QUEUE_LENGTH in exporter/denyqueue.py) goes on unseen and uncounted (fail
# open): a burst of one family alone never fills it (an IPv4 and an IPv6 burst at the
# same moment could).
DENY_BURST = 4096
NOT_QUEUED_COMMENT = "antrea-flow: denied, not queued (over rate)"
# The packets the filter's policy chains see: all but ESTABLISHED and RELATED.
POLICED = "-m conntrack ! --ctstate RELATED,ESTABLISHED"

# UDP to or from this port (iperf3's) bypasses conntrack on every Node.
UNTRACKED_UDP_PORT = 5201


def _label_matches(rule_id: int, direction: str) -> str:
    """connlabel matches that set `rule_id` big-endian in label bytes 12..15 (ingress) or
    8..11 (egress); CTA_LABELS byte i holds label bits 8i..8i+7 (little-endian words)."""
    first_byte = 12 if direction == "ingress" else 8
    bits = []
    for i in range(4):
        value = (rule_id >> (8 * (3 - i))) & 0xFF
        bits += [8 * (first_byte + i) + j for j in range(8) if value >> j & 1]
    return " ".join(f"-m connlabel --label {b} --set" for b in bits)


class _Family:
    def __init__(self, version: int):
        self.version = version
        self.icmp_reject = "icmp-port-unreachable" if version == 4 else "icmp6-port-unreachable"

    def addresses(self, pods: Iterable[Pod]) -> list[str]:
        return [p.addresses[self.version] for p in pods if self.version in p.addresses]

    def host(self, address: str) -> str:
        return f"{address}/{32 if self.version == 4 else 128}"

    def networks(self, cidrs) -> list:
        return [c for c in cidrs if c.version == self.version]


class NodeRules:
    """Builds the iptables-restore input of one Node for one IP family."""

    def __init__(self, cluster: Cluster, node: Node, version: int):
        self.cluster = cluster
        self.node = node
        self.family = _Family(version)
        self.local = [p for p in cluster.local_pods(node) if version in p.addresses]
        self._chains: dict[str, list[str]] = {}

    # -- policy chains -------------------------------------------------------------------

    def _peer_matches(self, rule: Rule) -> list[tuple[str, list[str]]]:
        """(address match, exception matches) of the rule's other end; [("", [])] = any."""
        peers = rule.peers
        side = "-s" if rule.direction == "ingress" else "-d"
        if peers.every:
            return [("", [])]
        out: list[tuple[str, list[str]]] = [
            (f"{side} {self.family.host(a)}", []) for a in self.family.addresses(peers.pods)
        ]
        for network, excepts in peers.cidrs:
            if network.version == self.family.version:
                out.append((f"{side} {network}", [f"{side} {e}" for e in excepts]))
        return out

    def _port_matches(self, rule: Rule) -> list[str]:
        if not rule.ports:
            return [""]
        out: list[str] = []
        for match in rule.ports:
            proto = f"-p {match.protocol.lower()}"
            if match.port is None:
                out.append(proto)
            elif match.end_port:
                out.append(f"{proto} --dport {match.port}:{match.end_port}")
            else:
                out.append(f"{proto} --dport {match.port}")
        return out

    def _emit_rule(self, chain: list[str], name: str, rule: Rule, targets: list[str]) -> None:
        """Append the matches of `rule` leading to each of `targets` (action lines)."""
        for address, excepts in self._peer_matches(rule):
            for port in self._port_matches(rule):
                match = " ".join(m for m in (address, port) if m)
                if excepts:
                    for e in excepts:
                        chain.append(f"-A {name} {e} -j MARK --or-mark {EXCEPT_FLAG:#x}")
                    match += f" -m mark ! --mark {EXCEPT_FLAG:#x}/{EXCEPT_FLAG:#x}"
                protocol = port.split()[1] if port else None
                for target in targets:
                    if protocol and target.startswith("-p "):
                        if target.split()[1] != protocol:
                            continue  # that reject form is for another protocol
                        target = target.split(None, 2)[2]  # the match already has -p
                    chain.append(f"-A {name} {match} {target}".replace("  ", " "))
                if excepts:
                    chain.append(f"-A {name} -j MARK --and-mark {~EXCEPT_FLAG & 0xFFFFFFFF:#x}")

    def _chain(self, name: str) -> list[str]:
        return self._chains.setdefault(name, [])

    def _packet_in(self) -> str:
        """The Node's one chain (per family) that hands denied packets to the agent: every
        deny rule shares its limit, as every deny flow of an Antrea Node shares one meter."""
        if PACKET_IN_CHAIN not in self._chains:
            self._chain(PACKET_IN_CHAIN).extend(
                [
                    f"-A {PACKET_IN_CHAIN} -m limit --limit {DENY_RATE}/second --limit-burst "
                    f"{DENY_BURST} -j NFQUEUE --queue-num {DENY_QUEUE} --queue-bypass",
                    f'-A {PACKET_IN_CHAIN} -m comment --comment "{NOT_QUEUED_COMMENT}" -j ACCEPT',
                ]
            )
        return PACKET_IN_CHAIN

    def _deny_targets(self, table: str, rule_id: int, action: str) -> list[str]:
        if table == "mangle":
            deny = f"AFL-DENY-{rule_id}"
            if deny not in self._chains:
                self._chain(deny).extend(
                    [f"-A {deny} -j MARK --set-mark {rule_id}", f"-A {deny} -g {self._packet_in()}"]
                )
            return [f"-g {deny}"]
        if action == "Drop":
            return ["-j DROP"]
        return [
            "-p tcp -j REJECT --reject-with tcp-reset",
            f"-j REJECT --reject-with {self.family.icmp_reject}",
        ]

    def _allow_target(self, table: str, rule: Rule) -> str:
        if table == "mangle":
            return "-j RETURN"
        chain = f"AFL-ALLOW-{rule.rule_id}"
        if chain not in self._chains:
            self._chain(chain).append(f"-A {chain} {_label_matches(rule.rule_id, rule.direction)}")
        return f"-g {chain}"

    def _direction_chains(self, table: str, pod: Pod, index: int, direction: str) -> str:
        tag = "IN" if direction == "ingress" else "EG"
        name, k8s = f"AFL-{tag}-{index}", f"AFL-{tag}K-{index}"
        chain, k8s_chain = self._chain(name), self._chain(k8s)
        for rule in self.cluster.antrea_rules:
            if rule.direction != direction or pod not in rule.applied_to:
                continue
            if rule.action == "Allow":
                targets = [self._allow_target(table, rule)]
            elif rule.action == "Pass":
                targets = [f"-g {k8s}"]
            else:
                targets = self._deny_targets(table, rule.rule_id, rule.action)
            self._emit_rule(chain, name, rule, targets)
        chain.append(f"-A {name} -g {k8s}")
        if pod.key in self.cluster.isolated[direction]:
            for rule in self.cluster.k8s_rules:
                if rule.direction == direction and pod in rule.applied_to:
                    self._emit_rule(k8s_chain, k8s, rule, [self._allow_target(table, rule)])
            isolation = ISOLATION_INGRESS_ID if direction == "ingress" else ISOLATION_EGRESS_ID
            for target in self._deny_targets(table, isolation, "Drop"):
                k8s_chain.append(f"-A {k8s} {target}")
        return name

    def _policy_jumps(self, table: str) -> list[str]:
        jumps = []
        # The filter accepts ESTABLISHED and RELATED before these jumps.
        policed = f"{POLICED} " if table == "mangle" else ""
        for index, pod in enumerate(self.local):
            address = self.family.host(pod.addresses[self.family.version])
            egress = self._direction_chains(table, pod, index, "egress")
            ingress = self._direction_chains(table, pod, index, "ingress")
            jumps.append(f"-A FORWARD {policed}-s {address} -j {egress}")
            jumps.append(f"-A FORWARD {policed}-d {address} -j {ingress}")
        return jumps

    # -- tables ----------------------------------------------------------------------------

    def _table(self, name: str, builtins: list[str], lines: list[str]) -> list[str]:
        out = [f"*{name}"] + [f":{chain} ACCEPT [0:0]" for chain in builtins]
        out += [f":{chain} - [0:0]" for chain in self._chains]
        out += lines
        for chain_lines in self._chains.values():
            out += chain_lines
        out.append("COMMIT")
        self._chains = {}
        return out

    def raw(self) -> list[str]:
        f = self.family
        lines = []
        for end in ("--dport", "--sport"):  # first: a CT target does not end the chain
            untracked = f"-A PREROUTING -p udp {end} {UNTRACKED_UDP_PORT}"
            lines += [f"{untracked} -j CT --notrack", f"{untracked} -j ACCEPT"]
        lines.append(f"-A PREROUTING -i antrea-gw0 -j CT --zone {ANTREA_POD_ZONE}")
        cidr = self.node.cidr(f.version)
        if cidr is not None:
            lines.append(f"-A PREROUTING -i eth0 -d {cidr} -j CT --zone {ANTREA_POD_ZONE}")
        snat = f.host(self.node.address(f.version, 100))
        lines.append(f"-A PREROUTING -i eth0 -d {snat} -j CT --zone {ANTREA_POD_ZONE}")
        return self._table("raw", ["PREROUTING", "OUTPUT"], lines)

    def mangle(self) -> list[str]:
        lines = [
            f"-A PREROUTING -i antrea-gw0 -m conntrack --ctstate NEW "
            f"-j CONNMARK --set-xmark {MARK_FROM_POD:#x}/0xf",
            f"-A PREROUTING -i eth0 -m conntrack --ctstate NEW "
            f"-j CONNMARK --set-xmark {MARK_FROM_UPLINK:#x}/0xf",
            f"-A POSTROUTING -m conntrack --ctstate NEW -m conntrack --ctstate DNAT "
            f"-j CONNMARK --or-mark {MARK_SERVICE:#x}",
        ]
        lines += self._policy_jumps("mangle")
        return self._table(
            "mangle", ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"], lines
        )

    def nat(self) -> list[str]:
        f = self.family
        lines = []
        for service in self.cluster.services:
            endpoints = f.addresses(service.endpoints)
            for cluster_ip in service.cluster_ips:
                if ipaddress.ip_address(cluster_ip).version != f.version:
                    continue
                for port in service.ports:
                    if not endpoints:
                        continue
                    key = (service.namespace, service.name, cluster_ip, port.protocol, port.port)
                    chain = f"AFL-SVC-{rule_id('service', *key)}"
                    chain_lines = self._chain(chain)
                    lines.append(
                        f"-A PREROUTING -d {f.host(cluster_ip)} -p {port.protocol.lower()} "
                        f"--dport {port.port} -j {chain}"
                    )
                    target = self._target_port(port, service.endpoints)
                    for i, address in enumerate(endpoints):
                        remaining = len(endpoints) - i
                        choice = (
                            f"-m statistic --mode random --probability {1 / remaining:.5f} "
                            if remaining > 1
                            else ""
                        )
                        dest = f"[{address}]:{target}" if f.version == 6 else f"{address}:{target}"
                        chain_lines.append(
                            f"-A {chain} {choice}-p {port.protocol.lower()} "
                            f"-j DNAT --to-destination {dest}"
                        )
        for node in self.cluster.nodes:
            cidr = node.cidr(f.version)
            if cidr is not None:
                lines.append(f"-A POSTROUTING -d {cidr} -j RETURN")
        cidr = self.node.cidr(f.version)
        if cidr is not None:
            snat = self.node.address(f.version, 100)
            lines.append(f"-A POSTROUTING -s {cidr} -o eth0 -j SNAT --to-source {snat}")
        return self._table("nat", ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"], lines)

    @staticmethod
    def _target_port(port, endpoints: list[Pod]) -> int:
        if isinstance(port.target_port, int):
            return port.target_port
        if str(port.target_port).isdigit():
            return int(port.target_port)
        for pod in endpoints:
            if port.target_port in pod.named_ports:
                return pod.named_ports[port.target_port]
        return port.port

    def filter(self) -> list[str]:
        lines = ["-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
        lines += self._policy_jumps("filter")
        lines.append("-A FORWARD -j ACCEPT")
        return self._table("filter", ["INPUT", "FORWARD", "OUTPUT"], lines)

    def document(self) -> str:
        """The whole iptables-restore input."""
        return "\n".join(self.raw() + self.mangle() + self.nat() + self.filter()) + "\n"
