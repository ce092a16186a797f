"""The ClickHouse sink: exported records inserted in columnar batches (Arrow) into the
`flows` table (chschema), in chDB inside the aggregator (`file://` URLs, the default) or
in a ClickHouse server or cluster over HTTP(S).

The intake never waits for the database: `send` appends to a bounded backlog, and a writer
thread turns what arrives into Arrow tables and inserts them every `commitInterval`. While
the database is slow or down, the writer holds up to `queueSize` rows, then drops the
oldest (counted), and reconnects with backoff; a batch that failed is retried whole with
its deduplication token, so a server that stored it before the failure does not store it
twice.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa

from ..flowfilter import FlowFilter
from ..ipfix.antrea import FlowRecord
from ..logutil import LogOnce
from ..metrics import counter, gauge
from . import chschema, history
from .chschema import COLUMNS, FLOWS, SCHEMA_VERSION, VERSION_TABLE, Column, records_table
from .config import ClickHouseConfig

log = logging.getLogger(__name__)
# The client logs a warning of its own for every failed request; the sink says once that
# the database is down, and when it is back.
logging.getLogger("clickhouse_connect").setLevel(logging.ERROR)

BACKLOG_RECORDS = 65536  # records between the loop and the writer, before they are columns
WAKE_RECORDS = 16384  # the writer turns records into columns at least this often
INSERT_ROWS = 65536  # rows of one insert
FLUSH_TIMEOUT = 10.0  # what stop() gives the last inserts (as upstream)
BACKOFF_MAX = 30.0


class DatabaseError(Exception):
    """The database refused or could not be reached; the message says which and why."""


class Database:
    """ClickHouse through clickhouse-connect: chDB inside this process for file:// URLs (one
    directory per process, chDB's rule), a server's HTTP interface otherwise. The same
    client, statements and columnar inserts either way. The sink's writer thread uses it,
    and the flow API's threads read history through it: each call holds `_lock`."""

    def __init__(self, config: ClickHouseConfig):
        self.config = config
        self.database = config.database
        self._client: Any = None
        self._lock = threading.RLock()

    def connect(self) -> None:
        with self._lock:
            self._connect()

    def _connect(self) -> None:
        import clickhouse_connect

        config = self.config
        parts = urlsplit(config.url)
        options: dict[str, Any]
        if config.embedded:
            # The engine clickhouse-connect's "chdb" interface runs in this process (250 MB
            # of libraries): loaded here, so that its absence says what is missing.
            try:
                import chdb
            except ImportError as exc:
                raise DatabaseError(
                    f"{self.where}: chDB, the embedded engine, cannot be loaded ({exc}); "
                    "install the chdb package, or give an http(s):// databaseURL"
                ) from None
            log.debug("embedded ClickHouse: chDB %s", chdb.__version__)
            options = {"interface": "chdb", "path": parts.path}
        else:
            options = {
                "interface": parts.scheme,
                "host": parts.hostname,
                "port": parts.port,
                "username": config.username,
                "password": config.password,
                "compress": "lz4" if config.compress else False,
                "verify": not config.insecure_skip_verify,
                "ca_cert": config.ca_cert or None,
                "connect_timeout": 10,
                "send_receive_timeout": 60,
            }
        self._client = self._guarded(
            clickhouse_connect.get_client, show_clickhouse_errors=True, **options
        )
        self.command(f"CREATE DATABASE IF NOT EXISTS {config.database}")

    @property
    def where(self) -> str:
        kind = "embedded ClickHouse at" if self.config.embedded else "ClickHouse at"
        return f"{kind} {self.config.url}"

    def _guarded(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from clickhouse_connect.driver.exceptions import ClickHouseError

        try:
            return method(*args, **kwargs)
        except (ClickHouseError, OSError) as exc:
            self.close()
            message = " ".join(str(exc).split())  # one line
            raise DatabaseError(f"{self.where}: {message}") from None

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """The client's method `name`, under the lock; DatabaseError when not connected."""
        with self._lock:
            if self._client is None:
                raise DatabaseError(f"{self.where}: not connected")
            return self._guarded(getattr(self._client, name), *args, **kwargs)

    def command(self, sql: str) -> None:
        self._call("command", sql)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self._call("query", sql).result_rows]

    def insert(self, table: pa.Table, token: str) -> None:
        self._call(
            "insert_arrow",
            f"{self.database}.{FLOWS}",
            table,
            settings={
                "insert_deduplication_token": token,
                "deduplicate_blocks_in_dependent_materialized_views": 1,
            },
        )

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()
                self._client = None


def prepare(database: Database, ttl_seconds: int) -> tuple[Column, ...]:
    """Make the schema current in a connected database; the columns to insert.

    A database without `flows` gets the whole schema and its version. A `flows` table that
    another tool created (Theia's, or the Distributed table of a cluster) is written as it
    is: the columns it has. A schema newer than this release's is refused."""
    name = database.database
    tables = {row[0] for row in database.rows(f"SHOW TABLES FROM {name}")}
    if VERSION_TABLE in tables:
        (version,) = database.rows(f"SELECT max(version) FROM {name}.{VERSION_TABLE}")[0]
        if version > SCHEMA_VERSION:
            raise DatabaseError(
                f"the schema is version {version}, written by a later release of antrea-flow; "
                f"this one writes version {SCHEMA_VERSION}"
            )
    elif FLOWS in tables:
        present = {row[0] for row in database.rows(f"DESCRIBE TABLE {name}.{FLOWS}")}
        columns = tuple(c for c in COLUMNS if c.name in present)
        missing = [c.name for c in COLUMNS if c.name not in present]
        if missing:
            log.warning(
                "ClickHouse: table %s was not created by antrea-flow and lacks %d of its "
                "columns (%s); records are inserted without them",
                FLOWS,
                len(missing),
                ", ".join(missing),
            )
        return columns
    else:
        for statement in chschema.create_statements(name, ttl_seconds):
            database.command(statement)
        log.info("ClickHouse: created the flows table and its views (schema %d)", SCHEMA_VERSION)
    return COLUMNS


class _Backlog:
    """Records on their way from the aggregator's loop (`put`) to the writer thread
    (`take`), with the sink's counters. Shared by those two threads: every field changes
    under `_lock`; readers on other threads read the ints whole."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.accepted = 0
        self.settled = 0  # inserted, or dropped and counted
        self.dropped: Counter[str] = Counter()
        self.stopping = False
        self._records: deque[FlowRecord] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)

    def put(self, record: FlowRecord) -> None:
        with self._lock:
            if len(self._records) >= self.capacity:  # the writer is not keeping up
                self._records.popleft()
                self._count_dropped("queue_full", 1)
            self._records.append(record)
            self.accepted += 1
            if len(self._records) == WAKE_RECORDS:
                self._ready.notify()

    def take(self, timeout: float) -> list[FlowRecord]:
        """What waits, once there is enough of it, or after `timeout`, or at stop."""
        with self._ready:
            self._ready.wait_for(
                lambda: self.stopping or len(self._records) >= WAKE_RECORDS, timeout
            )
            taken = list(self._records)
            self._records.clear()
            return taken

    def stop(self) -> None:
        with self._ready:
            self.stopping = True
            self._ready.notify()

    def settle(self, count: int, dropped_as: str | None = None) -> None:
        with self._lock:
            if dropped_as is None:
                self.settled += count
            else:
                self._count_dropped(dropped_as, count)

    def _count_dropped(self, reason: str, count: int) -> None:
        self.dropped[reason] += count
        self.settled += count


@dataclass(slots=True)
class _Batch:
    table: pa.Table
    token: str  # the same on every retry: a server that stored it ignores it again


class ClickHouseSink:
    """Exported records to ClickHouse. `send` runs on the aggregator's loop; the writer
    thread owns the database, the pending batches and `sent`, `inserts` and
    `insert_failures`; the backlog holds the counters both change."""

    name = "clickhouse"

    def __init__(
        self,
        config: ClickHouseConfig,
        database: Database | None = None,
        clock: Callable[[], float] = time.monotonic,
        flush_timeout: float = FLUSH_TIMEOUT,
    ):
        self.config = config
        self.flush_timeout = flush_timeout
        self.database = database or Database(config)
        self.clock = clock
        self.sent = 0
        self.inserts = 0
        self.insert_failures = 0
        self.insert_seconds = 0.0  # of the last successful insert
        self._backlog = _Backlog(BACKLOG_RECORDS)
        self._pending: deque[_Batch] = deque()  # converted, not yet inserted; oldest first
        self._loose: list[pa.Table] = []  # converted since the last commit, no batch yet
        self._pending_rows = 0
        self._columns: tuple[Column, ...] | None = None  # set once connected and prepared
        self._down = False  # the last commit failed
        self._log_once = LogOnce(log)
        self._thread = threading.Thread(target=self._write, name="clickhouse-sink", daemon=True)

    @property
    def accepted(self) -> int:
        return self._backlog.accepted

    @property
    def settled(self) -> int:
        return self._backlog.settled

    @property
    def dropped(self) -> dict[str, int]:
        return dict(self._backlog.dropped)

    @property
    def connected(self) -> bool:
        return self._columns is not None

    @property
    def pending(self) -> int:
        """Records taken and not yet inserted or dropped."""
        return self.accepted - self.settled

    def history(self, flow_filter: FlowFilter, last: int) -> tuple[list[dict[str, Any]], int]:
        """The latest `last` stored records `flow_filter` matches, oldest first, and how many
        records the sink had settled when it asked (those it took later may not be stored
        yet). DatabaseError while the database cannot be used. Called on API threads."""
        columns = self._columns
        if columns is None:
            raise DatabaseError(f"{self.database.where}: not connected yet")
        settled = self.settled
        sql = history.select(self.database.database, columns, flow_filter, last)
        found = history.records(columns, self.database.rows(sql))
        found = [record for record in found if flow_filter.matches(record)]
        found.reverse()
        return found, settled

    @property
    def held_rows(self) -> int:
        """Of them, those already turned into columns, waiting for their insert."""
        return self._pending_rows

    def metrics(self, prefix: str):
        yield gauge(
            f"{prefix}connected",
            "1 when the last insert (or connection) to ClickHouse succeeded.",
            int(self.connected),
        )
        yield gauge(
            f"{prefix}pending_records",
            "Records waiting for their insert into ClickHouse (at most queueSize, then the "
            "oldest are dropped).",
            self.pending,
        )
        yield counter(f"{prefix}inserts_total", "Batches inserted into ClickHouse.", self.inserts)
        yield counter(
            f"{prefix}insert_failures_total",
            "Inserts (or connections) that failed; the batch is kept and retried.",
            self.insert_failures,
        )
        yield gauge(
            f"{prefix}last_insert_seconds",
            "How long the last successful insert took.",
            self.insert_seconds,
        )

    def start(self) -> None:
        self._thread.start()

    def send(self, record: FlowRecord) -> None:
        self._backlog.put(record)

    async def stop(self) -> None:
        self._backlog.stop()
        self._thread.join(self.flush_timeout + 5.0)

    # -- the writer thread --------------------------------------------------------------

    def _write(self) -> None:
        try:
            self._write_until_stopped()
            self._flush()
        finally:
            if self._pending_rows:
                # Not settled: the checkpoint keeps them for the agents' replays.
                log.error(
                    "ClickHouse: %d records not inserted at stop (%s)",
                    self._pending_rows,
                    self.config.url,
                )
            self.database.close()
            self._columns = None

    def _write_until_stopped(self) -> None:
        interval = self.config.commit_interval
        backoff = 1.0
        # Connect and prepare the schema at once: a database that cannot be used shows at
        # start-up, not a commit interval later.
        next_commit = self.clock() + (interval if self._commit() else backoff)
        while True:
            records = self._backlog.take(max(0.0, next_commit - self.clock()))
            if records:
                self._convert(records)
            if self._backlog.stopping:
                return
            now = self.clock()
            if now >= next_commit:
                if self._commit():
                    backoff, next_commit = 1.0, now + interval
                else:
                    next_commit = now + backoff
                    backoff = min(backoff * 2, BACKOFF_MAX)

    def _flush(self) -> None:
        """At stop: what is left, retried for at most `flush_timeout`."""
        records = self._backlog.take(0.0)
        if records:
            self._convert(records)
        deadline = time.monotonic() + self.flush_timeout
        while self._pending_rows and not self._commit():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(1.0, left))

    def _convert(self, records: Sequence[FlowRecord]) -> None:
        try:
            table = records_table(records)
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
            # A value that does not fit its column: these records cannot be stored.
            self._log_once("convert", logging.ERROR, "ClickHouse: records dropped: %s", exc)
            self._backlog.settle(len(records), "bad_value")
            return
        self._loose.append(table)
        self._pending_rows += table.num_rows
        self._trim()

    def _trim(self) -> None:
        """Hold at most queue_size rows: the oldest go first (as upstream)."""
        excess = self._pending_rows - self.config.queue_size
        while excess > 0:
            if self._pending:
                oldest = self._pending[0]
                if oldest.table.num_rows <= excess:
                    self._pending.popleft()
                    cut = oldest.table.num_rows
                else:
                    oldest.table = oldest.table.slice(excess)
                    cut = excess
            else:
                table = self._loose[0]
                cut = min(excess, table.num_rows)
                if cut == table.num_rows:
                    self._loose.pop(0)
                else:
                    self._loose[0] = table.slice(cut)
            self._pending_rows -= cut
            excess -= cut
            self._backlog.settle(cut, "queue_full")
            self._log_once(
                "queue_full",
                logging.ERROR,
                "ClickHouse: %s is not taking records fast enough; the oldest are dropped "
                "beyond queueSize (%d), counted as clickhouse:queue_full",
                self.config.url,
                self.config.queue_size,
            )

    def _commit(self) -> bool:
        """Insert every pending batch, oldest first; False when the database failed."""
        if self._loose:
            tables = self._loose
            table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
            # Batches of at most INSERT_ROWS: 65,536 rows go in 2.5 to 4 times as fast per
            # row as 400,000 at once (the engine sorts each part and each view's).
            for start in range(0, table.num_rows, INSERT_ROWS):
                self._pending.append(_Batch(table.slice(start, INSERT_ROWS), uuid.uuid4().hex))
            self._loose = []
        try:
            if self._columns is None:
                self.database.connect()
                self._columns = prepare(self.database, int(self.config.ttl))
                log.info("ClickHouse: writing to %s", self.config.url)
            while self._pending:
                batch = self._pending[0]
                started = time.perf_counter()
                table = batch.table
                if len(self._columns) < len(COLUMNS):
                    table = table.select([c.name for c in self._columns])
                self.database.insert(table, batch.token)
                self.insert_seconds = time.perf_counter() - started
                self._pending.popleft()
                rows = table.num_rows
                self._pending_rows -= rows
                self.sent += rows
                self.inserts += 1
                self._backlog.settle(rows)
                if self.config.debug:
                    log.info("ClickHouse: inserted %d records in %.3fs", rows, self.insert_seconds)
            if self._down:
                log.info("ClickHouse: %s takes records again", self.config.url)
                self._down = False
            return True
        except DatabaseError as exc:
            self.insert_failures += 1
            self._columns = None
            self.database.close()
            # Once per outage; its end is said too.
            log.log(
                logging.DEBUG if self._down else logging.ERROR,
                "%s; keeping up to queueSize (%d) records and retrying",
                exc,
                self.config.queue_size,
            )
            self._down = True
            return False
