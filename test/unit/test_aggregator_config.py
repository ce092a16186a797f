"""flow-aggregator.conf: upstream's keys and defaults, ours, aliases, and clear errors."""

from __future__ import annotations

import logging
import textwrap

import pytest

from antrea_flow.aggregator.config import (
    DEFAULT_AGGREGATOR_ADDRESS,
    AggregatorConfig,
    load_aggregator_config,
)
from antrea_flow.configfile import ConfigError
from antrea_flow.errors import UsageError
from antrea_flow.ipfix.address import TransportAddress


@pytest.fixture
def load(tmp_path):
    def load(text: str) -> AggregatorConfig:
        path = tmp_path / "flow-aggregator.conf"
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return load_aggregator_config(path)

    return load


def error_of(load, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(text)
    assert isinstance(info.value, UsageError)
    message = str(info.value)
    assert "\n" not in message, "errors are reported in one line"
    return message


def test_defaults_of_an_empty_file(load):
    config = load("")
    assert config.external_collector is None
    assert config.export_interval == 60.0
    assert config.listen == TransportAddress("", 4739, "tls")
    assert config.tls is True
    assert config.aggregator_address == DEFAULT_AGGREGATOR_ADDRESS
    assert DEFAULT_AGGREGATOR_ADDRESS == "flow-aggregator.flow-aggregator.svc"
    assert config.inactive_timeout == 90.0
    assert config.correlation_timeout == 60.0
    assert config.cert_dir  # somewhere to keep the certificates
    assert config.json_log == ""
    assert config.metrics_address is not None and config.metrics_address.protocol == "tcp"
    assert config.observation_domain_id == 0
    assert config.template_refresh == 600.0
    assert config.inventory_file == ""


def test_the_seed_snippet_as_documented(load):
    config = load(
        """\
        # Provide the flow collector address as a string with format <IP>:<port>[:<proto>]
        externalFlowCollectorAddr: ""
        #flowExportInterval: 60s
        #aggregatorTransportProtocol: "tls"
        #flowAggregatorAddress: "flow-aggregator.flow-aggregator.svc"
        """
    )
    assert config.external_collector is None
    assert config.export_interval == 60.0
    assert config.listen.protocol == "tls"
    assert config.aggregator_address == "flow-aggregator.flow-aggregator.svc"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.168.86.86:4739", TransportAddress("192.168.86.86", 4739, "tcp")),
        ("192.168.86.86:4739:tcp", TransportAddress("192.168.86.86", 4739, "tcp")),
        ("192.168.86.86:4739:udp", TransportAddress("192.168.86.86", 4739, "udp")),
        ("10.96.1.2:4739:UDP", TransportAddress("10.96.1.2", 4739, "udp")),
        ("[fd00::86]:4740:udp", TransportAddress("fd00::86", 4740, "udp")),
        ("logstash.elk.svc:4739:udp", TransportAddress("logstash.elk.svc", 4739, "udp")),
    ],
)
def test_external_collector_address(load, text, expected):
    assert load(f"externalFlowCollectorAddr: {text!r}").external_collector == expected


@pytest.mark.parametrize(
    "text", ["192.168.86.86:4739:tls", "192.168.86.86:4739:grpc", "192.168.86.86", "fd00::1:4739"]
)
def test_external_collector_address_rejected(load, text):
    message = error_of(load, f"externalFlowCollectorAddr: {text!r}")
    assert "externalFlowCollectorAddr" in message
    assert text in message
    assert "<PORT>" in message  # the accepted form


@pytest.mark.parametrize(("text", "seconds"), [("60s", 60.0), ("1s", 1.0), ("2m30s", 150.0)])
def test_flow_export_interval(load, text, seconds):
    assert load(f"flowExportInterval: {text}").export_interval == seconds


@pytest.mark.parametrize("text", ["500ms", "0s", "60", "sixty", "-5s"])
def test_flow_export_interval_rejected(load, text):
    message = error_of(load, f"flowExportInterval: {text!r}")
    assert "flowExportInterval" in message
    assert text in message
    assert "duration" in message


@pytest.mark.parametrize("protocol", ["tls", "tcp", "udp", "TCP"])
def test_aggregator_transport_protocol(load, protocol):
    config = load(f"aggregatorTransportProtocol: {protocol}")
    assert config.listen.protocol == protocol.lower()
    assert config.listen.port == 4739
    assert config.tls is (protocol == "tls")


@pytest.mark.parametrize("protocol", ["grpc", "none", "sctp"])
def test_aggregator_transport_protocol_rejected(load, protocol):
    message = error_of(load, f"aggregatorTransportProtocol: {protocol}")
    assert "aggregatorTransportProtocol" in message
    assert protocol in message
    assert "tls" in message and "tcp" in message and "udp" in message


def test_flow_aggregator_address(load):
    assert load("flowAggregatorAddress: 10.96.5.5").aggregator_address == "10.96.5.5"
    assert load("flowAggregatorAddress: fa.example.com").aggregator_address == "fa.example.com"


def test_our_keys(load, tmp_path):
    config = load(
        f"""\
        aggregatorTransportProtocol: tcp
        listenAddress: "127.0.0.1:14739"
        inactiveFlowRecordTimeout: 2m
        correlationTimeout: 30s
        certDir: {tmp_path / "certs"}
        jsonLogPath: {tmp_path / "flows.json"}
        metricsBindAddress: "127.0.0.1:9100"
        observationDomainID: 42
        templateRefreshTimeout: 5m
        inventoryFile: {tmp_path / "inventory.yaml"}
        """
    )
    assert config.listen == TransportAddress("127.0.0.1", 14739, "tcp")
    assert config.inactive_timeout == 120.0
    assert config.correlation_timeout == 30.0
    assert config.cert_dir == str(tmp_path / "certs")
    assert config.json_log == str(tmp_path / "flows.json")
    assert config.metrics_address == TransportAddress("127.0.0.1", 9100, "tcp")
    assert config.observation_domain_id == 42
    assert config.template_refresh == 300.0
    assert config.inventory_file == str(tmp_path / "inventory.yaml")


def test_listen_on_any_port_and_no_metrics(load):
    config = load('listenAddress: "127.0.0.1:0"\nmetricsBindAddress: ""\n')
    assert config.listen.port == 0
    assert config.metrics_address is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("inactiveFlowRecordTimeout", "'500ms'"),
        ("correlationTimeout", "'0s'"),
        ("observationDomainID", "-1"),
        ("observationDomainID", "4294967296"),
        ("observationDomainID", "abc"),
        ("templateRefreshTimeout", "soon"),
        ("listenAddress", "'4739'"),
        ("metricsBindAddress", "'127.0.0.1'"),
        ("certDir", "[a, b]"),
    ],
)
def test_bad_values_name_the_key_and_the_value(load, key, value):
    message = error_of(load, f"{key}: {value}")
    assert key in message
    assert value.strip("'").split(",")[0].strip("[") in message
    assert "expected" in message


def test_active_flow_record_timeout_is_upstreams_name_for_the_export_interval(load):
    assert load("activeFlowRecordTimeout: 30s").export_interval == 30.0
    message = error_of(load, "activeFlowRecordTimeout: 100ms")
    assert "activeFlowRecordTimeout" in message


def test_flow_collector_section(load):
    config = load(
        """\
        flowCollector:
          enable: true
          address: "10.0.0.9:4739:udp"
          observationDomainID: 7
          templateRefreshTimeout: 1m
          recordFormat: IPFIX
        """
    )
    assert config.external_collector == TransportAddress("10.0.0.9", 4739, "udp")
    assert config.observation_domain_id == 7
    assert config.template_refresh == 60.0


def test_flow_collector_section_disabled(load):
    config = load(
        """\
        externalFlowCollectorAddr: "10.0.0.8:4739"
        flowCollector:
          enable: false
          address: "10.0.0.9:4739:tcp"
        """
    )
    assert config.external_collector is None


def test_flow_collector_enable_defaults_to_false_as_upstream(load):
    config = load("flowCollector:\n  address: '10.0.0.9:4739'\n")
    assert config.external_collector is None


def test_upstreams_default_flow_collector_section_loads(load):
    """The section as upstream's flow-aggregator.yml ships it: disabled, empty address."""
    config = load(
        """\
        flowCollector:
          enable: false
          address: ""
          observationDomainID:
          recordFormat: "IPFIX"
          templateRefreshTimeout: "600s"
          maxIPFIXMsgSize: 0
          tls:
            enable: false
            caSecretName: ""
            serverName: ""
            clientSecretName: ""
            minVersion: ""
          includeK8sNames: true
          includeK8sUIDs: false
        """
    )
    assert config.external_collector is None
    assert config.template_refresh == 600.0


def test_flow_collector_section_bad_address_and_unknown_key(load):
    message = error_of(load, "flowCollector: {enable: true, address: '10.0.0.9:4739:grpc'}")
    assert "10.0.0.9:4739:grpc" in message
    message = error_of(load, "flowCollector: {enable: true, adress: '10.0.0.9:4739'}")
    assert "flowCollector.adress" in message
    assert "10.0.0.9:4739" in message
    assert "address" in message
    message = error_of(load, "flowCollector: {enable: yes-please}")
    assert "flowCollector.enable" in message


@pytest.mark.parametrize("section", ["clickHouse", "s3Uploader", "flowLogger", "flowStreamService"])
def test_unsupported_upstream_sections_are_warned_about_and_ignored(load, caplog, section):
    with caplog.at_level(logging.WARNING, logger="antrea_flow.aggregator.config"):
        config = load(f"{section}:\n  enable: true\nflowExportInterval: 10s\n")
    assert config.export_interval == 10.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(section in w for w in warnings), warnings


def test_upstream_keys_without_effect_here_are_accepted(load):
    config = load("recordContents: {podLabels: true}\nclusterID: abc\nrecordBufferSize: 8192\n")
    assert config.export_interval == 60.0


@pytest.mark.parametrize(
    "setting",
    [
        "tls: {enable: true, caSecretName: ca, clientSecretName: client}",
        "recordFormat: JSON",
    ],
)
def test_flow_collector_settings_we_cannot_honour_are_not_silently_dropped(load, caplog, setting):
    """Upstream would encrypt (or send JSON); exporting plain IPFIX instead without a word
    would be a silent change of what the user configured."""
    text = f"flowCollector:\n  enable: true\n  address: '10.0.0.9:4739'\n  {setting}\n"
    with caplog.at_level(logging.WARNING, logger="antrea_flow.aggregator.config"):
        try:
            load(text)
        except ConfigError as exc:
            assert "flowCollector." in str(exc)
            return
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    key = setting.split(":")[0]
    assert any(key in w for w in warnings), f"flowCollector.{key} ignored without a warning"


def test_unknown_key_is_rejected_in_one_line_with_key_value_and_accepted_form(load):
    message = error_of(load, "flowExportIntervall: 10s\n")
    assert "flowExportIntervall" in message
    assert "10s" in message
    assert "flowExportInterval" in message  # the accepted keys (and a hint)
    assert "expected" in message


def test_not_a_mapping(load):
    message = error_of(load, "- a\n- b\n")
    assert "mapping" in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_aggregator_config(tmp_path / "absent.conf")
    assert "absent.conf" in str(info.value)
