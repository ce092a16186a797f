"""IPFIX hot paths: encode, pack, decode (beside tshark) and collector intake over mutual TLS.

Measured with the Antrea exporter IPv4 template (256) and realistic record values:

1. encode: `Template.encode` on values in template order, then the full export path
   (encode + `MessagePacker` into 65535-byte messages), and `ExportingProcess.add`;
2. decode: `SessionDecoder.decode` on whole 65535-byte messages (and on the 1452-byte UDP
   messages that tshark reads, for a like-for-like comparison);
3. the peer: tshark dissecting the same records from a pcap of UDP datagrams to port 4739,
   with and without its fixed start-up cost;
4. intake: 100 exporters (`ExportingProcess` over TLS) each sending 1000 records to one
   `CollectingProcess` on 127.0.0.1, the shape of go-ipfix's
   BenchmarkMultipleExportersToCollector. Once with the exporters in the collector's event
   loop (one core shared by both sides), once with the exporters in a child process (so
   the collector's own intake rate is measured). Each variant runs in a fresh process so
   its peak RSS is its own.

Timings are reported beside the spec's goals, never asserted. The last line of output is
one JSON object. Run: `.venv/bin/python test/bench/bench_ipfix.py [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import benchkit
from benchkit import GOAL_INTAKE, INTAKE_TIMEOUT, fmt_rate, maybe_round, rate, versus

from antrea_flow.ipfix import antrea
from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.collecting import CollectingProcess, Peer
from antrea_flow.ipfix.exporting import ExportingProcess
from antrea_flow.ipfix.messages import (
    DEFAULT_UDP_MESSAGE_SIZE,
    MAX_MESSAGE_SIZE,
    Message,
    MessagePacker,
    SessionDecoder,
    template_messages,
)
from antrea_flow.ipfix.templates import Template
from antrea_flow.tls import CertificateAuthority, server_context, write_pem_files

GOAL_ENCODE = 200_000
GOAL_DECODE = 100_000
GO_IPFIX_RSS_MB = 252
IPFIX_PORT = 4739
EXPORT_TIME = 1_700_000_000
# The largest UDP payload an IPv4 datagram can carry (65535 - 20 - 8).
MAX_UDP4_PAYLOAD = 65_507


# -- records ----------------------------------------------------------------------------


def record_values(rng: random.Random, i: int) -> list[Any]:
    """One exporter record (template 256 order) as the agent would fill it."""
    end = EXPORT_TIME + rng.randrange(600)
    kind = i % 4  # intra-node, inter-node, via a Service, to an external address
    client = f"client-{i % 50}"
    packets = rng.randrange(1, 2_000_000)
    octets = packets * rng.randrange(60, 1500)
    rpackets = rng.randrange(1, 2_000_000)
    roctets = rpackets * rng.randrange(60, 1500)
    with_service = kind == 2
    external = kind == 3
    ingress = i % 3 == 0 and not external  # policy names on some records, "" on the others
    egress = i % 5 == 0
    return [
        end - rng.randrange(1, 3600),  # flowStartSeconds
        end,  # flowEndSeconds
        rng.choice((1, 2, 3)),  # flowEndReason: idle, active, end of flow
        rng.randrange(32768, 61000),  # sourceTransportPort
        rng.choice((80, 443, 8080, 5432)),  # destinationTransportPort
        6,  # protocolIdentifier: TCP
        packets,
        octets,
        rng.randrange(0, 5000),  # packetDeltaCount
        rng.randrange(0, 5_000_000),  # octetDeltaCount
        f"10.10.{i % 4}.{2 + i % 250}",  # sourceIPv4Address
        f"93.184.{i % 200}.{1 + i % 250}" if external else f"10.10.{(i + 1) % 4}.{2 + i % 200}",
        rpackets,
        roctets,
        rng.randrange(0, 5000),
        rng.randrange(0, 5_000_000),
        client,  # sourcePodName
        "frontend" if i % 2 else "default",  # sourcePodNamespace
        f"k8s-node-worker-{i % 4}",  # sourceNodeName
        "" if external else f"web-{i % 20}-7f9c8d6b5-x{i % 7}q2z",  # destinationPodName
        "" if external else "backend",  # destinationPodNamespace
        "" if external else f"k8s-node-worker-{(i + kind) % 4}",  # destinationNodeName
        80 if with_service else 0,  # destinationServicePort
        "backend/web:http" if with_service else "",  # destinationServicePortName
        *benchkit.policy_values(ingress, egress, "egress-default-deny"),  # ingress...egress
        "ESTABLISHED" if i % 7 else "TIME_WAIT",  # tcpState
        (1, 2, 2, 3)[kind],  # flowType
        "10.96.0.10" if with_service else "0.0.0.0",  # destinationClusterIPv4
    ]


def value_pool(size: int = 4096, seed: int = 7) -> list[list[Any]]:
    rng = random.Random(seed)
    return [record_values(rng, i) for i in range(size)]


def cycled(pool: Sequence[list[Any]], n: int) -> list[list[Any]]:
    return [pool[i % len(pool)] for i in range(n)]


def pack_all(
    template: Template, records: Sequence[bytes], max_message_size: int, domain: int = 1
) -> list[bytes]:
    """Template message(s) first, then data messages holding every record."""
    messages = template_messages([template], EXPORT_TIME, 0, domain, max_message_size)
    packer = MessagePacker(domain, max_message_size)
    # A slice bounded by how many records could possibly fit keeps packing linear.
    chunk = packer.max_record_size // template.min_record_length + 1
    tid = template.template_id
    pos, n = 0, len(records)
    while pos < n:
        message, count = packer.pack(tid, records[pos : pos + chunk], EXPORT_TIME)
        messages.append(message)
        pos += count
    return messages


def best_of(repeats: int, fn) -> tuple[float, Any]:
    """The shortest of `repeats` timed calls of fn(), and the last result."""
    best = float("inf")
    result = None
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def row(label: str, value: float, note: str = "") -> None:
    print(f"   {label:<30}{fmt_rate(value)}  {note}".rstrip())


# -- 1. encode and pack -----------------------------------------------------------------


def bench_encode(template: Template, values: list[list[Any]], repeats: int) -> dict[str, float]:
    n = len(values)
    encode = template.encode

    def encode_only() -> list[bytes]:
        return [encode(v) for v in values]

    t_encode, records = best_of(repeats, encode_only)

    def pack_only() -> list[bytes]:
        return pack_all(template, records, MAX_MESSAGE_SIZE)

    t_pack, _ = best_of(repeats, pack_only)

    def full_path() -> list[bytes]:
        return pack_all(template, [encode(v) for v in values], MAX_MESSAGE_SIZE)

    t_full, messages = best_of(repeats, full_path)

    def exporter_add() -> int:
        # No loop is running and start() is never called: this is add() = encode + enqueue.
        exporter = ExportingProcess(
            TransportAddress("127.0.0.1", IPFIX_PORT, "tcp"),
            [template],
            1,
            max_queue_records=n,
        )
        add = exporter.add
        tid = template.template_id
        for v in values:
            add(tid, v)
        return exporter.queued

    t_add, queued = best_of(repeats, exporter_add)
    assert queued == n, f"ExportingProcess.add queued {queued} of {n}"
    record_bytes = sum(map(len, records)) / n
    return {
        "encode": rate(n, t_encode),
        "pack_only": rate(n, t_pack),
        "pack": rate(n, t_full),
        "exporter_add": rate(n, t_add),
        "record_bytes": record_bytes,
        "messages": len(messages) - 1,
    }


# -- 2. decode --------------------------------------------------------------------------


def bench_decode(messages: list[bytes], expected: int, repeats: int) -> float:
    """Records/s of SessionDecoder.decode over the data messages (templates decoded first)."""
    template_msg, data = messages[0], messages[1:]
    best = float("inf")
    for _ in range(repeats):
        decoder = SessionDecoder()
        decoder.decode(template_msg)
        decode = decoder.decode
        gc.collect()
        t0 = time.perf_counter()
        count = 0
        for raw in data:
            count += decode(raw).record_count
        best = min(best, time.perf_counter() - t0)
        assert count == expected, f"decoded {count} records, expected {expected}"
        assert decoder.lost_records == 0, f"{decoder.lost_records} records lost"
    return rate(expected, best)


# -- 3. tshark --------------------------------------------------------------------------


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def write_pcap(path: Path, payloads: Sequence[bytes]) -> None:
    """Each payload as a UDP datagram 10.0.0.1:40000 -> 10.0.0.2:4739 (Ethernet, IPv4)."""
    eth = bytes.fromhex("020000000002020000000001") + b"\x08\x00"
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262_144, 1))
        for i, payload in enumerate(payloads):
            udp = struct.pack("!HHHH", 40000, IPFIX_PORT, 8 + len(payload), 0)
            # version/IHL, TOS, total length, id, DF, TTL, UDP, checksum (filled below)
            ip = struct.pack(
                "!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), i & 0xFFFF, 0x4000, 64, 17, 0, src, dst
            )
            ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
            frame = eth + ip + udp + payload
            sec, usec = divmod(i, 1_000_000)
            f.write(struct.pack("<IIII", EXPORT_TIME + sec, usec, len(frame), len(frame)))
            f.write(frame)


def _tshark_cmd(tshark: str, path: Path, mode: str) -> list[str]:
    cmd = [tshark, "-n", "-r", str(path), "-d", f"udp.port=={IPFIX_PORT},cflow"]
    if mode == "fields":
        return cmd + ["-T", "fields", "-e", "cflow.od_id", "-e", "cflow.srcaddr"]
    return cmd + ["-V"]


def _time_tshark(cmd: list[str], repeats: int, capture: bool) -> tuple[float, str]:
    best = float("inf")
    out = ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        best = min(best, elapsed)
        out = proc.stdout if capture else ""
    return best, out


def bench_tshark(
    tshark: str, workdir: Path, variants: dict[str, list[bytes]], expected: int, repeats: int
) -> dict[str, dict[str, float]]:
    """tshark rates per (datagram size, output mode), with and without start-up cost."""
    results: dict[str, dict[str, float]] = {}
    for label, messages in variants.items():
        path = workdir / f"ipfix-{label}.pcap"
        write_pcap(path, messages)
        empty = workdir / f"ipfix-{label}-template-only.pcap"
        write_pcap(empty, messages[:1])
        for mode in ("fields", "full"):
            startup, _ = _time_tshark(_tshark_cmd(tshark, empty, mode), repeats, False)
            total, out = _time_tshark(_tshark_cmd(tshark, path, mode), repeats, mode == "fields")
            if mode == "fields":
                # Every record's source address, comma-joined per datagram: proof that
                # tshark dissected each record rather than skipping unknown data.
                seen = sum(
                    line.split("\t")[1].count(",") + 1
                    for line in out.splitlines()
                    if "\t" in line and line.split("\t")[1]
                )
                if seen != expected:
                    raise RuntimeError(f"tshark saw {seen} records of {expected} in {path}")
            results[f"{label}/{mode}"] = {
                "packets": len(messages),
                "seconds": total,
                "startup": startup,
                "rate": rate(expected, total),
                "rate_without_startup": rate(expected, total - startup),
            }
    return results


# -- 4. intake over mutual TLS ------------------------------------------------------------


def make_certificates(directory: Path) -> None:
    ca = CertificateAuthority.create()
    server = ca.issue("flow-aggregator", ["localhost"], ["127.0.0.1"], server=True)
    client = ca.issue("antrea-agent", client=True)
    write_pem_files(directory / "server", ca, server)
    write_pem_files(directory / "client", ca, client)


async def _queue_records(exporters: list[ExportingProcess], per_exporter: int) -> None:
    """Each exporter queues its records; the loop runs between exporters so sending starts
    while the others are still encoding, as with concurrent exporters."""
    pool = value_pool()
    tid = antrea.EXPORTER_TEMPLATE_ID_IPV4
    for n, exporter in enumerate(exporters):
        add = exporter.add
        base = n * per_exporter
        for i in range(per_exporter):
            add(tid, pool[(base + i) % len(pool)])
        await asyncio.sleep(0)


async def _run_exporters_child(args: argparse.Namespace) -> None:
    """--role exporters: on 'go', each exporter queues its share of the value pool."""
    exporters = benchkit.make_exporters(args.port, Path(args.certs) / "client", args.exporters)
    await benchkit.run_exporters_child(
        exporters, lambda ready: _queue_records(ready, args.per_exporter)
    )


async def _run_intake(args: argparse.Namespace) -> dict[str, Any]:
    """--role intake: a collector here, exporters here (same) or in a child (separate)."""
    certs = Path(args.certs)
    total = args.exporters * args.per_exporter
    state = {"records": 0, "t_end": 0.0}
    done = asyncio.Event()

    def handler(peer: Peer, message: Message) -> None:
        state["records"] += message.record_count
        if state["records"] >= total and not done.is_set():
            state["t_end"] = time.perf_counter()
            done.set()

    ctx = server_context(
        certs / "server" / "tls.crt", certs / "server" / "tls.key", certs / "server" / "ca.crt"
    )
    collector = CollectingProcess(TransportAddress("127.0.0.1", 0, "tls"), handler, ssl_context=ctx)
    await collector.start()
    assert collector.port is not None
    result: dict[str, Any] = {"mode": args.mode, "records": total}
    child = None
    exporters: list[ExportingProcess] = []
    try:
        if args.mode == "same":
            exporters = benchkit.make_exporters(collector.port, certs / "client", args.exporters)
            result["connect_s"] = await benchkit.connect(exporters)
        else:
            child, result["connect_s"] = await benchkit.start_exporters_child(
                __file__,
                collector.port,
                [
                    f"--certs={certs}",
                    f"--exporters={args.exporters}",
                    f"--per-exporter={args.per_exporter}",
                ],
            )
        await benchkit.wait_for_sessions(collector, args.exporters)

        gc.collect()
        cpu0, t0 = benchkit.cpu_seconds(), time.perf_counter()
        if child is not None:
            await benchkit.send_go(child)
        else:
            await _queue_records(exporters, args.per_exporter)
            result["last_queued_s"] = time.perf_counter() - t0
        try:
            await asyncio.wait_for(done.wait(), INTAKE_TIMEOUT)
        except TimeoutError:
            result["error"] = f"collector saw {state['records']} of {total} records"
            return result
        elapsed = state["t_end"] - t0
        result["cpu_s"] = benchkit.cpu_seconds() - cpu0
        result["elapsed_s"] = elapsed
        result["rate"] = rate(total, elapsed)
        if child is not None:
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), 60)
            result["exporters"] = json.loads(line)
            await child.wait()
        else:
            await asyncio.gather(*(e.stop() for e in exporters))
        stats = collector.stats
        result["collector"] = {
            "messages": stats.messages,
            "malformed": dict(stats.malformed),
            "refused": dict(stats.refused),
            "lost_records": stats.lost_records,
        }
        if stats.records != total or stats.malformed or stats.lost_records:
            result["error"] = f"collector stats: {result['collector']}, records {stats.records}"
        return result
    finally:
        await benchkit.stop_child(child)
        await collector.stop()
        result["rss_mb"] = benchkit.peak_rss_mb()


def intake_in_subprocess(
    mode: str, certs: Path, exporters: int, per_exporter: int
) -> dict[str, Any]:
    options = [f"--certs={certs}", f"--exporters={exporters}", f"--per-exporter={per_exporter}"]
    return benchkit.run_variant(__file__, "intake", mode, options, INTAKE_TIMEOUT + 240)


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, help="records for encode/decode (200000)")
    parser.add_argument("--exporters", type=int, help="concurrent exporters for intake (100)")
    parser.add_argument("--per-exporter", type=int, help="records each exporter sends (1000)")
    parser.add_argument("--repeats", type=int, help="repeats of each micro-measure (3)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--no-tshark", action="store_true", help="skip the tshark peer")
    # Internal: the script runs itself as the intake process and the exporters' process.
    parser.add_argument("--role", choices=("main", "intake", "exporters"), default="main")
    parser.add_argument("--mode", choices=("same", "separate"), default="same")
    parser.add_argument("--certs", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    benchkit.fill_sizes(
        args,
        records=(20_000, 200_000),
        exporters=(10, 100),
        per_exporter=(200, 1000),
        repeats=(1, 3),
    )
    return args


def main(args: argparse.Namespace) -> int:
    benchkit.log_warnings()
    n = args.records
    template = antrea.exporter_templates()[0]
    print(
        f"bench_ipfix: {benchkit.machine()}, template {template.template_id} "
        f"({len(template.fields)} fields), {n:,} records, best of {args.repeats}"
    )
    if args.quick:
        print("--quick: a smoke run; the sizes are too small for stable rates")
    values = cycled(value_pool(), n)

    enc = bench_encode(template, values, args.repeats)
    print(
        f"\n1. encode (record mean {enc['record_bytes']:.0f} bytes, "
        f"{enc['messages']} messages of <= {MAX_MESSAGE_SIZE} bytes)"
    )
    row("Template.encode", enc["encode"], versus(enc["encode"], GOAL_ENCODE))
    row("MessagePacker.pack only", enc["pack_only"])
    row("encode + pack (full path)", enc["pack"], versus(enc["pack"], GOAL_ENCODE))
    row("ExportingProcess.add", enc["exporter_add"], "(encode + enqueue)")

    encode = template.encode
    records = [encode(v) for v in values]
    big = pack_all(template, records, MAX_MESSAGE_SIZE)
    udp = pack_all(template, records, DEFAULT_UDP_MESSAGE_SIZE)
    jumbo = pack_all(template, records, MAX_UDP4_PAYLOAD)
    del records
    dec_big = bench_decode(big, n, args.repeats)
    dec_udp = bench_decode(udp, n, args.repeats)
    print("\n2. decode (SessionDecoder.decode, template message decoded first)")
    row(f"{len(big) - 1} messages <= {MAX_MESSAGE_SIZE} B", dec_big, versus(dec_big, GOAL_DECODE))
    row(f"{len(udp) - 1} messages <= {DEFAULT_UDP_MESSAGE_SIZE} B", dec_udp, "(the tshark input)")

    tshark_rate = None
    tshark_fields_rate = None
    print("\n3. peer: tshark on the same records in a pcap (UDP to port 4739)")
    tshark = shutil.which("tshark")
    if args.no_tshark:
        print("   skipped (--no-tshark)")
    elif tshark is None:
        print("   tshark is not installed: skipped (apt-get install tshark)")
    else:
        version = subprocess.run(
            [tshark, "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
        print(f"   {version}")
        print(
            "   fields: -T fields -e cflow.od_id -e cflow.srcaddr (every record walked, one\n"
            "           value per record extracted and checked); full: -V > /dev/null (every\n"
            "           field of every record built into the tree and printed)"
        )
        with tempfile.TemporaryDirectory(prefix="bench-ipfix-") as tmp:
            ts = bench_tshark(
                tshark,
                Path(tmp),
                {f"{DEFAULT_UDP_MESSAGE_SIZE}B": udp, f"{MAX_UDP4_PAYLOAD}B": jumbo},
                n,
                max(1, min(args.repeats, 2)),
            )
        for label, r in ts.items():
            print(
                f"   {label:<13} {r['packets']:>6} datagrams {r['seconds']:7.2f} s "
                f"(start-up {r['startup']:.2f} s): {fmt_rate(r['rate'])}, "
                f"without start-up {fmt_rate(r['rate_without_startup'])}"
            )
        headline = ts[f"{DEFAULT_UDP_MESSAGE_SIZE}B/full"]
        tshark_rate = headline["rate"]
        tshark_fields_rate = ts[f"{DEFAULT_UDP_MESSAGE_SIZE}B/fields"]["rate"]
        print(
            f"   ours on the same {DEFAULT_UDP_MESSAGE_SIZE}-byte datagrams: "
            f"{dec_udp / headline['rate_without_startup']:.1f}x tshark -V, "
            f"{dec_udp / ts[f'{DEFAULT_UDP_MESSAGE_SIZE}B/fields']['rate_without_startup']:.1f}x "
            "tshark -T fields (start-up excluded)"
        )
    del big, udp, jumbo, values

    total = args.exporters * args.per_exporter
    print(
        f"\n4. intake over mutual TLS: {args.exporters} exporters x {args.per_exporter} records "
        f"= {total:,} records to one collector on 127.0.0.1 (each variant in a fresh process)"
    )
    intake: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ipfix-certs-") as tmp:
        make_certificates(Path(tmp))
        for mode in ("same", "separate"):
            intake[mode] = intake_in_subprocess(mode, Path(tmp), args.exporters, args.per_exporter)
    failed = False
    for mode, r in intake.items():
        title = (
            "exporters in the collector's loop (one core for both sides)"
            if mode == "same"
            else "exporters in a child process (collector's own intake)"
        )
        print(f"   {title}:")
        if "error" in r:
            failed = True
            print(f"     FAILED: {r['error']}")
            continue
        print(f"     {fmt_rate(r['rate'])}  {versus(r['rate'], GOAL_INTAKE)}")
        line = (
            f"     {r['elapsed_s']:.2f} s from first queueing to the last record at the handler; "
            f"{r['collector']['messages']} messages; connect+handshake of all {args.exporters}: "
            f"{r['connect_s']:.2f} s"
        )
        print(line)
        cpu = f"     collector process CPU {r['cpu_s']:.2f} s ({r['cpu_s'] / r['elapsed_s']:.0%})"
        if "last_queued_s" in r:
            cpu += f"; the last exporter finished queueing after {r['last_queued_s']:.2f} s"
        if "exporters" in r:
            ex = r["exporters"]
            cpu += (
                f"; exporters' process CPU {ex['cpu_s']:.2f} s, done sending after "
                f"{ex['elapsed_s']:.2f} s, peak RSS {ex['rss_mb']:.0f} MB"
            )
        print(cpu)
        print(f"     peak RSS {r['rss_mb']:.0f} MB (go-ipfix reports {GO_IPFIX_RSS_MB} MB)")
    print(f"   goal >= {GOAL_INTAKE:,} records/s (go-ipfix BenchmarkMultipleExportersToCollector)")

    def ok(mode: str, key: str) -> Any:
        return None if "error" in intake[mode] else intake[mode].get(key)

    summary = {
        "encode_records_per_s": round(enc["encode"]),
        "pack_records_per_s": round(enc["pack"]),
        "decode_records_per_s": round(dec_big),
        "tshark_records_per_s": None if tshark_rate is None else round(tshark_rate),
        "intake_tls_records_per_s_same_process": maybe_round(ok("same", "rate")),
        "intake_tls_records_per_s_separate_exporters": maybe_round(ok("separate", "rate")),
        "rss_mb": maybe_round(intake["same"].get("rss_mb")),
        "tshark_fields_records_per_s": maybe_round(tshark_fields_rate),
        "decode_udp_records_per_s": round(dec_udp),
        "rss_mb_collector_only": maybe_round(intake["separate"].get("rss_mb")),
    }
    print()
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    benchkit.dispatch(parse_args(), main, _run_exporters_child, "intake", _run_intake)
