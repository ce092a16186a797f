"""The aggregator's configuration: flow-aggregator.conf's keys, plus ours."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..codes import AGGREGATOR_SERVICE_NAME
from ..configfile import ConfigError, ConfigReader, read_kubeconfig, shown
from ..ipfix.address import AddressError, TransportAddress, is_ip, parse_address
from ..ipfix.collecting import CollectorLimits
from ..ipfix.messages import TemplateLimits
from ..k8s.watch import DEFAULT_SYNC_TIMEOUT
from .aggregation import DEFAULT_MAX_FLOWS

log = logging.getLogger(__name__)

# Keys of upstream's flow-aggregator.conf for features antrea-flow does not have.
_UNSUPPORTED = ("mode", "s3Uploader", "flowLogger", "flowStreamService", "apiServer")
_IGNORED = ("recordContents", "clusterID", "recordBufferSize")
HOST_FORM = "a DNS name or an IP address, e.g. flow-aggregator.example.com, 10.96.5.5 or fd00::5"
LISTEN_FORM = (
    "[HOST]:PORT with PORT in 0..65535 and IPv6 hosts in brackets, e.g. :4739, 0.0.0.0:4739 "
    "or [::]:4739 (the protocol is aggregatorTransportProtocol's)"
)
MESSAGE_SIZE_FORM = "0 (automatic) or an integer in 512..65535"
DATABASE_URL_FORM = (
    "file:///DIRECTORY (ClickHouse embedded in the aggregator, chDB), or http://HOST:PORT or "
    "https://HOST:PORT (a ClickHouse server or cluster's HTTP interface, port 8123 or 8443 by "
    "default); empty: embedded, under stateDir"
)
DATABASE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DATABASE_FORM = "a ClickHouse database name: letters, digits and _, not starting with a digit"
# Where the Deployment mounts Secret clickhouse-ca, read when tls.caCert is true (upstream
# mounts it under /etc/flow-aggregator, which here is the ConfigMap's directory, mounted whole).
# The flow API and UI: on loopback by default (kubectl port-forward reaches it); a wider
# address wants apiToken.
DEFAULT_API_ADDRESS = "127.0.0.1:10349"
DEFAULT_API_WINDOW = 10000  # about 6 KB each: 60 MB
MAX_API_WINDOW = 1_000_000
CLICKHOUSE_CA = "/etc/flow-aggregator-certs/clickhouse/ca.crt"


@dataclass(frozen=True, slots=True)
class ClickHouseConfig:
    """flow-aggregator.conf's `clickHouse` section (upstream's keys, and ours)."""

    url: str  # file:///directory (chDB), http(s)://host:port (a server)
    database: str = "default"
    debug: bool = False  # log every commit
    compress: bool = True  # lz4 over HTTP
    commit_interval: float = 8.0
    ttl: float = 12 * 3600.0  # rows expire this long after insertion; 0: never
    queue_size: int = 1 << 19  # rows held while the database is slow or down (upstream's)
    insecure_skip_verify: bool = False
    ca_cert: str = ""  # a CA bundle for https; "" trusts the system's
    username: str = "default"  # from CH_USERNAME, as upstream
    password: str = ""  # from CH_PASSWORD

    @property
    def embedded(self) -> bool:
        return self.url.startswith("file://")


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    listen: TransportAddress  # where agents connect (protocol: aggregatorTransportProtocol)
    aggregator_address: str  # the name (or IP) agents use, for the server certificate
    external_collector: TransportAddress | None
    export_interval: float
    inactive_timeout: float
    correlation_timeout: float
    cert_dir: str
    json_log: str
    metrics_address: TransportAddress | None
    observation_domain_id: int
    template_refresh: float
    inventory_file: str = ""  # Pods by IP, to complete records and add Pod labels
    max_message_size: int | None = None  # of the IPFIX export; None: by transport
    limits: CollectorLimits = CollectorLimits()  # what the agents' side may make us hold
    state_dir: str = ""  # where the checkpoint is kept; "" keeps none
    kubeconfig: str = ""  # clientConnection.kubeconfig: the API server to watch and write
    metadata_sync_timeout: float = DEFAULT_SYNC_TIMEOUT  # wait at start for the first lists
    clickhouse: ClickHouseConfig | None = None  # None: no ClickHouse sink
    api_address: TransportAddress | None = None  # the flow API and UI; None: off
    api_token: str = ""  # the bearer token the API asks for; "": none
    api_window: int = DEFAULT_API_WINDOW  # exported records the API keeps
    max_flows: int = DEFAULT_MAX_FLOWS  # flows held; beyond, the oldest is exported early

    @property
    def tls(self) -> bool:
        return self.listen.protocol == "tls"


def _host(reader: ConfigReader, key: str, text: str) -> str:
    """A DNS name or an IP address; IPv6 without brackets, as the certificate needs it."""
    bracketed = text.startswith("[") and text.endswith("]")
    bare = text[1:-1] if bracketed else text
    if is_ip(bare) and (":" in bare or not bracketed):
        return bare
    # parse_address holds the host-name rules; a bare name parses to itself.
    with contextlib.suppress(AddressError):
        if parse_address(text, default_protocol="tcp").host == text:
            return text
    raise reader.error(key, text, "is not a DNS name or an IP address", HOST_FORM)


def _message_size(section: ConfigReader) -> int | None:
    """flowCollector.maxIPFIXMsgSize: None (0, upstream's default) leaves it to the transport."""
    key = "maxIPFIXMsgSize"
    with contextlib.suppress(ConfigError):
        size = section.integer(key, 0, 0, 65535)
        if size == 0:
            return None
        if size >= 512:
            return size
    raise section.error(key, section.raw(key), "is not allowed", MESSAGE_SIZE_FORM)


def _collector_limits(section: ConfigReader | None) -> CollectorLimits:
    """collectorLimits: what agents (or anyone reaching the port) can make the intake hold."""
    default = CollectorLimits()
    if section is None:
        return default
    templates = default.templates
    count, big = 1_000_000, 1 << 40
    idle = section.duration("idleTimeout", default.idle_timeout or 0.0, minimum=0.0)
    limits = CollectorLimits(
        max_sessions=section.integer("maxSessions", default.max_sessions, 1, count),
        max_sessions_per_address=section.integer(
            "maxSessionsPerAddress", default.max_sessions_per_address, 1, count
        ),
        first_message_timeout=section.duration(
            "firstMessageTimeout", default.first_message_timeout, minimum=1.0
        ),
        idle_timeout=idle or None,
        templates=TemplateLimits(
            max_fields=section.integer("maxTemplateFields", templates.max_fields, 1, 16383),
            max_templates=section.integer(
                "maxTemplatesPerDomain", templates.max_templates, 1, 65280
            ),
            max_domains=section.integer("maxDomainsPerSession", templates.max_domains, 1, count),
            max_session_bytes=section.integer(
                "maxTemplateMemoryPerSession", templates.max_session_bytes, 1, big
            ),
            max_total_bytes=section.integer("maxTemplateMemory", templates.max_total_bytes, 1, big),
        ),
    )
    section.reject_unknown()
    return limits


def _database_url(section: ConfigReader, default_directory: str) -> str:
    key = "databaseURL"
    text = section.string(key, "", DATABASE_URL_FORM)
    if not text:
        return Path(default_directory, "clickhouse").absolute().as_uri()
    try:
        return database_url(text)
    except ValueError as exc:
        raise section.error(key, text, str(exc), DATABASE_URL_FORM) from None


def credentials() -> tuple[str, str]:
    """The ClickHouse user and password, from CH_USERNAME and CH_PASSWORD as upstream's
    Deployment sets them (from Secret clickhouse-secret)."""
    return os.environ.get("CH_USERNAME") or "default", os.environ.get("CH_PASSWORD", "")


def database_url(text: str) -> str:
    """A ClickHouse URL as the sink uses it (the port made explicit); ValueError saying
    what is wrong with it (the accepted form is DATABASE_URL_FORM)."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError("is not a URL") from None
    scheme = parts.scheme.lower()
    if scheme in ("tcp", "tls"):
        raise ValueError(
            "uses ClickHouse's native protocol, which antrea-flow does not speak; the same "
            "server answers over HTTP"
        )
    if scheme == "file":
        if parts.netloc or not parts.path.startswith("/") or parts.query or parts.fragment:
            raise ValueError("is not a file URL")
        return text
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("is not allowed")
    # As upstream: the database, user and options have keys of their own.
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError("has a path, query or user (not allowed)")
    default_port = 8443 if scheme == "https" else 8123
    return f"{scheme}://{parts.netloc.lower() if port else f'{parts.netloc}:{default_port}'}"


def _clickhouse(reader: ConfigReader, default_directory: str) -> ClickHouseConfig | None:
    """clickHouse: upstream's keys (enable, database, databaseURL, debug, compress,
    commitInterval, tls), and ours (ttl, queueSize). Credentials from CH_USERNAME and
    CH_PASSWORD, as upstream's Deployment sets them from Secret clickhouse-secret."""
    section = reader.section("clickHouse")
    if section is None:
        return None
    enabled = section.boolean("enable", False)
    database = section.string("database", "default", DATABASE_FORM)
    if not DATABASE_NAME.fullmatch(database):
        raise section.error("database", database, "is not allowed", DATABASE_FORM)
    url = _database_url(section, default_directory)
    tls = section.section("tls")
    insecure, ca_cert = False, ""
    if tls is not None:
        insecure = tls.boolean("insecureSkipVerify", False)
        ca_cert = CLICKHOUSE_CA if tls.boolean("caCert", False) else ""
        tls.reject_unknown()
    username, password = credentials()
    config = ClickHouseConfig(
        url=url,
        database=database,
        debug=section.boolean("debug", False),
        compress=section.boolean("compress", True),
        commit_interval=section.duration("commitInterval", 8.0, minimum=0.1),
        ttl=section.duration("ttl", 12 * 3600.0, minimum=0.0),
        queue_size=section.integer("queueSize", 1 << 19, 1, 1 << 26),
        insecure_skip_verify=insecure,
        ca_cert=ca_cert,
        username=username,
        password=password,
    )
    section.reject_unknown()
    return config if enabled else None


def load_aggregator_config(path: str | os.PathLike) -> AggregatorConfig:
    reader = ConfigReader.from_file(path)
    collector_text = reader.string("externalFlowCollectorAddr", "", "<IP>:<port>[:<proto>]")
    domain_id = reader.integer("observationDomainID", 0, 0, 0xFFFFFFFF)
    refresh = reader.duration("templateRefreshTimeout", 600.0, minimum=1.0)
    message_size = None
    # Current upstream groups the external collector under `flowCollector:`.
    section = reader.section("flowCollector")
    if section is not None:
        address = section.string("address", "", "<IP>:<port>[:<proto>]")
        enabled = section.boolean("enable", False)  # upstream's default
        collector_text = (address or collector_text) if enabled else ""
        tls = section.section("tls")
        if tls is not None:
            if tls.boolean("enable", False):
                raise tls.error("enable", True, "is not supported by antrea-flow", "false")
            # The certificates of a TLS export antrea-flow does not make.
            tls.ignore(("caSecretName", "serverName", "clientSecretName", "minVersion"))
            tls.reject_unknown()
        record_format = section.string("recordFormat", "IPFIX", "IPFIX")
        if record_format.upper() != "IPFIX":
            raise section.error("recordFormat", record_format, "is not supported", "IPFIX")
        # Our records always carry the names and never the UIDs: other values cannot be met.
        if not section.boolean("includeK8sNames", True):
            raise section.error("includeK8sNames", False, "is not supported", "true")
        if section.boolean("includeK8sUIDs", False):
            raise section.error("includeK8sUIDs", True, "is not supported", "false")
        message_size = _message_size(section)
        domain_id = section.integer("observationDomainID", domain_id, 0, 0xFFFFFFFF)
        refresh = section.duration("templateRefreshTimeout", refresh, minimum=1.0)
        section.reject_unknown()
    collector = None
    if collector_text:
        collector = reader.address(
            "externalFlowCollectorAddr",
            collector_text,
            default_protocol="tcp",
            protocols=("tcp", "udp"),
            port_required=True,
        )
    interval = reader.duration("flowExportInterval", 60.0, minimum=1.0)
    old, new = reader.raw("flowExportInterval"), reader.raw("activeFlowRecordTimeout")
    if old is not None and new is not None:
        raise ConfigError(
            f"{reader.source}: flowExportInterval: {shown(old)} and activeFlowRecordTimeout: "
            f"{shown(new)} "
            "are two names of one setting; expected only one of them"
        )
    interval = reader.duration("activeFlowRecordTimeout", interval, minimum=1.0)  # upstream's name
    inactive = reader.duration("inactiveFlowRecordTimeout", 90.0, minimum=1.0)
    correlation = reader.duration("correlationTimeout", 60.0, minimum=1.0)
    protocol = reader.choice("aggregatorTransportProtocol", "tls", ("tls", "tcp", "udp"))
    name = _host(
        reader,
        "flowAggregatorAddress",
        reader.string("flowAggregatorAddress", AGGREGATOR_SERVICE_NAME, HOST_FORM),
    )
    listen_text = reader.string("listenAddress", ":4739", LISTEN_FORM)
    try:
        # With the protocol appended, a protocol in the text leaves one ':' too many.
        listen = parse_address(
            f"{listen_text}:{protocol}", default_protocol=protocol, port_required=True, listen=True
        )
    except AddressError:
        raise reader.error(
            "listenAddress", listen_text, "is not a listen address", LISTEN_FORM
        ) from None
    cert_dir = reader.string(
        "certDir", "/var/run/antrea-flow/flow-aggregator", "a directory for the certificates"
    )
    json_log = reader.string("jsonLogPath", "", "a file path (empty: no JSON log)")
    state_dir = reader.string(
        "stateDir", cert_dir, "a directory for the checkpoint (empty: no checkpoint)"
    )
    inventory = reader.string("inventoryFile", "", "a path to a Kubernetes List YAML file")
    kubeconfig = read_kubeconfig(reader)
    sync_timeout = reader.duration("metadataSyncTimeout", DEFAULT_SYNC_TIMEOUT, minimum=0.0)
    metrics = reader.bind_address("metricsBindAddress", ":10348")
    api_address = reader.bind_address("apiBindAddress", DEFAULT_API_ADDRESS)
    api_token = reader.string("apiToken", "", "a token clients send as Authorization: Bearer")
    api_window = reader.integer("apiWindowRecords", DEFAULT_API_WINDOW, 1, MAX_API_WINDOW)
    max_flows = reader.integer("maxFlows", DEFAULT_MAX_FLOWS, 1000, 100_000_000)
    limits = _collector_limits(reader.section("collectorLimits"))
    clickhouse = _clickhouse(reader, state_dir or cert_dir)
    for key in reader.ignore(_UNSUPPORTED):
        log.warning("%s: %s is not supported by antrea-flow and is ignored", reader.source, key)
    reader.ignore(_IGNORED)
    reader.reject_unknown()
    return AggregatorConfig(
        listen=listen,
        aggregator_address=name,
        external_collector=collector,
        export_interval=interval,
        inactive_timeout=inactive,
        correlation_timeout=correlation,
        cert_dir=cert_dir,
        json_log=json_log,
        metrics_address=metrics,
        observation_domain_id=domain_id,
        template_refresh=refresh,
        inventory_file=inventory,
        max_message_size=message_size,
        limits=limits,
        state_dir=state_dir,
        kubeconfig=kubeconfig,
        metadata_sync_timeout=sync_timeout,
        clickhouse=clickhouse,
        api_address=api_address,
        api_token=api_token,
        api_window=api_window,
        max_flows=max_flows,
    )
