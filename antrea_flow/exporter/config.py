"""The agent's configuration: the flow exporter keys of `antrea-agent.conf`, plus ours.

The file may be a whole antrea-agent.conf: Antrea's other agent keys are accepted and
ignored, so the same ConfigMap works; any other key is a mistake and stops start-up.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..codes import AGGREGATOR_SERVICE_NAME, ANTREA_POD_ZONE
from ..configfile import ConfigError, ConfigReader, read_kubeconfig
from ..durations import format_duration
from ..ipfix.address import TransportAddress
from ..k8s.watch import DEFAULT_SYNC_TIMEOUT

log = logging.getLogger(__name__)

DEFAULT_COLLECTOR = f"{AGGREGATOR_SERVICE_NAME}:4739:tls"
PROTOCOLS = ("tcp", "udp", "sctp")

# Keys of Antrea's antrea-agent.conf that are not about flow export: accepted, not used.
_ANTREA_AGENT_KEYS = {
    "antreaClientConnection",
    "kubeAPIServerOverride",
    "dnsServerOverride",
    "ovsBridge",
    "ovsDatapathType",
    "ovsRunDir",
    "trafficEncapMode",
    "noSNAT",
    "tunnelType",
    "tunnelPort",
    "tunnelCsum",
    "trafficEncryptionMode",
    "enableBridgingMode",
    "disableTXChecksumOffload",
    "defaultMTU",
    "hostProcPathPrefix",
    "serviceCIDR",
    "serviceCIDRv6",
    "wireGuard",
    "ipsec",
    "egress",
    "nodePortLocal",
    "apiPort",
    "clusterPort",
    "enablePrometheusMetrics",
    "antreaProxy",
    "multicast",
    "multicluster",
    "nodeIPAM",
    "externalNode",
    "secondaryNetwork",
    "transportInterface",
    "transportInterfaceCIDRs",
    "multicastInterfaces",
    "tlsCipherSuites",
    "tlsMinVersion",
    "nodeNetworkPolicy",
    "packetCapture",
    "fqdnCacheMinTTL",
    "auditLogging",
    "hostNetworkAcceleration",
    "enableIPSecTunnel",
    "snatFullyRandomPorts",
    "packetInRate",
}


@dataclass(frozen=True, slots=True)
class EbpfConfig:
    """The `ebpf:` section: the per-flow packet counter in the kernel."""

    enable: bool = False
    interfaces: tuple[str, ...] = ()  # empty: the Pod-facing veths, followed
    max_flows: int = 100_000  # cacheMaxFlows: entries of the kernel map
    active_timeout: float = 5.0  # cacheActiveTimeout: how often the map is emptied


@dataclass(frozen=True, slots=True)
class AgentConfig:
    flow_exporter_enabled: bool
    collector: TransportAddress
    poll_interval: float
    active_timeout: float
    idle_timeout: float
    conntrack_zone: int
    inventory_file: str
    tls_cert_dir: str
    metrics_address: TransportAddress | None
    protocol_filter: tuple[str, ...] | None  # None: every protocol; (): none
    deny_queue: int | None = None  # NFQUEUE of denied packets; None: not listening
    deny_record_rate: float = 5000.0  # denied packets recorded per second, at most
    replay_window: float = 90.0  # acknowledged records sent again to a reconnected collector
    ebpf: EbpfConfig = EbpfConfig()
    host_gateway: str = "antrea-gw0"  # Antrea's hostGateway: not a Pod's interface
    kubeconfig: str = ""  # clientConnection.kubeconfig: the API server to watch and ask
    metadata_sync_timeout: float = DEFAULT_SYNC_TIMEOUT  # wait at start for the first lists

    @property
    def tls_files(self) -> tuple[str, str, str]:
        """ca.crt, tls.crt and tls.key in tlsCertDir (Antrea's ConfigMap and Secret keys)."""
        d = self.tls_cert_dir
        return (os.path.join(d, "ca.crt"), os.path.join(d, "tls.crt"), os.path.join(d, "tls.key"))


def _service_dns_name(text: str) -> str:
    """Newer Antrea names the collector's Service as <namespace>/<name>[:...]: its cluster
    DNS name, <name>.<namespace>.svc."""
    namespace, slash, rest = text.partition("/")
    if slash and namespace and ":" not in namespace and not namespace.startswith("["):
        name, colon, tail = rest.partition(":")
        return f"{name}.{namespace}.svc{colon}{tail}"
    return text


def load_agent_config(path: str | os.PathLike) -> AgentConfig:
    reader = ConfigReader.from_file(path)
    gates = reader.section("featureGates")
    enabled = gates.boolean("FlowExporter", False) if gates else False
    # Newer Antrea versions group the same keys under `flowExporter:` with `enable`.
    section = reader.section("flowExporter")
    if section is not None:
        enabled = section.boolean("enable", enabled)
    flow = section or reader

    collector_text = flow.string(
        "flowCollectorAddr", DEFAULT_COLLECTOR, "<HOST>:[<PORT>][:<PROTO>]"
    )
    collector = flow.address(
        "flowCollectorAddr", _service_dns_name(collector_text), default_protocol="tls"
    )
    poll = flow.duration("flowPollInterval", 5.0, minimum=1.0)
    active = flow.duration("activeFlowExportTimeout", 60.0, minimum=1e-9)
    idle = flow.duration("idleFlowExportTimeout", 15.0, minimum=1e-9)
    # As upstream: a timeout shorter than the poll interval cannot be honoured.
    if active < poll:
        log.warning(
            "activeFlowExportTimeout %s is shorter than flowPollInterval %s; using %s",
            format_duration(active),
            format_duration(poll),
            format_duration(poll),
        )
        active = poll
    if idle < poll:
        log.warning(
            "idleFlowExportTimeout %s is shorter than flowPollInterval %s; using %s",
            format_duration(idle),
            format_duration(poll),
            format_duration(poll),
        )
        idle = poll

    if section is not None:
        section.reject_unknown()
    zone = reader.integer("conntrackZone", ANTREA_POD_ZONE, 0, 65535)
    inventory = reader.string("inventoryFile", "", "a path to a Kubernetes List YAML file")
    cert_dir = reader.string("tlsCertDir", "", "a directory holding ca.crt, tls.crt, tls.key")
    kubeconfig = read_kubeconfig(reader)
    ebpf = _ebpf(reader.section("ebpf"))
    gateway = reader.string("hostGateway", "antrea-gw0", "an interface name")
    sync_timeout = reader.duration("metadataSyncTimeout", DEFAULT_SYNC_TIMEOUT, minimum=0.0)
    metrics = reader.bind_address("metricsBindAddress", ":10351")
    protocols = reader.string_list("protocolFilter", None, PROTOCOLS)
    deny_queue = reader.optional_integer("denyQueue", 0, 65535)
    deny_rate = reader.integer("denyRecordRate", 5000, 1, 10_000_000)
    replay_window = reader.duration("exportReplayWindow", 90.0, minimum=0.0)
    ignored = reader.ignore(_ANTREA_AGENT_KEYS)
    if ignored:
        log.debug("antrea-agent.conf keys not used by antrea-flow: %s", ", ".join(ignored))
    reader.reject_unknown()

    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if enabled and collector.protocol == "tls" and not (cert_dir or kubeconfig or in_cluster):
        raise ConfigError(
            f"{reader.source}: tlsCertDir: '' is required because flowCollectorAddr "
            f"{collector} uses tls and there is no Kubernetes API to fetch the certificates "
            "from (clientConnection.kubeconfig unset, not running in a Pod); expected a "
            "directory holding ca.crt, tls.crt and tls.key"
        )
    return AgentConfig(
        flow_exporter_enabled=enabled,
        collector=collector,
        poll_interval=poll,
        active_timeout=active,
        idle_timeout=idle,
        conntrack_zone=zone,
        inventory_file=inventory,
        tls_cert_dir=cert_dir,
        metrics_address=metrics,
        protocol_filter=tuple(protocols) if protocols is not None else None,
        deny_queue=deny_queue,
        deny_record_rate=float(deny_rate),
        replay_window=replay_window,
        kubeconfig=kubeconfig,
        metadata_sync_timeout=sync_timeout,
        ebpf=ebpf,
        host_gateway=gateway,
    )


def _ebpf(section: ConfigReader | None) -> EbpfConfig:
    if section is None:
        return EbpfConfig()
    default = EbpfConfig()
    names = section.raw("interfaces")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
    ):
        raise section.error(
            "interfaces", names, "is not a list of interface names", "a list such as [eth1]"
        )
    config = EbpfConfig(
        enable=section.boolean("enable", default.enable),
        interfaces=tuple(names or ()),
        max_flows=section.integer("cacheMaxFlows", default.max_flows, 1024, 16_777_216),
        active_timeout=section.duration("cacheActiveTimeout", default.active_timeout, 0.1),
    )
    section.reject_unknown()
    return config
