"""flow-aggregator.conf: upstream's keys and defaults, ours, aliases, and clear errors."""

from __future__ import annotations

import logging
import textwrap

import pytest

from antrea_flow.aggregator.config import AggregatorConfig, load_aggregator_config
from antrea_flow.aggregator.service import Aggregator
from antrea_flow.codes import AGGREGATOR_SERVICE_NAME
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
    assert config.aggregator_address == AGGREGATOR_SERVICE_NAME
    assert AGGREGATOR_SERVICE_NAME == "flow-aggregator.flow-aggregator.svc"
    assert config.inactive_timeout == 90.0
    assert config.correlation_timeout == 60.0
    assert config.cert_dir  # somewhere to keep the certificates
    assert config.json_log == ""
    assert config.metrics_address is not None and config.metrics_address.protocol == "tcp"
    assert config.observation_domain_id == 0
    assert config.template_refresh == 600.0
    assert config.inventory_file == ""
    assert config.api_address == TransportAddress("127.0.0.1", 10349, "tcp")  # loopback only
    assert (config.api_token, config.api_window) == ("", 10000)
    assert config.max_flows == 1_000_000


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


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("10.96.5.5", "10.96.5.5"),
        ("fa.example.com", "fa.example.com"),
        ("fa.example.com.", "fa.example.com."),
        ("flow-aggregator", "flow-aggregator"),
        ("fd00::1", "fd00::1"),
        ("[fd00::1]", "fd00::1"),  # the certificate needs the address, not the brackets
    ],
)
def test_flow_aggregator_address(load, text, stored):
    assert load(f"flowAggregatorAddress: {text!r}").aggregator_address == stored


@pytest.mark.parametrize(
    "text",
    ["", "a b!", "flüss.example", "fa.example.com:4739", "[10.0.0.1]", "[fa.example]", "10.1.2"],
)
def test_flow_aggregator_address_rejected(load, text):
    """It goes into the server certificate: a value that is neither a name nor an address
    would be refused there (or crash start-up), far from the config key that caused it."""
    message = error_of(load, f"flowAggregatorAddress: {text!r}")
    assert "flowAggregatorAddress" in message
    assert repr(text) in message
    assert "a DNS name or an IP address" in message


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


@pytest.mark.parametrize(
    "text", ["0.0.0.0:4739:tcp", "0.0.0.0:4739:tls", "0.0.0.0", "[::]:4739:tls", ":99999", ""]
)
def test_listen_address_errors_show_what_the_user_wrote(load, text):
    """The protocol comes from aggregatorTransportProtocol, not from this key."""
    message = error_of(load, f"listenAddress: {text!r}")
    assert f"listenAddress: {text!r} " in message
    assert "[HOST]:PORT" in message
    assert "aggregatorTransportProtocol" in message
    assert "<PROTO>" not in message


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
        ("apiBindAddress", "'10349'"),
        ("apiWindowRecords", "0"),
        ("maxFlows", "999"),
        ("maxFlows", "lots"),
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
    assert load("flowExportInterval:\nactiveFlowRecordTimeout: 30s\n").export_interval == 30.0


@pytest.mark.parametrize(("first", "second"), [("10s", "20s"), ("30s", "30s")])
def test_flow_export_interval_and_its_alias_together_are_rejected(load, first, second):
    """Upstream knows only activeFlowRecordTimeout: with both, neither may silently win."""
    message = error_of(load, f"flowExportInterval: {first}\nactiveFlowRecordTimeout: {second}\n")
    assert f"flowExportInterval: {first!r}" in message
    assert f"activeFlowRecordTimeout: {second!r}" in message
    assert "expected only one" in message


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
    assert config.max_message_size is None  # 0: the transport's own


@pytest.mark.parametrize("size", [512, 1400, 65535])
def test_max_ipfix_msg_size_reaches_the_ipfix_export(load, size):
    config = load(
        f"""        aggregatorTransportProtocol: tcp
        listenAddress: "127.0.0.1:0"
        flowCollector:
          enable: true
          address: "10.0.0.9:4739:udp"
          maxIPFIXMsgSize: {size}
        """
    )
    assert config.max_message_size == size
    (sink,) = Aggregator(config).sinks
    assert sink.exporter.max_message_size == size


@pytest.mark.parametrize("value", ["100", "511", "65536", "-1", "big", "true"])
def test_max_ipfix_msg_size_rejected(load, value):
    message = error_of(load, f"flowCollector: {{enable: true, maxIPFIXMsgSize: {value}}}")
    assert "flowCollector.maxIPFIXMsgSize" in message
    assert value.lower() in message.lower()
    assert "512..65535" in message


def test_flow_collector_section_bad_address_and_unknown_key(load):
    message = error_of(load, "flowCollector: {enable: true, address: '10.0.0.9:4739:grpc'}")
    assert "10.0.0.9:4739:grpc" in message
    message = error_of(load, "flowCollector: {enable: true, adress: '10.0.0.9:4739'}")
    assert "flowCollector.adress" in message
    assert "10.0.0.9:4739" in message
    assert "address" in message
    message = error_of(load, "flowCollector: {enable: yes-please}")
    assert "flowCollector.enable" in message


@pytest.mark.parametrize("section", ["s3Uploader", "flowLogger", "flowStreamService"])
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
        "includeK8sNames: false",
        "includeK8sUIDs: true",
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


def aggregator_conf(tmp_path, json_log) -> str:
    return textwrap.dedent(
        f"""\
        listenAddress: "127.0.0.1:0"
        metricsBindAddress: ""
        certDir: {tmp_path / "certs"}
        jsonLogPath: {json_log}
        """
    )


def test_json_log_in_a_new_directory_is_created_at_start_up(load, tmp_path):
    path = tmp_path / "logs" / "new" / "flows.json"
    Aggregator(load(aggregator_conf(tmp_path, path)))
    assert path.is_file()  # start-up checked it can be written


@pytest.mark.parametrize("under", ["file", "file/sub"])
def test_bad_json_log_path_stops_start_up_before_certificates_are_made(load, tmp_path, under):
    (tmp_path / "file").write_text("not a directory", encoding="utf-8")
    path = tmp_path / under / "flows.json"
    config = load(aggregator_conf(tmp_path, path))
    with pytest.raises(UsageError) as info:
        Aggregator(config)
    message = str(info.value)
    assert "\n" not in message
    assert "jsonLogPath" in message
    assert repr(str(path)) in message
    assert not (tmp_path / "certs").exists()


def test_collector_limits_default_and_section(load):
    from antrea_flow.ipfix.collecting import CollectorLimits

    assert load("").limits == CollectorLimits()
    limits = load(
        """\
        collectorLimits:
          maxSessions: 100
          maxSessionsPerAddress: 4
          firstMessageTimeout: 5s
          idleTimeout: 0s
          maxTemplateFields: 64
          maxTemplatesPerDomain: 8
          maxDomainsPerSession: 2
          maxTemplateMemoryPerSession: 65536
          maxTemplateMemory: 1048576
        """
    ).limits
    assert (limits.max_sessions, limits.max_sessions_per_address) == (100, 4)
    assert limits.first_message_timeout == 5.0 and limits.idle_timeout is None
    t = limits.templates
    assert (t.max_fields, t.max_templates, t.max_domains) == (64, 8, 2)
    assert (t.max_session_bytes, t.max_total_bytes) == (65536, 1048576)


@pytest.mark.parametrize(
    ("key", "value"),
    [("maxSessions", 0), ("maxTemplateFields", 20000), ("idleTimeout", "soon")],
)
def test_collector_limits_bad_values_name_the_key(load, key, value):
    message = error_of(load, f"collectorLimits:\n  {key}: {value}\n")
    assert f"collectorLimits.{key}: {value!r}" in message


def test_collector_limits_unknown_key(load):
    message = error_of(load, "collectorLimits:\n  maxSesions: 10\n")
    assert "collectorLimits.maxSesions" in message and "maxSessions" in message


def test_state_dir_defaults_to_cert_dir_and_empty_keeps_no_checkpoint(load, tmp_path):
    assert load(f"certDir: {tmp_path / 'certs'}\n").state_dir == str(tmp_path / "certs")
    config = load(f"certDir: {tmp_path}/c\nstateDir: ''\naggregatorTransportProtocol: tcp\n")
    assert config.state_dir == ""
    assert Aggregator(config).checkpoint is None
    config = load(f"stateDir: {tmp_path}/s\naggregatorTransportProtocol: tcp\n")
    assert Aggregator(config).checkpoint.path == tmp_path / "s" / "exporters.checkpoint"
    (tmp_path / "file").write_text("")
    config = load(f"stateDir: {tmp_path}/file\naggregatorTransportProtocol: tcp\n")
    with pytest.raises(UsageError, match="stateDir: .* is not a directory"):
        Aggregator(config)


def test_the_flow_collector_tls_section_is_read_like_any_other(load):
    # Its certificate keys are accepted while the TLS export is off; enabling it is refused
    # by name; a misspelled key in it is an unknown key, with a suggestion.
    assert load("flowCollector:\n  tls: {enable: false, caSecretName: ca}\n").limits
    message = error_of(load, "flowCollector:\n  tls: {enable: true}\n")
    assert "flowCollector.tls.enable: True is not supported" in message
    message = error_of(load, "flowCollector:\n  tls: {enabel: true}\n")
    assert (
        "flowCollector.tls.enabel" in message and "did you mean flowCollector.tls.enable" in message
    )


def test_the_kubernetes_api_keys(load):
    assert load("").kubeconfig == "" and load("").metadata_sync_timeout == 30.0
    config = load(
        """\
        clientConnection:
          kubeconfig: /etc/flow-aggregator/kubeconfig
          qps: 20
        metadataSyncTimeout: 0s
        """
    )
    assert config.kubeconfig == "/etc/flow-aggregator/kubeconfig"
    assert config.metadata_sync_timeout == 0.0
    message = error_of(load, "clientConnection: /etc/kubeconfig\n")
    assert "clientConnection: '/etc/kubeconfig' is not a mapping" in message
    message = error_of(load, "metadataSyncTimeout: soon\n")
    assert "metadataSyncTimeout: 'soon' is not a duration" in message


def test_clickhouse_is_off_unless_enabled_and_embedded_under_state_dir_by_default(load, tmp_path):
    assert load("").clickhouse is None
    assert load("clickHouse: {database: flows}\n").clickhouse is None  # enable: false
    config = load(f"stateDir: {tmp_path}/state\nclickHouse: {{enable: true}}\n").clickhouse
    assert config is not None and config.embedded
    assert config.url == (tmp_path / "state" / "clickhouse").as_uri()
    # Upstream's defaults.
    assert (config.database, config.commit_interval, config.compress, config.debug) == (
        "default", 8.0, True, False
    )  # fmt: skip
    assert config.queue_size == 1 << 19 and config.ttl == 12 * 3600


def test_clickhouse_keys_and_credentials_from_the_environment(load, monkeypatch):
    monkeypatch.setenv("CH_USERNAME", "flows")
    monkeypatch.setenv("CH_PASSWORD", "s3cret")
    config = load(
        """
        clickHouse:
          enable: true
          database: antrea_flows
          databaseURL: "https://ClickHouse.example.com"
          debug: true
          compress: false
          commitInterval: 1s
          ttl: 0s
          queueSize: 1000
          tls: {insecureSkipVerify: true, caCert: true}
        """
    ).clickhouse
    assert config is not None and not config.embedded
    assert config.url == "https://ClickHouse.example.com:8443"  # the HTTPS interface's port
    assert (config.username, config.password) == ("flows", "s3cret")
    assert (config.database, config.debug, config.compress) == ("antrea_flows", True, False)
    assert (config.commit_interval, config.ttl, config.queue_size) == (1.0, 0.0, 1000)
    assert config.insecure_skip_verify and config.ca_cert.endswith("/clickhouse/ca.crt")
    assert load(
        "clickHouse: {enable: true, databaseURL: 'http://[fd00::5]:18123'}"
    ).clickhouse.url == ("http://[fd00::5]:18123")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("tcp://clickhouse-clickhouse.flow-visibility.svc:9000", "native protocol"),
        ("tls://clickhouse:9440", "native protocol"),
        ("ftp://clickhouse", "is not allowed"),
        ("http://user:pw@clickhouse:8123", "has a path, query or user"),
        ("http://clickhouse:8123/default", "has a path, query or user"),
        ("http://clickhouse:8123?database=x", "has a path, query or user"),
        ("http://clickhouse:99999", "is not a URL"),
        ("file://relative/path", "is not a file URL"),
        ("http://", "is not allowed"),
    ],
)
def test_a_bad_database_url_names_the_key_and_the_accepted_forms(load, value, problem):
    message = error_of(load, f"clickHouse: {{enable: true, databaseURL: '{value}'}}\n")
    assert "clickHouse.databaseURL" in message and problem in message
    assert "file:///DIRECTORY" in message and "http://HOST:PORT" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("database: 'flows; DROP TABLE x'", "clickHouse.database"),
        ("database: 9flows", "clickHouse.database"),
        ("commitInterval: 0s", "clickHouse.commitInterval"),
        ("queueSize: 0", "clickHouse.queueSize"),
        ("tls: {caCert: yes-please}", "clickHouse.tls.caCert"),
        ("compres: true", "clickHouse.compres"),
    ],
)
def test_bad_clickhouse_keys_name_the_key(load, text, key):
    assert key in error_of(load, f"clickHouse:\n  enable: true\n  {text}\n")


def test_the_flow_api_keys_and_the_bound_on_flows(load):
    config = load("apiBindAddress: ''\nmaxFlows: 5000\n")
    assert config.api_address is None and config.max_flows == 5000
    config = load("apiBindAddress: '[::]:8080'\napiToken: s3cret\napiWindowRecords: 50\n")
    assert config.api_address == TransportAddress("::", 8080, "tcp")
    assert (config.api_token, config.api_window) == ("s3cret", 50)
