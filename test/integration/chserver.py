"""A ClickHouse server for the tests: ClickHouse's HTTP interface, answered by the
ClickHouse engine itself (chDB) in a process of its own.

No ClickHouse server can be installed here, but the engine can: this serves what a
client sends over HTTP (the query in the body or in `query`, data after an INSERT's
FORMAT in the body, the database and settings as parameters, the user in
X-ClickHouse-User/-Key) by running the same statement in chDB, and answers with the
engine's own output and its errors as a server does (status 500 and the exception text,
X-ClickHouse-Exception-Code). Settings sent as parameters apply to inserts with data.
So the real client (clickhouse-connect) and the engine's
real formats are exercised; only the HTTP framing is this file's.

    python chserver.py --port PORT --path DIRECTORY [--user U --password P]
"""

from __future__ import annotations

import argparse
import base64
import re
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from chdb import session

# Parameters of the HTTP interface that are not query settings.
TRANSPORT = {
    "query", "query_id", "database", "default_format", "wait_end_of_query", "session_id",
    "send_progress_in_http_headers", "http_headers_progress_interval_ms",
    "enable_http_compression", "user", "password", "client_protocol_version",
}  # fmt: skip
INSERT = re.compile(
    r"\s*INSERT\s+INTO\s+(?P<table>[\w.`\"]+)\s*(?P<columns>\([^)]*\))?\s*FORMAT\s+(?P<format>\w+)\s*$",
    re.IGNORECASE | re.DOTALL,
)
ERROR_CODE = re.compile(r"Code: (\d+)")


class Engine:
    """chDB, one statement at a time (the engine is one per process)."""

    def __init__(self, path: str):
        self.session = session.Session(path)
        self.lock = threading.Lock()

    def run(self, sql: str, output_format: str = "TabSeparated") -> bytes:
        """A server's default output format is TabSeparated; a FORMAT clause overrides it."""
        with self.lock:
            return self.session.query(sql, output_format).bytes()


def settings_clause(settings: dict[str, str]) -> str:
    if not settings:
        return ""
    quoted = ", ".join(f"{k} = '{v}'" for k, v in settings.items())
    return f" SETTINGS {quoted}"


class Handler(BaseHTTPRequestHandler):
    engine: Engine
    user: str
    password: str

    def log_message(self, *args) -> None:  # quiet: the tests read the client's view
        pass

    def _authorised(self, params: dict[str, str]) -> bool:
        """The user as a server takes it: basic authentication, X-ClickHouse-User and -Key
        headers, or the user and password parameters."""
        user = self.headers.get("X-ClickHouse-User") or params.get("user") or "default"
        key = self.headers.get("X-ClickHouse-Key") or params.get("password") or ""
        basic = self.headers.get("Authorization", "")
        if basic.startswith("Basic "):
            user, _, key = base64.b64decode(basic[6:]).decode().partition(":")
        return (user, key) == (self.user, self.password)

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("X-ClickHouse-Timezone", "UTC")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _fail(self, message: str, status: int = 500) -> None:
        match = ERROR_CODE.search(message)
        code = match.group(1) if match else "1001"
        self._answer(status, message.encode() + b"\n", {"X-ClickHouse-Exception-Code": code})

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/ping":
            self._answer(200, b"Ok.\n")
        else:
            self._handle(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._handle(self.rfile.read(length))

    def _handle(self, body: bytes) -> None:
        params = dict(parse_qsl(urlsplit(self.path).query))
        if not self._authorised(params):
            message = (
                "Code: 516. DB::Exception: default: Authentication failed (AUTHENTICATION_FAILED)"
            )
            self._fail(message, 403)
            return
        if self.headers.get("Content-Encoding"):
            self._fail("Code: 1001. this test server takes no compressed bodies", 400)
            return
        settings = {k: v for k, v in params.items() if k not in TRANSPORT}
        query = params.get("query")
        data = b""
        if query is None:
            query = body.decode()
        else:
            data = body
        database = params.get("database")
        try:
            insert = INSERT.match(query)
            if insert and data:
                output = self._insert(insert, data, settings, database)
            else:
                sql = query.strip().rstrip(";")
                if database:
                    self.engine.run(f"USE {database}")
                # The client's settings matter to inserts with data (the deduplication
                # token); other statements run with the engine's defaults.
                output = self.engine.run(sql, params.get("default_format", "TabSeparated"))
        except Exception as exc:  # the engine's error, as a server reports it
            self._fail(" ".join(str(exc).split()))
            return
        self._answer(200, output, {"X-ClickHouse-Summary": "{}"})

    def _insert(self, insert: re.Match, data: bytes, settings: dict[str, str], database) -> bytes:
        """An INSERT with its data in the body: the engine reads the data from a file in
        the format named, into the columns named."""
        table = insert.group("table")
        if database and "." not in table:
            table = f"{database}.{table}"
        columns = insert.group("columns") or ""
        with tempfile.NamedTemporaryFile(suffix=".data") as file:
            file.write(data)
            file.flush()
            selected = columns.strip("()") or "*"
            return self.engine.run(
                f"INSERT INTO {table} {columns}{settings_clause(settings)} "
                f"SELECT {selected} FROM file('{file.name}', '{insert.group('format')}')"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--user", default="default")
    parser.add_argument("--password", default="")
    args = parser.parse_args()
    Path(args.path).mkdir(parents=True, exist_ok=True)
    Handler.engine = Engine(args.path)
    Handler.user, Handler.password = args.user, args.password
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
