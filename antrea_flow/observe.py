"""`antrea-flow observe`: the exported flow records, filtered and printed the way
`hubble observe` prints them, from the aggregator's flow API or from a JSON-lines file.

Filters are flowfilter's: each flag's values any-of, different flags all-of. The server
applies them (the same code), a file is filtered here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode, urlsplit

from .codes import ACTION_DROP, ACTION_REJECT
from .errors import UsageError
from .flowfilter import (
    FILTER_PARAMETERS,
    FLOW_TYPE_NAMES,
    PROTOCOL_NAMES,
    FilterError,
    FlowFilter,
    Record,
    destination_ip,
    flow_end,
    parse_filter,
    source_ip,
    verdict,
)

DEFAULT_SERVER = "http://127.0.0.1:10349"
PORT_FORWARD = "kubectl -n flow-aggregator port-forward deployment/flow-aggregator 10349"
FOLLOW_POLL = 0.5  # seconds between looks at a followed file
ALL = 1_000_000  # `last` when --since or --until ask for everything in a time range

_SHORT = {"namespace": "-n"}
_COLORS = {"ALLOWED": "\033[32m", "DROPPED": "\033[31m", "REJECTED": "\033[33m"}
_RESET = "\033[0m"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "observe",
        help="print exported flows, filtered like `hubble observe`",
        description="Print the flow records the aggregator exported: the latest ones, or "
        "new ones as they come (-f). A flag given twice matches either value; different "
        "flags must all match.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--server", help=f"the aggregator's flow API (default {DEFAULT_SERVER})", metavar="URL"
    )
    source.add_argument("--file", help="a JSON-lines file of records (the JSON sink's)")
    source.add_argument(
        "--clickhouse",
        metavar="URL",
        help="the ClickHouse sink's database: http(s)://HOST:PORT (user from CH_USERNAME and "
        "CH_PASSWORD) or file:///DIRECTORY of an embedded one no aggregator holds open",
    )
    p.add_argument("--database", default="default", help="with --clickhouse (default: default)")
    p.add_argument("--token", help="the API's token (apiToken); or ANTREA_FLOW_API_TOKEN")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")
    p.add_argument("--last", type=str, help="the N latest matching flows (default 20)")
    p.add_argument(
        "-o",
        "--output",
        default="compact",
        choices=("compact", "table", "json"),
        help="compact: one line per flow (default); table; json: one object per line",
    )
    p.add_argument("--no-color", action="store_true", help="no colours (also NO_COLOR=1)")
    for name, form in FILTER_PARAMETERS.items():
        flags = [f"--{name}"] + ([_SHORT[name]] if name in _SHORT else [])
        p.add_argument(*flags, action="append", default=[], metavar="VALUE", help=form)


def main(args: argparse.Namespace) -> int:
    params = {name: getattr(args, name.replace("-", "_")) for name in FILTER_PARAMETERS}
    try:
        flow_filter = parse_filter(params, time.time())
    except FilterError as exc:
        raise UsageError(f"--{exc}") from None
    last = _last(args, params)
    color = not args.no_color and not os.environ.get("NO_COLOR") and sys.stdout.isatty()
    printer = Printer(args.output, color, sys.stdout, flush_each=args.follow)
    try:
        if args.file:
            records = _file_records(Path(args.file), flow_filter, last, args.follow)
        elif args.clickhouse:
            if args.follow:
                raise UsageError("--follow: reads --server or --file; --clickhouse is history")
            records = iter(_stored_records(args.clickhouse, args.database, flow_filter, last))
        else:
            token = args.token or os.environ.get("ANTREA_FLOW_API_TOKEN", "")
            server = (args.server or DEFAULT_SERVER).rstrip("/")
            records = server_records(server, params, last, args.follow, token)
        for record in records:
            printer.print(record)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `| head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python's advice for SIGPIPE
    printer.flush()
    return 0


def _last(args: argparse.Namespace, params: dict[str, list[str]]) -> int:
    if args.last is not None:
        try:
            last = int(args.last)
        except ValueError:
            last = -1
        if not 0 <= last <= ALL:
            raise UsageError(f"--last: {args.last!r} is not valid; expected a number 0-{ALL}")
        return last
    if params["since"] or params["until"]:
        return ALL
    return 0 if args.follow else 20


def server_records(
    server: str, params: dict[str, list[str]], last: int, follow: bool, token: str
) -> Iterator[dict[str, Any]]:
    """The records the flow API at `server` sends; UsageError when it cannot be reached or
    refuses the request."""
    scheme = urlsplit(server).scheme
    if scheme not in ("http", "https"):
        raise UsageError(f"--server: {server!r} is not valid; expected http://HOST:PORT")
    query = [(name, value) for name, values in params.items() for value in values]
    query.append(("last", str(last)))
    if follow:
        query.append(("follow", "true"))
    request = urllib.request.Request(f"{server}/api/v1/flows?{urlencode(query)}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        response = urllib.request.urlopen(request, timeout=None if follow else 60)
    except urllib.error.HTTPError as exc:
        raise UsageError(_refusal(server, exc)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UsageError(
            f"cannot reach the flow API at {server} ({reason}); is the aggregator running with "
            f"apiBindAddress? In a cluster: {PORT_FORWARD}"
        ) from None
    with response:
        for line in response:
            if not line.strip():
                continue  # a keep-alive
            try:
                message = json.loads(line)
            except ValueError:  # cut short: the server closed the stream mid-record
                print("antrea-flow observe: the stream ended in the middle of a record",
                      file=sys.stderr)  # fmt: skip
                return
            if "flow" in message:
                yield message["flow"]
            elif "error" in message:
                print(f"antrea-flow observe: {message['error']}", file=sys.stderr)


def _stored_records(
    url: str, database_name: str, flow_filter: FlowFilter, last: int
) -> list[dict[str, Any]]:
    """The latest `last` matching records of the ClickHouse sink's `flows` table, oldest
    first (read only: nothing is created)."""
    from .aggregator import history  # pyarrow, and chDB for file:// URLs
    from .aggregator.chschema import COLUMNS, FLOWS
    from .aggregator.clickhouse import Database, DatabaseError
    from .aggregator.config import (
        DATABASE_FORM,
        DATABASE_NAME,
        DATABASE_URL_FORM,
        ClickHouseConfig,
        credentials,
        database_url,
    )

    try:
        url = database_url(url)
    except ValueError as exc:
        raise UsageError(f"--clickhouse: {url!r} {exc}; expected {DATABASE_URL_FORM}") from None
    if not DATABASE_NAME.fullmatch(database_name):
        raise UsageError(f"--database: {database_name!r} is not valid; expected {DATABASE_FORM}")
    username, password = credentials()
    config = ClickHouseConfig(url, database_name, username=username, password=password)
    database = Database(config)
    try:
        database.connect()
        present = {row[0] for row in database.rows(f"DESCRIBE TABLE {database_name}.{FLOWS}")}
        columns = [c for c in COLUMNS if c.name in present]
        rows = database.rows(history.select(database_name, columns, flow_filter, last))
    except DatabaseError as exc:
        raise UsageError(str(exc)) from None
    finally:
        database.close()
    found = [r for r in history.records(columns, rows) if flow_filter.matches(r)]
    found.reverse()
    return found


def _refusal(server: str, exc: urllib.error.HTTPError) -> str:
    try:
        message = json.loads(exc.read())["error"]
    except (ValueError, KeyError, TypeError):
        message = exc.reason
    if exc.code == 400:  # the server names the parameter: it is the flag of that name
        return f"--{message}"
    if exc.code == 401:
        return f"{server}: {message} (--token, or ANTREA_FLOW_API_TOKEN)"
    return f"{server}: HTTP {exc.code}: {message}"


def _file_records(
    path: Path, flow_filter: FlowFilter, last: int, follow: bool
) -> Iterator[dict[str, Any]]:
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise UsageError(f"--file: {str(path)!r}: {exc.strerror}") from None
    bad = [0]
    try:
        matching = [r for r in _decoded(stream, bad) if flow_filter.matches(r)]
        yield from matching[len(matching) - last :] if last else ()
        while follow:
            more = [r for r in _decoded(stream, bad) if flow_filter.matches(r)]
            yield from more
            if more:
                continue
            time.sleep(FOLLOW_POLL)
            try:
                now = path.stat()
            except FileNotFoundError:
                continue  # between a rotation's rename and the new file
            if now.st_ino != os.fstat(stream.fileno()).st_ino:  # replaced (logrotate)
                stream.close()
                stream = path.open("rb")
            elif now.st_size < stream.tell():  # truncated in place
                stream.seek(0)
    finally:
        stream.close()


def _decoded(stream: IO[bytes], bad: list[int]) -> Iterator[dict[str, Any]]:
    """The complete lines' records; an incomplete last line is left for the next read."""
    while True:
        position = stream.tell()
        line = stream.readline()
        if not line:
            return
        if not line.endswith(b"\n"):
            stream.seek(position)
            return
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if line.strip() and not bad[0]:
                print(
                    f"antrea-flow observe: skipping lines that are not JSON objects "
                    f"(the first: {line[:60]!r})",
                    file=sys.stderr,
                )
            bad[0] += 1
            continue
        yield record


class Printer:
    """Records as compact lines, a table or JSON lines."""

    COLUMNS = ("TIME", "SOURCE", "DESTINATION", "SERVICE", "PROTO", "TYPE", "VERDICT", "POLICY",
               "BYTES")  # fmt: skip
    WIDTHS = (19, 32, 32, 24, 6, 13, 8, 40, 20)

    def __init__(self, output: str, color: bool, out: IO[str], flush_each: bool = False):
        self.output, self.color, self.out = output, color, out
        self.flush_each = flush_each  # following: each line as soon as it comes
        self._header = False

    def print(self, record: Record) -> None:
        if self.output == "json":
            self.out.write(json.dumps(record) + "\n")
        elif self.output == "table":
            if not self._header:
                self._row(self.COLUMNS)
                self._header = True
            self._row(table_row(record))
        else:
            self.out.write(compact(record, self.color) + "\n")
        if self.flush_each:
            self.out.flush()

    def _row(self, cells: Iterable[str]) -> None:
        line = "  ".join(_cut(c, w).ljust(w) for c, w in zip(cells, self.WIDTHS, strict=True))
        self.out.write(line.rstrip() + "\n")

    def flush(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.out.flush()


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def endpoint(record: Record, side: str) -> str:
    """ns/pod:port, or the address and port for what is not a Pod."""
    get = record.get
    name, namespace = get(f"{side}PodName"), get(f"{side}PodNamespace")
    if name:
        host = f"{namespace}/{name}" if namespace else name
    else:
        ip = source_ip(record) if side == "source" else destination_ip(record)
        host = f"[{ip}]" if ":" in ip else ip
    port = get(f"{side}TransportPort")
    if get("protocolIdentifier") in (1, 58) or port is None:  # ICMP has no ports
        return host
    return f"{host}:{port}"


def policy_text(record: Record) -> str:
    """The rules that decided: for a denied flow the one that denied it, for an allowed one
    those that allowed it (egress first)."""
    denied = verdict(record) != "ALLOWED"
    parts = []
    for direction in ("egress", "ingress"):
        name = record.get(f"{direction}NetworkPolicyName")
        action = record.get(f"{direction}NetworkPolicyRuleAction")
        if denied and action not in (ACTION_DROP, ACTION_REJECT):
            continue
        if not name:
            # Antrea names no rule when a K8s NetworkPolicy's isolation dropped the flow.
            if action in (ACTION_DROP, ACTION_REJECT):
                parts.append(f"{direction} K8s NetworkPolicy default deny")
            continue
        namespace = record.get(f"{direction}NetworkPolicyNamespace")
        rule = record.get(f"{direction}NetworkPolicyRuleName")
        text = f"{direction} {namespace}/{name}" if namespace else f"{direction} {name}"
        parts.append(f"{text} rule {rule}" if rule else text)
    return ", ".join(parts)


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _time(record: Record) -> str:
    moment = datetime.fromtimestamp(flow_end(record))
    return moment.strftime("%b %e %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _protocol(record: Record) -> str:
    number = record.get("protocolIdentifier")
    return PROTOCOL_NAMES.get(number, str(number)) if number is not None else "-"


def _bytes(record: Record) -> str:
    tx = record.get("octetTotalCount") or 0
    rx = record.get("reverseOctetTotalCount") or 0
    return f"tx {human_bytes(tx)}, rx {human_bytes(rx)}"


def compact(record: Record, color: bool = False) -> str:
    """hubble's compact line: time, source, arrow, destination, then what the flow was."""
    get = record.get
    service = get("destinationServicePortName")
    kind = FLOW_TYPE_NAMES.get(get("flowType") or 0, "unknown-type")
    decided = verdict(record)
    shown = f"{_COLORS[decided]}{decided}{_RESET}" if color else decided
    policy = policy_text(record)
    return (
        f"{_time(record)}: {endpoint(record, 'source')} -> {endpoint(record, 'destination')}"
        + (f" via {service}" if service else "")
        + f" {_protocol(record)} {kind} {shown}"
        + (f" by {policy}" if policy else "")
        + f" ({_bytes(record)})"
    )


def table_row(record: Record) -> tuple[str, ...]:
    moment = datetime.fromtimestamp(flow_end(record))
    return (
        moment.strftime("%b %e %H:%M:%S"),
        endpoint(record, "source"),
        endpoint(record, "destination"),
        record.get("destinationServicePortName") or "-",
        _protocol(record),
        FLOW_TYPE_NAMES.get(record.get("flowType") or 0, "-"),
        verdict(record),
        policy_text(record) or "-",
        _bytes(record),
    )
