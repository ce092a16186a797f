"""Information elements: data types and the registries (IANA, reverse PEN 29305, Antrea PEN 56506).

An information element (IE) is identified on the wire by (enterprise number, element id) and
in records by its name. The registry answers both lookups; unknown elements get a stable
synthetic name so that records from any RFC 7011 exporter can still be decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

IANA = 0
REVERSE_PEN = 29305  # RFC 5103 biflow reverse elements
ANTREA_PEN = 56506  # "Project Antrea" in IANA's enterprise numbers

VARIABLE_LENGTH = 0xFFFF


class DataType(IntEnum):
    """IANA 'IPFIX Information Element Data Types' codes (RFC 7012, RFC 6313)."""

    octetArray = 0
    unsigned8 = 1
    unsigned16 = 2
    unsigned32 = 3
    unsigned64 = 4
    signed8 = 5
    signed16 = 6
    signed32 = 7
    signed64 = 8
    float32 = 9
    float64 = 10
    boolean = 11
    macAddress = 12
    string = 13
    dateTimeSeconds = 14
    dateTimeMilliseconds = 15
    dateTimeMicroseconds = 16
    dateTimeNanoseconds = 17
    ipv4Address = 18
    ipv6Address = 19
    basicList = 20
    subTemplateList = 21
    subTemplateMultiList = 22


NATURAL_LENGTH = {
    DataType.octetArray: VARIABLE_LENGTH,
    DataType.unsigned8: 1,
    DataType.unsigned16: 2,
    DataType.unsigned32: 4,
    DataType.unsigned64: 8,
    DataType.signed8: 1,
    DataType.signed16: 2,
    DataType.signed32: 4,
    DataType.signed64: 8,
    DataType.float32: 4,
    DataType.float64: 8,
    DataType.boolean: 1,
    DataType.macAddress: 6,
    DataType.string: VARIABLE_LENGTH,
    DataType.dateTimeSeconds: 4,
    DataType.dateTimeMilliseconds: 8,
    DataType.dateTimeMicroseconds: 8,
    DataType.dateTimeNanoseconds: 8,
    DataType.ipv4Address: 4,
    DataType.ipv6Address: 16,
    DataType.basicList: VARIABLE_LENGTH,
    DataType.subTemplateList: VARIABLE_LENGTH,
    DataType.subTemplateMultiList: VARIABLE_LENGTH,
}


@dataclass(frozen=True, slots=True)
class InformationElement:
    name: str
    element_id: int
    enterprise: int
    data_type: DataType

    @property
    def natural_length(self) -> int:
        return NATURAL_LENGTH[self.data_type]


_T = DataType

# (id, name, type) of the IANA registry: every element the Antrea exporter and aggregator use,
# plus the ones other flow exporters commonly send, so a foreign stream decodes with names.
_IANA_ELEMENTS = [
    (1, "octetDeltaCount", _T.unsigned64),
    (2, "packetDeltaCount", _T.unsigned64),
    (3, "deltaFlowCount", _T.unsigned64),
    (4, "protocolIdentifier", _T.unsigned8),
    (5, "ipClassOfService", _T.unsigned8),
    (6, "tcpControlBits", _T.unsigned16),
    (7, "sourceTransportPort", _T.unsigned16),
    (8, "sourceIPv4Address", _T.ipv4Address),
    (9, "sourceIPv4PrefixLength", _T.unsigned8),
    (10, "ingressInterface", _T.unsigned32),
    (11, "destinationTransportPort", _T.unsigned16),
    (12, "destinationIPv4Address", _T.ipv4Address),
    (13, "destinationIPv4PrefixLength", _T.unsigned8),
    (14, "egressInterface", _T.unsigned32),
    (15, "ipNextHopIPv4Address", _T.ipv4Address),
    (16, "bgpSourceAsNumber", _T.unsigned32),
    (17, "bgpDestinationAsNumber", _T.unsigned32),
    (18, "bgpNextHopIPv4Address", _T.ipv4Address),
    (19, "postMCastPacketDeltaCount", _T.unsigned64),
    (20, "postMCastOctetDeltaCount", _T.unsigned64),
    (21, "flowEndSysUpTime", _T.unsigned32),
    (22, "flowStartSysUpTime", _T.unsigned32),
    (23, "postOctetDeltaCount", _T.unsigned64),
    (24, "postPacketDeltaCount", _T.unsigned64),
    (25, "minimumIpTotalLength", _T.unsigned64),
    (26, "maximumIpTotalLength", _T.unsigned64),
    (27, "sourceIPv6Address", _T.ipv6Address),
    (28, "destinationIPv6Address", _T.ipv6Address),
    (29, "sourceIPv6PrefixLength", _T.unsigned8),
    (30, "destinationIPv6PrefixLength", _T.unsigned8),
    (31, "flowLabelIPv6", _T.unsigned32),
    (32, "icmpTypeCodeIPv4", _T.unsigned16),
    (33, "igmpType", _T.unsigned8),
    (36, "flowActiveTimeout", _T.unsigned16),
    (37, "flowIdleTimeout", _T.unsigned16),
    (40, "exportedOctetTotalCount", _T.unsigned64),
    (41, "exportedMessageTotalCount", _T.unsigned64),
    (42, "exportedFlowRecordTotalCount", _T.unsigned64),
    (44, "sourceIPv4Prefix", _T.ipv4Address),
    (45, "destinationIPv4Prefix", _T.ipv4Address),
    (52, "minimumTTL", _T.unsigned8),
    (53, "maximumTTL", _T.unsigned8),
    (54, "fragmentIdentification", _T.unsigned32),
    (55, "postIpClassOfService", _T.unsigned8),
    (56, "sourceMacAddress", _T.macAddress),
    (57, "postDestinationMacAddress", _T.macAddress),
    (58, "vlanId", _T.unsigned16),
    (59, "postVlanId", _T.unsigned16),
    (60, "ipVersion", _T.unsigned8),
    (61, "flowDirection", _T.unsigned8),
    (62, "ipNextHopIPv6Address", _T.ipv6Address),
    (63, "bgpNextHopIPv6Address", _T.ipv6Address),
    (64, "ipv6ExtensionHeaders", _T.unsigned32),
    (80, "destinationMacAddress", _T.macAddress),
    (81, "postSourceMacAddress", _T.macAddress),
    (82, "interfaceName", _T.string),
    (83, "interfaceDescription", _T.string),
    (84, "samplerName", _T.string),
    (85, "octetTotalCount", _T.unsigned64),
    (86, "packetTotalCount", _T.unsigned64),
    (88, "fragmentOffset", _T.unsigned16),
    (94, "applicationDescription", _T.string),
    (95, "applicationId", _T.octetArray),
    (96, "applicationName", _T.string),
    (130, "exporterIPv4Address", _T.ipv4Address),
    (131, "exporterIPv6Address", _T.ipv6Address),
    (132, "droppedOctetDeltaCount", _T.unsigned64),
    (133, "droppedPacketDeltaCount", _T.unsigned64),
    (134, "droppedOctetTotalCount", _T.unsigned64),
    (135, "droppedPacketTotalCount", _T.unsigned64),
    (136, "flowEndReason", _T.unsigned8),
    (137, "commonPropertiesId", _T.unsigned64),
    (138, "observationPointId", _T.unsigned64),
    (139, "icmpTypeCodeIPv6", _T.unsigned16),
    (141, "lineCardId", _T.unsigned32),
    (142, "portId", _T.unsigned32),
    (143, "meteringProcessId", _T.unsigned32),
    (144, "exportingProcessId", _T.unsigned32),
    (145, "templateId", _T.unsigned16),
    (148, "flowId", _T.unsigned64),
    (149, "observationDomainId", _T.unsigned32),
    (150, "flowStartSeconds", _T.dateTimeSeconds),
    (151, "flowEndSeconds", _T.dateTimeSeconds),
    (152, "flowStartMilliseconds", _T.dateTimeMilliseconds),
    (153, "flowEndMilliseconds", _T.dateTimeMilliseconds),
    (154, "flowStartMicroseconds", _T.dateTimeMicroseconds),
    (155, "flowEndMicroseconds", _T.dateTimeMicroseconds),
    (156, "flowStartNanoseconds", _T.dateTimeNanoseconds),
    (157, "flowEndNanoseconds", _T.dateTimeNanoseconds),
    (158, "flowStartDeltaMicroseconds", _T.unsigned32),
    (159, "flowEndDeltaMicroseconds", _T.unsigned32),
    (160, "systemInitTimeMilliseconds", _T.dateTimeMilliseconds),
    (161, "flowDurationMilliseconds", _T.unsigned32),
    (162, "flowDurationMicroseconds", _T.unsigned32),
    (163, "observedFlowTotalCount", _T.unsigned64),
    (164, "ignoredPacketTotalCount", _T.unsigned64),
    (165, "ignoredOctetTotalCount", _T.unsigned64),
    (166, "notSentFlowTotalCount", _T.unsigned64),
    (167, "notSentPacketTotalCount", _T.unsigned64),
    (168, "notSentOctetTotalCount", _T.unsigned64),
    (169, "destinationIPv6Prefix", _T.ipv6Address),
    (170, "sourceIPv6Prefix", _T.ipv6Address),
    (171, "postOctetTotalCount", _T.unsigned64),
    (172, "postPacketTotalCount", _T.unsigned64),
    (173, "flowKeyIndicator", _T.unsigned64),
    (176, "icmpTypeIPv4", _T.unsigned8),
    (177, "icmpCodeIPv4", _T.unsigned8),
    (178, "icmpTypeIPv6", _T.unsigned8),
    (179, "icmpCodeIPv6", _T.unsigned8),
    (180, "udpSourcePort", _T.unsigned16),
    (181, "udpDestinationPort", _T.unsigned16),
    (182, "tcpSourcePort", _T.unsigned16),
    (183, "tcpDestinationPort", _T.unsigned16),
    (184, "tcpSequenceNumber", _T.unsigned32),
    (185, "tcpAcknowledgementNumber", _T.unsigned32),
    (186, "tcpWindowSize", _T.unsigned16),
    (188, "tcpHeaderLength", _T.unsigned8),
    (189, "ipHeaderLength", _T.unsigned8),
    (190, "totalLengthIPv4", _T.unsigned16),
    (191, "payloadLengthIPv6", _T.unsigned16),
    (192, "ipTTL", _T.unsigned8),
    (193, "nextHeaderIPv6", _T.unsigned8),
    (195, "ipDiffServCodePoint", _T.unsigned8),
    (196, "ipPrecedence", _T.unsigned8),
    (197, "fragmentFlags", _T.unsigned8),
    (204, "ipPayloadLength", _T.unsigned32),
    (205, "udpMessageLength", _T.unsigned16),
    (206, "isMulticast", _T.unsigned8),
    (210, "paddingOctets", _T.octetArray),
    (211, "collectorIPv4Address", _T.ipv4Address),
    (212, "collectorIPv6Address", _T.ipv6Address),
    (213, "exportInterface", _T.unsigned32),
    (214, "exportProtocolVersion", _T.unsigned8),
    (215, "exportTransportProtocol", _T.unsigned8),
    (216, "collectorTransportPort", _T.unsigned16),
    (217, "exporterTransportPort", _T.unsigned16),
    (218, "tcpSynTotalCount", _T.unsigned64),
    (219, "tcpFinTotalCount", _T.unsigned64),
    (220, "tcpRstTotalCount", _T.unsigned64),
    (221, "tcpPshTotalCount", _T.unsigned64),
    (222, "tcpAckTotalCount", _T.unsigned64),
    (223, "tcpUrgTotalCount", _T.unsigned64),
    (224, "ipTotalLength", _T.unsigned64),
    (225, "postNATSourceIPv4Address", _T.ipv4Address),
    (226, "postNATDestinationIPv4Address", _T.ipv4Address),
    (227, "postNAPTSourceTransportPort", _T.unsigned16),
    (228, "postNAPTDestinationTransportPort", _T.unsigned16),
    (229, "natOriginatingAddressRealm", _T.unsigned8),
    (230, "natEvent", _T.unsigned8),
    (231, "initiatorOctets", _T.unsigned64),
    (232, "responderOctets", _T.unsigned64),
    (233, "firewallEvent", _T.unsigned8),
    (234, "ingressVRFID", _T.unsigned32),
    (235, "egressVRFID", _T.unsigned32),
    (236, "VRFname", _T.string),
    (239, "biflowDirection", _T.unsigned8),
    (243, "dot1qVlanId", _T.unsigned16),
    (244, "dot1qPriority", _T.unsigned8),
    (252, "ingressPhysicalInterface", _T.unsigned32),
    (253, "egressPhysicalInterface", _T.unsigned32),
    (256, "ethernetType", _T.unsigned16),
    (258, "collectionTimeMilliseconds", _T.dateTimeMilliseconds),
    (260, "maxExportSeconds", _T.dateTimeSeconds),
    (261, "maxFlowEndSeconds", _T.dateTimeSeconds),
    (264, "minExportSeconds", _T.dateTimeSeconds),
    (265, "minFlowStartSeconds", _T.dateTimeSeconds),
    (276, "dataRecordsReliability", _T.boolean),
    (278, "newConnectionDeltaCount", _T.unsigned32),
    (279, "connectionSumDurationSeconds", _T.unsigned64),
    (281, "postNATSourceIPv6Address", _T.ipv6Address),
    (282, "postNATDestinationIPv6Address", _T.ipv6Address),
    (283, "natPoolId", _T.unsigned32),
    (284, "natPoolName", _T.string),
    (298, "initiatorPackets", _T.unsigned64),
    (299, "responderPackets", _T.unsigned64),
    (300, "observationDomainName", _T.string),
    (322, "observationTimeSeconds", _T.dateTimeSeconds),
    (323, "observationTimeMilliseconds", _T.dateTimeMilliseconds),
    (324, "observationTimeMicroseconds", _T.dateTimeMicroseconds),
    (325, "observationTimeNanoseconds", _T.dateTimeNanoseconds),
    (346, "privateEnterpriseNumber", _T.unsigned32),
    (352, "layer2OctetDeltaCount", _T.unsigned64),
    (403, "originalExporterIPv4Address", _T.ipv4Address),
    (404, "originalExporterIPv6Address", _T.ipv6Address),
    (405, "originalObservationDomainId", _T.unsigned32),
]

# The Antrea registry (PEN 56506): the exporter and aggregator IEs of Antrea's flow
# visibility documentation, plus the ones the upstream agent and aggregator templates carry.
_ANTREA_ELEMENTS = [
    (100, "sourcePodNamespace", _T.string),
    (101, "sourcePodName", _T.string),
    (102, "destinationPodNamespace", _T.string),
    (103, "destinationPodName", _T.string),
    (104, "sourceNodeName", _T.string),
    (105, "destinationNodeName", _T.string),
    (106, "destinationClusterIPv4", _T.ipv4Address),
    (107, "destinationClusterIPv6", _T.ipv6Address),
    (108, "destinationServicePort", _T.unsigned16),
    (109, "destinationServicePortName", _T.string),
    (110, "ingressNetworkPolicyName", _T.string),
    (111, "ingressNetworkPolicyNamespace", _T.string),
    (112, "egressNetworkPolicyName", _T.string),
    (113, "egressNetworkPolicyNamespace", _T.string),
    (114, "ingressNetworkPolicyUID", _T.string),
    (115, "ingressNetworkPolicyType", _T.unsigned8),
    (116, "ingressNetworkPolicyRulePriority", _T.signed32),
    (117, "egressNetworkPolicyUID", _T.string),
    (118, "egressNetworkPolicyType", _T.unsigned8),
    (119, "egressNetworkPolicyRulePriority", _T.signed32),
    (120, "packetTotalCountFromSourceNode", _T.unsigned64),
    (121, "octetTotalCountFromSourceNode", _T.unsigned64),
    (122, "packetDeltaCountFromSourceNode", _T.unsigned64),
    (123, "octetDeltaCountFromSourceNode", _T.unsigned64),
    (124, "reversePacketTotalCountFromSourceNode", _T.unsigned64),
    (125, "reverseOctetTotalCountFromSourceNode", _T.unsigned64),
    (126, "reversePacketDeltaCountFromSourceNode", _T.unsigned64),
    (127, "reverseOctetDeltaCountFromSourceNode", _T.unsigned64),
    (128, "packetTotalCountFromDestinationNode", _T.unsigned64),
    (129, "octetTotalCountFromDestinationNode", _T.unsigned64),
    (130, "packetDeltaCountFromDestinationNode", _T.unsigned64),
    (131, "octetDeltaCountFromDestinationNode", _T.unsigned64),
    (132, "reversePacketTotalCountFromDestinationNode", _T.unsigned64),
    (133, "reverseOctetTotalCountFromDestinationNode", _T.unsigned64),
    (134, "reversePacketDeltaCountFromDestinationNode", _T.unsigned64),
    (135, "reverseOctetDeltaCountFromDestinationNode", _T.unsigned64),
    (136, "tcpState", _T.string),
    (137, "flowType", _T.unsigned8),
    (138, "tcpStatePrevList", _T.string),
    (139, "ingressNetworkPolicyRuleAction", _T.unsigned8),
    (140, "egressNetworkPolicyRuleAction", _T.unsigned8),
    (141, "ingressNetworkPolicyRuleName", _T.string),
    (142, "egressNetworkPolicyRuleName", _T.string),
    (143, "sourcePodLabels", _T.string),
    (144, "destinationPodLabels", _T.string),
    (145, "throughput", _T.unsigned64),
    (146, "reverseThroughput", _T.unsigned64),
    (147, "throughputFromSourceNode", _T.unsigned64),
    (148, "throughputFromDestinationNode", _T.unsigned64),
    (149, "reverseThroughputFromSourceNode", _T.unsigned64),
    (150, "reverseThroughputFromDestinationNode", _T.unsigned64),
    (151, "flowEndSecondsFromSourceNode", _T.dateTimeSeconds),
    (152, "flowEndSecondsFromDestinationNode", _T.dateTimeSeconds),
    (153, "egressName", _T.string),
    (154, "egressIP", _T.string),
    (157, "egressNodeName", _T.string),
    (158, "clusterId", _T.string),
    (168, "destinationServiceIPv4", _T.ipv4Address),
    (169, "destinationServiceIPv6", _T.ipv6Address),
    (170, "proxySnatIPv4", _T.ipv4Address),
    (171, "proxySnatIPv6", _T.ipv6Address),
    (172, "proxySnatPort", _T.unsigned16),
]


def reverse_name(name: str) -> str:
    """RFC 5103 naming: the reverse of 'packetTotalCount' is 'reversePacketTotalCount'."""
    return "reverse" + name[0].upper() + name[1:]


class Registry:
    """Lookup of information elements by name and by (enterprise, element id)."""

    def __init__(self, elements: list[InformationElement]):
        self._by_name: dict[str, InformationElement] = {}
        self._by_key: dict[tuple[int, int], InformationElement] = {}
        for ie in elements:
            if ie.name in self._by_name or (ie.enterprise, ie.element_id) in self._by_key:
                raise ValueError(f"duplicate information element {ie}")
            self._by_name[ie.name] = ie
            self._by_key[(ie.enterprise, ie.element_id)] = ie

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self):
        return iter(self._by_name.values())

    def by_name(self, name: str) -> InformationElement:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown information element {name!r}") from None

    def by_id(self, enterprise: int, element_id: int) -> InformationElement:
        """The registered element, or a synthetic octetArray element for an unknown one."""
        ie = self._by_key.get((enterprise, element_id))
        if ie is not None:
            return ie
        if enterprise == IANA:
            return InformationElement(f"ie{element_id}", element_id, IANA, DataType.octetArray)
        return InformationElement(
            f"ie{enterprise}_{element_id}", element_id, enterprise, DataType.octetArray
        )


def _build_default_registry() -> Registry:
    iana = [InformationElement(name, i, IANA, t) for i, name, t in _IANA_ELEMENTS]
    reverse = [
        InformationElement(reverse_name(ie.name), ie.element_id, REVERSE_PEN, ie.data_type)
        for ie in iana
    ]
    antrea = [InformationElement(name, i, ANTREA_PEN, t) for i, name, t in _ANTREA_ELEMENTS]
    return Registry(iana + reverse + antrea)


REGISTRY = _build_default_registry()
