"""The `collector` command: receive IPFIX and print one line per data record.

It plays the go-ipfix collector's role: a sink to point an exporter or the aggregator at,
whose output is easy to read and to parse.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import TextIO

from .errors import UsageError, cannot_listen
from .ipfix.address import parse_address
from .ipfix.collecting import CollectingProcess, Peer
from .ipfix.messages import Message
from .ipfix.render import json_line, message_records, text_line
from .tls import TLSFileError, check_pem_files, server_context

log = logging.getLogger(__name__)


_TLS_FLAGS = ("ca", "cert", "key")


def build_collector(args, out: TextIO) -> CollectingProcess:
    address = parse_address(args.address, default_protocol="tcp", port_required=True, listen=True)
    ssl_context = None
    if address.protocol == "tls":
        missing = [f"--{n}" for n in _TLS_FLAGS if not getattr(args, n)]
        if missing:
            raise UsageError(f"--address {args.address} uses tls and needs {', '.join(missing)}")
        try:
            labels = (f"--ca {args.ca}", f"--cert {args.cert}", f"--key {args.key}")
            check_pem_files(args.ca, args.cert, args.key, labels)
        except TLSFileError as exc:
            raise UsageError(str(exc)) from None
        ssl_context = server_context(args.cert, args.key, args.ca)
    elif given := [f"--{n} {getattr(args, n)}" for n in _TLS_FLAGS if getattr(args, n)]:
        raise UsageError(
            f"--address {args.address} is {address.protocol}, yet {', '.join(given)} given: "
            "--ca/--cert/--key need a tls address (HOST:PORT:tls)"
        )
    render = json_line if args.output == "json" else text_line

    def handle(peer: Peer, message: Message) -> None:
        lines = [render(record) for record in message_records(peer, message)]
        if lines:
            out.write("\n".join(lines) + "\n")
            out.flush()

    return CollectingProcess(address, handle, ssl_context=ssl_context)


async def run(collector: CollectingProcess, address: str) -> None:
    try:
        await collector.start()
    except OSError as exc:
        raise cannot_listen(f"--address {address}", collector.address.host, exc) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await collector.stop()
        stats = collector.stats
        log.info(
            "collector stopped: %d records in %d messages from %d sessions; malformed %s; "
            "refused %s; lost (by sequence numbers) %d",
            stats.records,
            stats.messages,
            stats.sessions_total,
            dict(stats.malformed) or 0,
            dict(stats.refused) or 0,
            stats.lost_records,
        )


def main(args) -> int:
    collector = build_collector(args, sys.stdout)
    asyncio.run(run(collector, args.address))
    return 0
