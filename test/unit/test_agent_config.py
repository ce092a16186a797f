"""The agent's config file: antrea-agent.conf's flow exporter keys, defaults, and errors that
name the file, the key, the value and the accepted form."""

import argparse
import logging
import os

import pytest
from agentkit import config_error

from antrea_flow.configfile import ConfigError
from antrea_flow.errors import UsageError
from antrea_flow.exporter import agent
from antrea_flow.exporter.config import load_agent_config
from antrea_flow.ipfix.address import TransportAddress

# -- defaults ----------------------------------------------------------------------------


def test_empty_file_gives_the_documented_defaults(write):
    config = load_agent_config(write(""))
    assert config.flow_exporter_enabled is False
    assert config.collector == TransportAddress("flow-aggregator.flow-aggregator.svc", 4739, "tls")
    assert str(config.collector) == "flow-aggregator.flow-aggregator.svc:4739:tls"
    assert config.poll_interval == 5.0
    assert config.active_timeout == 60.0
    assert config.idle_timeout == 15.0
    assert config.conntrack_zone == 65520
    assert config.metrics_address == TransportAddress("", 10351, "tcp")
    assert config.protocol_filter is None  # every protocol
    assert config.tls_cert_dir == ""
    assert config.inventory_file == ""
    assert config.replay_window == 90.0


def test_comments_only_file_is_the_same_as_an_empty_one(write):
    config = load_agent_config(write("# nothing set\n#flowPollInterval: 1s\n"))
    assert config.poll_interval == 5.0
    assert config.flow_exporter_enabled is False


def test_empty_protocol_filter_means_no_protocol_and_null_means_all(write):
    assert load_agent_config(write("protocolFilter: []\n")).protocol_filter == ()
    assert load_agent_config(write("protocolFilter:\n")).protocol_filter is None
    assert load_agent_config(write("protocolFilter: [TCP, udp]\n")).protocol_filter == (
        "tcp",
        "udp",
    )
    assert load_agent_config(write("protocolFilter: [sctp]\n")).protocol_filter == ("sctp",)


def test_empty_metrics_bind_address_disables_metrics(write):
    assert load_agent_config(write('metricsBindAddress: ""\n')).metrics_address is None
    config = load_agent_config(write('metricsBindAddress: "127.0.0.1:9100"\n'))
    assert config.metrics_address == TransportAddress("127.0.0.1", 9100, "tcp")


# -- the seed's format and the newer nested one ------------------------------------------


def test_seed_format_feature_gate_and_top_level_keys(write, tmp_path):
    path = write(
        f"""\
        featureGates:
          AntreaProxy: true
          FlowExporter: true
        flowCollectorAddr: "flow-aggregator.flow-aggregator.svc:4739:tls"
        flowPollInterval: "2s"
        activeFlowExportTimeout: "30s"
        idleFlowExportTimeout: "10s"
        tlsCertDir: {tmp_path / "certs"}
        """
    )
    config = load_agent_config(path)
    assert config.flow_exporter_enabled is True
    assert config.collector == TransportAddress("flow-aggregator.flow-aggregator.svc", 4739, "tls")
    assert (config.poll_interval, config.active_timeout, config.idle_timeout) == (2, 30, 10)


def test_feature_gate_false_keeps_the_exporter_off(write):
    config = load_agent_config(write("featureGates:\n  FlowExporter: false\n"))
    assert config.flow_exporter_enabled is False


def test_newer_nested_flow_exporter_section(write, tmp_path):
    path = write(
        f"""\
        featureGates:
          FlowExporter: true
        flowExporter:
          enable: true
          flowCollectorAddr: "10.96.10.20:4739:tcp"
          flowPollInterval: "3s"
          activeFlowExportTimeout: "20s"
          idleFlowExportTimeout: "9s"
        tlsCertDir: {tmp_path}
        """
    )
    config = load_agent_config(path)
    assert config.flow_exporter_enabled is True
    assert config.collector == TransportAddress("10.96.10.20", 4739, "tcp")
    assert (config.poll_interval, config.active_timeout, config.idle_timeout) == (3, 20, 9)


def test_nested_section_with_enable_only(write, tmp_path):
    config = load_agent_config(write(f"flowExporter:\n  enable: true\ntlsCertDir: {tmp_path}\n"))
    assert config.flow_exporter_enabled is True
    assert config.poll_interval == 5.0


def test_nested_enable_with_tls_needs_a_certificate_directory(write, outside_a_pod):
    message = config_error(write("flowExporter:\n  enable: true\n"))
    assert "tlsCertDir" in message


def test_nested_enable_false_overrides_the_feature_gate(write):
    config = load_agent_config(
        write("featureGates: {FlowExporter: true}\nflowExporter:\n  enable: false\n")
    )
    assert config.flow_exporter_enabled is False


def test_nested_section_rejects_an_unknown_key_with_a_suggestion(write):
    message = config_error(write("flowExporter:\n  enable: false\n  flowPolInterval: 5s\n"))
    assert "flowExporter.flowPolInterval" in message
    assert "did you mean flowExporter.flowPollInterval" in message


# -- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "flow-aggregator.flow-aggregator.svc:4739:tls",
            ("flow-aggregator.flow-aggregator.svc", 4739, "tls"),
        ),
        ("collector.example.com", ("collector.example.com", 4739, "tls")),
        ("collector.example.com:", ("collector.example.com", 4739, "tls")),
        ("10.0.0.1:4739", ("10.0.0.1", 4739, "tls")),
        ("10.0.0.1:4739:tcp", ("10.0.0.1", 4739, "tcp")),
        ("10.0.0.1:4739:udp", ("10.0.0.1", 4739, "udp")),
        ("10.0.0.1:4739:TCP", ("10.0.0.1", 4739, "tcp")),
        ("10.0.0.1::udp", ("10.0.0.1", 4739, "udp")),
        ("10.0.0.1:9995:udp", ("10.0.0.1", 9995, "udp")),
        ("[fd00::1]:4739:tcp", ("fd00::1", 4739, "tcp")),
        ("[fd00::1]:4739", ("fd00::1", 4739, "tls")),
        ("[fd00::1]", ("fd00::1", 4739, "tls")),
        ("[fd00::1]::udp", ("fd00::1", 4739, "udp")),
    ],
)
def test_collector_address_forms(write, tmp_path, text, expected):
    config = load_agent_config(write(f'flowCollectorAddr: "{text}"\ntlsCertDir: {tmp_path}\n'))
    assert config.collector == TransportAddress(*expected)


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.1:4739:grpc",
        "10.0.0.1:4739:sctp",
        "fd00::1:4739",  # IPv6 without brackets
        "[fd00::1:4739",
        "[10.0.0.1]:4739",
        "10.0.0.1:port",
        "10.0.0.1:70000",
        "10.0.0.1:0",
        ":4739:tcp",
        "10.0.0.1:4739:tcp:extra",
        "bad host:4739",
        "999.1.1.1:4739",
    ],
)
def test_malformed_collector_address_is_one_line_naming_key_value_and_form(write, text):
    message = config_error(write(f'flowCollectorAddr: "{text}"\n'))
    assert "flowCollectorAddr" in message
    assert repr(text) in message
    assert "<HOST>:" in message  # the accepted form
    assert "tls" in message and "udp" in message


def test_grpc_is_named_as_the_rejected_protocol(write):
    message = config_error(write('flowCollectorAddr: "10.0.0.1:14739:grpc"\n'))
    assert "'grpc'" in message


def test_tls_needs_a_certificate_directory_when_the_exporter_is_on(write, outside_a_pod):
    message = config_error(write("featureGates:\n  FlowExporter: true\n"))
    assert "tlsCertDir" in message
    assert "''" in message
    assert "ca.crt" in message and "tls.crt" in message and "tls.key" in message


def test_tls_without_certificate_directory_is_fine_while_the_exporter_is_off(write):
    config = load_agent_config(write("featureGates:\n  FlowExporter: false\n"))
    assert config.collector.protocol == "tls"
    assert config.tls_cert_dir == ""


def test_tcp_or_udp_collector_needs_no_certificates(write):
    for proto in ("tcp", "udp"):
        path = write(
            f'featureGates: {{FlowExporter: true}}\nflowCollectorAddr: "10.0.0.1:4739:{proto}"\n'
        )
        config = load_agent_config(path)
        assert config.flow_exporter_enabled and config.collector.protocol == proto


def test_tls_files_are_antreas_configmap_and_secret_keys(write, tmp_path):
    certs = tmp_path / "certs"
    config = load_agent_config(
        write(f"featureGates: {{FlowExporter: true}}\ntlsCertDir: {certs}\n")
    )
    assert config.tls_files == (
        os.path.join(certs, "ca.crt"),
        os.path.join(certs, "tls.crt"),
        os.path.join(certs, "tls.key"),
    )


@pytest.mark.parametrize(
    "files, problem",
    [
        ({}, "ca.crt: cannot read: No such file or directory"),
        ({"ca.crt": "", "tls.crt": "", "tls.key": ""}, "ca.crt: not a PEM certificate"),
    ],
)
def test_an_unusable_tls_cert_dir_stops_start_up_naming_the_key(write, tmp_path, files, problem):
    certs = tmp_path / "certs"
    certs.mkdir()
    for name, text in files.items():
        (certs / name).write_text(text)
    path = write(f"featureGates: {{FlowExporter: true}}\ntlsCertDir: {certs}\n")
    with pytest.raises(ConfigError) as info:
        agent.main(argparse.Namespace(config=str(path), netns=None, node_name="node-1"))
    message = str(info.value)
    assert "\n" not in message
    assert f"{path}: tlsCertDir: '{certs}'" in message and problem in message, message


# -- a whole antrea-agent.conf -----------------------------------------------------------


SEED_ERA_AGENT_CONF = """\
# FeatureGates is a map of feature names to bools that enable or disable experimental features.
featureGates:
  AntreaProxy: true
  Traceflow: true
  NodePortLocal: false
  AntreaPolicy: true
  FlowExporter: true
  NetworkPolicyStats: false
  Egress: false
ovsBridge: br-int
ovsDatapathType: system
hostGateway: antrea-gw0
trafficEncapMode: encap
noSNAT: false
tunnelType: geneve
tunnelPort: 0
tunnelCsum: false
trafficEncryptionMode: none
enableBridgingMode: false
disableTXChecksumOffload: false
defaultMTU: 0
serviceCIDR: 10.96.0.0/12
serviceCIDRv6: ""
wireGuard:
  port: 51820
egress:
  exceptCIDRs: []
nodePortLocal:
  enable: false
  portRange: 61000-62000
apiPort: 10350
enablePrometheusMetrics: true
kubeAPIServerOverride: ""
dnsServerOverride: ""
tlsCipherSuites: ""
tlsMinVersion: ""
transportInterface: ""
transportInterfaceCIDRs: []
multicastInterfaces: []
antreaProxy:
  proxyAll: false
  nodePortAddresses: []
  skipServices: []
  proxyLoadBalancerIPs: true
clientConnection:
  kubeconfig: ""
antreaClientConnection:
  kubeconfig: ""
flowCollectorAddr: "flow-aggregator.flow-aggregator.svc:4739:tls"
flowPollInterval: "5s"
activeFlowExportTimeout: "60s"
idleFlowExportTimeout: "15s"
"""


def test_whole_seed_era_antrea_agent_conf_is_accepted(write, tmp_path):
    config = load_agent_config(write(SEED_ERA_AGENT_CONF + f"tlsCertDir: {tmp_path}\n"))
    assert config.flow_exporter_enabled is True
    assert config.collector == TransportAddress("flow-aggregator.flow-aggregator.svc", 4739, "tls")
    assert (config.poll_interval, config.active_timeout, config.idle_timeout) == (5, 60, 15)


# The top-level keys of the current upstream antrea-agent.conf (build/charts/antrea/conf),
# rendered with the chart's defaults; flow export keys are in the nested section.
CURRENT_AGENT_CONF = """\
featureGates:
  AllAlpha: false
  AllBeta: false
  AntreaProxy: true
  FlowExporter: true
  L7FlowExporter: false
ovsBridge: "br-int"
hostGateway: "antrea-gw0"
trafficEncapMode: "encap"
noSNAT: false
snatFullyRandomPorts: false
tunnelType: "geneve"
tunnelPort: 0
tunnelCsum: false
trafficEncryptionMode: "none"
enableBridgingMode: false
disableTXChecksumOffload: false
defaultMTU: 0
packetInRate: 5000
wireGuard:
  port: 51820
egress:
  exceptCIDRs:
  maxEgressIPsPerNode: 255
  snatFullyRandomPorts:
serviceCIDR: ""
serviceCIDRv6: ""
apiPort: 10350
enablePrometheusMetrics: true
flowExporter:
  enable: true
  flowCollectorAddr: "flow-aggregator.flow-aggregator.svc:4739:tls"
  flowPollInterval: "5s"
  activeFlowExportTimeout: "5s"
  idleFlowExportTimeout: "15s"
nodePortLocal:
  enable: true
  portRange: "61000-62000"
kubeAPIServerOverride: ""
dnsServerOverride: ""
fqdnCacheMinTTL: 0
tlsCipherSuites: ""
tlsMinVersion: ""
transportInterface: ""
multicast:
  enable: false
  multicastInterfaces:
  igmpQueryVersions:
  - 1
  - 2
  - 3
  igmpQueryInterval: "125s"
transportInterfaceCIDRs:
antreaProxy:
  enable: true
  proxyAll: false
  nodePortAddresses:
  skipServices:
  proxyLoadBalancerIPs: true
  serviceProxyName: ""
  defaultLoadBalancerMode: "nat"
ipsec:
  authenticationMode: "psk"
multicluster:
  enableGateway: false
  namespace: ""
  enableStretchedNetworkPolicy: false
  enablePodToPodConnectivity: false
  trafficEncryptionMode: "none"
  wireGuard:
    port: 51821
auditLogging:
  maxSize: 500
  maxBackups: 3
  maxAge: 28
  compress: true
secondaryNetwork:
  ovsBridges:
"""


def test_whole_current_antrea_agent_conf_is_accepted(write, tmp_path):
    config = load_agent_config(write(CURRENT_AGENT_CONF + f"tlsCertDir: {tmp_path}\n"))
    assert config.flow_exporter_enabled is True
    assert config.poll_interval == 5.0
    assert config.active_timeout == 5.0
    assert config.idle_timeout == 15.0


@pytest.mark.parametrize("key", ["snatFullyRandomPorts: false", "packetInRate: 5000"])
def test_antrea_agent_keys_of_current_versions_are_accepted(write, key):
    config = load_agent_config(write(f"{key}\nflowPollInterval: 2s\n"))
    assert config.poll_interval == 2.0


# -- errors ------------------------------------------------------------------------------


def test_unknown_key_suggests_the_near_miss(write):
    message = config_error(write("flowPolInterval: 5s\n"))
    assert "flowPolInterval" in message
    assert "did you mean flowPollInterval?" in message


def test_unknown_key_message_names_its_value(write):
    # Like every other config error: the file, the key, the value and the accepted form.
    message = config_error(write("flowPolInterval: 7s\n"))
    assert "flowPolInterval" in message
    assert "'7s'" in message
    assert "flowPollInterval" in message


def test_unknown_key_without_a_near_miss_lists_the_known_keys(write):
    message = config_error(write("completelyUnrelated: 1\n"))
    assert "completelyUnrelated" in message
    assert "did you mean" not in message
    assert "flowCollectorAddr" in message and "flowPollInterval" in message


def test_config_error_is_a_usage_error(write):
    with pytest.raises(UsageError):
        load_agent_config(write("flowPolInterval: 5s\n"))


@pytest.mark.parametrize(
    ("line", "key", "value", "form"),
    [
        ('conntrackZone: "65520"', "conntrackZone", "'65520'", "an integer in 0..65535"),
        ("conntrackZone: true", "conntrackZone", "True", "an integer in 0..65535"),
        ("conntrackZone: 1.5", "conntrackZone", "1.5", "an integer in 0..65535"),
        ("conntrackZone: 70000", "conntrackZone", "70000", "an integer in 0..65535"),
        ("conntrackZone: -1", "conntrackZone", "-1", "an integer in 0..65535"),
        (
            "flowCollectorAddr: [a, b]",
            "flowCollectorAddr",
            "['a', 'b']",
            "<HOST>:[<PORT>][:<PROTO>]",
        ),
        ("flowCollectorAddr: 4739", "flowCollectorAddr", "4739", "<HOST>:[<PORT>][:<PROTO>]"),
        ("tlsCertDir: [x]", "tlsCertDir", "['x']", "ca.crt"),
        ("flowPollInterval: 500ms", "flowPollInterval", "'500ms'", "at least 1s"),
        ("flowPollInterval: 5", "flowPollInterval", "5", "Go duration"),
        ('flowPollInterval: "5"', "flowPollInterval", "'5'", "Go duration"),
        ("flowPollInterval: 5 s", "flowPollInterval", "'5 s'", "Go duration"),
        ("activeFlowExportTimeout: soon", "activeFlowExportTimeout", "'soon'", "Go duration"),
        ("idleFlowExportTimeout: [15s]", "idleFlowExportTimeout", "['15s']", "Go duration"),
        (
            "featureGates: {FlowExporter: 'yes please'}",
            "FlowExporter",
            "'yes please'",
            "true or false",
        ),
        ("featureGates: [FlowExporter]", "featureGates", "['FlowExporter']", "a mapping"),
        ("flowExporter: {enable: 1}", "flowExporter.enable", "1", "true or false"),
        ("protocolFilter: [tcp, icmp]", "protocolFilter", "'icmp'", "a list of tcp, udp, sctp"),
        ("protocolFilter: tcp", "protocolFilter", "'tcp'", "a list of tcp, udp, sctp"),
        ("protocolFilter: [6]", "protocolFilter", "[6]", "a list of tcp, udp, sctp"),
        ("metricsBindAddress: 10351", "metricsBindAddress", "10351", "PORT"),
        ("metricsBindAddress: 'localhost'", "metricsBindAddress", "'localhost'", "<PORT>"),
    ],
)
def test_bad_values_name_file_key_value_and_accepted_form(write, line, key, value, form):
    message = config_error(write(line + "\n"))
    assert key in message
    assert value in message
    assert form in message


def test_file_that_is_not_a_mapping_is_a_config_error(write):
    message = config_error(write("- a\n- b\n"))
    assert "mapping" in message


def test_invalid_yaml_is_a_config_error(write):
    with pytest.raises(ConfigError) as info:
        load_agent_config(write("flowPollInterval: [5s\n"))
    assert "antrea-agent.conf" in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_agent_config(tmp_path / "absent.conf")
    assert "absent.conf" in str(info.value)


# -- timeouts below the poll interval ----------------------------------------------------


def test_timeouts_shorter_than_the_poll_interval_are_raised_to_it_with_a_warning(write, caplog):
    path = write(
        "flowPollInterval: 10s\nactiveFlowExportTimeout: 2s\nidleFlowExportTimeout: 500ms\n"
    )
    with caplog.at_level(logging.WARNING, logger="antrea_flow.exporter.config"):
        config = load_agent_config(path)
    assert config.poll_interval == 10.0
    assert config.active_timeout == 10.0
    assert config.idle_timeout == 10.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("activeFlowExportTimeout" in w and "2s" in w and "10s" in w for w in warnings)
    assert any("idleFlowExportTimeout" in w and "500ms" in w and "10s" in w for w in warnings)


def test_timeouts_at_or_above_the_poll_interval_are_kept_without_warning(write, caplog):
    path = write("flowPollInterval: 10s\nactiveFlowExportTimeout: 10s\nidleFlowExportTimeout: 1m\n")
    with caplog.at_level(logging.WARNING, logger="antrea_flow.exporter.config"):
        config = load_agent_config(path)
    assert (config.active_timeout, config.idle_timeout) == (10.0, 60.0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_default_timeouts_are_raised_when_the_poll_interval_exceeds_them(write):
    config = load_agent_config(write("flowPollInterval: 30s\n"))
    assert config.active_timeout == 60.0
    assert config.idle_timeout == 30.0  # the 15s default cannot be honoured


def test_poll_interval_of_exactly_one_second_is_allowed(write):
    assert load_agent_config(write("flowPollInterval: 1s\n")).poll_interval == 1.0
    assert load_agent_config(write("flowPollInterval: 1000ms\n")).poll_interval == 1.0


def test_conntrack_zone_bounds(write):
    assert load_agent_config(write("conntrackZone: 0\n")).conntrack_zone == 0
    assert load_agent_config(write("conntrackZone: 65535\n")).conntrack_zone == 65535
    config_error(write("conntrackZone: 65536\n"))


def test_export_replay_window_reaches_the_exporter_and_0s_turns_it_off(write):
    for text, seconds in (("exportReplayWindow: 2m", 120.0), ("exportReplayWindow: 0s", 0.0)):
        config = load_agent_config(write(f"flowCollectorAddr: 127.0.0.1:4739:tcp\n{text}\n"))
        assert config.replay_window == seconds
        exporter = agent.Agent(config, "node-1").exporter
        assert exporter.delivery.replay_window == seconds
    message = config_error(write("exportReplayWindow: soon\n"))
    assert "exportReplayWindow" in message and "'soon'" in message


def test_two_agents_do_not_start_numbering_at_the_same_record(write):
    config = load_agent_config(write("flowCollectorAddr: 127.0.0.1:4739:tcp\n"))
    firsts = {agent.Agent(config, "node-1").exporter.delivery.next_sequence for _ in range(4)}
    assert len(firsts) == 4


# 300 bytes of YAML aliases that nest 10**9 items: what the fuzzer found to take 2 GB
# when an error message quoted the value whole.
ALIAS_BOMB = b"a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
    b"a%d: &a%d [" % (i, i) + b", ".join([b"*a%d" % (i - 1)] * 10) + b"]\n" for i in range(1, 9)
)


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b'flowPollInterval: "\xff"\n', "not valid YAML"),  # not UTF-8 (found by fuzzing)
        (b"conntrackZone: 0x" + b"f" * 3600 + b"\n", "an integer of 14400 bits"),
        (b"flowExporter: " + b"[" * 3000 + b"\n", "not valid YAML"),
        (b"denyQueue: '" + b"x" * 100_000 + b"'\n", "..."),
        (ALIAS_BOMB + b"flowPollInterval: *a8\n", "is not a duration"),
        (ALIAS_BOMB + b"flowPollIntervall: *a8\n", "unknown config key"),
    ],
    ids=["not-utf8", "huge-integer", "deep-nesting", "huge-string", "aliases", "aliases-key"],
)
def test_files_no_one_writes_by_hand_still_get_a_one_line_error(tmp_path, data, said):
    path = tmp_path / "antrea-agent.conf"
    path.write_bytes(data)
    message = config_error(path)
    assert said in message and len(message) < 600, message


# -- the Kubernetes API ------------------------------------------------------------------


@pytest.fixture
def outside_a_pod(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_client_connection_kubeconfig_is_antreas_key(write, outside_a_pod):
    config = load_agent_config(
        write(
            "featureGates: {FlowExporter: true}\n"
            "clientConnection:\n  kubeconfig: /etc/antrea/kubeconfig\n"
            "  acceptContentTypes: application/json\n  qps: 50\n  burst: 100\n"
            "metadataSyncTimeout: 5s\n"
        )
    )
    assert config.kubeconfig == "/etc/antrea/kubeconfig"
    assert config.metadata_sync_timeout == 5.0
    assert config.tls_cert_dir == ""  # the certificates come through the API


def test_the_metadata_waits_half_a_minute_by_default(write):
    assert load_agent_config(write("")).metadata_sync_timeout == 30.0


def test_an_unknown_client_connection_key_is_named(write):
    message = config_error(write("clientConnection:\n  kubeconfg: /x\n"))
    assert "clientConnection.kubeconfg" in message and "clientConnection.kubeconfig" in message


def test_tls_in_a_pod_needs_no_certificate_directory(write, monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    config = load_agent_config(write("featureGates: {FlowExporter: true}\n"))
    assert config.collector.protocol == "tls" and config.tls_cert_dir == ""


def test_tls_outside_a_pod_without_api_or_directory_says_both(write, outside_a_pod):
    message = config_error(write("featureGates: {FlowExporter: true}\n"))
    assert "tlsCertDir" in message and "clientConnection.kubeconfig" in message


def test_an_unusable_kubeconfig_stops_the_agent_naming_the_key(write, tmp_path, outside_a_pod):
    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    config = load_agent_config(
        write(f"featureGates: {{FlowExporter: true}}\nclientConnection: {{kubeconfig: {bad}}}\n")
    )
    with pytest.raises(ConfigError) as info:
        agent.Agent(config, "node-1")
    message = str(info.value)
    assert message.startswith(f"clientConnection.kubeconfig: '{bad}' cannot be used")
    assert "kubeconfig file" in message
    missing = tmp_path / "absent"
    config = load_agent_config(
        write(
            f"featureGates: {{FlowExporter: true}}\nclientConnection: {{kubeconfig: {missing}}}\n"
        )
    )
    with pytest.raises(ConfigError, match="No such file"):
        agent.Agent(config, "node-1")


@pytest.mark.parametrize(
    ("content", "problem"),
    [("just a string\n", "not a kubeconfig: a YAML str"), ("a: [\n", "while parsing")],
)
def test_a_kubeconfig_that_is_not_one_is_named_with_its_problem(
    write, tmp_path, outside_a_pod, content, problem
):
    bad = tmp_path / "kubeconfig"
    bad.write_text(content)
    config = load_agent_config(write(f"clientConnection: {{kubeconfig: {bad}}}\n"))
    with pytest.raises(ConfigError) as info:
        agent.Agent(config, "node-1")
    assert problem in str(info.value) and "\n" not in str(info.value)
