"""The aggregator process: intake from agents, aggregation, export to sinks, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, cast

from cryptography import x509
from prometheus_client import CollectorRegistry

from .. import tuning
from ..codes import AGGREGATOR_SERVICE_NAME
from ..configfile import ConfigError
from ..errors import UsageError, cannot_listen
from ..flowfilter import FlowFilter
from ..ipfix.address import is_ip
from ..ipfix.antrea import FlowRecord
from ..ipfix.collecting import LIMIT_REASONS, CollectingProcess, Peer, exporter_key
from ..ipfix.messages import Message
from ..ipfix.sequences import MODULO
from ..k8s.client import api_connection
from ..k8s.credentials import ClusterCertificates, CredentialsError, aggregator_namespace
from ..k8s.inventory import InventoryFileSource
from ..k8s.stores import MetadataStore, pack_ip
from ..k8s.watch import AGGREGATOR_RESOURCES, ApiSource, metadata_metrics
from ..logutil import LogOnce
from ..metrics import OwnerCollector, counter, gauge, labelled_counter, run_until_signalled
from ..tls import server_context
from ..tls.provision import ensure_aggregator_certificates
from .aggregation import AggregationStore
from .checkpoint import CHECKPOINT_FILE, Checkpointer
from .config import AggregatorConfig, load_aggregator_config
from .sinks import IPFIXSink, JSONLinesSink
from .window import FlowWindow

if TYPE_CHECKING:
    from .api import FlowApi
    from .clickhouse import ClickHouseSink

log = logging.getLogger(__name__)

EXPORT_BATCH = 4096
CERTIFY_INTERVAL = 3600.0  # how often the CA and the certificates are checked for renewal


class _Side(NamedTuple):
    """The elements of one end of a flow that `_complete` reads and fills."""

    ipv4: Literal["sourceIPv4Address", "destinationIPv4Address"]
    ipv6: Literal["sourceIPv6Address", "destinationIPv6Address"]
    pod: Literal["sourcePodName", "destinationPodName"]
    namespace: Literal["sourcePodNamespace", "destinationPodNamespace"]
    node: Literal["sourceNodeName", "destinationNodeName"]
    labels: Literal["sourcePodLabels", "destinationPodLabels"]


_SIDES = (
    _Side(
        "sourceIPv4Address", "sourceIPv6Address", "sourcePodName", "sourcePodNamespace",
        "sourceNodeName", "sourcePodLabels",
    ),
    _Side(
        "destinationIPv4Address", "destinationIPv6Address", "destinationPodName",
        "destinationPodNamespace", "destinationNodeName", "destinationPodLabels",
    ),
)  # fmt: skip


def _certificate_names(config: AggregatorConfig) -> tuple[list[str], list[str]]:
    """DNS names and IPs the server certificate must carry: the configured address, the
    name agents check when they dial an IP (as Antrea's do), and local/listen addresses."""
    names = [AGGREGATOR_SERVICE_NAME, "localhost"]
    addresses = ["127.0.0.1", "::1"]
    for value in (config.aggregator_address, config.listen.host):
        if not value:
            continue
        target = addresses if is_ip(value) else names
        if value not in target:
            target.append(value)
    return names, addresses


def _url_host(host: str, port: int) -> str:
    host = host or "0.0.0.0"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Aggregator:
    def __init__(
        self,
        config: AggregatorConfig,
        *,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
    ):
        self.config = config
        self.clock = clock
        self.store = AggregationStore(
            config.export_interval,
            config.inactive_timeout,
            config.correlation_timeout,
            config.max_flows,
        )
        self.sinks: list[IPFIXSink | JSONLinesSink | ClickHouseSink] = []
        self.clickhouse: ClickHouseSink | None = None
        # The JSON log first: a bad jsonLogPath must stop start-up before certificates exist.
        if config.json_log:
            try:
                json_sink = JSONLinesSink(config.json_log)
            except OSError as exc:
                reason = f"{exc.strerror}: {exc.filename}" if exc.strerror else str(exc)
                raise UsageError(
                    f"jsonLogPath: {config.json_log!r} cannot be appended to ({reason}); "
                    "expected a file path the aggregator can create or append to"
                ) from None
        # With the API, the CA lives there and the collector gets its context in run(),
        # before it listens; the empty one stands in until then.
        self.api = api_connection(config.kubeconfig)
        self.certificates: ClusterCertificates | None = None
        self._certified: tuple[x509.Certificate, bytes] | None = None  # (CA, trusted CAs)
        ssl_context = None
        if config.tls:
            if self.api is not None:
                self.certificates = ClusterCertificates(self.api, aggregator_namespace())
                ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            else:
                names, addresses = _certificate_names(config)
                files = ensure_aggregator_certificates(config.cert_dir, names, addresses)
                ssl_context = server_context(files.server_cert, files.server_key, files.ca)
        # Sequence numbers per agent across sessions: what an agent replays after a
        # reconnect and was received before is dropped, what a dead aggregator lost is
        # counted (and, with the checkpoint, taken back from the replay).
        self.collector = CollectingProcess(
            config.listen,
            self._intake,
            ssl_context=ssl_context,
            limits=config.limits,
            sequence_scope="exporter",
        )
        if config.external_collector is not None:
            self.sinks.append(
                IPFIXSink(
                    config.external_collector,
                    config.observation_domain_id,
                    config.template_refresh,
                    config.max_message_size,
                )
            )
        if config.json_log:
            self.sinks.append(json_sink)
        if config.clickhouse is not None:
            from .clickhouse import ClickHouseSink  # pyarrow, and chDB when embedded

            self.clickhouse = ClickHouseSink(config.clickhouse)
            self.sinks.append(self.clickhouse)
        self.checkpoint: Checkpointer | None = None
        if config.state_dir and config.listen.protocol != "udp":
            state = Path(config.state_dir)
            if state.exists() and not state.is_dir():
                raise UsageError(
                    f"stateDir: {config.state_dir!r} is not a directory; expected a directory "
                    "the aggregator can write (created if missing), or '' for no checkpoint"
                )
            assert self.collector.exporter_sequences is not None
            self.checkpoint = Checkpointer(
                state / CHECKPOINT_FILE, self.collector.exporter_sequences, self.store, self.sinks
            )
        self.window: FlowWindow | None = None
        self.flow_api: FlowApi | None = None
        if config.api_address is not None:
            from .api import FlowApi

            self.window = FlowWindow(config.api_window)
            self.flow_api = FlowApi(
                config.api_address,
                self.window,
                config.api_token,
                clock,
                history=self._history if self.clickhouse is not None else None,
            )
        self.metadata = MetadataStore(clock=clock)
        self.inventory = (
            InventoryFileSource(config.inventory_file, self.metadata)
            if config.inventory_file
            else None
        )
        self.watch = (
            ApiSource(self.api, AGGREGATOR_RESOURCES, self.metadata)
            if self.api is not None and self.inventory is None
            else None
        )
        self.listening = False  # readiness: the intake is open
        self.registry = registry or CollectorRegistry()
        self.metrics = OwnerCollector(self._metrics)
        self.registry.register(self.metrics)

    def _history(self, flow_filter: FlowFilter, last: int) -> tuple[list[dict], int]:
        """The flow API's history: what the ClickHouse sink stored (on an API thread)."""
        from .api import HistoryUnavailable
        from .clickhouse import DatabaseError

        assert self.clickhouse is not None
        try:
            return self.clickhouse.history(flow_filter, last)
        except DatabaseError as exc:
            raise HistoryUnavailable(str(exc)) from None

    def _intake(self, peer: Peer, message: Message) -> None:
        now = self.clock()
        exporter = exporter_key(peer, message.observation_domain_id)
        add = self.store.add
        numbered = self.checkpoint is not None  # only a checkpoint needs what is pending
        for data_set in message.data_sets:
            sequence = data_set.first_sequence
            # Decoded by the records' own template: FlowRecord's keys where ours, maybe more.
            for record in cast(list[FlowRecord], data_set.records):
                add(record, exporter, now, sequence if numbered else None)
                sequence = (sequence + 1) % MODULO

    def export_due(self, drain: bool = False, limit: int | None = None) -> int:
        now = self.clock()
        records = self.store.drain(now) if drain else self.store.expire(now, limit)
        window = self.window
        for record in records:
            self._complete(record)
            for sink in self.sinks:
                sink.send(record)
            if window is not None:
                window.append(record)
        if window is not None and records:
            window.published()
        return len(records)

    def _complete(self, record: FlowRecord) -> None:
        """Fill what the agents could not know from the metadata (as upstream does from its
        stores): each side's missing Pod, namespace and Node (the Pod that had the address
        when the flow started, or the Node that has it), the Pods' labels, and the name of
        the Service port the client dialled."""
        metadata = self.metadata
        start = record.get("flowStartSeconds") or None
        for side in _SIDES:
            ip = record.get(side.ipv4) or record.get(side.ipv6)
            if not ip:
                continue
            packed = pack_ip(ip)
            pod = metadata.pod(packed, start)
            if pod is None:
                if not record.get(side.node):
                    node = metadata.node_name_of(packed)
                    if node is not None:
                        record[side.node] = node
                continue
            if pod.name and not record.get(side.pod):
                record[side.pod] = pod.name
            if pod.namespace and not record.get(side.namespace):
                record[side.namespace] = pod.namespace
            if pod.node_name and not record.get(side.node):
                record[side.node] = pod.node_name
            if pod.labels:
                record[side.labels] = json.dumps(pod.labels, sort_keys=True)
        port = record.get("destinationServicePort")
        if port and not record.get("destinationServicePortName"):
            cluster_ip = record.get("destinationClusterIPv4") or record.get(
                "destinationClusterIPv6"
            )
            if cluster_ip and cluster_ip not in ("0.0.0.0", "::"):
                service = metadata.service(
                    pack_ip(cluster_ip), port, record.get("protocolIdentifier", 0)
                )
                if service is not None:
                    record["destinationServicePortName"] = service.port_name_full

    async def _certify(self) -> None:
        """Bring the CA, the agents' credentials and the server's certificate up to date
        through the API (the blocking calls in an executor); a new CA or server
        certificate takes effect for the sessions that start after it."""
        assert self.certificates is not None
        credentials = await asyncio.get_running_loop().run_in_executor(None, self.certificates.sync)
        state = (credentials.authority.certificate, credentials.trusted)
        if state == self._certified:
            return
        names, addresses = _certificate_names(self.config)
        files = ensure_aggregator_certificates(
            self.config.cert_dir, names, addresses, credentials.authority, credentials.trusted
        )
        self.collector.ssl_context = server_context(files.server_cert, files.server_key, files.ca)
        self._certified = state

    async def _certify_until_done(self, stop: asyncio.Event) -> bool:
        """Start-up: the certificates must come before the intake opens; retried with
        backoff while the API cannot give them. False when stopped first."""
        backoff = 1.0
        log_once = LogOnce(log)
        while not stop.is_set():
            try:
                await self._certify()
                return True
            except (CredentialsError, OSError) as exc:
                log_once(
                    str(exc), logging.ERROR, "cannot set up TLS through the API: %s; retrying", exc
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 30.0)
        return False

    def ready(self) -> bool:
        """/readyz: agents can deliver (on the loop)."""
        return self.listening

    async def run(self, stop: asyncio.Event) -> None:
        self.metrics.bind(asyncio.get_running_loop())  # scrapes read the loop's state there
        if self.inventory is not None:
            self.inventory.refresh()
        elif self.watch is not None:
            self.watch.start()
        else:
            log.warning(
                "no metadata source (no inventoryFile, no clientConnection.kubeconfig, not "
                "running in a Pod): records are exported as the agents sent them, without "
                "the Pods of the other Node or Pod labels"
            )
        try:
            if self.certificates is None or await self._certify_until_done(stop):
                await self._serve(stop)
        finally:
            if self.watch is not None:
                await self.watch.stop()

    async def _serve(self, stop: asyncio.Event) -> None:
        """Open the intake, export what is due until `stop`, then drain to the sinks."""
        if self.checkpoint is not None:
            exporters, owed = self.checkpoint.restore(self.clock())
            if exporters:
                log.info(
                    "resuming %d agents' sequence numbers from %s; %d records received "
                    "before the restart and not yet exported are taken back from their replays",
                    exporters,
                    self.checkpoint.path,
                    owed,
                )
        try:
            await self.collector.start()
        except OSError as exc:
            listen = self.config.listen
            raise cannot_listen(
                f"listenAddress {listen.host_port!r} ({listen.protocol})", listen.host, exc
            ) from None
        config = self.config
        database = config.clickhouse.url if config.clickhouse is not None else ""
        log.info(
            "flow aggregator listening on %s%s; exporting every %ss to %s",
            config.listen,
            f" (certificates in {config.cert_dir})" if config.tls else "",
            config.export_interval,
            ", ".join(
                [str(config.external_collector)] * bool(config.external_collector)
                + [config.json_log] * bool(config.json_log)
                + [f"ClickHouse {database}"] * bool(database)
            )
            or "nowhere (no flowCollector, no jsonLogPath, no clickHouse)",
        )
        if self.flow_api is not None:
            address = config.api_address
            assert address is not None
            try:
                self.flow_api.start()
            except OSError as exc:
                # A view of the records, not their path: the aggregator goes on without it.
                problem = cannot_listen(f"apiBindAddress {address.host_port!r}", address.host, exc)
                log.error("%s; running without the flow API and UI", problem)
                self.flow_api = self.window = None
            else:
                log.info(
                    "flow API and UI on http://%s/", _url_host(address.host, self.flow_api.port)
                )
        self.listening = True
        for sink in self.sinks:
            sink.start()
        # Exports wait for the metadata (its first lists, or metadataSyncTimeout): records
        # wait for their timeouts anyway, and the first would lack what the others get.
        metadata_wait = None
        if self.watch is not None and config.metadata_sync_timeout > 0:
            metadata_wait = asyncio.create_task(
                self.watch.wait_synced(config.metadata_sync_timeout)
            )
        next_certify = self.clock() + CERTIFY_INTERVAL
        try:
            while not stop.is_set():
                if self.inventory is not None:
                    self.inventory.refresh()
                self.metadata.expire()
                if self.certificates is not None and self.clock() >= next_certify:
                    next_certify = self.clock() + CERTIFY_INTERVAL
                    try:
                        await self._certify()
                    except (CredentialsError, OSError) as exc:
                        log.error("cannot renew the certificates through the API: %s", exc)
                if metadata_wait is not None and not metadata_wait.done():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.2)
                    continue
                # In batches, letting the intake run in between.
                while self.export_due(limit=EXPORT_BATCH) == EXPORT_BATCH:
                    await asyncio.sleep(0)
                if self.checkpoint is not None:
                    await self.checkpoint.tick(self.clock())
                due = self.store.next_event()
                wait = 1.0 if due is None else min(1.0, max(0.0, due - self.clock()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            if metadata_wait is not None:
                metadata_wait.cancel()
            self.listening = False
            await self.collector.stop()
            self.export_due(drain=True)
            if self.flow_api is not None:
                self.flow_api.stop()
            for sink in self.sinks:
                await sink.stop()
            if self.checkpoint is not None:
                # Nothing pending after the drain, unless a sink could not finish.
                await self.checkpoint.save(self.clock())

    def _metrics(self):
        stats = self.store.stats
        collector = self.collector.stats
        yield counter(
            "antrea_flow_aggregator_records_received_total",
            "Flow records received from agents.",
            stats.received,
        )
        yield labelled_counter(
            "antrea_flow_aggregator_records_ignored_total",
            "Records received but not aggregated, by reason.",
            "reason",
            dict(stats.ignored),
            always=("repeated_or_stale", "no_addresses"),
        )
        yield counter(
            "antrea_flow_aggregator_records_exported_total",
            "Aggregated records handed to the sinks.",
            stats.exported,
        )
        family = labelled_counter(
            "antrea_flow_aggregator_sink_records_total",
            "Records each sink delivered.",
            "sink",
            {s.name: s.sent for s in self.sinks},
        )
        yield family
        dropped = {}
        for sink in self.sinks:
            for reason, count in sink.dropped.items():
                dropped[f"{sink.name}:{reason}"] = count
        yield labelled_counter(
            "antrea_flow_aggregator_records_dropped_total",
            "Records a sink had to drop, as sink:reason; and malformed input by reason.",
            "reason",
            {**dropped, **{f"malformed:{k}": v for k, v in collector.malformed.items()}},
        )
        yield gauge("antrea_flow_aggregator_flows", "Flows in the store.", len(self.store))
        yield gauge(
            "antrea_flow_aggregator_flows_waiting_for_correlation",
            "Inter-node flows waiting for the other Node's record.",
            self.store.waiting,
        )
        yield counter(
            "antrea_flow_aggregator_correlated_total",
            "Flows completed by the other Node's record.",
            stats.correlated,
        )
        yield counter(
            "antrea_flow_aggregator_correlation_timeouts_total",
            "Flows exported incomplete: the other Node's record never came.",
            stats.correlation_timeouts,
        )
        yield counter(
            "antrea_flow_aggregator_new_connections_total",
            "Flows replaced by a new connection on their 5-tuple (after their end, or from a "
            "Node reporting another start time).",
            stats.new_connections,
        )
        yield labelled_counter(
            "antrea_flow_aggregator_flows_evicted_total",
            "Flows let go to stay within maxFlows: exported early (what they had not exported "
            "yet; waiting ones incomplete) or idle (nothing to export).",
            "outcome",
            dict(stats.evicted),
            always=("exported", "idle"),
        )
        yield labelled_counter(
            "antrea_flow_aggregator_values_clamped_total",
            "Exported values that did not fit their element (throughputs), clamped, by element.",
            "element",
            dict(stats.clamped),
        )
        yield gauge(
            "antrea_flow_aggregator_connected_exporters",
            "Agents connected now.",
            collector.sessions_open,
        )
        yield labelled_counter(
            "antrea_flow_aggregator_refused_peers_total",
            "Connections refused during the TLS handshake, by reason.",
            "reason",
            dict(collector.refused),
            always=(
                "not_tls",
                "no_client_certificate",
                "untrusted_certificate",
                "expired_certificate",
                "certificate_not_yet_valid",
                "wrong_certificate_purpose",
                "bad_certificate_signature",
            ),
        )
        yield labelled_counter(
            "antrea_flow_aggregator_limit_refusals_total",
            "Sessions or messages refused because they would exceed a collectorLimits limit.",
            "limit",
            dict(collector.limits),
            always=LIMIT_REASONS,
        )
        sequences = collector.sequences
        yield counter(
            "antrea_flow_aggregator_records_lost_total",
            "Records missing according to the agents' sequence numbers (never received, or "
            "held by an aggregator that stopped without exporting them and not replayed).",
            sequences.lost,
        )
        yield labelled_counter(
            "antrea_flow_aggregator_records_replayed_total",
            "Records agents sent again after a reconnect: dropped as received before "
            "(duplicate), or taken back after a restart (recovered).",
            "outcome",
            {"duplicate": sequences.repeated, "recovered": sequences.recovered},
        )
        yield counter(
            "antrea_flow_aggregator_sequence_resets_total",
            "Agents that started numbering their records again (a restarted agent).",
            sequences.resets,
        )
        yield from metadata_metrics("antrea_flow_aggregator_", self.metadata, self.watch)
        if self.clickhouse is not None:
            yield from self.clickhouse.metrics("antrea_flow_aggregator_clickhouse_")
        if self.flow_api is not None:
            yield from self.flow_api.metrics("antrea_flow_aggregator_")


def main(args) -> int:
    config = load_aggregator_config(args.config)
    try:
        aggregator = Aggregator(config)
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    except OSError as exc:
        raise UsageError(f"certDir {config.cert_dir}: {exc.strerror or exc}") from None
    tuning.tune()
    asyncio.run(
        run_until_signalled(
            aggregator.run, aggregator.registry, config.metrics_address, aggregator.ready
        )
    )
    return 0
