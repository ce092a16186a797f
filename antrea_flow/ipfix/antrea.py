"""The templates of Antrea's flow exporter and flow aggregator, as upstream lays them out,
and `FlowRecord`: the fields our code writes into their records.

`FlowRecord` is a TypedDict, so a misspelled element name written as a literal key is a
type error (`make lint` runs mypy); the names that code loops over are tuples of Literal
names, checked the same way. A test holds it equal to the templates' elements and types.
"""

from __future__ import annotations

from typing import Literal, TypedDict, get_args

from .templates import Template


class FlowRecord(TypedDict, total=False):
    """An agent's or the aggregator's flow record: IE names to values (ints, strs; IP
    addresses as strs). Decoded records may carry more elements (a peer's template)."""

    flowStartSeconds: int
    flowEndSeconds: int
    flowEndReason: int
    sourceTransportPort: int
    destinationTransportPort: int
    protocolIdentifier: int
    packetTotalCount: int
    octetTotalCount: int
    packetDeltaCount: int
    octetDeltaCount: int
    sourceIPv4Address: str
    destinationIPv4Address: str
    sourceIPv6Address: str
    destinationIPv6Address: str
    reversePacketTotalCount: int
    reverseOctetTotalCount: int
    reversePacketDeltaCount: int
    reverseOctetDeltaCount: int
    sourcePodName: str
    sourcePodNamespace: str
    sourceNodeName: str
    destinationPodName: str
    destinationPodNamespace: str
    destinationNodeName: str
    destinationServicePort: int
    destinationServicePortName: str
    ingressNetworkPolicyName: str
    ingressNetworkPolicyNamespace: str
    ingressNetworkPolicyType: int
    ingressNetworkPolicyRuleName: str
    ingressNetworkPolicyRuleAction: int
    egressNetworkPolicyName: str
    egressNetworkPolicyNamespace: str
    egressNetworkPolicyType: int
    egressNetworkPolicyRuleName: str
    egressNetworkPolicyRuleAction: int
    tcpState: str
    flowType: int
    destinationClusterIPv4: str
    destinationClusterIPv6: str
    # From the eBPF counter path (an agent with ebpf.enable), and the aggregator's merge.
    tcpControlBits: int
    flowStartMilliseconds: int
    flowEndMilliseconds: int
    # The aggregator's: each Node's counters, end times and throughputs, Pod labels and
    # the provenance of the latest record.
    octetDeltaCountFromSourceNode: int
    octetDeltaCountFromDestinationNode: int
    octetTotalCountFromSourceNode: int
    octetTotalCountFromDestinationNode: int
    packetDeltaCountFromSourceNode: int
    packetDeltaCountFromDestinationNode: int
    packetTotalCountFromSourceNode: int
    packetTotalCountFromDestinationNode: int
    reverseOctetDeltaCountFromSourceNode: int
    reverseOctetDeltaCountFromDestinationNode: int
    reverseOctetTotalCountFromSourceNode: int
    reverseOctetTotalCountFromDestinationNode: int
    reversePacketDeltaCountFromSourceNode: int
    reversePacketDeltaCountFromDestinationNode: int
    reversePacketTotalCountFromSourceNode: int
    reversePacketTotalCountFromDestinationNode: int
    flowEndSecondsFromSourceNode: int
    flowEndSecondsFromDestinationNode: int
    throughput: int
    throughputFromSourceNode: int
    throughputFromDestinationNode: int
    reverseThroughput: int
    reverseThroughputFromSourceNode: int
    reverseThroughputFromDestinationNode: int
    sourcePodLabels: str
    destinationPodLabels: str
    originalExporterIPv4Address: str
    originalExporterIPv6Address: str
    originalObservationDomainId: int
    # Ours, in the JSON log only: a half exported without its peer.
    incomplete: bool


RECORD_ANNOTATIONS = ("incomplete",)  # FlowRecord fields that are no element

TotalName = Literal[
    "packetTotalCount", "octetTotalCount", "reversePacketTotalCount", "reverseOctetTotalCount"
]
DeltaName = Literal[
    "packetDeltaCount", "octetDeltaCount", "reversePacketDeltaCount", "reverseOctetDeltaCount"
]
TOTALS: tuple[TotalName, ...] = get_args(TotalName)
DELTAS: tuple[DeltaName, ...] = get_args(DeltaName)

EXPORTER_TEMPLATE_ID_IPV4 = 256
EXPORTER_TEMPLATE_ID_IPV6 = 257

ContextName = Literal[
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
]
# The Pod, Service and NetworkPolicy context an agent adds to a connection's 5-tuple.
KUBERNETES_CONTEXT_ELEMENTS: tuple[ContextName, ...] = get_args(ContextName)


# What the eBPF counter path adds to an agent's records (after Antrea's elements).
PacketDetailName = Literal["tcpControlBits", "flowStartMilliseconds", "flowEndMilliseconds"]
PACKET_DETAILS: tuple[PacketDetailName, ...] = get_args(PacketDetailName)


def exporter_element_names(ipv6: bool, packet_details: bool = False) -> list[str]:
    """Every exporter IE of Antrea's flow visibility tables, in the upstream agent's order;
    with `packet_details`, the counter path's elements after them."""
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
        *(PACKET_DETAILS if packet_details else ()),
    ]


def exporter_templates(packet_details: bool = False) -> list[Template]:
    """The IPv4 (256) and IPv6 (257) templates of the flow exporter."""
    return [
        Template.from_names(
            EXPORTER_TEMPLATE_ID_IPV4, exporter_element_names(False, packet_details)
        ),
        Template.from_names(
            EXPORTER_TEMPLATE_ID_IPV6, exporter_element_names(True, packet_details)
        ),
    ]


AGGREGATOR_TEMPLATE_ID_IPV4 = 256
AGGREGATOR_TEMPLATE_ID_IPV6 = 257


def aggregator_element_names(ipv6: bool) -> list[str]:
    """What the flow aggregator exports: every exporter IE (the counter path's too: without
    it, the times are the seconds' and the flags 0), each Node's counters (in upstream's
    order), throughputs and the provenance of the records it merged."""
    names = exporter_element_names(ipv6, packet_details=True)
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
