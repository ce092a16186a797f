"""The templates of Antrea's flow exporter (node agent), as upstream lays them out."""

from __future__ import annotations

from .templates import Template

EXPORTER_TEMPLATE_ID_IPV4 = 256
EXPORTER_TEMPLATE_ID_IPV6 = 257

# The Pod, Service and NetworkPolicy context an agent adds to a connection's 5-tuple.
KUBERNETES_CONTEXT_ELEMENTS = (
    "sourcePodName",
    "sourcePodNamespace",
    "sourceNodeName",
    "destinationPodName",
    "destinationPodNamespace",
    "destinationNodeName",
    "destinationServicePort",
    "destinationServicePortName",
    "ingressNetworkPolicyName",
    "ingressNetworkPolicyNamespace",
    "ingressNetworkPolicyType",
    "ingressNetworkPolicyRuleName",
    "ingressNetworkPolicyRuleAction",
    "egressNetworkPolicyName",
    "egressNetworkPolicyNamespace",
    "egressNetworkPolicyType",
    "egressNetworkPolicyRuleName",
    "egressNetworkPolicyRuleAction",
)


def exporter_element_names(ipv6: bool) -> list[str]:
    """Every exporter IE of Antrea's flow visibility tables, in the upstream agent's order."""
    family = "IPv6" if ipv6 else "IPv4"
    return [
        "flowStartSeconds",
        "flowEndSeconds",
        "flowEndReason",
        "sourceTransportPort",
        "destinationTransportPort",
        "protocolIdentifier",
        "packetTotalCount",
        "octetTotalCount",
        "packetDeltaCount",
        "octetDeltaCount",
        f"source{family}Address",
        f"destination{family}Address",
        "reversePacketTotalCount",
        "reverseOctetTotalCount",
        "reversePacketDeltaCount",
        "reverseOctetDeltaCount",
        *KUBERNETES_CONTEXT_ELEMENTS,
        "tcpState",
        "flowType",
        f"destinationCluster{family}",
    ]


def exporter_templates() -> list[Template]:
    """The IPv4 (256) and IPv6 (257) templates of the flow exporter."""
    return [
        Template.from_names(EXPORTER_TEMPLATE_ID_IPV4, exporter_element_names(ipv6=False)),
        Template.from_names(EXPORTER_TEMPLATE_ID_IPV6, exporter_element_names(ipv6=True)),
    ]


AGGREGATOR_TEMPLATE_ID_IPV4 = 256
AGGREGATOR_TEMPLATE_ID_IPV6 = 257


def aggregator_element_names(ipv6: bool) -> list[str]:
    """What the flow aggregator exports: every exporter IE, each Node's counters (in
    upstream's order), throughputs and the provenance of the records it merged."""
    names = exporter_element_names(ipv6)
    for direction in ("", "reverse"):
        for counter in ("OctetDelta", "OctetTotal", "PacketDelta", "PacketTotal"):
            name = f"{direction}{counter}" if direction else counter[0].lower() + counter[1:]
            for side in ("SourceNode", "DestinationNode"):
                names.append(f"{name}CountFrom{side}")
    names += [
        "flowEndSecondsFromSourceNode",
        "flowEndSecondsFromDestinationNode",
        "throughput",
        "throughputFromSourceNode",
        "throughputFromDestinationNode",
        "reverseThroughput",
        "reverseThroughputFromSourceNode",
        "reverseThroughputFromDestinationNode",
        "sourcePodLabels",
        "destinationPodLabels",
        "originalExporterIPv4Address",
        "originalExporterIPv6Address",
        "originalObservationDomainId",
    ]
    return names


def aggregator_templates() -> list[Template]:
    """The IPv4 (256) and IPv6 (257) templates of the flow aggregator's export."""
    return [
        Template.from_names(AGGREGATOR_TEMPLATE_ID_IPV4, aggregator_element_names(ipv6=False)),
        Template.from_names(AGGREGATOR_TEMPLATE_ID_IPV6, aggregator_element_names(ipv6=True)),
    ]
