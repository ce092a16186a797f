"""Kubernetes context for a new connection: local Pods, Service, NetworkPolicy rules and
flowType, computed once when the connection is first seen (as upstream does)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import numpy as np

from ..codes import (
    ACTION_ALLOW,
    FLOW_TYPE_FROM_EXTERNAL,
    FLOW_TYPE_INTER_NODE,
    FLOW_TYPE_INTRA_NODE,
    FLOW_TYPE_TO_EXTERNAL,
)
from ..conntrack.parser import Dump, Entry
from ..k8s.stores import MetadataStore, NodeInfo, PodInfo, PolicyRule, unpack_ip

# Antrea's conntrack mark bit for connections to a Service (set by its proxy).
SERVICE_CT_MARK = 1 << 4
# Connections between the same endpoints share their metadata; remember that many.
_MEMO_SIZE = 1 << 16
# What the metadata depends on, read by name in one call (it runs per new connection).
_MEMO_FIELDS = operator.attrgetter(
    "proto", "orig_src", "orig_dst", "orig_dport", "reply_src", "reply_sport", "mark", "labels"
)


_KEY_WORDS = 11  # of `groups`' key: four 16-byte values, the port, protocol, Service bit
_MIX = np.uint64(0x9E3779B97F4A7C15)  # an odd multiplier that spreads the bits (Fibonacci)


@dataclass(frozen=True, slots=True, eq=False)
class FlowMeta:
    """What a connection's records say about Kubernetes. Shared by the connections that
    have the same Pods, Service and rules."""

    source_pod: PodInfo | None  # only Pods on this Node
    destination_pod: PodInfo | None
    cluster_ip: str  # the Service address the client dialled, "" without a Service
    service_port: int
    service_port_name: str  # "namespace/name:port"
    ingress_rule: PolicyRule | None
    egress_rule: PolicyRule | None
    flow_type: int


class _Subnets:
    """Membership of packed addresses in a set of CIDRs: byte-aligned prefixes are looked
    up in sets, others compared as integers."""

    def __init__(self, networks) -> None:
        aligned: dict[tuple[int, int], set[bytes]] = {}
        self._other: list[tuple[int, int, int]] = []
        for net in networks:
            size = 4 if net.version == 4 else 16
            if net.prefixlen % 8 == 0:
                prefix = net.network_address.packed[: net.prefixlen // 8]
                aligned.setdefault((size, net.prefixlen // 8), set()).add(prefix)
            else:
                self._other.append((size, int(net.network_address), int(net.netmask)))
        self._aligned = [(size, n, frozenset(p)) for (size, n), p in aligned.items()]

    def __contains__(self, packed: bytes) -> bool:
        size = len(packed)
        for family, length, prefixes in self._aligned:
            if family == size and packed[:length] in prefixes:
                return True
        if self._other:
            value = int.from_bytes(packed, "big")
            return any(f == size and value & m == n for f, n, m in self._other)
        return False


class Enricher:
    """Builds FlowMeta for the connections of one Node from the metadata store.

    Owned by one thread (its memos are not shared): the agent gives the poll thread and the
    deny-queue thread an enricher each. It reads the store through its lookups, and starts
    its memos afresh whenever the store's version moves.
    """

    def __init__(self, store: MetadataStore, node_name: str):
        self.store = store
        self.node_name = node_name
        self._version = -1  # not the store's: the first call refreshes
        self._nodes: tuple[NodeInfo, ...] | None = None
        self._pod_subnets = _Subnets([])
        self._gateways: frozenset[bytes] = frozenset()
        self._local_gateways: frozenset[bytes] = frozenset()
        self._interned: dict[tuple, FlowMeta] = {}
        self._memo: dict[tuple, FlowMeta | None] = {}
        self._allowing: dict[int, PolicyRule] = {}

    def _refresh(self) -> None:
        store = self.store
        self._version = store.version  # read first: a change after it shows next call
        self._interned = {}
        self._memo = {}
        self._allowing = {}
        nodes = store.nodes
        if nodes is self._nodes:
            return
        # Pod subnets and gateway addresses are derived from the Nodes' pod CIDRs; the
        # gateway takes the first address of each, as Antrea's antrea-gw0 does.
        networks, gateways, local = [], set(), set()
        for node in nodes:
            for cidr in node.pod_cidrs:
                networks.append(cidr)
                gateway = (cidr.network_address + 1).packed
                gateways.add(gateway)
                if node.name == self.node_name:
                    local.add(gateway)
        self._pod_subnets = _Subnets(networks)
        self._gateways = frozenset(gateways)
        self._local_gateways = frozenset(local)
        self._nodes = nodes

    def local_pod(self, ip: bytes) -> PodInfo | None:
        pod = self.store.pod(ip)
        return pod if pod is not None and pod.node_name == self.node_name else None

    def __call__(self, entry: Entry) -> FlowMeta | None:
        """The connection's metadata, or None when it is not a flow of this Node's Pods."""
        if self.store.version != self._version:
            self._refresh()
        # Everything below depends on the endpoints, the Service bit and rule labels, and
        # on the destination port only when a Service is involved.
        proto, orig_src, orig_dst, orig_dport, reply_src, reply_sport, mark, labels = _MEMO_FIELDS(
            entry
        )
        service_bit = mark & SERVICE_CT_MARK
        service = service_bit or orig_dst != reply_src or orig_dport != reply_sport
        memo_key = (
            orig_src,
            reply_src,
            orig_dst,
            orig_dport if service else 0,
            proto,
            service_bit,
            labels,
        )
        memo = self._memo
        if memo_key in memo:
            return memo[memo_key]
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        meta = memo[memo_key] = self._enrich(entry, bool(service))
        return meta

    def groups(self, dump: Dump, index: np.ndarray) -> np.ndarray:
        """Per entry of `dump` at `index`, a group number (0 to the number of groups less
        one, each used): entries of a group get the same metadata (they agree on all
        `__call__` keys its memo on), so a table's new entries are enriched once per group,
        not once each."""
        cols, count = dump.columns, len(index)
        # The memo key as 64-bit words, a row per word: the addresses 16 bytes wide (two
        # words each), the labels (none and all-zero name no rule alike), then the port
        # that matters, the protocol with the address width, and the Service bit.
        key = np.empty((_KEY_WORDS, count), np.uint64)
        for row, name in enumerate(("orig_src", "reply_src", "orig_dst", "labels")):
            values, full = dump.packed(name, index)
            key[2 * row : 2 * row + 2] = values.view(np.uint64).reshape(count, 2).T
            if name == "orig_src":
                wide = full
        orig_dport, reply_sport = cols["orig_dport"][index], cols["reply_sport"][index]
        service_bit = cols["mark"][index] & SERVICE_CT_MARK
        dnat = (key[4] != key[2]) | (key[5] != key[3])  # dialled another address
        service = (service_bit != 0) | dnat | (orig_dport != reply_sport)
        key[8] = np.where(service, orig_dport, 0)
        key[9] = cols["proto"][index] | (wide.astype(np.int64) << 8)
        key[10] = service_bit
        # Sorting whole keys is slow (88 bytes each); a hash of each sorts fast, and
        # comparing every key with its group's first settles collisions.
        digest = np.zeros(count, np.uint64)
        for word in key:
            digest ^= word
            digest *= _MIX
            digest ^= digest >> np.uint64(29)
        _, first, groups = np.unique(digest, return_index=True, return_inverse=True)
        groups = groups.ravel()
        representative = first[groups]
        if not all((word == word[representative]).all() for word in key):
            whole = np.ascontiguousarray(key.T).view(f"V{8 * _KEY_WORDS}").ravel()
            _, groups = np.unique(whole, return_inverse=True)
        return groups.ravel()

    def _enrich(self, entry: Entry, service: bool) -> FlowMeta | None:
        source, destination = entry.orig_src, entry.reply_src
        if destination in self._local_gateways:
            return None
        source_pod = self.local_pod(source)
        destination_pod = self.local_pod(destination)
        if source_pod is None and destination_pod is None:
            return None
        flow_type = self._flow_type(source, destination, source_pod, destination_pod)
        if flow_type is None:
            return None
        cluster_ip, service_port, port_name = "", 0, ""
        if service:
            known = self.store.service(entry.orig_dst, entry.orig_dport, entry.proto)
            if known is not None or entry.mark & SERVICE_CT_MARK:
                cluster_ip = unpack_ip(entry.orig_dst)
                service_port = entry.orig_dport
                port_name = known.port_name_full if known else ""
        ingress = egress = None
        labels = entry.labels
        if len(labels) == 16 and any(labels):
            # Antrea's layout: the ingress rule id in bytes 12..15, egress in 8..11, big
            # endian (ct_label bits 0-31 and 32-63 as OVS numbers them).
            ingress_id = int.from_bytes(labels[12:16], "big")
            egress_id = int.from_bytes(labels[8:12], "big")
            ingress = self._allowing_rule(ingress_id)
            egress = self._allowing_rule(egress_id)
        key = (
            id(source_pod),
            id(destination_pod),
            cluster_ip,
            service_port,
            port_name,
            id(ingress),
            id(egress),
            flow_type,
        )
        meta = self._interned.get(key)
        if meta is None:
            meta = self._interned[key] = FlowMeta(
                source_pod,
                destination_pod,
                cluster_ip,
                service_port,
                port_name,
                ingress,
                egress,
                flow_type,
            )
        return meta

    def _allowing_rule(self, rule_id: int) -> PolicyRule | None:
        """The rule a conntrack label names. Only allowed connections are committed, so
        its action in the records is Allow whatever the rule's own (a Pass rule's id, say),
        as upstream reports it."""
        rule = self.store.rule(rule_id) if rule_id else None
        if rule is None or rule.action == ACTION_ALLOW:
            return rule
        allowing = self._allowing.get(rule_id)
        if allowing is None:
            allowing = self._allowing[rule_id] = replace(rule, action=ACTION_ALLOW)
        return allowing

    def _flow_type(
        self,
        source: bytes,
        destination: bytes,
        source_pod: PodInfo | None,
        destination_pod: PodInfo | None,
    ) -> int | None:
        """Upstream's rules (destination.go findFlowType); None: not a flow to export."""
        if destination in self._gateways:
            return None
        if source in self._gateways:
            return FLOW_TYPE_INTER_NODE if destination_pod is not None else None
        if source not in self._pod_subnets:
            return FLOW_TYPE_FROM_EXTERNAL if destination in self._pod_subnets else None
        if destination not in self._pod_subnets:
            return FLOW_TYPE_TO_EXTERNAL
        if source_pod is None or destination_pod is None:
            return FLOW_TYPE_INTER_NODE
        return FLOW_TYPE_INTRA_NODE
