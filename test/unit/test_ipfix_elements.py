"""The information element registry against Antrea's flow visibility IE tables."""

from __future__ import annotations

import pytest

from antrea_flow.ipfix.antrea import exporter_element_names
from antrea_flow.ipfix.elements import (
    ANTREA_PEN,
    IANA,
    NATURAL_LENGTH,
    REGISTRY,
    REVERSE_PEN,
    VARIABLE_LENGTH,
    DataType,
    InformationElement,
    Registry,
    reverse_name,
)

# The IE tables of Antrea's "Network Flow Visibility" document, transcribed literally:
# (name, enterprise id, field id, type).
EXPORTER_IES = [
    # IEs from IANA-assigned IE registry
    ("flowStartSeconds", 0, 150, "dateTimeSeconds"),
    ("flowEndSeconds", 0, 151, "dateTimeSeconds"),
    ("flowEndReason", 0, 136, "unsigned8"),
    ("sourceIPv4Address", 0, 8, "ipv4Address"),
    ("destinationIPv4Address", 0, 12, "ipv4Address"),
    ("sourceIPv6Address", 0, 27, "ipv6Address"),
    ("destinationIPv6Address", 0, 28, "ipv6Address"),
    ("sourceTransportPort", 0, 7, "unsigned16"),
    ("destinationTransportPort", 0, 11, "unsigned16"),
    ("protocolIdentifier", 0, 4, "unsigned8"),
    ("packetTotalCount", 0, 86, "unsigned64"),
    ("octetTotalCount", 0, 85, "unsigned64"),
    ("packetDeltaCount", 0, 2, "unsigned64"),
    ("octetDeltaCount", 0, 1, "unsigned64"),
    # IEs from Reverse IANA-assigned IE Registry
    ("reversePacketTotalCount", 29305, 86, "unsigned64"),
    ("reverseOctetTotalCount", 29305, 85, "unsigned64"),
    ("reversePacketDeltaCount", 29305, 2, "unsigned64"),
    ("reverseOctetDeltaCount", 29305, 1, "unsigned64"),
    # IEs from Antrea IE Registry
    ("sourcePodNamespace", 56506, 100, "string"),
    ("sourcePodName", 56506, 101, "string"),
    ("destinationPodNamespace", 56506, 102, "string"),
    ("destinationPodName", 56506, 103, "string"),
    ("sourceNodeName", 56506, 104, "string"),
    ("destinationNodeName", 56506, 105, "string"),
    ("destinationClusterIPv4", 56506, 106, "ipv4Address"),
    ("destinationClusterIPv6", 56506, 107, "ipv6Address"),
    ("destinationServicePort", 56506, 108, "unsigned16"),
    ("destinationServicePortName", 56506, 109, "string"),
    ("ingressNetworkPolicyName", 56506, 110, "string"),
    ("ingressNetworkPolicyNamespace", 56506, 111, "string"),
    ("ingressNetworkPolicyType", 56506, 115, "unsigned8"),
    ("ingressNetworkPolicyRuleName", 56506, 141, "string"),
    ("egressNetworkPolicyName", 56506, 112, "string"),
    ("egressNetworkPolicyNamespace", 56506, 113, "string"),
    ("egressNetworkPolicyType", 56506, 118, "unsigned8"),
    ("egressNetworkPolicyRuleName", 56506, 142, "string"),
    ("ingressNetworkPolicyRuleAction", 56506, 139, "unsigned8"),
    ("egressNetworkPolicyRuleAction", 56506, 140, "unsigned8"),
    ("tcpState", 56506, 136, "string"),
    ("flowType", 56506, 137, "unsigned8"),
]

AGGREGATOR_IES = [
    # IEs from IANA-assigned IE registry
    ("originalExporterIPv4Address", 0, 403, "ipv4Address"),
    # The document lists originalObservationDomainId as (0, 151), which is flowEndSeconds'
    # id (see EXPORTER_IES): a typo in the document. IANA assigns 405 and Antrea's
    # aggregator sends 405, so the registry must use 405, not the document's 151.
    ("originalObservationDomainId", 0, 405, "unsigned32"),
    # IEs from Antrea IE Registry
    ("packetTotalCountFromSourceNode", 56506, 120, "unsigned64"),
    ("octetTotalCountFromSourceNode", 56506, 121, "unsigned64"),
    ("packetDeltaCountFromSourceNode", 56506, 122, "unsigned64"),
    ("octetDeltaCountFromSourceNode", 56506, 123, "unsigned64"),
    ("reversePacketTotalCountFromSourceNode", 56506, 124, "unsigned64"),
    ("reverseOctetTotalCountFromSourceNode", 56506, 125, "unsigned64"),
    ("reversePacketDeltaCountFromSourceNode", 56506, 126, "unsigned64"),
    ("reverseOctetDeltaCountFromSourceNode", 56506, 127, "unsigned64"),
    ("packetTotalCountFromDestinationNode", 56506, 128, "unsigned64"),
    ("octetTotalCountFromDestinationNode", 56506, 129, "unsigned64"),
    ("packetDeltaCountFromDestinationNode", 56506, 130, "unsigned64"),
    ("octetDeltaCountFromDestinationNode", 56506, 131, "unsigned64"),
    ("reversePacketTotalCountFromDestinationNode", 56506, 132, "unsigned64"),
    ("reverseOctetTotalCountFromDestinationNode", 56506, 133, "unsigned64"),
    ("reversePacketDeltaCountFromDestinationNode", 56506, 134, "unsigned64"),
    ("reverseOctetDeltaCountFromDestinationNode", 56506, 135, "unsigned64"),
]

# What the upstream aggregator adds beyond the document's tables (aggregate and proxy mode).
AGGREGATOR_EXTRA_IES = [
    ("throughput", 56506, 145, "unsigned64"),
    ("reverseThroughput", 56506, 146, "unsigned64"),
    ("throughputFromSourceNode", 56506, 147, "unsigned64"),
    ("throughputFromDestinationNode", 56506, 148, "unsigned64"),
    ("reverseThroughputFromSourceNode", 56506, 149, "unsigned64"),
    ("reverseThroughputFromDestinationNode", 56506, 150, "unsigned64"),
    # dateTimeSeconds in go-ipfix's registry (its #320; Antrea's IE table still says
    # unsigned32): the same 4 bytes, but consumers that go by type (Logstash, ClickHouse
    # mappings) read a time.
    ("flowEndSecondsFromSourceNode", 56506, 151, "dateTimeSeconds"),
    ("flowEndSecondsFromDestinationNode", 56506, 152, "dateTimeSeconds"),
    ("sourcePodLabels", 56506, 143, "string"),
    ("destinationPodLabels", 56506, 144, "string"),
    ("flowDirection", 0, 61, "unsigned8"),
    ("originalExporterIPv6Address", 0, 404, "ipv6Address"),
]

ALL_TABLE_IES = EXPORTER_IES + AGGREGATOR_IES + AGGREGATOR_EXTRA_IES


def _ids(rows):
    return [row[0] for row in rows]


def test_table_transcription_has_every_row():
    # 14 IANA + 4 reverse + 22 Antrea in the exporter table; 2 IANA + 16 Antrea in the
    # aggregator table. Guards against a row lost while editing the literal tables.
    assert len(EXPORTER_IES) == 40
    assert len(AGGREGATOR_IES) == 18
    assert len({row[0] for row in ALL_TABLE_IES}) == len(ALL_TABLE_IES)


@pytest.mark.parametrize(
    "name,enterprise,element_id,type_name", ALL_TABLE_IES, ids=_ids(ALL_TABLE_IES)
)
def test_registered_by_name(name, enterprise, element_id, type_name):
    ie = REGISTRY.by_name(name)
    assert ie.name == name
    assert ie.enterprise == enterprise
    assert ie.element_id == element_id
    assert ie.data_type == DataType[type_name]


@pytest.mark.parametrize(
    "name,enterprise,element_id,type_name", ALL_TABLE_IES, ids=_ids(ALL_TABLE_IES)
)
def test_registered_by_id(name, enterprise, element_id, type_name):
    ie = REGISTRY.by_id(enterprise, element_id)
    assert ie == InformationElement(name, element_id, enterprise, DataType[type_name])


def test_original_observation_domain_id_does_not_shadow_flow_end_seconds():
    assert REGISTRY.by_id(IANA, 151).name == "flowEndSeconds"
    assert REGISTRY.by_id(IANA, 405).name == "originalObservationDomainId"


def test_pens():
    assert IANA == 0
    assert REVERSE_PEN == 29305
    assert ANTREA_PEN == 56506


@pytest.mark.parametrize(
    "name,expected",
    [
        ("packetTotalCount", "reversePacketTotalCount"),
        ("octetDeltaCount", "reverseOctetDeltaCount"),
        ("sourceIPv4Address", "reverseSourceIPv4Address"),
        ("flowStartSeconds", "reverseFlowStartSeconds"),
        ("VRFname", "reverseVRFname"),
    ],
)
def test_reverse_name(name, expected):
    assert reverse_name(name) == expected


def test_every_iana_element_has_its_reverse():
    iana = [ie for ie in REGISTRY if ie.enterprise == IANA]
    assert len(iana) > 100
    for ie in iana:
        rev = REGISTRY.by_name(reverse_name(ie.name))
        assert rev.enterprise == REVERSE_PEN
        assert rev.element_id == ie.element_id
        assert rev.data_type == ie.data_type
        assert REGISTRY.by_id(REVERSE_PEN, ie.element_id) == rev


def test_reverse_elements_mirror_iana_exactly():
    iana = {ie.element_id for ie in REGISTRY if ie.enterprise == IANA}
    reverse = {ie.element_id for ie in REGISTRY if ie.enterprise == REVERSE_PEN}
    assert reverse == iana


def test_registry_keys_are_unique():
    elements = list(REGISTRY)
    assert len(elements) == len(REGISTRY)
    assert len({ie.name for ie in elements}) == len(elements)
    assert len({(ie.enterprise, ie.element_id) for ie in elements}) == len(elements)


def test_unknown_iana_element_gets_synthetic_name():
    ie = REGISTRY.by_id(IANA, 32000)
    assert ie == InformationElement("ie32000", 32000, IANA, DataType.octetArray)
    assert ie.natural_length == VARIABLE_LENGTH


def test_unknown_enterprise_element_gets_synthetic_name():
    ie = REGISTRY.by_id(12345, 7)
    assert ie == InformationElement("ie12345_7", 7, 12345, DataType.octetArray)


def test_unknown_element_of_known_pen_gets_synthetic_name():
    assert REGISTRY.by_id(ANTREA_PEN, 999).name == "ie56506_999"
    assert REGISTRY.by_id(REVERSE_PEN, 32000).name == "ie29305_32000"


def test_by_name_unknown_raises_key_error_naming_it():
    with pytest.raises(KeyError, match="noSuchElement"):
        REGISTRY.by_name("noSuchElement")


def test_registry_rejects_duplicates():
    a = InformationElement("a", 1, 0, DataType.unsigned8)
    with pytest.raises(ValueError, match="duplicate"):
        Registry([a, InformationElement("a", 2, 0, DataType.unsigned8)])
    with pytest.raises(ValueError, match="duplicate"):
        Registry([a, InformationElement("b", 1, 0, DataType.unsigned8)])


def test_custom_registry_lookup():
    reg = Registry([InformationElement("x", 5, 77, DataType.unsigned16)])
    assert len(reg) == 1
    assert reg.by_name("x").element_id == 5
    assert reg.by_id(77, 5).name == "x"
    assert reg.by_id(77, 6).name == "ie77_6"


@pytest.mark.parametrize(
    "data_type,length",
    [
        (DataType.unsigned8, 1),
        (DataType.unsigned16, 2),
        (DataType.unsigned32, 4),
        (DataType.unsigned64, 8),
        (DataType.signed8, 1),
        (DataType.signed16, 2),
        (DataType.signed32, 4),
        (DataType.signed64, 8),
        (DataType.float32, 4),
        (DataType.float64, 8),
        (DataType.boolean, 1),
        (DataType.macAddress, 6),
        (DataType.dateTimeSeconds, 4),
        (DataType.dateTimeMilliseconds, 8),
        (DataType.dateTimeMicroseconds, 8),
        (DataType.dateTimeNanoseconds, 8),
        (DataType.ipv4Address, 4),
        (DataType.ipv6Address, 16),
        (DataType.string, VARIABLE_LENGTH),
        (DataType.octetArray, VARIABLE_LENGTH),
        (DataType.basicList, VARIABLE_LENGTH),
        (DataType.subTemplateList, VARIABLE_LENGTH),
        (DataType.subTemplateMultiList, VARIABLE_LENGTH),
    ],
)
def test_natural_lengths(data_type, length):
    assert NATURAL_LENGTH[data_type] == length
    assert InformationElement("x", 1, 0, data_type).natural_length == length


def test_data_type_codes_follow_iana():
    # IANA "IPFIX Information Element Data Types" codes (RFC 7012 / RFC 6313).
    assert DataType.octetArray == 0
    assert DataType.unsigned64 == 4
    assert DataType.string == 13
    assert DataType.dateTimeSeconds == 14
    assert DataType.dateTimeNanoseconds == 17
    assert DataType.ipv4Address == 18
    assert DataType.ipv6Address == 19
    assert DataType.subTemplateMultiList == 22


def test_antrea_exporter_templates_carry_every_exporter_ie_of_their_family():
    ipv6_only = {"sourceIPv6Address", "destinationIPv6Address", "destinationClusterIPv6"}
    ipv4_only = {"sourceIPv4Address", "destinationIPv4Address", "destinationClusterIPv4"}
    table = {row[0] for row in EXPORTER_IES}
    v4 = exporter_element_names(ipv6=False)
    v6 = exporter_element_names(ipv6=True)
    assert len(v4) == len(set(v4)) == 37
    assert set(v4) == table - ipv6_only
    assert set(v6) == table - ipv4_only
