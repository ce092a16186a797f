"""The `collector` command: receive IPFIX and print one line per data record.

It plays the go-ipfix collector's role: a sink to point an exporter or the aggregator at,
whose output is easy to read and to parse.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from typing import TextIO

from .errors import UsageError
from .ipfix.address import parse_address
from .ipfix.collecting import CollectingProcess, Peer
from .ipfix.messages import Message
from .ipfix.render import json_line, message_records, text_line
from .tls import server_context

log = logging.getLogger(__name__)


def build_collector(args, out: TextIO) -> CollectingProcess:
    address = parse_address(args.address, default_protocol="tcp", port_required=True, listen=True)
    ssl_context = None
    if address.protocol == "tls":
        missing = [f"--{n}" for n in ("ca", "cert", "key") if not getattr(args, n)]
        if missing:
            raise UsageError(f"--address {args.address} uses tls and needs {', '.join(missing)}")
        try:
            ssl_context = server_context(args.cert, args.key, args.ca)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(
                f"cannot load TLS files (--ca {args.ca}, --cert {args.cert}, --key {args.key}): "
                f"{getattr(exc, 'strerror', None) or exc}"
                + (f": {exc.filename}" if getattr(exc, "filename", None) else "")
            ) from None
    render = json_line if args.output == "json" else text_line

    def handle(peer: Peer, message: Message) -> None:
        lines = [render(record) for record in message_records(peer, message)]
        if lines:
            out.write("\n".join(lines) + "\n")
            out.flush()

    return CollectingProcess(address, handle, ssl_context=ssl_context)


async def run(collector: CollectingProcess) -> None:
    await collector.start()
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
    asyncio.run(run(collector))
    return 0
