"""Writes the fuzzers' seed corpus, test/fuzz/corpus/<target>/, from our own encoder.

Seeds are real: IPFIX sessions built with the exporter's templates and codecs (Antrea's
exporter and aggregator templates, options templates, a softflowd-like template of IANA
elements, every wire type the registry has), with withdrawals, expiry and a few classic
faults; and antrea-agent.conf / flow-aggregator.conf files in each form the loaders read.
The generated files are committed; run this again after changing it:

    .venv/bin/python test/fuzz/make_corpus.py
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fuzz_decoder as dec
import fuzz_framing

from antrea_flow.ipfix.antrea import aggregator_templates, exporter_templates
from antrea_flow.ipfix.elements import ANTREA_PEN, REGISTRY, VARIABLE_LENGTH
from antrea_flow.ipfix.messages import (
    OPTIONS_TEMPLATE_SET_ID,
    TEMPLATE_SET_ID,
    encode_message,
    encode_set,
    encode_template_record,
    template_messages,
    withdrawal_message,
)
from antrea_flow.ipfix.templates import COMPILE_AFTER, Field, Template

CORPUS = Path(__file__).resolve().parent / "corpus"
EXPORT_TIME = 1_700_000_000


def _field(name: str, length: int | None = None) -> Field:
    ie = REGISTRY.by_name(name)
    return Field(ie, ie.natural_length if length is None else length)


EXP4, EXP6 = exporter_templates()
AGG4, AGG6 = aggregator_templates()
# As softflowd 1.1 sends them: IANA elements only, 4-byte counters, an options template
# scoped by meteringProcessId with a NUL-padded fixed-length interfaceName.
SOFTFLOWD = Template(
    1024,
    [
        _field("sourceIPv4Address"),
        _field("destinationIPv4Address"),
        _field("octetDeltaCount", 4),
        _field("packetDeltaCount", 4),
        _field("ingressInterface"),
        _field("egressInterface"),
        _field("sourceTransportPort"),
        _field("destinationTransportPort"),
        _field("protocolIdentifier"),
        _field("tcpControlBits", 1),
        _field("ipVersion"),
        _field("ipClassOfService"),
        _field("flowStartMilliseconds"),
        _field("flowEndMilliseconds"),
    ],
)
SOFTFLOWD_OPTIONS = Template(
    1025,
    [
        _field("meteringProcessId"),
        _field("systemInitTimeMilliseconds"),
        _field("interfaceName", 16),
    ],
    scope_field_count=1,
)
# Every wire type the registry has, reduced-length integers, an unknown IANA element and
# an unknown enterprise's (both octetArray), variable-length fields.
MIXED = Template(
    300,
    [
        _field("octetDeltaCount", 4),
        _field("packetDeltaCount", 3),
        _field("sourceMacAddress"),
        _field("flowStartMicroseconds"),
        _field("flowStartNanoseconds"),
        _field("dataRecordsReliability"),
        _field("sourceIPv6Address"),
        _field("applicationName", VARIABLE_LENGTH),
        Field(REGISTRY.by_id(0, 999), 5),
        Field(REGISTRY.by_id(12345, 7), VARIABLE_LENGTH),
        Field(REGISTRY.by_id(ANTREA_PEN, 116), 4),
        Field(REGISTRY.by_id(ANTREA_PEN, 116), 2),
        _field("flowStartSeconds"),
        _field("interfaceName", 8),
    ],
)
TINY = Template(400, [_field("protocolIdentifier")])
OPTIONS = Template(
    500,
    [
        _field("observationDomainId"),
        _field("exportedMessageTotalCount"),
        _field("samplerName", VARIABLE_LENGTH),
    ],
    scope_field_count=1,
)

POD_RECORD = {
    "flowStartSeconds": EXPORT_TIME - 30,
    "flowEndSeconds": EXPORT_TIME,
    "flowEndReason": 1,
    "sourceTransportPort": 40000,
    "destinationTransportPort": 80,
    "protocolIdentifier": 6,
    "packetTotalCount": 12,
    "octetTotalCount": 3400,
    "packetDeltaCount": 2,
    "octetDeltaCount": 600,
    "sourceIPv4Address": "10.10.0.5",
    "destinationIPv4Address": "10.10.1.7",
    "sourceIPv6Address": "fd00:10:10::5",
    "destinationIPv6Address": "fd00:10:10:1::7",
    "reversePacketTotalCount": 10,
    "reverseOctetTotalCount": 9000,
    "sourcePodName": "client-7d4b9",
    "sourcePodNamespace": "default",
    "sourceNodeName": "k8s-node-1",
    "destinationPodName": "web-0",
    "destinationPodNamespace": "shop",
    "destinationNodeName": "k8s-node-2",
    "destinationServicePort": 80,
    "destinationServicePortName": "shop/web:http",
    "ingressNetworkPolicyName": "allow-web",
    "ingressNetworkPolicyNamespace": "shop",
    "ingressNetworkPolicyType": 1,
    "ingressNetworkPolicyRuleAction": 1,
    "tcpState": "ESTABLISHED",
    "flowType": 2,
    "sourcePodLabels": '{"app":"client"}',
    "throughput": 160,
}


class Exporter:
    """Messages of one exporter, with the sequence numbers of each observation domain."""

    def __init__(self) -> None:
        self.sequences: dict[int, int] = {}

    def message(self, sets: Sequence[bytes], records: int = 0, domain: int = 1) -> bytes:
        sequence = self.sequences.get(domain, 0)
        self.sequences[domain] = sequence + records
        return encode_message(sets, EXPORT_TIME, sequence, domain)

    def templates(self, *templates: Template, domain: int = 1) -> bytes:
        (message,) = template_messages(
            templates, EXPORT_TIME, self.sequences.get(domain, 0), domain
        )
        return message

    def data(self, template: Template, records: Sequence[bytes], domain: int = 1) -> bytes:
        return self.message([encode_set(template.template_id, records)], len(records), domain)

    def withdraw(self, *template_ids: int, domain: int = 1) -> bytes:
        return withdrawal_message(template_ids, EXPORT_TIME, self.sequences.get(domain, 0), domain)


def records(template: Template, count: int, **changes: Any) -> list[bytes]:
    out = []
    for i in range(count):
        values = dict(POD_RECORD, **changes)
        values["sourceTransportPort"] = 40000 + i
        out.append(template.encode_mapping(values))
    return out


def mixed_records() -> list[bytes]:
    return [
        MIXED.encode(
            [
                0xFFFFFFFF,
                0x123456,
                "02:42:ac:11:00:02",
                1_700_000_000_123_456,
                1_700_000_000_123_456_789,
                True,
                "fd00::1",
                "x" * 300,  # a long variable-length field: 3-byte length
                b"\x01\x02\x03\x04\x05",
                b"",
                -7,
                -2,
                EXPORT_TIME,
                "eth0",
            ]
        ),
        MIXED.encode(
            [0, 0, "00:00:00:00:00:00", 0, 0, False, "::", "", bytes(5), b"\xff", 0, 0, 0, ""]
        ),
    ]


def softflowd_records() -> list[bytes]:
    values = [
        "10.0.0.1",
        "10.0.0.2",
        1500,
        3,
        1,
        2,
        40000,
        5353,
        17,
        0,
        4,
        0,
        EXPORT_TIME * 1000,
        EXPORT_TIME * 1000 + 600,
    ]
    return [SOFTFLOWD.encode(values), SOFTFLOWD.encode(values[:9] + [0x1B] + values[10:])]


def options_record() -> bytes:
    return SOFTFLOWD_OPTIONS.encode([4242, EXPORT_TIME * 1000 - 5000, "flows.pcap"])


def template_set(*templates: Template) -> bytes:
    set_id = OPTIONS_TEMPLATE_SET_ID if templates[0].is_options else TEMPLATE_SET_ID
    return encode_set(set_id, [encode_template_record(t) for t in templates])


def sessions() -> dict[str, list[bytes]]:
    """Sessions of messages, by name; each is a decoder seed and a framing seed."""
    out: dict[str, list[bytes]] = {}

    e = Exporter()
    out["exporter_v4"] = [e.templates(EXP4, EXP6), e.data(EXP4, records(EXP4, 3))]
    e = Exporter()
    both = [template_set(EXP6), encode_set(257, records(EXP6, 2))]
    out["exporter_v6_one_message"] = [e.message(both, 2)]
    e = Exporter()
    out["aggregator"] = [
        e.templates(AGG4, AGG6),
        e.data(AGG4, records(AGG4, 2)),
        e.data(AGG6, records(AGG6, 1)),
    ]
    e = Exporter()
    out["softflowd"] = [
        e.templates(SOFTFLOWD, SOFTFLOWD_OPTIONS),
        e.data(SOFTFLOWD, softflowd_records()),
        e.data(SOFTFLOWD_OPTIONS, [options_record()]),
    ]
    e = Exporter()
    out["mixed_types"] = [e.templates(MIXED), e.data(MIXED, mixed_records())]
    e = Exporter()
    out["options"] = [
        e.templates(OPTIONS, TINY),
        e.data(OPTIONS, [OPTIONS.encode([1, 99, "sampler-1"])]),
        e.data(TINY, [b"\x06"]),
    ]
    e = Exporter()
    options_withdraw_all = encode_set(OPTIONS_TEMPLATE_SET_ID, [struct.pack(">HH", 3, 0)])
    options_withdraw_one = encode_set(OPTIONS_TEMPLATE_SET_ID, [struct.pack(">HH", 500, 0)])
    out["options_withdrawals"] = [
        e.templates(OPTIONS, TINY),
        e.message([options_withdraw_one]),
        e.templates(OPTIONS),
        e.message([options_withdraw_all]),
        e.data(TINY, [b"\x06"]),
    ]
    e = Exporter()
    # Enough records that the template is compiled after COMPILE_AFTER of them.
    many = [b"\x11"] * (COMPILE_AFTER + 8)
    out["compile_threshold"] = [e.templates(TINY), e.data(TINY, many), e.data(TINY, many[:4])]
    e = Exporter()
    out["withdrawals"] = [
        e.templates(EXP4, TINY),
        e.data(EXP4, records(EXP4, 1)),
        e.withdraw(256),
        e.data(TINY, [b"\x06", b"\x11"]),
        e.withdraw(TEMPLATE_SET_ID),  # all data templates of the domain
        e.templates(TINY),
        e.data(TINY, [b"\x01"]),
        e.data(EXP4, records(EXP4, 1)),  # withdrawn: unknown template
    ]
    e = Exporter()
    out["withdraw_and_announce_in_one_message"] = [
        e.templates(TINY, MIXED),
        e.message([encode_set(TEMPLATE_SET_ID, [struct.pack(">HH", 400, 0)]), template_set(TINY)]),
        e.data(TINY, [b"\x06"]),
    ]
    e = Exporter()
    out["domains"] = [
        e.templates(TINY, domain=1),
        e.templates(TINY, OPTIONS, domain=7),
        e.templates(TINY, domain=0xFFFFFFFF),
        e.data(TINY, [b"\x06"], domain=7),
        e.data(TINY, [b"\x11"], domain=2),  # no templates in domain 2
    ]
    e = Exporter()
    first = e.data(TINY, [b"\x06"] * 3)
    e.sequences[1] += 5  # five records lost
    out["sequence_gap"] = [e.templates(TINY), first, e.data(TINY, [b"\x06"]), first]
    e = Exporter()
    padded = encode_set(300, mixed_records()[1:] + [bytes(3)])
    template_padding = encode_set(TEMPLATE_SET_ID, [encode_template_record(TINY), bytes(2)])
    out["padding"] = [e.message([template_padding]), e.templates(MIXED), e.message([padded], 1)]
    e = Exporter()
    out["faults"] = [
        e.templates(TINY),
        e.data(TINY, [b"\x06"])[:-1],  # shorter than its header says
        struct.pack(">HHIII", 9, 16, EXPORT_TIME, 0, 1),  # NetFlow v9
        e.message([struct.pack(">HH", 300, 3)]),  # set shorter than a set header
        e.message([encode_set(1, [b"\0\0\0\0"])]),  # reserved set id
        e.message([encode_set(TEMPLATE_SET_ID, [struct.pack(">HH", 255, 1) + b"\0\x04\0\x01"])]),
        e.message([encode_set(OPTIONS_TEMPLATE_SET_ID, [struct.pack(">HHH", 501, 1, 0)])]),
        e.data(EXP4, records(EXP4, 1)),  # template never announced
        e.data(TINY, [b"\x06"]),
    ]
    return out


def decoder_seeds() -> dict[str, bytes]:
    """Each session in each mode that the harness's flags and ops give."""
    seeds = {}
    plain, announced, used, expire = (
        dec.DECODE,
        dec.COMPILE_ANNOUNCED,
        dec.COMPILE_USED,
        dec.EXPIRE,
    )
    later = 8 << 3  # advance the clock 64 s: past the UDP template timeout
    for name, messages in sessions().items():
        seeds[name] = dec.encode_input(0, [(plain, m) for m in messages])
        seeds[f"{name}_compiled"] = dec.encode_input(
            0, [(announced, messages[0])] + [(used, m) for m in messages[1:]]
        )
    s = sessions()
    # Templates past their deadline stay until expiry runs; re-announced, they live again.
    seeds["udp_expiry"] = dec.encode_input(
        dec.UDP,
        [
            (plain, s["softflowd"][0]),
            (plain | 4 << 3, s["softflowd"][1]),  # 32 s later: still known
            (expire | later, b""),  # 96 s: expired
            (plain, s["softflowd"][1]),  # unknown template
            (plain, s["softflowd"][0]),
            (used | 4 << 3, s["softflowd"][1]),
        ],
    )
    seeds["udp_refresh"] = dec.encode_input(
        dec.UDP,
        [
            (plain, s["exporter_v4"][0]),
            (plain | 6 << 3, s["exporter_v4"][0]),
            (expire | 2 << 3, b""),
            (used, s["exporter_v4"][1]),
        ],
    )
    seeds["two_sessions"] = dec.encode_input(
        0,
        [
            (plain, s["aggregator"][0]),
            (plain | dec.SECOND_SESSION, s["exporter_v4"][0]),
            (used | dec.SECOND_SESSION, s["exporter_v4"][1]),
            (used, s["aggregator"][1]),
        ],
    )
    seeds["tight_limits"] = dec.encode_input(
        dec.TIGHT_LIMITS,
        [(plain, s["exporter_v4"][0])]
        + [(plain, m) for m in s["domains"]]
        + [(plain | dec.SECOND_SESSION, m) for m in s["options"]],
    )
    seeds["tight_limits_udp"] = dec.encode_input(
        dec.UDP | dec.TIGHT_LIMITS,
        [(plain, m) for m in s["options_withdrawals"]] + [(expire | later, b"")],
    )
    return seeds


def framing_seeds() -> dict[str, bytes]:
    """Sessions as streams, cut in the middle of headers, sets and records."""
    seeds = {}
    for name, messages in sessions().items():
        stream = b"".join(messages)
        seeds[name] = fuzz_framing.encode_input([], stream)
        seeds[f"{name}_cut"] = fuzz_framing.encode_input([1, 3, 17, len(messages[0]) + 2], stream)
    stream = b"".join(sessions()["exporter_v4"])
    seeds["byte_by_byte_header"] = fuzz_framing.encode_input(list(range(1, 16)), stream)
    seeds["incomplete_tail"] = fuzz_framing.encode_input([40], stream + stream[:30])
    tls = bytes.fromhex("160301020001000200")  # a TLS ClientHello's first bytes
    seeds["tls_client_hello"] = fuzz_framing.encode_input([2], tls + stream)
    seeds["bad_header_after_good"] = fuzz_framing.encode_input([], stream + b"\0\x05\0\x18")
    seeds["short_length"] = fuzz_framing.encode_input([5], stream + b"\0\x0a\0\x08")
    return seeds


AGENT_CONFIGS = {
    "agent_empty.conf": "",
    "agent_seed_format.conf": """\
featureGates:
  AntreaProxy: true
  FlowExporter: true
flowCollectorAddr: "flow-aggregator.flow-aggregator.svc:4739:tls"
flowPollInterval: "5s"
activeFlowExportTimeout: "60s"
idleFlowExportTimeout: "15s"
tlsCertDir: /etc/antrea-flow/certs
""",
    "agent_all_keys.conf": """\
featureGates:
  FlowExporter: true
flowCollectorAddr: "10.96.5.5:4739:tcp"
flowPollInterval: "1s"
activeFlowExportTimeout: "1m30s"
idleFlowExportTimeout: "500ms"
conntrackZone: 0
inventoryFile: /etc/antrea-flow/inventory.yaml
tlsCertDir: ""
metricsBindAddress: "127.0.0.1:9100"
protocolFilter: [TCP, udp]
denyQueue: 1
denyRecordRate: 100
""",
    "agent_nested.conf": """\
flowExporter:
  enable: true
  flowCollectorAddr: "flow-aggregator/flow-aggregator:4739:tls"
  flowPollInterval: "2s"
  activeFlowExportTimeout: "30s"
  idleFlowExportTimeout: "10s"
tlsCertDir: /var/run/antrea/flow-certs
""",
    "agent_antrea_keys.conf": """\
clientConnection:
  kubeconfig: /etc/antrea/kubeconfig
ovsBridge: br-int
trafficEncapMode: encap
tunnelType: geneve
antreaProxy:
  proxyAll: false
enablePrometheusMetrics: true
featureGates:
  FlowExporter: true
flowCollectorAddr: "[fd00:10:96::5]:4739:udp"
protocolFilter: [sctp]
metricsBindAddress: ""
""",
    "agent_ipv6_tls_needs_certs.conf": """\
featureGates: {FlowExporter: true}
flowCollectorAddr: "[fd00::5]"
""",
    "agent_typo.conf": """\
flowPolInterval: 5s
protocolFilter: []
""",
    "agent_bad_values.conf": """\
flowPollInterval: 5
conntrackZone: 70000
protocolFilter: tcp
denyQueue: -1
""",
    "agent_short_timeouts.conf": """\
flowPollInterval: 10s
activeFlowExportTimeout: 1µs
idleFlowExportTimeout: 1.5h
""",
    "agent_udp_collector.conf": """\
featureGates:
  FlowExporter: true
flowCollectorAddr: "192.168.1.10:4739:UDP"
flowPollInterval: "1h"
activeFlowExportTimeout: "0"
""",
    "agent_gate_off_null_values.conf": """\
featureGates:
  FlowExporter: false
flowCollectorAddr:
protocolFilter:
denyQueue: 65535
denyRecordRate: 10000000
""",
    "agent_nested_disabled.conf": """\
flowExporter:
  enable: false
  flowCollectorAddr: "flow-aggregator.flow-aggregator.svc:4739:tcp"
  pollInterval: 5s
""",
}

AGGREGATOR_CONFIGS = {
    "aggregator_upstream.conf": """\
mode: "Aggregate"
externalFlowCollectorAddr: ""
flowExportInterval: "60s"
aggregatorTransportProtocol: "tls"
flowAggregatorAddress: "flow-aggregator.flow-aggregator.svc"
inactiveFlowRecordTimeout: "90s"
recordContents:
  podLabels: false
apiServer:
  apiPort: 10348
flowCollector:
  enable: false
  address: ""
  observationDomainID:
  recordFormat: "IPFIX"
clickHouse:
  enable: false
""",
    "aggregator_all_keys.conf": """\
externalFlowCollectorAddr: "10.0.0.9:4739:udp"
flowExportInterval: "30s"
aggregatorTransportProtocol: "tcp"
flowAggregatorAddress: "fd00::5"
inactiveFlowRecordTimeout: "2m"
correlationTimeout: "30s"
listenAddress: "127.0.0.1:14739"
certDir: /var/run/antrea-flow/flow-aggregator
jsonLogPath: /var/log/antrea-flow/flows.json
inventoryFile: /etc/antrea-flow/inventory.yaml
metricsBindAddress: "[::1]:9100"
observationDomainID: 42
templateRefreshTimeout: "300s"
""",
    "aggregator_flow_collector.conf": """\
flowCollector:
  enable: true
  address: "10.0.0.9:4739:udp"
  observationDomainID: 7
  templateRefreshTimeout: "60s"
  maxIPFIXMsgSize: 1400
  recordFormat: IPFIX
  includeK8sNames: true
  includeK8sUIDs: false
  tls:
    enable: false
activeFlowRecordTimeout: "45s"
aggregatorTransportProtocol: UDP
listenAddress: ":4739"
""",
    "aggregator_collector_limits.conf": """\
collectorLimits:
  maxSessions: 100
  maxSessionsPerAddress: 4
  firstMessageTimeout: 5s
  idleTimeout: 0s
  maxTemplateFields: 64
  maxTemplatesPerDomain: 16
  maxDomainsPerSession: 2
  maxTemplateMemoryPerSession: 1048576
  maxTemplateMemory: 67108864
""",
    "aggregator_both_interval_names.conf": """\
flowExportInterval: 60s
activeFlowRecordTimeout: 30s
""",
    "aggregator_bad_values.conf": """\
flowAggregatorAddress: "[not-an-address"
listenAddress: "0.0.0.0:4739:tcp"
flowCollector:
  maxIPFIXMsgSize: 100
  tls: {enable: true}
""",
    "aggregator_newer_names.conf": """\
activeFlowRecordTimeout: "60s"
inactiveFlowRecordTimeout: "90s"
aggregatorTransportProtocol: "udp"
listenAddress: "[::]:4739"
metricsBindAddress: ""
""",
    "aggregator_external_tcp.conf": """\
externalFlowCollectorAddr: "ipfix-collector.example.com:4739:tcp"
flowAggregatorAddress: "[fd00::5]"
clusterID: "a1b2"
recordBufferSize: 1024
flowLogger:
  enable: false
""",
    "aggregator_collector_disabled.conf": """\
externalFlowCollectorAddr: "10.0.0.1:4739"
flowCollector:
  enable: false
  address: "10.0.0.9:4739:udp"
  maxIPFIXMsgSize: 0
""",
    "aggregator_unsupported_values.conf": """\
flowCollector:
  enable: true
  address: "10.0.0.9:4739:tcp"
  recordFormat: JSON
  includeK8sUIDs: true
collectorLimits:
  maxSessions: 0
  idleTimeout: 10
""",
}


def write(target: str, files: dict[str, bytes]) -> None:
    directory = CORPUS / target
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    total = sum(len(d) for d in files.values())
    print(f"{directory}: {len(files)} files, {total} bytes")


def main() -> None:
    write("decoder", {f"{name}.bin": data for name, data in decoder_seeds().items()})
    write("framing", {f"{name}.bin": data for name, data in framing_seeds().items()})
    configs = {**AGENT_CONFIGS, **AGGREGATOR_CONFIGS}
    write("config", {name: text.encode() for name, text in configs.items()})


if __name__ == "__main__":
    main()
