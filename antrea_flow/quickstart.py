"""The `quickstart` command: a demo stream of Antrea flow records over mutual TLS.

A collector and an exporter run in this process on loopback; the exporter streams records
of a few synthetic connections (the shapes the node agent exports), the collector decodes
them, prints them as a table and writes them to DIR/flows.jsonl.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path

from .ipfix.address import TransportAddress
from .ipfix.antrea import EXPORTER_TEMPLATE_ID_IPV4, EXPORTER_TEMPLATE_ID_IPV6, exporter_templates
from .ipfix.collecting import CollectingProcess, Peer
from .ipfix.exporting import ExportingProcess
from .ipfix.messages import Message
from .ipfix.render import json_line, message_records
from .tls import CertificateAuthority, client_context, server_context, write_pem_files

log = logging.getLogger(__name__)

# (template, source, destination, sport, dport, pods, service, bytes/s each way)
_DEMO_FLOWS = [
    (
        EXPORTER_TEMPLATE_ID_IPV4,
        "10.10.1.5",
        "10.10.2.6",
        41000,
        8080,
        ("frontend", "client-1", "node-1", "", "", ""),
        ("10.96.0.10", 80, "backend/web:http"),
        20000,
    ),
    (
        EXPORTER_TEMPLATE_ID_IPV4,
        "10.10.1.5",
        "10.10.1.7",
        41002,
        5201,
        ("frontend", "client-1", "node-1", "backend", "web-1", "node-1"),
        None,
        1250000,
    ),
    (
        EXPORTER_TEMPLATE_ID_IPV6,
        "fd00:10:10:1::5",
        "fd00:10:10:2::6",
        41004,
        8080,
        ("frontend", "client-1", "node-1", "", "", ""),
        ("fd00:10:96::a", 80, "backend/web:http"),
        9000,
    ),
]
_TABLE = "{:<8} {:<26} {:<26} {:>5} {:>12} {:>8} {:<18}"


def _record(flow, start: int, now: int) -> dict:
    template_id, src, dst, sport, dport, pods, service, rate = flow
    family = "IPv6" if template_id == EXPORTER_TEMPLATE_ID_IPV6 else "IPv4"
    elapsed = now - start
    total = rate * elapsed
    record = {
        "flowStartSeconds": start,
        "flowEndSeconds": now,
        "flowEndReason": 2,
        "sourceTransportPort": sport,
        "destinationTransportPort": dport,
        "protocolIdentifier": 6,
        "packetTotalCount": total // 1000,
        "octetTotalCount": total,
        "packetDeltaCount": rate // 1000,
        "octetDeltaCount": rate,
        f"source{family}Address": src,
        f"destination{family}Address": dst,
        "reversePacketTotalCount": total // 10000,
        "reverseOctetTotalCount": total // 10,
        "reversePacketDeltaCount": rate // 10000,
        "reverseOctetDeltaCount": rate // 10,
        "sourcePodNamespace": pods[0],
        "sourcePodName": pods[1],
        "sourceNodeName": pods[2],
        "destinationPodNamespace": pods[3],
        "destinationPodName": pods[4],
        "destinationNodeName": pods[5],
        "tcpState": "ESTABLISHED",
        "flowType": 1 if pods[4] else 2,
    }
    if service:
        record[f"destinationCluster{family}"] = service[0]
        record["destinationServicePort"] = service[1]
        record["destinationServicePortName"] = service[2]
    return record


def _make_certificates(directory: Path) -> tuple:
    ca = CertificateAuthority.create()
    server = ca.issue("localhost", ["localhost"], ["127.0.0.1"], server=True)
    client = ca.issue("quickstart-exporter", client=True)
    return write_pem_files(directory / "server", ca, server), write_pem_files(
        directory / "client", ca, client
    )


async def run(output: Path, duration: float | None) -> int:
    output.mkdir(parents=True, exist_ok=True)
    (server_ca, server_cert, server_key), (client_ca, client_cert, client_key) = _make_certificates(
        output / "certs"
    )
    flows_file = (output / "flows.jsonl").open("w")
    received = 0

    def handle(peer: Peer, message: Message) -> None:
        nonlocal received
        for record in message_records(peer, message):
            received += 1
            flows_file.write(json_line(record) + "\n")
            src = record.get("sourcePodName") or record.get("sourceIPv4Address", "")
            dst = record.get("destinationPodName") or record.get("destinationServicePortName", "")
            print(
                _TABLE.format(
                    time.strftime("%H:%M:%S"),
                    f"{record.get('sourcePodNamespace', '')}/{src}",
                    dst,
                    record["protocolIdentifier"],
                    record["octetDeltaCount"],
                    record["flowType"],
                    "mutual TLS",
                ),
                flush=True,
            )
        flows_file.flush()

    collector = CollectingProcess(
        TransportAddress("127.0.0.1", 0, "tls"),
        handle,
        ssl_context=server_context(server_cert, server_key, server_ca),
    )
    await collector.start()
    exporter = ExportingProcess(
        TransportAddress("127.0.0.1", collector.port, "tls"),
        exporter_templates(),
        observation_domain_id=1,
        ssl_context=client_context(client_ca, client_cert, client_key),
        server_hostname="localhost",
    )
    exporter.start()
    print(
        _TABLE.format("TIME", "SOURCE", "DESTINATION", "PROTO", "OCTETS(DELTA)", "FLOWTYPE", "VIA")
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    start = int(time.time())
    deadline = loop.time() + duration if duration else None
    while not stop.is_set() and (deadline is None or loop.time() < deadline):
        now = int(time.time())
        for flow in _DEMO_FLOWS:
            exporter.add_mapping(flow[0], _record(flow, start, max(now, start + 1)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    await exporter.stop()
    await asyncio.sleep(0.2)
    await collector.stop()
    flows_file.close()
    dropped = sum(exporter.stats.records_dropped.values())
    print(
        f"\n{received} records received over mutual TLS "
        f"({exporter.stats.records_sent} sent, {dropped} dropped); "
        f"written to {output / 'flows.jsonl'}"
    )
    return 0 if received == exporter.stats.records_sent and received else 1


def main(args) -> int:
    return asyncio.run(run(Path(args.output), args.duration))
