"""Flow records in the IEs of Antrea's exporter templates (256 IPv4, 257 IPv6)."""

from __future__ import annotations

from typing import Literal, NamedTuple

from ..conntrack.parser import TCP_STATES
from ..ipfix.antrea import EXPORTER_TEMPLATE_ID_IPV4, EXPORTER_TEMPLATE_ID_IPV6, FlowRecord
from ..k8s.stores import PolicyRule, unpack_ip
from .connections import Export
from .enrich import FlowMeta


class _Direction(NamedTuple):
    """The elements of one direction's NetworkPolicy rule."""

    name: Literal["ingressNetworkPolicyName", "egressNetworkPolicyName"]
    namespace: Literal["ingressNetworkPolicyNamespace", "egressNetworkPolicyNamespace"]
    type: Literal["ingressNetworkPolicyType", "egressNetworkPolicyType"]
    rule_name: Literal["ingressNetworkPolicyRuleName", "egressNetworkPolicyRuleName"]
    action: Literal["ingressNetworkPolicyRuleAction", "egressNetworkPolicyRuleAction"]


_INGRESS = _Direction(
    "ingressNetworkPolicyName", "ingressNetworkPolicyNamespace", "ingressNetworkPolicyType",
    "ingressNetworkPolicyRuleName", "ingressNetworkPolicyRuleAction",
)  # fmt: skip
_EGRESS = _Direction(
    "egressNetworkPolicyName", "egressNetworkPolicyNamespace", "egressNetworkPolicyType",
    "egressNetworkPolicyRuleName", "egressNetworkPolicyRuleAction",
)  # fmt: skip


def _rule(direction: _Direction, rule: PolicyRule, record: FlowRecord) -> None:
    record[direction.name] = rule.policy_name
    record[direction.namespace] = rule.policy_namespace
    record[direction.type] = rule.policy_type
    record[direction.rule_name] = rule.rule_name
    record[direction.action] = rule.action


def flow_record(
    export: Export, node_name: str, packet_details: bool = False
) -> tuple[int, FlowRecord]:
    """(template id, record) for one export of a connection; with `packet_details`, what
    the eBPF counter path saw (TCP flags, first and last packet to the millisecond: the
    conntrack times where it saw nothing)."""
    conn = export.connection
    meta: FlowMeta = conn.meta
    key = conn.key
    record: FlowRecord = {
        "flowStartSeconds": int(conn.start_time),
        "flowEndSeconds": int(export.end_time),
        "flowEndReason": export.reason,
        "sourceTransportPort": key.source_port,
        "destinationTransportPort": key.destination_port,
        "protocolIdentifier": key.protocol,
        "packetTotalCount": export.packets,
        "octetTotalCount": export.octets,
        "packetDeltaCount": export.packet_delta,
        "octetDeltaCount": export.octet_delta,
        "reversePacketTotalCount": export.reverse_packets,
        "reverseOctetTotalCount": export.reverse_octets,
        "reversePacketDeltaCount": export.reverse_packet_delta,
        "reverseOctetDeltaCount": export.reverse_octet_delta,
        "tcpState": TCP_STATES[conn.tcp_state] if conn.tcp_state >= 0 else "",
        "flowType": meta.flow_type,
    }
    source, destination = unpack_ip(key.source), unpack_ip(key.destination)
    ipv6 = len(key.source) == 16
    if ipv6:
        record["sourceIPv6Address"], record["destinationIPv6Address"] = source, destination
    else:
        record["sourceIPv4Address"], record["destinationIPv4Address"] = source, destination
    if meta.source_pod is not None:
        record["sourcePodName"] = meta.source_pod.name
        record["sourcePodNamespace"] = meta.source_pod.namespace
        record["sourceNodeName"] = node_name
    if meta.destination_pod is not None:
        record["destinationPodName"] = meta.destination_pod.name
        record["destinationPodNamespace"] = meta.destination_pod.namespace
        record["destinationNodeName"] = node_name
    if meta.cluster_ip:
        if ipv6:
            record["destinationClusterIPv6"] = meta.cluster_ip
        else:
            record["destinationClusterIPv4"] = meta.cluster_ip
        record["destinationServicePort"] = meta.service_port
        record["destinationServicePortName"] = meta.service_port_name
    if meta.ingress_rule is not None:
        _rule(_INGRESS, meta.ingress_rule, record)
    if meta.egress_rule is not None:
        _rule(_EGRESS, meta.egress_rule, record)
    if packet_details:
        record["tcpControlBits"] = conn.tcp_flags
        record["flowStartMilliseconds"] = int((conn.first_packet or conn.start_time) * 1000)
        record["flowEndMilliseconds"] = int((conn.last_packet or export.end_time) * 1000)
    template_id = EXPORTER_TEMPLATE_ID_IPV6 if ipv6 else EXPORTER_TEMPLATE_ID_IPV4
    return template_id, record
