"""The flow API and the web UI, over HTTP on apiBindAddress: read-only views of the records
the aggregator exported, from its FlowWindow.

    GET /api/v1/flows        the latest matching records, oldest first, one {"flow": {...}}
                             per line (NDJSON); follow=true streams new ones as they are
                             exported (format=sse, or Accept: text/event-stream, for
                             server-sent events)
    GET /api/v1/graph        who talks to whom over a window, grouped by workload, pod,
                             namespace, service, node or policy
    GET /api/v1/throughput   each Node's transmitted and received bits/s over time
    GET /api/v1/status       the window's size and the API's counters
    GET /                    the web UI (its files come with the package)

Query parameters are the `antrea-flow observe` flags' long names (see flowfilter); a bad
one gets a 400 that names it and the accepted form. With apiToken set every request needs
`Authorization: Bearer <token>` (or `access_token=<token>`, for the UI's address bar).

Each request runs on a thread of its own and reads the window without a lock (see
FlowWindow); a follow request's connection is handed, once its headers are sent, to the
one thread that serves every stream (streams.StreamPump): the aggregator never waits for
a reader.
"""

from __future__ import annotations

import difflib
import hmac
import json
import mimetypes
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ..durations import parse_duration
from ..flowfilter import FILTER_PARAMETERS, FilterError, FlowFilter, parse_filter
from ..ipfix.address import TransportAddress
from .graph import GROUPINGS, flow_graph, node_throughput
from .streams import MAX_STREAMS, StreamPump, line
from .window import Entry, FlowWindow, encode

MAX_CLIENTS = 128  # requests answered at once (follow streams are the pump's); more get 503
DEFAULT_LAST = 20
MAX_LAST = 1_000_000
UI_DIR = resources.files("antrea_flow.aggregator") / "ui"

_COMMON = {"access_token": "the API token"}
_FLOWS = {
    **FILTER_PARAMETERS,
    "last": "a number of records 0-1000000 (0: none of the past)",
    "follow": "true or false",
    "format": "ndjson or sse",
}
_GRAPH = {**FILTER_PARAMETERS, "by": ", ".join(GROUPINGS)}
_THROUGHPUT = {**FILTER_PARAMETERS, "step": 'a duration such as "10s" (at least 1s)'}
GRAPH_SINCE = "5m"  # the window of a graph or throughput request that names no `since`


class HistoryUnavailable(Exception):
    """The stored records cannot be read now; the message says why."""


# (filter, last) -> (the latest `last` stored records it matches, oldest first; how many
# exported records were stored or given up when it asked): ClickHouse's, when that sink runs.
History = Callable[[FlowFilter, int], tuple[list[dict], int]]


class BadParameter(Exception):
    def __init__(self, parameter: str, value: str, form: str):
        super().__init__(f"{parameter}: {value!r} is not valid; expected {form}")


@dataclass(frozen=True, slots=True)
class ApiCounts:
    requests: dict[str, int]  # by HTTP status code
    cut_off: dict[str, int]  # follow streams ended by us, by reason
    streams: int  # follow streams open
    streamed: int  # records written to follow streams


class ApiStats:
    """Counters of the API's threads, each change under one short lock; `snapshot` copies
    them for the metrics scrape."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.cut_off: Counter[str] = Counter()
        self.streams = 0
        self.streamed = 0

    def count(self, counter: Counter[str], key: str) -> None:
        with self._lock:
            counter[key] += 1

    def stream(self, delta: int) -> None:
        with self._lock:
            self.streams += delta

    def wrote(self, records: int) -> None:
        with self._lock:
            self.streamed += records

    def snapshot(self) -> ApiCounts:
        with self._lock:
            return ApiCounts(dict(self.requests), dict(self.cut_off), self.streams, self.streamed)


class FlowApi:
    """The HTTP server in a thread of its own; `start` binds (OSError if it cannot), `stop`
    ends every request, follow streams included."""

    def __init__(
        self,
        address: TransportAddress,
        window: FlowWindow,
        token: str = "",
        clock: Callable[[], float] = time.time,
        history: History | None = None,
    ):
        self.address = address
        self.window = window
        self.token = token
        self.history = history
        self.clock = clock
        self.stats = ApiStats()
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.pump: StreamPump | None = None

    def start(self) -> None:
        api = self

        class Handler(_Handler):
            pass

        Handler.api = api
        host = self.address.host or "0.0.0.0"
        server_class = _DualStackServer if ":" in host else ThreadingHTTPServer
        self._server = server_class((host, self.address.port), Handler)
        self._server.daemon_threads = True
        self.pump = StreamPump(self.window, self.stats)
        self.pump.start()
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="flow-api", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self.pump is not None:
            self.pump.stop()  # the follow streams end

    def metrics(self, prefix: str):
        from ..metrics import counter, gauge, labelled_counter

        counts = self.stats.snapshot()
        yield labelled_counter(
            f"{prefix}api_requests_total",
            "Flow API requests, by HTTP status.",
            "code",
            counts.requests,
        )
        yield gauge(f"{prefix}api_follow_streams", "Follow streams open now.", counts.streams)
        yield counter(
            f"{prefix}api_streamed_records_total",
            "Records written to follow streams (each stream counts its own).",
            counts.streamed,
        )
        yield labelled_counter(
            f"{prefix}api_streams_cut_off_total",
            "Follow streams ended because their client fell behind (window: a whole window "
            "of records behind; send_timeout: took nothing for the send timeout).",
            "reason",
            counts.cut_off,
            always=("window", "send_timeout"),
        )
        yield gauge(
            f"{prefix}api_window_records", "Exported records the flow API holds.", len(self.window)
        )


class _DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    api: FlowApi
    protocol_version = "HTTP/1.1"
    server_version = "antrea-flow"

    def log_message(self, format: str, *args) -> None:  # requests are not news
        pass

    def do_HEAD(self) -> None:
        # The request's body is not read: the connection closes after the answer.
        self.close_connection = True
        self._error(
            HTTPStatus.METHOD_NOT_ALLOWED,
            "the flow API is read-only: use GET",
            {"Allow": "GET", "Connection": "close"},
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD

    def do_GET(self) -> None:
        api = self.api
        if not api._slots.acquire(blocking=False):
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"more than {MAX_CLIENTS} clients")
            return
        try:
            self._get()
        except BadParameter as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except FilterError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        finally:
            api._slots.release()

    def _get(self) -> None:
        url = urlsplit(self.path)
        params = parse_qs(url.query, keep_blank_values=True)
        if not self._authorized(params):
            return
        path = url.path
        if path == "/api/v1/flows":
            self._flows(params)
        elif path == "/api/v1/graph":
            self._graph(params)
        elif path == "/api/v1/throughput":
            self._throughput(params)
        elif path == "/api/v1/status":
            self._check(params, {})
            self._status()
        elif path == "/" or path.startswith("/ui/"):
            self._static(path)
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such path {path!r}; see /api/v1/flows")

    def _authorized(self, params: dict[str, list[str]]) -> bool:
        token = self.api.token
        if not token:
            return True
        header = self.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else params.get("access_token", [""])[0]
        if hmac.compare_digest(given.encode(), token.encode()):
            return True
        self._error(
            HTTPStatus.UNAUTHORIZED,
            "this API needs its token: Authorization: Bearer ...",
            {"WWW-Authenticate": 'Bearer realm="antrea-flow"'},
        )
        return False

    def _check(self, params: dict[str, list[str]], known: dict[str, str]) -> None:
        for name in params:
            if name not in known and name not in _COMMON:
                nearest = difflib.get_close_matches(name, list(known), 1)
                hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
                accepted = ", ".join(sorted(known)) or "none"
                raise BadParameter(name, params[name][0], f"one of the parameters {accepted}{hint}")

    def _filter(
        self, params: dict[str, list[str]], known: dict[str, str], since: str = ""
    ) -> FlowFilter:
        self._check(params, known)
        if since and not params.get("since"):
            params = {**params, "since": [since]}
        return parse_filter(params, self.api.clock())

    def _flows(self, params: dict[str, list[str]]) -> None:
        flow_filter = self._filter(params, _FLOWS)
        follow = _boolean(params, "follow")
        fmt = _one(params, "format", "")
        if fmt not in ("ndjson", "sse", ""):
            raise BadParameter("format", fmt, _FLOWS["format"])
        accept = self.headers.get("Accept", "")
        sse = fmt == "sse" or (not fmt and "text/event-stream" in accept)
        last = _integer(params, "last", 0 if follow else DEFAULT_LAST, 0, MAX_LAST)
        window = self.api.window
        cursor = window.next_seq
        resume = self.headers.get("Last-Event-ID", "")
        if sse and resume.isdigit():  # an EventSource reconnecting: go on where it was (not
            cursor, last = min(int(resume) + 1, cursor), 0  # past now: a restarted aggregator)
        past: list[Entry] = []
        if last:
            for entry in window.newest():
                if entry.seq < cursor and flow_filter.matches(entry.record):
                    past.append(entry)
                    if len(past) == last:
                        break
            past.reverse()
        content_type = "text/event-stream" if sse else "application/x-ndjson"
        if not follow:
            if len(past) < last and self.api.history is not None:
                self._stored(flow_filter, last, past, content_type)
                return
            body = b"".join(line(entry, sse) for entry in past)
            self._send(HTTPStatus.OK, content_type, body, {"X-Flow-Source": "window"})
            return
        pump = self.api.pump
        assert pump is not None
        if pump.full():
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"more than {MAX_STREAMS} follow streams")
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.api.stats.count(self.api.stats.requests, "200")
        # The connection is the pump's from here; what this handler had of it closes.
        sock = socket.socket(fileno=self.connection.detach())
        first = b"".join(line(entry, sse) for entry in past)
        pump.add(sock, flow_filter, cursor, sse, first, len(past))

    def _stored(
        self, flow_filter: FlowFilter, last: int, past: list[Entry], content_type: str
    ) -> None:
        """What the window lacks, from the database: its latest records, then those the
        window holds that may not be stored yet."""
        assert self.api.history is not None
        try:
            stored, settled = self.api.history(flow_filter, last)
        except HistoryUnavailable as exc:
            body = b"".join(line(entry, False) for entry in past)
            headers = {"X-Flow-Source": "window", "X-Flow-History-Error": _header(str(exc))}
            self._send(HTTPStatus.OK, content_type, body, headers)
            return
        records = stored + [entry.record for entry in past if entry.seq >= settled]
        body = b"".join(encode(record) for record in records[-last:])
        self._send(HTTPStatus.OK, content_type, body, {"X-Flow-Source": "clickhouse"})

    def _graph(self, params: dict[str, list[str]]) -> None:
        flow_filter = self._filter(params, _GRAPH, GRAPH_SINCE)
        by = _one(params, "by", "workload")
        if by not in GROUPINGS:
            raise BadParameter("by", by, _GRAPH["by"])
        self._json(flow_graph(self._matching(flow_filter), by))

    def _throughput(self, params: dict[str, list[str]]) -> None:
        flow_filter = self._filter(params, _THROUGHPUT, GRAPH_SINCE)
        assert flow_filter.since is not None
        since = flow_filter.since
        until = flow_filter.until if flow_filter.until is not None else self.api.clock()
        if until <= since:
            raise BadParameter("until", _one(params, "until", ""), "a time after `since`")
        step_text = _one(params, "step", "")
        try:
            step = parse_duration(step_text) if step_text else max(1.0, (until - since) / 60)
        except ValueError:
            raise BadParameter("step", step_text, _THROUGHPUT["step"]) from None
        if step < 1 or (until - since) / step > 10_000:
            raise BadParameter("step", step_text, f"{_THROUGHPUT['step']}, at most 10000 steps")
        self._json(node_throughput(self._matching(flow_filter), since, until, step))

    def _matching(self, flow_filter: FlowFilter) -> list:
        return [e.record for e in self.api.window.newest() if flow_filter.matches(e.record)]

    def _status(self) -> None:
        window = self.api.window
        counts = self.api.stats.snapshot()
        self._json(
            {
                "window": {"capacity": window.capacity, "records": len(window)},
                "exported": window.next_seq,
                "followStreams": counts.streams,
                "streamed": counts.streamed,
                "cutOff": counts.cut_off,
            }
        )

    def _static(self, path: str) -> None:
        name = "index.html" if path == "/" else path[len("/ui/") :]
        parts = Path(name).parts
        if not name or ".." in parts or name.startswith("/"):
            self._error(HTTPStatus.NOT_FOUND, f"no such file {name!r}")
            return
        resource = UI_DIR.joinpath(*parts)
        if not resource.is_file():
            if parts[0] == "vendor":
                self._error(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    f"the UI's library {name!r} is not installed: run `make setup` "
                    "(it fetches it from npm), or install a package built after it",
                )
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such file {name!r}")
            return
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        self._send(HTTPStatus.OK, content_type, resource.read_bytes())

    def _json(self, value) -> None:
        body = json.dumps(value, separators=(",", ":")).encode()
        self._send(HTTPStatus.OK, "application/json", body)

    def _error(
        self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps({"error": message}).encode() + b"\n"
        self._send(status, "application/json", body, headers)

    def _send(
        self,
        status: HTTPStatus,
        content_type: str,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.api.stats.count(self.api.stats.requests, str(status.value))
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def _header(text: str) -> str:
    """`text` as one header line: printable ASCII, bounded."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:300]


def _one(params: dict[str, list[str]], name: str, default: str) -> str:
    values = params.get(name)
    return values[-1] if values else default


def _boolean(params: dict[str, list[str]], name: str) -> bool:
    value = _one(params, name, "false").lower()
    if value not in ("true", "false", "1", "0", ""):
        raise BadParameter(name, value, "true or false")
    return value in ("true", "1", "")


def _integer(params: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    text = _one(params, name, "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise BadParameter(name, text, _FLOWS[name])
    return value
