"""Flow records in the IEs of Antrea's exporter templates (256 IPv4, 257 IPv6)."""

from __future__ import annotations

from typing import Any

from ..conntrack.parser import TCP_STATES
from ..ipfix.antrea import EXPORTER_TEMPLATE_ID_IPV4, EXPORTER_TEMPLATE_ID_IPV6
from ..k8s.stores import unpack_ip
from .connections import Export
from .enrich import FlowMeta


def _rule_fields(prefix: str, meta: FlowMeta, record: dict[str, Any]) -> None:
    rule = meta.ingress_rule if prefix == "ingress" else meta.egress_rule
    if rule is None:
        return
    record[f"{prefix}NetworkPolicyName"] = rule.policy_name
    record[f"{prefix}NetworkPolicyNamespace"] = rule.policy_namespace
    record[f"{prefix}NetworkPolicyType"] = rule.policy_type
    record[f"{prefix}NetworkPolicyRuleName"] = rule.rule_name
    record[f"{prefix}NetworkPolicyRuleAction"] = rule.action


def flow_record(export: Export, node_name: str) -> tuple[int, dict[str, Any]]:
    """(template id, record) for one export of a connection."""
    conn = export.connection
    meta: FlowMeta = conn.meta
    source, destination, protocol, source_port, destination_port = conn.key
    ipv6 = len(source) == 16
    family = "IPv6" if ipv6 else "IPv4"
    record: dict[str, Any] = {
        "flowStartSeconds": int(conn.start_time),
        "flowEndSeconds": int(export.end_time),
        "flowEndReason": export.reason,
        "sourceTransportPort": source_port,
        "destinationTransportPort": destination_port,
        "protocolIdentifier": protocol,
        "packetTotalCount": export.packets,
        "octetTotalCount": export.octets,
        "packetDeltaCount": export.packet_delta,
        "octetDeltaCount": export.octet_delta,
        f"source{family}Address": unpack_ip(source),
        f"destination{family}Address": unpack_ip(destination),
        "reversePacketTotalCount": export.reverse_packets,
        "reverseOctetTotalCount": export.reverse_octets,
        "reversePacketDeltaCount": export.reverse_packet_delta,
        "reverseOctetDeltaCount": export.reverse_octet_delta,
        "tcpState": TCP_STATES[conn.tcp_state] if conn.tcp_state >= 0 else "",
        "flowType": meta.flow_type,
    }
    if meta.source_pod is not None:
        record["sourcePodName"] = meta.source_pod.name
        record["sourcePodNamespace"] = meta.source_pod.namespace
        record["sourceNodeName"] = node_name
    if meta.destination_pod is not None:
        record["destinationPodName"] = meta.destination_pod.name
        record["destinationPodNamespace"] = meta.destination_pod.namespace
        record["destinationNodeName"] = node_name
    if meta.cluster_ip:
        record[f"destinationCluster{family}"] = meta.cluster_ip
        record["destinationServicePort"] = meta.service_port
        record["destinationServicePortName"] = meta.service_port_name
    _rule_fields("ingress", meta, record)
    _rule_fields("egress", meta, record)
    template_id = EXPORTER_TEMPLATE_ID_IPV6 if ipv6 else EXPORTER_TEMPLATE_ID_IPV4
    return template_id, record
