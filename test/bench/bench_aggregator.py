"""Flow aggregator: intake with correlation over mutual TLS, the store alone, export passes.

The shape of the issue's benchmark: 100 exporters (agents) each send 1000 records of the
Antrea exporter IPv4 template (256) over mutual TLS to one in-process `Aggregator`. Half of
all records are inter-node halves whose peers come from another exporter: exporter 2k is the
source Node of its pair's inter-node flows (sourcePodName set), exporter 2k+1 their
destination Node (destinationPodName set, same 5-tuple), so 25,000 flows are correlated.
The other half are intra-node records (both Pods known). Measured in the same run:

1. intake over TLS, exporters in a child process (the aggregator has a core of its own),
   each variant in a fresh process so its peak RSS is its own:
   - collector only: the aggregator's `CollectingProcess` with a handler that only counts
     (TLS + framing + decode: the floor under the next two);
   - collector + store: the aggregator's own intake (`AggregationStore.add` per record,
     correlation included), its run loop not started;
   - whole aggregator: `Aggregator.run`, i.e. intake plus its expiry loop exporting the
     flows as they become ready (no sink configured, so an export builds the record only).
   Timed from the 'go' to the exporters until `AggregationStore.stats.received` (collector
   only: the handler's count) reaches the total.
2. the store without the network: the same records, decoded once by `SessionDecoder` and
   interleaved message by message as they arrive from concurrent exporters, fed to
   `AggregationStore.add`;
3. one `AggregationStore.expire` pass exporting every ready flow (75,000 at full size);
4. one `Aggregator.export_due` pass to the JSON log sink (a file in a temp dir), timed until
   the sink's thread has written (or dropped) every record.

There is no peer to run here (go-ipfix's collector is Go): its published figure, about 67k
records/s for BenchmarkMultipleExportersToCollector, is the goal. Timings are reported,
never asserted. The last line of output is one JSON object.

    .venv/bin/python test/bench/bench_aggregator.py [--exporters N] [--per-exporter M]
        [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchkit
from benchkit import GOAL_INTAKE, INTAKE_TIMEOUT, fmt_rate, maybe_round, rate, versus

from antrea_flow import tuning
from antrea_flow.aggregator.aggregation import AggregationStore
from antrea_flow.aggregator.config import AggregatorConfig
from antrea_flow.aggregator.service import Aggregator
from antrea_flow.codes import AGGREGATOR_SERVICE_NAME
from antrea_flow.ipfix import antrea
from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.collecting import Peer
from antrea_flow.ipfix.exporting import ExportingProcess
from antrea_flow.ipfix.messages import (
    MAX_MESSAGE_SIZE,
    Message,
    MessagePacker,
    SessionDecoder,
    template_messages,
)
from antrea_flow.ipfix.templates import Template

EXPORT_TIME = 1_700_000_000
# Long enough that no flow leaves or times out during a run: only first exports happen.
LONG_TIMEOUT = 3600.0
EXPORTER_ADDRESS = "127.0.0.1"
FOLLOWERS = 50  # follow streams of the flow API in the "api" variant
# Its window holds the backlog and every export: a stream of everything is never cut off
# (with the default 10,000, one 75,000-record export pass cuts unfiltered streams off).
API_WINDOW = 1 << 18
MODES = ("collector", "intake", "aggregator", "api")
MODE_TITLES = {
    "collector": "collector only (handler counts; TLS, framing, decode)",
    "intake": "collector + store (Aggregator intake, correlation; run loop not started)",
    "aggregator": "whole aggregator (Aggregator.run: intake + expiry loop, no sink)",
    "api": f"whole aggregator while the flow API streams to {FOLLOWERS} follow clients (in a "
    "third process) a backlog of exported records, then every export",
}


# -- records ----------------------------------------------------------------------------


def node_name(n: int) -> str:
    return f"k8s-node-worker-{n}"


def pod_ip(node: int, host: int) -> str:
    """Cluster CIDR 10.0.0.0/8 with a /24 per Node."""
    return f"10.{node >> 8}.{node & 0xFF}.{host}"


def flow_values(rng: random.Random, j: int, src_node: int, dst_node: int, side: str) -> list[Any]:
    """One agent record (template 256 order). side: "source" or "destination" (the half an
    inter-node flow's Node reports), or "both" (an intra-node flow). The 5-tuple, Pods and
    times depend on (Nodes, j) only, so both halves of a flow agree; counters are per Node."""
    source = side in ("source", "both")
    destination = side in ("destination", "both")
    end = EXPORT_TIME - j * 7 % 600
    start = end - 1 - j * 13 % 3600
    packets = rng.randrange(1, 2_000_000)
    rpackets = rng.randrange(1, 2_000_000)
    service = j % 3 == 0 and source  # the ClusterIP is seen on the source Node
    ingress = j % 4 == 0 and destination  # ingress rules are enforced at the destination
    egress = j % 5 == 0 and source
    return [
        start,  # flowStartSeconds
        end,  # flowEndSeconds
        3 if j % 10 == 9 else 2,  # flowEndReason: end of flow, active timeout
        32768 + j,  # sourceTransportPort
        (80, 443, 8080, 5432)[j % 4],  # destinationTransportPort
        6,  # protocolIdentifier: TCP
        packets,
        packets * rng.randrange(60, 1500),
        rng.randrange(0, 5000),  # packetDeltaCount
        rng.randrange(0, 5_000_000),  # octetDeltaCount
        pod_ip(src_node, 2 + j % 50),  # sourceIPv4Address
        pod_ip(dst_node, 100 + j % 20),  # destinationIPv4Address
        rpackets,
        rpackets * rng.randrange(60, 1500),
        rng.randrange(0, 5000),
        rng.randrange(0, 5_000_000),
        f"client-{j % 50}" if source else "",  # sourcePodName
        "frontend" if source else "",  # sourcePodNamespace
        node_name(src_node) if source else "",  # sourceNodeName
        f"web-{j % 20}-7f9c8d6b5-x{j % 7}q2z" if destination else "",  # destinationPodName
        "backend" if destination else "",  # destinationPodNamespace
        node_name(dst_node) if destination else "",  # destinationNodeName
        80 if service else 0,  # destinationServicePort
        "backend/web:http" if service else "",  # destinationServicePortName
        # ingress...egress columns; the egress rule allows, so the aggregator awaits the peer
        *benchkit.policy_values(ingress, egress, "egress-allow-dns-web"),
        "ESTABLISHED" if j % 7 else "TIME_WAIT",  # tcpState
        1 if side == "both" else 2,  # flowType: intra-node, inter-node
        "10.96.0.10" if service else "0.0.0.0",  # destinationClusterIPv4
    ]


def exporter_values(e: int, per_exporter: int) -> list[list[Any]]:
    """Exporter e's records: first its inter-node halves (the source Node's if e is even,
    the destination Node's if odd, of the flows of Nodes e//2*2 -> e//2*2+1), then
    intra-node records of its own Node."""
    rng = random.Random(e)
    pair = e // 2
    src, dst = 2 * pair, 2 * pair + 1
    side = "destination" if e % 2 else "source"
    inter = per_exporter // 2
    values = [flow_values(rng, j, src, dst, side) for j in range(inter)]
    values += [flow_values(rng, j, e, e, "both") for j in range(inter, per_exporter)]
    return values


def expected_counts(exporters: int, per_exporter: int) -> tuple[int, int]:
    """(correlated flows, flows) for the records above."""
    inter = per_exporter // 2
    correlated = exporters // 2 * inter
    return correlated, correlated + exporters * (per_exporter - inter)


def exporter_messages(template: Template, e: int, per_exporter: int) -> list[bytes]:
    """Exporter e's records as ExportingProcess sends them: template message, then data
    messages of up to 65535 bytes."""
    domain = e + 1
    records = [template.encode(v) for v in exporter_values(e, per_exporter)]
    messages = template_messages([template], EXPORT_TIME, 0, domain, MAX_MESSAGE_SIZE)
    packer = MessagePacker(domain, MAX_MESSAGE_SIZE)
    pos = 0
    while pos < len(records):
        message, count = packer.pack(template.template_id, records[pos:], EXPORT_TIME)
        messages.append(message)
        pos += count
    return messages


def decoded_records(exporters: int, per_exporter: int) -> list[tuple[dict, tuple[str, int]]]:
    """Every record as the collector hands it to the store, with its exporter key; messages
    interleaved round-robin across exporters, as concurrent sessions deliver them."""
    template = antrea.exporter_templates()[0]
    per_exporter_messages = []
    for e in range(exporters):
        decoder = SessionDecoder()
        exporter = (EXPORTER_ADDRESS, e + 1)
        decoded = []
        for data in exporter_messages(template, e, per_exporter):
            message = decoder.decode(data)
            records = [r for ds in message.data_sets for r in ds.records]
            if records:
                decoded.append([(r, exporter) for r in records])
        per_exporter_messages.append(decoded)
    out: list[tuple[dict, tuple[str, int]]] = []
    longest = max(len(m) for m in per_exporter_messages)
    for i in range(longest):
        for messages in per_exporter_messages:
            if i < len(messages):
                out.extend(messages[i])
    return out


# -- helpers ----------------------------------------------------------------------------


class GCTimer:
    """CPU time spent in the cyclic garbage collector, by generation (a gc.callbacks entry).
    Process CPU time, not wall time: on a shared machine a collection may be descheduled."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.process_time()
        else:
            generation = info["generation"]
            self.seconds[generation] += time.process_time() - self._t0
            self.count[generation] += 1

    def __enter__(self) -> GCTimer:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> dict[str, Any]:
        return {"seconds": sum(self.seconds), "count": list(self.count), "by_gen": self.seconds}


def fmt_gc(g: dict[str, Any]) -> str:
    gen2 = g["by_gen"][2]
    return f"{g['seconds']:.2f} s in gc ({g['count'][2]} full collections: {gen2:.2f} s)"


def aggregator_config(
    cert_dir: str, json_log: str = "", tls: bool = True, api: bool = False
) -> AggregatorConfig:
    return AggregatorConfig(
        listen=TransportAddress("127.0.0.1", 0, "tls" if tls else "tcp"),
        aggregator_address=AGGREGATOR_SERVICE_NAME,
        external_collector=None,
        export_interval=LONG_TIMEOUT,
        inactive_timeout=LONG_TIMEOUT,
        correlation_timeout=LONG_TIMEOUT,
        cert_dir=cert_dir,
        json_log=json_log,
        metrics_address=None,
        observation_domain_id=0,
        template_refresh=600.0,
        api_address=TransportAddress("127.0.0.1", 0, "tcp") if api else None,
        api_window=API_WINDOW,
    )


# -- 1. intake over mutual TLS ----------------------------------------------------------


async def _run_exporters_child(args: argparse.Namespace) -> None:
    """--role exporters: the records are built before connecting, then sent on 'go'."""
    values = [exporter_values(e, args.per_exporter) for e in range(args.exporters)]
    # What agents get from the flow-aggregator-ca ConfigMap and client Secret.
    exporters = benchkit.make_exporters(
        args.port, Path(args.cert_dir), args.exporters, server_hostname=AGGREGATOR_SERVICE_NAME
    )

    async def send(exporters: list[ExportingProcess]) -> None:
        tid = antrea.EXPORTER_TEMPLATE_ID_IPV4
        for exporter, records in zip(exporters, values, strict=True):
            add = exporter.add
            for record in records:
                add(tid, record)
            # Let sessions send while the other exporters are still encoding, as concurrent
            # agents would.
            await asyncio.sleep(0)

    await benchkit.run_exporters_child(exporters, send, count_dropped=True)


async def _run_followers_child(args: argparse.Namespace) -> None:
    """--role followers: FOLLOWERS follow streams of the flow API at --port; 'ready' once all
    are open, then read everything until the aggregator ends them, and report."""
    request = b"GET /api/v1/flows?follow=true HTTP/1.1\r\nHost: bench\r\n\r\n"
    streams = []
    for _ in range(FOLLOWERS):
        reader, writer = await asyncio.open_connection("127.0.0.1", args.port, limit=1 << 20)
        writer.write(request)
        await reader.readuntil(b"\r\n\r\n")  # status and headers
        streams.append((reader, writer))
    print(json.dumps({"ready": True}), flush=True)
    cpu0 = benchkit.cpu_seconds()

    async def read(reader: asyncio.StreamReader) -> tuple[int, int]:
        flows = cut_off = 0
        # A mark cut by a chunk's end is counted with the next chunk: each is searched in
        # what the last one left, one byte short of the mark (so never counted twice).
        flow_tail = lost_tail = b""
        while chunk := await reader.read(1 << 20):
            data = flow_tail + chunk
            flows += data.count(b'{"flow":')
            flow_tail = data[-7:]
            data = lost_tail + chunk
            cut_off += data.count(b'"lost":')
            lost_tail = data[-6:]
        return flows, cut_off

    counts = await asyncio.gather(*(read(reader) for reader, _ in streams))
    for _, writer in streams:
        writer.close()
    print(json.dumps({"flows": [f for f, _ in counts], "cut_off": sum(c for _, c in counts),
                      "cpu_s": benchkit.cpu_seconds() - cpu0}), flush=True)  # fmt: skip


def aggregated_record() -> dict[str, Any]:
    """A record with every element of the aggregator's IPv4 export."""
    template = antrea.aggregator_templates()[0]
    record = dict(zip(template.keys, template.values_from({}), strict=True))
    record.update(sourceIPv4Address="10.10.1.5", destinationIPv4Address="10.10.2.6",
                  sourcePodName="client-7d9f8", sourcePodNamespace="frontend",
                  destinationPodName="web-5d4f8c7b9-x2k4q", destinationPodNamespace="backend",
                  sourceNodeName="node-1", destinationNodeName="node-2",
                  octetTotalCount=123456, flowType=2)  # fmt: skip
    return record


def _run_store_child(args: argparse.Namespace) -> None:
    """--role store: a store filled to --flows flows (the benchmark's records again and again,
    each round on other destination ports), its RSS and the time to fill it, as JSON."""
    base = [record for record, _ in decoded_records(args.exporters, args.per_exporter)]
    gc.collect()
    rss0 = benchkit.peak_rss_mb()
    store = AggregationStore(LONG_TIMEOUT, LONG_TIMEOUT, LONG_TIMEOUT, max_flows=args.flows)
    now = time.time()
    t0 = time.perf_counter()
    added = 0
    round_ = 0
    while len(store) < args.flows:
        for record in base:
            copy = dict(record)
            copy["destinationTransportPort"] = 1000 + round_
            store.add(copy, ("127.0.0.1", 1), now)
            added += 1
            if len(store) >= args.flows:
                break
        round_ += 1
    elapsed = time.perf_counter() - t0
    print(json.dumps({"flows": len(store), "records": added, "seconds": elapsed,
                      "rss_mb": benchkit.peak_rss_mb(), "rss_before_mb": rss0,
                      "evicted": sum(store.stats.evicted.values())}), flush=True)  # fmt: skip


def _profile_text(profile: cProfile.Profile, limit: int = 30) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    text = out.getvalue()
    # Keep the table: drop pstats' preamble up to the totals line.
    start = text.find("function calls")
    return text[text.rfind("\n", 0, start) + 1 :] if start >= 0 else text


async def _run_aggregator(args: argparse.Namespace) -> dict[str, Any]:
    """--role aggregator: an Aggregator here in --mode, the exporters in a child process."""
    total = args.exporters * args.per_exporter
    correlated_expected, flows_expected = expected_counts(args.exporters, args.per_exporter)
    result: dict[str, Any] = {"mode": args.mode, "records": total, "profiled": args.profile}
    aggregator = Aggregator(aggregator_config(args.cert_dir, api=args.mode == "api"))
    if not args.gc_defaults:
        tuning.tune()  # as `antrea-flow aggregator` does once it is built
    store = aggregator.store
    collector = aggregator.collector
    state: dict[str, Any] = {"records": 0}
    done = asyncio.Event()
    intake = collector.handler
    profile = cProfile.Profile() if args.profile else None
    gc_timer = GCTimer()

    def finish() -> None:
        # Everything the window measures is taken here: once the last record is in, the
        # run loop may export before the waiting coroutine resumes (timers and other
        # callbacks run first), and that belongs to the export, not to the intake.
        if profile is not None:
            profile.disable()
        state["t_end"] = time.perf_counter()
        state["cpu_end"] = benchkit.cpu_seconds()
        state["exported"] = store.stats.exported
        state["gc"] = gc_timer.summary()
        state["rss_intake_mb"] = benchkit.peak_rss_mb()
        done.set()

    def count_only(peer: Peer, message: Message) -> None:
        state["records"] += message.record_count
        if state["records"] >= total and not done.is_set():
            finish()

    def with_store(peer: Peer, message: Message) -> None:
        intake(peer, message)
        if store.stats.received >= total and not done.is_set():
            finish()

    collector.handler = count_only if args.mode == "collector" else with_store
    passes: list[tuple[int, float]] = []  # (records, seconds) of the loop's export passes
    export_due = aggregator.export_due

    def timed_export_due(drain: bool = False, limit: int | None = None) -> int:
        t = time.perf_counter()
        count = export_due(drain, limit)
        if count:
            passes.append((count, time.perf_counter() - t))
        return count

    aggregator.export_due = timed_export_due  # type: ignore[method-assign]
    stop = asyncio.Event()
    run_task = None
    child = followers = None
    try:
        if args.mode in ("aggregator", "api"):
            run_task = asyncio.create_task(aggregator.run(stop))
            deadline = time.perf_counter() + 30
            while collector.port is None:
                if run_task.done() or time.perf_counter() > deadline:
                    await run_task
                    raise RuntimeError("the aggregator did not start listening")
                await asyncio.sleep(0.01)
        else:
            await collector.start()
        assert collector.port is not None
        if aggregator.flow_api is not None:
            followers = await asyncio.create_subprocess_exec(
                sys.executable, os.path.abspath(__file__), "--role=followers",
                f"--port={aggregator.flow_api.port}", stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert followers.stdout is not None
            await asyncio.wait_for(followers.stdout.readline(), 60)  # all streams open
        child, result["connect_s"] = await benchkit.start_exporters_child(
            __file__,
            collector.port,
            [
                f"--cert-dir={args.cert_dir}",
                f"--exporters={args.exporters}",
                f"--per-exporter={args.per_exporter}",
            ],
        )
        await benchkit.wait_for_sessions(collector, args.exporters)

        if aggregator.window is not None:
            # Streams busy writing when the intake starts: a backlog of exported records
            # as large as the run's exports, published just before the 'go'. Encoded
            # already, as records exported before are (once, when a stream first sends them).
            backlog = aggregated_record()
            for _ in range(flows_expected):
                aggregator.window.append(dict(backlog))
            for entry in aggregator.window.newest():
                entry.line()
        gc.collect()
        rss_before = benchkit.peak_rss_mb()
        cpu0, t0 = benchkit.cpu_seconds(), time.perf_counter()
        if aggregator.window is not None:
            aggregator.window.published()
        gc.callbacks.append(gc_timer)
        if profile is not None:
            profile.enable()
        await benchkit.send_go(child)
        try:
            await asyncio.wait_for(done.wait(), INTAKE_TIMEOUT)
        except TimeoutError:
            received = state["records"] if args.mode == "collector" else store.stats.received
            result["error"] = f"the aggregator saw {received} of {total} records"
            return result
        finally:
            if profile is not None:
                profile.disable()
            gc.callbacks.remove(gc_timer)
        elapsed = state["t_end"] - t0
        result.update(elapsed_s=elapsed, cpu_s=state["cpu_end"] - cpu0, rate=rate(total, elapsed))
        result.update(rss_before_mb=rss_before, rss_intake_mb=state["rss_intake_mb"])
        result["gc"] = state["gc"]
        if args.mode in ("aggregator", "api"):
            # The loop's next pass exports every ready flow: intake through export.
            deadline = time.perf_counter() + INTAKE_TIMEOUT
            while store.stats.exported < flows_expected and time.perf_counter() < deadline:
                await asyncio.sleep(0.005)
            result["all_exported_s"] = time.perf_counter() - t0
            result["exported"] = store.stats.exported
            result["export_passes"] = list(passes)
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 120)
        result["exporters"] = json.loads(line) if line else {"error": "no report"}
        await child.wait()
        stats = store.stats
        result["store"] = {
            "received": stats.received,
            "correlated": stats.correlated,
            "ignored": dict(stats.ignored),
            "flows": len(store),
            "waiting": store.waiting,
            "exported_during_intake": state["exported"],
        }
        result["collector"] = {
            "records": collector.stats.records,
            "messages": collector.stats.messages,
            "malformed": dict(collector.stats.malformed),
            "lost_records": collector.stats.lost_records,
            "handler_errors": collector.stats.handler_errors,
        }
        problems = []
        if collector.stats.records != total:
            problems.append(f"collector decoded {collector.stats.records} of {total}")
        if collector.stats.malformed or collector.stats.lost_records:
            problems.append(f"collector: {result['collector']}")
        if args.mode != "collector":
            if stats.received != total or stats.ignored:
                problems.append(f"store received {stats.received}, ignored {dict(stats.ignored)}")
            if stats.correlated != correlated_expected or len(store) != flows_expected:
                problems.append(
                    f"correlated {stats.correlated} (expected {correlated_expected}), "
                    f"{len(store)} flows (expected {flows_expected})"
                )
        if problems:
            result["error"] = "; ".join(problems)
        if profile is not None:
            result["profile"] = _profile_text(profile)
        if aggregator.flow_api is not None:
            # Until every stream has had every export (the window holds them all).
            deadline = time.perf_counter() + INTAKE_TIMEOUT
            api = aggregator.flow_api
            while time.perf_counter() < deadline:
                counts = api.stats.snapshot()
                streamed = (store.stats.exported + flows_expected) * FOLLOWERS  # and the backlog
                if counts.streamed >= streamed or not counts.streams:
                    break
                await asyncio.sleep(0.01)
            result["all_streamed_s"] = time.perf_counter() - t0
            result["streamed"] = api.stats.snapshot().streamed
        return result
    finally:
        await benchkit.stop_child(child)
        if run_task is not None:
            stop.set()
            await run_task  # stops the collector and drains the store (no sink)
        else:
            await collector.stop()
        result["rss_mb"] = benchkit.peak_rss_mb()
        if followers is not None:
            assert followers.stdout is not None
            line = await asyncio.wait_for(followers.stdout.readline(), 120)
            result["followers"] = json.loads(line) if line else {"error": "no report"}
            await benchkit.stop_child(followers)


def store_in_subprocess(args: argparse.Namespace) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--role=store", f"--flows={args.flows}",
         f"--exporters={args.exporters}", f"--per-exporter={args.per_exporter}"],
        stdout=subprocess.PIPE, text=True, check=False, timeout=1800,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"store process exited {proc.returncode}"}
    return json.loads(lines[-1])


def intake_in_subprocess(
    mode: str, cert_dir: Path, exporters: int, per_exporter: int, profile: bool = False,
    gc_defaults: bool = False,
) -> dict[str, Any]:  # fmt: skip
    options = [
        f"--cert-dir={cert_dir}",
        f"--exporters={exporters}",
        f"--per-exporter={per_exporter}",
    ]
    if profile:
        options.append("--profile")
    if gc_defaults:
        options.append("--gc-defaults")
    return benchkit.run_variant(__file__, "aggregator", mode, options, INTAKE_TIMEOUT + 300)


# -- 2.-4. the store alone, expiry, the JSON sink ---------------------------------------


def filled_store(records: list[tuple[dict, tuple[str, int]]], now: float) -> AggregationStore:
    store = AggregationStore(LONG_TIMEOUT, LONG_TIMEOUT, LONG_TIMEOUT)
    add = store.add
    for record, exporter in records:
        add(record, exporter, now)
    return store


def bench_store(
    records: list[tuple[dict, tuple[str, int]]], repeats: int, now: float
) -> dict[str, Any]:
    """add (every record into a fresh store) and one expire pass, best of `repeats`."""
    best_add = best_expire = float("inf")
    store = None
    exported = 0
    add_gc: dict[str, Any] = {}
    for _ in range(repeats):
        store = None
        gc.collect()
        with GCTimer() as gc_timer:
            t0 = time.perf_counter()
            store = filled_store(records, now)
            seconds = time.perf_counter() - t0
        if seconds < best_add:
            best_add, add_gc = seconds, gc_timer.summary()
        gc.collect()
        t0 = time.perf_counter()
        out = store.expire(now)
        best_expire = min(best_expire, time.perf_counter() - t0)
        exported = len(out)
        del out
    assert store is not None
    return {
        "add_s": best_add,
        "add_rate": rate(len(records), best_add),
        "add_gc": add_gc,
        "expire_s": best_expire,
        "expire_rate": rate(exported, best_expire),
        "exported": exported,
        "flows": len(store),
        "correlated": store.stats.correlated,
        "received": store.stats.received,
        "ignored": dict(store.stats.ignored),
    }


def bench_json_sink(records: list[tuple[dict, tuple[str, int]]], now: float) -> dict[str, Any]:
    """One Aggregator.export_due pass (inventory look-ups included) into the JSON log sink,
    timed until its thread has written or dropped every record."""
    with tempfile.TemporaryDirectory(prefix="bench-aggregator-json-") as tmp:
        path = Path(tmp) / "flows.json"
        # Plain TCP: the sink path needs no certificates, and the collector never starts.
        config = aggregator_config(str(Path(tmp) / "certs"), json_log=str(path), tls=False)
        aggregator = Aggregator(config, clock=lambda: now)
        aggregator.store = filled_store(records, now)
        (sink,) = aggregator.sinks
        sink.start()
        gc.collect()
        t0 = time.perf_counter()
        count = aggregator.export_due()
        queued_s = time.perf_counter() - t0
        deadline = t0 + 300
        while sink.sent + sum(sink.dropped.values()) < count and time.perf_counter() < deadline:
            time.sleep(0.001)
        elapsed = time.perf_counter() - t0
        asyncio.run(sink.stop())
        size = path.stat().st_size if path.exists() else 0
        with path.open("rb") as f:
            lines = sum(1 for _ in f)
    return {
        "exported": count,
        "queued_s": queued_s,
        "elapsed_s": elapsed,
        "rate": rate(count, elapsed),
        "written": sink.sent,
        "lines": lines,
        "dropped": dict(sink.dropped),
        "bytes_per_record": size / lines if lines else 0,
    }


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exporters", type=int, help="exporters (agents), an even number (100)")
    parser.add_argument("--per-exporter", type=int, help="records each exporter sends (1000)")
    parser.add_argument("--repeats", type=int, help="repeats of the in-process measures (3)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run the whole aggregator under cProfile and print where its time goes",
    )
    # Internal: the script runs itself as the aggregator process and the exporters' process.
    parser.add_argument(
        "--role", choices=("main", "aggregator", "exporters", "followers", "store"), default="main"
    )
    parser.add_argument("--flows", type=int, help="flows the store is filled to (1,000,000)")
    parser.add_argument(
        "--gc-defaults",
        action="store_true",
        help="leave Python's garbage collector settings as they are (for comparison)",
    )
    parser.add_argument("--mode", choices=MODES, default="aggregator")
    parser.add_argument("--cert-dir", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    benchkit.fill_sizes(args, exporters=(10, 100), per_exporter=(200, 1000), repeats=(1, 3),
                        flows=(20_000, 1_000_000))  # fmt: skip
    if args.exporters < 2 or args.exporters % 2:
        parser.error("--exporters must be an even number >= 2 (exporters pair up as Nodes)")
    if not 2 <= args.per_exporter <= 32767:
        parser.error("--per-exporter must be in 2..32767 (one source port per flow)")
    return args


def print_followers(r: dict[str, Any], alone: dict[str, Any]) -> None:
    followers = r["followers"]
    if "error" in followers:
        print(f"     follow streams: FAILED: {followers['error']}")
        return
    got = followers["flows"]
    print(
        f"     {len(got)} follow streams received {min(got):,} to {max(got):,} records each "
        f"(of {r['exported'] * 2:,}: the backlog and the exports), all {r['streamed']:,} written "
        f"{r['all_streamed_s']:.2f} s after 'go'; {followers['cut_off']} cut off; the "
        f"clients' process used {followers['cpu_s']:.2f} s of CPU"
    )
    if "rate" in alone and "error" not in alone:
        print(
            f"     intake with the streams: {r['rate'] / alone['rate']:.0%} of the rate without "
            f"them (goal: at least 90%); aggregator CPU {r['cpu_s'] / alone['cpu_s']:.0%} of it"
        )


def main(args: argparse.Namespace) -> int:
    benchkit.log_warnings()
    total = args.exporters * args.per_exporter
    correlated_expected, flows_expected = expected_counts(args.exporters, args.per_exporter)
    print(
        f"bench_aggregator: {benchkit.machine()}; "
        f"{args.exporters} exporters x {args.per_exporter} records = "
        f"{total:,} records of template {antrea.EXPORTER_TEMPLATE_ID_IPV4}, "
        f"{correlated_expected * 2:,} of them inter-node halves "
        f"({correlated_expected:,} flows to correlate, {flows_expected:,} flows in all)"
    )
    if args.quick:
        print("--quick: a smoke run; the sizes are too small for stable rates")

    print(
        "\n1. intake over mutual TLS on 127.0.0.1, exporters in a child process "
        "(each variant in a fresh process)"
    )
    intake: dict[str, dict[str, Any]] = {}
    profiled = None
    with tempfile.TemporaryDirectory(prefix="bench-aggregator-") as tmp:
        cert_dir = Path(tmp) / "certs"  # the Aggregator creates its CA and certificates here
        for mode in MODES:
            intake[mode] = intake_in_subprocess(
                mode, cert_dir, args.exporters, args.per_exporter, gc_defaults=args.gc_defaults
            )
        if args.profile:
            profiled = intake_in_subprocess(
                "aggregator", cert_dir, args.exporters, args.per_exporter, profile=True,
                gc_defaults=args.gc_defaults,
            )  # fmt: skip
    failed = False
    for mode in MODES:
        r = intake[mode]
        print(f"   {MODE_TITLES[mode]}:")
        if "error" in r:
            failed = True
            print(f"     FAILED: {r['error']}")
            if "rate" not in r:
                continue
        goal = versus(r["rate"], GOAL_INTAKE) if mode != "collector" else ""
        print(f"     {fmt_rate(r['rate'])}  {goal}".rstrip())
        # The aggregator's CPU time bounds what one core could do were it not shared.
        per_cpu = rate(total, r["cpu_s"])
        print(f"     {fmt_rate(per_cpu)} per CPU-second of the aggregator process")
        ex = r["exporters"]
        print(
            f"     {r['elapsed_s']:.2f} s from 'go' to the last record in the "
            f"{'handler' if mode == 'collector' else 'store'}; {r['collector']['messages']} "
            f"messages; connect+handshake of all {args.exporters}: {r['connect_s']:.2f} s"
        )
        share = r["cpu_s"] / r["elapsed_s"]
        print(
            f"     aggregator CPU {r['cpu_s']:.2f} s ({share:.0%} of a core), of which "
            f"{fmt_gc(r['gc'])}; exporters' process CPU {ex.get('cpu_s', 0):.2f} s, "
            f"done sending after {ex.get('elapsed_s', 0):.2f} s"
        )
        print(
            f"     aggregator peak RSS {r['rss_intake_mb']:.0f} MB at the last record, "
            f"{r['rss_mb']:.0f} MB by the end of the process ({r['rss_before_mb']:.0f} MB "
            "before sending)"
        )
        if mode != "collector":
            s = r["store"]
            line = (
                f"     store: {s['received']:,} received, {s['correlated']:,} correlated "
                f"(expected {correlated_expected:,}), {s['flows']:,} flows, "
                f"{s['waiting']:,} waiting"
            )
            if mode in ("aggregator", "api"):
                line += f", {s['exported_during_intake']:,} exported by the loop meanwhile"
            print(line)
        if mode == "api" and "followers" in r:
            print_followers(r, intake["aggregator"])
        if mode in ("aggregator", "api") and "all_exported_s" in r:
            passes = r["export_passes"]
            count = sum(n for n, _ in passes)
            seconds = sum(t for _, t in passes)
            print(
                f"     the loop (waking at most every second) had exported all {r['exported']:,} "
                f"flows {r['all_exported_s']:.2f} s after 'go';\n"
                f"     its export_due: {fmt_rate(rate(count, seconds)).strip()} "
                f"({len(passes)} pass(es), {count:,} records in {seconds:.2f} s; no sink)"
            )
    print(f"   goal >= {GOAL_INTAKE:,} records/s on one core (go-ipfix's comparable benchmark)")

    print(
        "\n2.-4. the same records without the network (decoded once, in arrival order; "
        + (
            "Python's collector settings)"
            if args.gc_defaults
            else "the aggregator's collector settings)"
        )
    )
    now = time.time()
    records = decoded_records(args.exporters, args.per_exporter)
    if not args.gc_defaults:
        tuning.tune()  # as the aggregator does once built (the decoded records are frozen)
    store = bench_store(records, args.repeats, now)
    if store["correlated"] != correlated_expected or store["flows"] != flows_expected:
        failed = True
        print(f"   FAILED: store {store}")
    print(
        f"   2. AggregationStore.add       {fmt_rate(store['add_rate'])}  "
        f"({store['add_s']:.2f} s for {len(records):,}, {fmt_gc(store['add_gc'])}; "
        f"{store['correlated']:,} correlated; best of {args.repeats})"
    )
    print(
        f"   3. AggregationStore.expire    {fmt_rate(store['expire_rate'])}  "
        f"(one pass exporting {store['exported']:,} ready flows in {store['expire_s']:.2f} s)"
    )
    sink = bench_json_sink(records, now)
    drops = sum(sink["dropped"].values())
    if sink["lines"] != sink["written"]:
        failed = True
    print(
        f"   4. export_due -> JSON log     {fmt_rate(sink['rate'])}  "
        f"({sink['exported']:,} records queued in {sink['queued_s']:.2f} s, written after "
        f"{sink['elapsed_s']:.2f} s, {sink['bytes_per_record']:.0f} bytes each; "
        f"{sink['written']:,} written, {drops:,} dropped)"
    )
    if drops:
        print(
            "      the JSON sink's queue holds 65,536 records: one pass exporting more than the\n"
            "      writer thread keeps up with drops the rest (counted, as designed)"
        )
    del records

    held = store_in_subprocess(args)
    if "error" in held:
        failed = True
        print(f"   5. a store of {args.flows:,} flows: FAILED: {held['error']}")
    else:
        grown = held["rss_mb"] - held["rss_before_mb"]
        print(
            f"   5. a store of {held['flows']:,} flows (maxFlows): filled in "
            f"{held['seconds']:.1f} s from {held['records']:,} records; peak RSS "
            f"{held['rss_mb']:.0f} MB, "
            f"{grown:.0f} MB of it the flows ({grown * 1024 / held['flows']:.1f} KB a flow)"
        )

    if profiled is not None:
        print("\n6. where the whole aggregator's time goes (cProfile, a separate run)")
        if "profile" in profiled:
            print(
                f"   under the profiler: {fmt_rate(profiled.get('rate'))}, "
                f"{profiled.get('elapsed_s', 0):.2f} s"
            )
            print("   " + profiled["profile"].rstrip().replace("\n", "\n   "))
        else:
            print(f"   FAILED: {profiled.get('error')}")

    def ok(mode: str, key: str) -> Any:
        return None if "error" in intake[mode] else intake[mode].get(key)

    head = intake["aggregator"]
    summary = {
        "intake_records_per_s": maybe_round(ok("aggregator", "rate")),
        "store_add_records_per_s": round(store["add_rate"]),
        "export_records_per_s": round(store["expire_rate"]),
        "correlated": head.get("store", {}).get("correlated"),
        "rss_mb": maybe_round(head.get("rss_mb")),
        "rss_mb_at_last_record": maybe_round(head.get("rss_intake_mb")),
        "intake_records_per_cpu_s": (
            None if "cpu_s" not in head or "error" in head else round(rate(total, head["cpu_s"]))
        ),
        "intake_without_loop_records_per_s": maybe_round(ok("intake", "rate")),
        "intake_with_follow_streams_records_per_s": maybe_round(ok("api", "rate")),
        "follow_streams_all_written_s": (
            None
            if "all_streamed_s" not in intake["api"]
            else round(intake["api"]["all_streamed_s"], 2)
        ),
        "collector_only_records_per_s": maybe_round(ok("collector", "rate")),
        "aggregator_cpu_s": None if "cpu_s" not in head else round(head["cpu_s"], 2),
        "json_sink_records_per_s": round(sink["rate"]),
        "json_sink_dropped": drops,
        "store_flows": held.get("flows"),
        "store_rss_mb": maybe_round(held.get("rss_mb")),
    }
    failed = failed or any("error" in r for r in intake.values())
    print()
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.role == "followers":
        asyncio.run(_run_followers_child(arguments))
    elif arguments.role == "store":
        _run_store_child(arguments)
    else:
        benchkit.dispatch(arguments, main, _run_exporters_child, "aggregator", _run_aggregator)
