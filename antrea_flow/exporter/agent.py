"""The agent loop: poll conntrack every flowPollInterval, export what is due, repeat.

The dump, parse and store update run in a worker thread so the event loop (which sends
IPFIX) stays responsive; the store is only touched there or after that work is awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram

from .. import tuning
from ..codes import AGGREGATOR_SERVICE_NAME, END_REASON_NAMES
from ..configfile import ConfigError
from ..conntrack import netns
from ..conntrack.netlink import ConntrackDumper
from ..conntrack.parser import ParseError, Parser
from ..ebpf.attach import AttachError
from ..ebpf.counter import PacketCounter
from ..ebpf.program import LoadError
from ..errors import UsageError
from ..ipfix.address import is_ip
from ..ipfix.antrea import exporter_templates
from ..ipfix.exporting import ExportingProcess, TLSCredentialsError
from ..k8s.client import ApiConnection, api_connection
from ..k8s.credentials import (
    CA_CONFIGMAP,
    CLIENT_SECRET,
    DEFAULT_NAMESPACE,
    CredentialsError,
    fetch_client_credentials,
)
from ..k8s.inventory import InventoryError, InventoryFileSource
from ..k8s.stores import MetadataStore
from ..k8s.watch import ApiSource, agent_resources, metadata_metrics
from ..metrics import OwnerCollector, counter, gauge, labelled_counter, run_until_signalled
from ..tls import TLSFileError, check_pem_files, client_context, client_context_from_pem
from .config import AgentConfig, load_agent_config
from .connections import ConnectionStore
from .deny import DenyStore
from .denyqueue import DenyQueue
from .enrich import Enricher
from .records import flow_record

log = logging.getLogger(__name__)


def observation_domain_id(node_name: str) -> int:
    """FNV-1 32-bit hash of the node name, as Antrea's agent computes it."""
    value = 0x811C9DC5
    for byte in node_name.encode():
        value = (value * 0x01000193) & 0xFFFFFFFF
        value ^= byte
    return value


def enable_accounting(netns_name: str | None) -> None:
    """Turn on per-connection counters and timestamps; say clearly when we cannot."""
    for key in ("net.netfilter.nf_conntrack_acct", "net.netfilter.nf_conntrack_timestamp"):
        try:
            if netns.read_sysctl(netns_name, key) != "1":
                netns.write_sysctl(netns_name, key, "1")
                log.info("enabled %s", key)
        except OSError as exc:
            log.warning(
                "cannot enable %s (%s): flow records will lack %s",
                key,
                exc.strerror or exc,
                "byte and packet counts" if key.endswith("acct") else "start times",
            )


def _client_context(config: AgentConfig) -> ssl.SSLContext:
    """The TLS context from tlsCertDir; what is wrong with it is a ConfigError."""
    try:
        check_pem_files(*config.tls_files, ("ca.crt", "tls.crt", "tls.key"))
        return client_context(*config.tls_files)
    except (TLSFileError, OSError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(
            f"tlsCertDir: {config.tls_cert_dir!r}: {exc}; expected a directory holding the "
            "PEM files ca.crt, tls.crt and tls.key (Antrea's flow-aggregator-ca ConfigMap and "
            "flow-aggregator-client-tls Secret)"
        ) from None


async def _fetch_tls_context(api: ApiConnection) -> ssl.SSLContext:
    """The client certificate and CAs from the API, as an SSL context (TLSCredentialsError
    says what is missing or wrong)."""
    namespace = DEFAULT_NAMESPACE
    try:
        credentials = await asyncio.get_running_loop().run_in_executor(
            None, fetch_client_credentials, api, namespace
        )
        context = client_context_from_pem(
            credentials.ca,
            credentials.certificate,
            credentials.key,
            (
                f"ConfigMap {namespace}/{CA_CONFIGMAP} ca.crt",
                f"Secret {namespace}/{CLIENT_SECRET} tls.crt",
                f"Secret {namespace}/{CLIENT_SECRET} tls.key",
            ),
        )
    except (CredentialsError, TLSFileError, ssl.SSLError) as exc:
        raise TLSCredentialsError(str(exc)) from None
    log.info(
        "fetched the CA (ConfigMap %s/%s) and the client certificate (Secret %s/%s) from %s",
        namespace,
        CA_CONFIGMAP,
        namespace,
        CLIENT_SECRET,
        api.server,
    )
    return context


def _exporter(
    config: AgentConfig, node_name: str, api: ApiConnection | None, packet_details: bool
) -> ExportingProcess:
    """The exporting process to the collector the config names."""
    ssl_context = None
    tls_credentials = None
    server_name = None
    if config.collector.protocol == "tls":
        if config.tls_cert_dir or api is None:
            ssl_context = _client_context(config)
        else:
            tls_credentials = functools.partial(_fetch_tls_context, api)
        host = config.collector.host
        server_name = AGGREGATOR_SERVICE_NAME if is_ip(host) else host
    return ExportingProcess(
        config.collector,
        exporter_templates(packet_details),
        observation_domain_id(node_name),
        ssl_context=ssl_context,
        tls_credentials=tls_credentials,
        server_hostname=server_name,
        replay_window=config.replay_window,
        # A restarted agent must not continue a numbering the aggregator still follows.
        first_sequence=random.SystemRandom().getrandbits(32),
    )


class Dumper(Protocol):
    """Where the conntrack table comes from (ConntrackDumper, or recorded dumps)."""

    def dump(self) -> Any: ...

    def close(self) -> None: ...


class Agent:
    """One node's flow exporter. Its parts can be given (a recorded conntrack dumper, a
    packet counter, an exporting process): otherwise it builds them from the config."""

    def __init__(
        self,
        config: AgentConfig,
        node_name: str,
        netns_name: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
        dumper: Dumper | None = None,
        counter: PacketCounter | None = None,
        exporter: ExportingProcess | None = None,
    ):
        self.config = config
        self.node_name = node_name
        self.netns_name = netns_name
        self.clock = clock
        self.metadata = MetadataStore(clock=clock)
        # The API, when there is one, serves the certificates even where the metadata
        # comes from a file.
        self.api = api_connection(config.kubeconfig)
        self.inventory = (
            InventoryFileSource(config.inventory_file, self.metadata)
            if config.inventory_file
            else None
        )
        self.watch = (
            ApiSource(self.api, agent_resources(node_name), self.metadata)
            if self.api is not None and self.inventory is None
            else None
        )
        self._metadata_version = -1  # of the store when skipped entries were last rechecked
        ebpf = config.ebpf
        if counter is None and ebpf.enable:
            counter = PacketCounter(
                netns_name, ebpf.max_flows, ebpf.interfaces, config.host_gateway
            )
        self.counter = counter
        self.packet_details = counter is not None
        self.store = ConnectionStore(
            Enricher(self.metadata, node_name),
            config.active_timeout,
            config.idle_timeout,
            config.conntrack_zone,
            config.protocol_filter,
            counted=self.packet_details,
        )
        self.exporter = exporter or _exporter(config, node_name, self.api, self.packet_details)
        # The deny-queue thread gets an enricher of its own: an enricher has one owner.
        self.denied = DenyStore(
            self.metadata.rule,
            Enricher(self.metadata, node_name),
            config.active_timeout,
            config.idle_timeout,
            config.deny_record_rate,
            clock,
        )
        self.deny_queue = (
            DenyQueue(netns_name, config.deny_queue, self.denied.observe)
            if config.deny_queue is not None
            else None
        )
        self.registry = registry or CollectorRegistry()
        self.poll_duration = Histogram(
            "antrea_agent_conntrack_poll_cycle_duration_seconds",
            "Time of one conntrack poll cycle: dump, parse and connection store update.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.metrics = OwnerCollector(self._metrics)
        self.registry.register(self.metrics)
        self.eviction_duration = Histogram(
            "antrea_agent_ebpf_eviction_duration_seconds",
            "Time to take the counted flows out of the kernel and merge them across CPUs.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )
        self.ebpf_loaded = False
        self.ebpf_load_failures = 0
        self._next_eviction = 0.0
        self._evicted: list[tuple[Any, float]] = []  # evictions not merged yet
        self._wake = asyncio.Event()  # an early poll: the counter's map is full
        self.polls_failed = 0
        self._dumper: Dumper | None = dumper
        self._parser = Parser()
        self._table_count = 0
        self._table_max = 0

    # -- one cycle -------------------------------------------------------------------------

    def poll(self) -> int:
        """Dump, parse and apply the table once (blocking); the number of entries. With
        the counter path, its flows are taken first and merged after: a packet counted
        between the two shows in conntrack's counters, never in neither."""
        if self._dumper is None:
            self._dumper = ConntrackDumper(self.netns_name, self.config.conntrack_zone)
        self.evict_counted(force=True)
        started = time.perf_counter()
        dump = self._parser.parse(self._dumper.dump())
        entries = len(dump)
        now = self.clock()
        self.store.update(dump, now)
        for flows, clock_offset in self._evicted:
            self.store.merge_counted(flows, clock_offset, now, self.denied.denies)
        self._evicted.clear()
        del dump
        tuning.release_free_memory()  # what the poll's columns took, back to the system
        self.poll_duration.observe(time.perf_counter() - started)
        try:
            self._table_count = int(
                netns.read_sysctl(self.netns_name, "net.netfilter.nf_conntrack_count")
            )
            self._table_max = int(
                netns.read_sysctl(self.netns_name, "net.netfilter.nf_conntrack_max")
            )
        except (OSError, ValueError):
            pass
        return entries

    def evict_counted(self, force: bool = False) -> None:
        """Take the counter's flows out of the kernel, to be merged by the next poll: at
        every poll (`force`: so that a flow's activity is known at each poll, as its idle
        timeout needs), between polls every cacheActiveTimeout if that is shorter, and
        at once when the map is full."""
        counter = self.counter
        if counter is None or not self.ebpf_loaded:
            return
        now = self.clock()
        if force or counter.full or now >= self._next_eviction:
            self._evicted.append(counter.evict())
            self._next_eviction = now + self.config.ebpf.active_timeout
            for seconds in counter.stats.durations:
                self.eviction_duration.observe(seconds)
            counter.stats.durations.clear()

    async def start_counter(self) -> None:
        """Load and attach the counter path; a failure is one line and a metric, and the
        agent goes on with conntrack alone."""
        counter = self.counter
        if counter is None or self.ebpf_loaded:
            return
        loop = asyncio.get_running_loop()

        def wake() -> None:  # from the ring-buffer thread
            loop.call_soon_threadsafe(self._wake.set)

        counter.on_full = wake
        try:
            await loop.run_in_executor(None, counter.start)
        except (LoadError, AttachError) as exc:
            self.ebpf_load_failures += 1
            log.error("eBPF packet counter not loaded: %s; counting with conntrack alone", exc)
            return
        self.ebpf_loaded = True
        assert counter.interfaces is not None
        log.info(
            "eBPF packet counter loaded (%d flows, evicted every %gs), on %d interfaces",
            counter.max_flows,
            self.config.ebpf.active_timeout,
            len(counter.interfaces.attached),
        )

    def export_due(self, drain: bool = False) -> int:
        """Queue the records that are due now (with `drain`: all that is held); how many."""
        now = self.clock()
        if drain:
            exports = self.store.drain() + self.denied.expire(now, drain=True)
        else:
            exports = self.store.expire(now) + self.denied.expire(now)
        for export in exports:
            template_id, record = flow_record(export, self.node_name, self.packet_details)
            self.exporter.add_mapping(template_id, record)
        return len(exports)

    def refresh_metadata(self) -> None:
        """Reload the inventory if it changed, let deleted Pods go, and have the next poll
        look again at connections skipped for want of a local Pod when the metadata moved."""
        if self.inventory is not None:
            self.inventory.refresh()
        self.metadata.expire()
        if self.metadata.version != self._metadata_version:
            self._metadata_version = self.metadata.version
            self.store.forget_skipped()

    # -- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self.metrics.bind(asyncio.get_running_loop())  # scrapes read the loop's state there
        self.refresh_metadata()  # a bad inventory stops start-up before any side effect
        enable_accounting(self.netns_name)
        self.exporter.start()
        # Denied packets first: until it listens the dataplane lets them go unrecorded,
        # and loading the counter takes a second.
        if self.deny_queue is not None:
            self.deny_queue.start()
        if self.watch is not None:
            self.watch.start()
        await self.start_counter()
        if self.watch is not None:
            if self.config.metadata_sync_timeout > 0:
                await self.watch.wait_synced(self.config.metadata_sync_timeout)
        elif self.inventory is None:
            log.warning(
                "no metadata source (no inventoryFile, no clientConnection.kubeconfig, not "
                "running in a Pod): the agent cannot tell this Node's Pods and exports no "
                "records"
            )
        loop = asyncio.get_running_loop()
        interval = self.config.poll_interval
        next_poll = self.clock()
        try:
            while not stop.is_set():
                now = self.clock()
                if now >= next_poll:
                    self.refresh_metadata()
                    try:
                        await loop.run_in_executor(None, self.poll)
                    except (OSError, ParseError) as exc:
                        # A failed dump must not look like every connection ended. The
                        # next poll starts afresh: this socket may be closed or still hold
                        # the rest of the broken dump, and the parser may have learnt a
                        # layout from it.
                        self.polls_failed += 1
                        self._close_dumper()
                        self._parser = Parser()
                        log.warning("conntrack poll failed: %s; retrying next interval", exc)
                    next_poll += interval
                    if next_poll <= self.clock():  # fell behind: skip, do not burst
                        next_poll = self.clock() + interval
                elif self.ebpf_loaded and now >= self._next_eviction:
                    await loop.run_in_executor(None, self.evict_counted)
                self.export_due()
                wake = next_poll
                due_times = [self.store.next_expiry(), self.denied.next_expiry()]
                if self.ebpf_loaded:
                    due_times.append(self._next_eviction)
                for due in due_times:
                    if due is not None:
                        wake = min(wake, due)
                if await self._sleep(stop, max(0.0, wake - self.clock())):
                    next_poll = self.clock()  # the counter's map is full: evict now
        finally:
            if self.deny_queue is not None:
                self.deny_queue.stop()
            if self.watch is not None:
                await self.watch.stop()
            # A last look at the table (and the counter), then what it holds goes out
            # before the exporter closes.
            self._next_eviction = 0.0
            with contextlib.suppress(OSError, ParseError):
                await loop.run_in_executor(None, self.poll)
            self.export_due(drain=True)
            await self.exporter.stop()
            self._close_dumper()
            if self.counter is not None and self.ebpf_loaded:
                await loop.run_in_executor(None, self.counter.stop)

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> bool:
        """Until `stop`, an early poll or `seconds`; True for an early poll."""
        self._wake.clear()
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return self._wake.is_set() and not stop.is_set()

    def ready(self) -> bool:
        """/readyz: the agent has read the conntrack table once (on the loop)."""
        return self.store.stats.polls > 0

    def _close_dumper(self) -> None:
        if self._dumper is not None:
            self._dumper.close()
            self._dumper = None

    # -- metrics ---------------------------------------------------------------------------

    def _metrics(self):
        """Runs on the loop (OwnerCollector): the exporter's stats are the loop's own; the
        connection store, deny store and deny queue are read through their snapshots."""
        store = self.store.counts
        deny = self.denied.counts()
        exporter = self.exporter.stats
        yield gauge(
            "antrea_agent_conntrack_total_connection_count",
            "Connections in the conntrack table of the polled network namespace.",
            self._table_count,
        )
        yield gauge(
            "antrea_agent_conntrack_antrea_connection_count",
            "Connections in the agent's connection store.",
            store.connections,
        )
        yield counter(
            "antrea_agent_conntrack_poll_failures_total",
            "Conntrack polls whose dump failed (the store kept its connections).",
            self.polls_failed,
        )
        yield gauge(
            "antrea_agent_conntrack_max_connection_count",
            "Size limit of the conntrack table (nf_conntrack_max).",
            self._table_max,
        )
        yield gauge(
            "antrea_agent_denied_connection_count",
            "Connections in the agent's deny store.",
            deny.connections,
        )
        outcomes = {"recorded": deny.recorded, **deny.not_recorded}
        if self.deny_queue is not None:
            outcomes.update(self.deny_queue.counts())  # socket_overflow, error
        yield labelled_counter(
            "antrea_agent_denied_packets_total",
            "Denied packets handed over by the dataplane: recorded, or why not.",
            "outcome",
            outcomes,
            always=(
                "recorded",
                "rate_limited",
                "unknown_rule",
                "no_local_pod",
                "unparsable",
                "socket_overflow",
                "error",
            ),
        )
        yield gauge(
            "antrea_agent_flow_collector_reconnection_count",
            "Successful connections to the flow collector since start.",
            exporter.connections,
        )
        yield labelled_counter(
            "antrea_agent_flow_records_exported_total",
            "Flow records produced from the connection store, by flowEndReason.",
            "reason",
            {END_REASON_NAMES[k]: v for k, v in store.exported.items()},
            always=END_REASON_NAMES.values(),
        )
        yield counter(
            "antrea_agent_flow_records_sent_total",
            "Flow records written to the collector connection (whole messages in the kernel; "
            "a record requeued after a lost session counts again when re-sent).",
            exporter.records_written,
        )
        yield counter(
            "antrea_agent_flow_records_replayed_total",
            "Flow records of acknowledged messages sent again at the start of a session "
            "(exportReplayWindow), for an aggregator that may have lost them.",
            exporter.records_replayed,
        )
        yield gauge(
            "antrea_agent_flow_replay_records",
            "Flow records of acknowledged messages kept for replay.",
            self.exporter.delivery.replay_held,
        )
        yield counter(
            "antrea_agent_flow_records_requeued_total",
            "Flow records of messages a failed session's collector host had not acknowledged, "
            "queued to be sent again.",
            exporter.records_requeued,
        )
        yield labelled_counter(
            "antrea_agent_flow_records_dropped_total",
            "Flow records lost before reaching the collector, by reason.",
            "reason",
            dict(exporter.records_dropped),
            always=("queue_full", "encode_error", "too_large", "shutdown"),
        )
        yield labelled_counter(
            "antrea_agent_conntrack_connections_skipped_total",
            "Conntrack connections not exported, by reason (no local Pod, filtered).",
            "reason",
            dict(store.filtered),
        )
        yield gauge(
            "antrea_agent_flow_export_queue_records",
            "Records waiting for the collector.",
            self.exporter.queued,
        )
        yield from metadata_metrics("antrea_agent_", self.metadata, self.watch)
        yield from self._ebpf_metrics(store)

    def _ebpf_metrics(self, store):
        """The counter path's families (on the loop; the counter's stats are written by
        the poll worker, which the loop awaits, and read whole)."""
        if self.counter is None:
            return
        stats = self.counter.stats
        interfaces = self.counter.interfaces
        yield gauge(
            "antrea_agent_ebpf_loaded",
            "1 while the eBPF packet counter is loaded and attached (ebpf.enable).",
            float(self.ebpf_loaded),
        )
        yield counter(
            "antrea_agent_ebpf_load_failures_total",
            "Times the eBPF packet counter could not be loaded or attached.",
            self.ebpf_load_failures,
        )
        yield gauge(
            "antrea_agent_ebpf_interfaces",
            "Interfaces the packet counter is attached to.",
            len(interfaces.attached) if interfaces is not None else 0,
        )
        yield counter(
            "antrea_agent_ebpf_evictions_total",
            "Times the counted flows were taken out of the kernel.",
            stats.evictions,
        )
        yield counter(
            "antrea_agent_ebpf_evicted_flows_total", "Counted flows evicted.", stats.flows
        )
        yield counter(
            "antrea_agent_ebpf_evicted_packets_total",
            "Packets of the counted flows evicted.",
            stats.packets,
        )
        yield gauge(
            "antrea_agent_ebpf_map_fill_ratio",
            "Entries of the flow map at the last eviction, over cacheMaxFlows.",
            stats.fill,
        )
        yield labelled_counter(
            "antrea_agent_ebpf_fallback_records_total",
            "Packets the flow map had no room for, sent through the ring buffer, by error.",
            "error",
            dict(stats.fallback),
        )
        yield counter(
            "antrea_agent_ebpf_lost_packets_total",
            "Packets that found neither room in the flow map nor in the ring buffer.",
            stats.lost,
        )
        yield counter(
            "antrea_agent_ebpf_stale_slots_total",
            "Per-CPU values left from before an eviction, discarded (old kernels only).",
            stats.stale_slots,
        )
        yield labelled_counter(
            "antrea_agent_ebpf_flows_merged_total",
            "Counted flows merged into the connection store, by outcome.",
            "outcome",
            dict(store.counted_flows),
            always=("matched", "untracked", "denied", "fragment", "protocol", "no_local_pod"),
        )
        yield counter(
            "antrea_agent_ebpf_conntrack_disagreements_total",
            "Ended connections whose packet counts by conntrack and by the counter differ "
            "beyond the packets in flight between the two reads (one of them is wrong).",
            store.disagreements,
        )


def main(args) -> int:
    config = load_agent_config(args.config)
    if not config.flow_exporter_enabled:
        log.info(
            "the FlowExporter feature gate is off in %s (featureGates: {FlowExporter: true} "
            "turns it on); nothing to do",
            args.config,
        )
        return 0
    if args.netns is not None:
        try:
            path = netns.netns_path(args.netns)
        except ValueError as exc:
            raise UsageError(f"--netns {args.netns}: {exc}") from None
        if not os.path.exists(path):
            raise UsageError(f"--netns {args.netns}: no such network namespace (see ip netns)")
    try:
        agent = Agent(config, args.node_name or socket.gethostname(), args.netns)
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    try:
        agent.refresh_metadata()
    except InventoryError as exc:
        raise UsageError(f"{args.config}: inventoryFile: {exc}") from None
    log.info(
        "flow exporter on node %s: polling conntrack zone %d%s every %ss, exporting to %s",
        agent.node_name,
        config.conntrack_zone,
        f" in netns {args.netns}" if args.netns else "",
        config.poll_interval,
        config.collector,
    )
    tuning.tune()
    asyncio.run(run_until_signalled(agent.run, agent.registry, config.metrics_address, agent.ready))
    return 0
