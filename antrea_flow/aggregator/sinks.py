"""Where aggregated records go: an IPFIX collector, and a JSON-lines file.

Each sink has its own bounded queue and worker, and `send` never blocks: a slow or absent
collector, or a slow disk, cannot hold up the intake or another sink. What a sink must
drop is counted by reason.

Every sink counts the records it `accepted` and those it `settled` (written, delivered, or
dropped after it accepted them): both only grow, and once `settled` reaches what `accepted`
was at some moment, the sink holds nothing of what it took before it. The checkpoint counts
a record as exported only then, so a crash loses nothing that waited in a sink.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import Counter
from pathlib import Path

import orjson

from ..ipfix.address import TransportAddress
from ..ipfix.antrea import (
    AGGREGATOR_TEMPLATE_ID_IPV4,
    AGGREGATOR_TEMPLATE_ID_IPV6,
    FlowRecord,
    aggregator_templates,
)
from ..ipfix.exporting import ExportingProcess
from ..ipfix.render import json_value
from ..logutil import LogOnce

log = logging.getLogger(__name__)

JSON_QUEUE_RECORDS = 65536


class IPFIXSink:
    """Aggregated records to an IPFIX collector (templates 256 IPv4, 257 IPv6)."""

    name = "ipfix"

    def __init__(
        self,
        address: TransportAddress,
        observation_domain_id: int,
        template_refresh: float,
        max_message_size: int | None = None,
    ):
        self.exporter = ExportingProcess(
            address,
            aggregator_templates(),
            observation_domain_id,
            max_message_size=max_message_size,
            template_refresh_interval=template_refresh,
        )
        self.accepted = 0

    def start(self) -> None:
        self.exporter.start()

    def send(self, record: FlowRecord) -> None:
        ipv6 = "sourceIPv6Address" in record
        template = AGGREGATOR_TEMPLATE_ID_IPV6 if ipv6 else AGGREGATOR_TEMPLATE_ID_IPV4
        if self.exporter.add_mapping(template, record):
            self.accepted += 1

    @property
    def settled(self) -> int:
        return self.exporter.stats.records_settled

    @property
    def sent(self) -> int:
        return self.exporter.stats.records_written  # a counter: never decreases

    @property
    def dropped(self) -> Counter[str]:
        return self.exporter.stats.records_dropped

    async def stop(self) -> None:
        await self.exporter.stop()


class JSONLinesSink:
    """Aggregated records as JSON objects, one per line, appended to a file by a thread.

    `send` runs on the aggregator's loop, which owns `accepted` and `queue_full`; the writer
    thread owns `sent`, `write_errors` and `settled`. Each counter has that one writer, and
    readers on other threads read it whole (an int, replaced, never changed in place)."""

    name = "json"

    def __init__(self, path: str):
        """Opens the file now, creating its directory, so that a path that cannot be
        written stops start-up (OSError) before anything else is set up."""
        self.path = Path(path)
        self.sent = 0
        self.accepted = 0
        self.settled = 0
        self.queue_full = 0
        self.write_errors = 0
        self._queue: queue.Queue[FlowRecord | None] = queue.Queue(JSON_QUEUE_RECORDS)
        self._thread = threading.Thread(target=self._write, name="json-sink", daemon=True)
        self._log_once = LogOnce(log)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")

    def start(self) -> None:
        self._thread.start()

    def send(self, record: FlowRecord) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.queue_full += 1
        else:
            self.accepted += 1

    @property
    def dropped(self) -> dict[str, int]:
        """Records not written, by reason."""
        return {"queue_full": self.queue_full, "write_error": self.write_errors}

    def _write(self) -> None:
        try:
            self._write_until_stopped(self._file)
        finally:
            # Closing flushes again what a failed write left buffered: already counted
            # and logged, so its error must not end the thread with a traceback.
            with contextlib.suppress(OSError):
                self._file.close()

    def _write_until_stopped(self, out) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            lines = [record]
            while len(lines) < 1024:  # write what is waiting in one go
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._flush(out, lines)
                    return
                lines.append(more)
            self._flush(out, lines)

    def _flush(self, out, records: list[FlowRecord]) -> None:
        try:
            dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
            out.write(b"".join([dumps(r, default=json_value, option=newline) for r in records]))
            out.flush()
            self.sent += len(records)
        except OSError as exc:
            self.write_errors += len(records)
            self._log_once(
                ("write_error", exc.errno),
                logging.ERROR,
                "cannot write %s: %s; dropping records (counted as json:write_error)",
                self.path,
                exc,
            )
        self.settled += len(records)

    async def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5.0)
