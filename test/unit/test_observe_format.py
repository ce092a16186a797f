"""`antrea-flow observe`: hubble-like compact lines, the table and JSON lines; the file
source in-process (--last, filters, errors as one line naming the flag), the server source's
errors, and following a file in a subprocess."""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from pathlib import Path

import flowrecords
import pytest

from antrea_flow import cli
from antrea_flow.observe import (
    PORT_FORWARD,
    Printer,
    compact,
    endpoint,
    human_bytes,
    policy_text,
    table_row,
)

WAIT = 15.0  # a liveness bound for every wait
END_MS = 1_796_676_604_335  # Dec  7 20:50:04.335 UTC

_BASE = {
    "flowStartSeconds": END_MS // 1000, "flowEndSeconds": END_MS // 1000,
    "flowEndMilliseconds": END_MS, "sourceTransportPort": 38590,
    "destinationTransportPort": 8080, "octetTotalCount": 60, "reverseOctetTotalCount": 0,
}  # fmt: skip


def rec(src: str, dst: str, **fields) -> dict:
    """A record from `src` to `dst` ("ns/pod@ip" for a Pod, "ip" for anything else)."""
    return flowrecords.record(src, dst, **{**_BASE, **fields})


SERVICE_FLOW = rec(
    "frontend/client-2@10.10.2.2", "backend/web-2@10.10.2.3", flowType=1,
    sourceTransportPort=42914, octetTotalCount=349, reverseOctetTotalCount=1528,
    destinationServicePortName="backend/web:http", destinationServicePort=80,
    destinationClusterIPv4="10.96.0.10", ingressNetworkPolicyName="web-allow-frontend",
    ingressNetworkPolicyNamespace="backend", ingressNetworkPolicyType=1,
    ingressNetworkPolicyRuleAction=1,
)  # fmt: skip
DEFAULT_DENY = rec("backend/db@10.10.2.4", "backend/web-1@10.10.1.3", sourceTransportPort=38196,
                   ingressNetworkPolicyType=1, ingressNetworkPolicyRuleAction=2)  # fmt: skip
ACNP_REJECT = rec(
    "frontend/client-1@10.10.1.2", "backend/db@10.10.2.4", ingressNetworkPolicyName="acnp-db-guard",
    ingressNetworkPolicyType=3, ingressNetworkPolicyRuleName="reject-clients",
    ingressNetworkPolicyRuleAction=3,
)  # fmt: skip
ICMP6 = rec("fe80::64b9:10ff:fe76:5a6b", "frontend/client-2@fd00:10:10:2::2",
            protocolIdentifier=58, flowType=4, sourceTransportPort=0,
            destinationTransportPort=34560, octetTotalCount=72)  # fmt: skip
TO_V6 = rec("frontend/client-2@fd00:10:10:2::2", "fd00:77::fe", flowType=3,
            sourceTransportPort=42240, octetTotalCount=457,
            reverseOctetTotalCount=1556)  # fmt: skip


@pytest.fixture
def utc(monkeypatch):
    """Times printed in UTC, whatever this machine's zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_compact_allowed_service_flow(utc):
    assert compact(SERVICE_FLOW) == (
        "Dec  7 20:50:04.335: frontend/client-2:42914 -> backend/web-2:8080 via "
        "backend/web:http TCP intra-node ALLOWED by ingress backend/web-allow-frontend "
        "(tx 349 B, rx 1.5 kB)"
    )


def test_compact_dropped_by_a_k8s_default_deny(utc):
    assert compact(DEFAULT_DENY) == (
        "Dec  7 20:50:04.335: backend/db:38196 -> backend/web-1:8080 TCP inter-node DROPPED "
        "by ingress K8s NetworkPolicy default deny (tx 60 B, rx 0 B)"
    )


def test_compact_rejected_by_an_acnp_rule():
    line = compact(ACNP_REJECT)
    assert line.endswith(
        ": frontend/client-1:38590 -> backend/db:8080 TCP inter-node REJECTED by ingress "
        "acnp-db-guard rule reject-clients (tx 60 B, rx 0 B)"
    )


def test_compact_icmp_has_no_ports_and_ipv6_is_in_brackets():
    assert compact(ICMP6).endswith(
        ": [fe80::64b9:10ff:fe76:5a6b] -> frontend/client-2 ICMPv6 from-external ALLOWED "
        "(tx 72 B, rx 0 B)"
    )
    assert compact(TO_V6).endswith(
        ": frontend/client-2:42240 -> [fd00:77::fe]:8080 TCP to-external ALLOWED "
        "(tx 457 B, rx 1.6 kB)"
    )
    icmp4 = rec("10.10.1.2", "10.10.2.2", protocolIdentifier=1, destinationTransportPort=2048)
    assert ": 10.10.1.2 -> 10.10.2.2 ICMP inter-node ALLOWED" in compact(icmp4)


def test_compact_time_has_milliseconds_and_falls_back_to_seconds():
    assert re.match(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d\.335: ", compact(SERVICE_FLOW))
    seconds_only = {k: v for k, v in SERVICE_FLOW.items() if k != "flowEndMilliseconds"}
    assert re.match(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d\.000: ", compact(seconds_only))


def test_compact_colours_the_verdict_only_when_asked():
    assert "\033[32mALLOWED\033[0m" in compact(SERVICE_FLOW, color=True)
    assert "\033[31mDROPPED\033[0m" in compact(DEFAULT_DENY, color=True)
    assert "\033[33mREJECTED\033[0m" in compact(ACNP_REJECT, color=True)
    for record in (SERVICE_FLOW, DEFAULT_DENY, ACNP_REJECT, ICMP6):
        assert "\033" not in compact(record)
        assert "\033" not in compact(record, color=False)


def test_compact_of_an_unknown_protocol_and_type():
    odd = rec("10.0.0.1", "10.0.0.2", protocolIdentifier=47, flowType=0)
    assert " 10.0.0.1:38590 -> 10.0.0.2:8080 47 unknown-type ALLOWED " in compact(odd)


def test_policy_text_names_the_deciding_rules():
    both = rec("a/x@10.0.0.1", "b/y@10.0.0.2", egressNetworkPolicyName="out",
               egressNetworkPolicyNamespace="a", egressNetworkPolicyRuleAction=1,
               ingressNetworkPolicyName="in-guard", ingressNetworkPolicyRuleName="r1",
               ingressNetworkPolicyRuleAction=1)  # fmt: skip
    assert policy_text(both) == "egress a/out, ingress in-guard rule r1"
    # denied: only the rule that denied it
    denied = {**both, "ingressNetworkPolicyRuleAction": 2}
    assert policy_text(denied) == "ingress in-guard rule r1"
    egress_drop = {**both, "egressNetworkPolicyRuleAction": 2, "egressNetworkPolicyName": ""}
    assert policy_text(egress_drop) == "egress K8s NetworkPolicy default deny"
    assert policy_text(rec("10.0.0.1", "10.0.0.2")) == ""


def test_endpoint_of_pods_and_addresses():
    assert endpoint(SERVICE_FLOW, "source") == "frontend/client-2:42914"
    assert endpoint(SERVICE_FLOW, "destination") == "backend/web-2:8080"
    assert endpoint(TO_V6, "destination") == "[fd00:77::fe]:8080"
    assert endpoint(ICMP6, "source") == "[fe80::64b9:10ff:fe76:5a6b]"


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (1528, "1.5 kB"), (8_520_096, "8.5 MB"),
     (3 * 10**9, "3.0 GB"), (10**15, "1000.0 TB")],
)  # fmt: skip
def test_human_bytes(count, text):
    assert human_bytes(count) == text


def test_table_has_one_header_and_aligned_rows(utc):
    out = StringIO()
    printer = Printer("table", False, out)
    for record in (SERVICE_FLOW, ACNP_REJECT, ICMP6):
        printer.print(record)
    header, *rows = out.getvalue().splitlines()
    assert header.split() == ["TIME", "SOURCE", "DESTINATION", "SERVICE", "PROTO", "TYPE",
                              "VERDICT", "POLICY", "BYTES"]  # fmt: skip
    assert len(rows) == 3
    assert rows[0].startswith("Dec  7 20:50:04      frontend/client-2:42914 ")
    for column, cell in (("SOURCE", 1), ("SERVICE", 3), ("VERDICT", 6), ("BYTES", 8)):
        start = header.index(column)
        for row, record in zip(rows, (SERVICE_FLOW, ACNP_REJECT, ICMP6), strict=True):
            assert row[start:].startswith(table_row(record)[cell][:20]), (column, row)
    assert "backend/web:http" in rows[0] and "ALLOWED" in rows[0]
    assert " - " in rows[1] and "REJECTED" in rows[1]  # no Service
    assert "ingress acnp-db-guard rule reject-cli..." in rows[1]  # cut to its column


def test_table_row_cells():
    assert table_row(ACNP_REJECT)[1:] == (
        "frontend/client-1:38590", "backend/db:8080", "-", "TCP", "inter-node", "REJECTED",
        "ingress acnp-db-guard rule reject-clients", "tx 60 B, rx 0 B",
    )  # fmt: skip


# -- the CLI on a file, in-process ------------------------------------------------------------


def numbered(i: int, **fields) -> dict:
    """Record number `i` (its source port), allowed unless fields say otherwise."""
    return rec("frontend/client-1@10.10.1.2", "backend/web-1@10.10.1.3",
               sourceTransportPort=40000 + i, flowEndMilliseconds=END_MS + i, **fields)  # fmt: skip


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def observe(capsys, *args: str) -> tuple[int, list[str], list[str]]:
    """Exit code, stdout lines and stderr lines of `antrea-flow observe ARGS`."""
    code = cli.main(["observe", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def ports(lines: list[str]) -> list[int]:
    return [json.loads(line)["sourceTransportPort"] - 40000 for line in lines]


@pytest.fixture
def flows(tmp_path) -> Path:
    """30 records: every tenth dropped, every 7th rejected, the rest allowed."""
    records = []
    for i in range(30):
        action = 2 if i % 10 == 0 else 3 if i % 7 == 0 else 1
        records.append(numbered(i, ingressNetworkPolicyRuleAction=action))
    return write_jsonl(tmp_path / "flows.jsonl", records)


def test_file_the_20_latest_by_default_oldest_first(capsys, flows):
    code, out, err = observe(capsys, "--file", str(flows), "-o", "json")
    assert code == 0 and err == []
    assert ports(out) == list(range(10, 30))


def test_file_json_is_one_record_per_line(capsys, flows):
    code, out, _ = observe(capsys, "--file", str(flows), "-o", "json", "--last", "2")
    assert [json.loads(line) for line in out] == [
        numbered(28, ingressNetworkPolicyRuleAction=3),
        numbered(29, ingressNetworkPolicyRuleAction=1),
    ]


def test_file_last(capsys, flows):
    assert ports(observe(capsys, "--file", str(flows), "-o", "json", "--last", "3")[1]) == [
        27, 28, 29,
    ]  # fmt: skip
    assert observe(capsys, "--file", str(flows), "--last", "0")[1] == []
    assert len(observe(capsys, "--file", str(flows), "--last", "1000")[1]) == 30


def test_file_filters(capsys, flows):
    args = ("--file", str(flows), "-o", "json", "--last", "100")
    assert ports(observe(capsys, *args, "--verdict", "DROPPED")[1]) == [0, 10, 20]
    assert ports(observe(capsys, *args, "--verdict", "dropped", "--verdict", "REJECTED")[1]) == [
        0, 7, 10, 14, 20, 21, 28,
    ]  # fmt: skip
    assert ports(observe(capsys, *args, "--verdict", "DROPPED", "--from-port", "40010")[1]) == [10]
    assert ports(observe(capsys, *args, "--pod", "web", "-n", "backend", "--last", "2")[1]) == [
        28, 29,
    ]  # fmt: skip
    assert observe(capsys, *args, "--pod", "web", "-n", "frontend")[1] == []


def test_file_last_applies_after_the_filters(capsys, flows):
    out = observe(capsys, "--file", str(flows), "-o", "json", "--verdict", "DROPPED",
                  "--last", "2")[1]  # fmt: skip
    assert ports(out) == [10, 20]


def test_file_since_takes_every_record_of_the_range(capsys, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [numbered(i) for i in range(25)])
    since = str(END_MS / 1000 + 0.0025)  # after records 0, 1 and 2
    out = observe(capsys, "--file", str(path), "-o", "json", "--since", since)[1]
    assert ports(out) == list(range(3, 25))  # not only the latest 20


def test_file_compact_and_table_without_colours_off_a_terminal(capsys, flows):
    code, out, _ = observe(capsys, "--file", str(flows), "--last", "2")
    assert code == 0 and len(out) == 2
    assert "frontend/client-1:40029 -> backend/web-1:8080 TCP inter-node ALLOWED" in out[1]
    assert "\033" not in "".join(out)
    code, out, _ = observe(capsys, "--file", str(flows), "--last", "2", "-o", "table")
    assert out[0].split()[:3] == ["TIME", "SOURCE", "DESTINATION"] and len(out) == 3


def test_file_lines_that_are_not_records_are_skipped_with_one_warning(capsys, tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(
        json.dumps(numbered(1)) + "\nnot json\n[1, 2]\n\n" + json.dumps(numbered(2)) + "\n"
        + '{"half": '
    )  # fmt: skip
    code, out, err = observe(capsys, "--file", str(path), "-o", "json")
    assert code == 0 and ports(out) == [1, 2]
    assert len(err) == 1 and "skipping lines that are not JSON objects" in err[0]
    assert "not json" in err[0]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--verdict", "foo",
         "--verdict: 'foo' is not valid; expected ALLOWED, DROPPED or REJECTED"),
        ("--port", "70000", "--port: '70000' is not valid; expected a port number 0-65535"),
        ("--type", "sideways", "--type: 'sideways' is not valid; expected intra-node, "
         "inter-node, to-external or from-external"),
        ("-n", "a/b", "--namespace: 'a/b' is not valid; expected a namespace name"),
        ("--last", "many", "--last: 'many' is not valid; expected a number 0-1000000"),
        ("--last", "-1", "--last: '-1' is not valid; expected a number 0-1000000"),
    ],
)  # fmt: skip
def test_a_bad_flag_value_is_one_line_naming_the_flag(capsys, flows, flag, value, message):
    code, out, err = observe(capsys, "--file", str(flows), flag, value)
    assert code == 2 and out == []
    assert err == [f"antrea-flow observe: {message}"]


def test_a_missing_file_is_one_line(capsys, tmp_path):
    code, out, err = observe(capsys, "--file", str(tmp_path / "nope.jsonl"))
    assert code == 2 and out == []
    assert err == [
        f"antrea-flow observe: --file: '{tmp_path / 'nope.jsonl'}': No such file or directory"
    ]


# -- the server source's errors ---------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_is_one_line_with_the_port_forward_hint(capsys):
    server = f"http://127.0.0.1:{_closed_port()}"
    code, out, err = observe(capsys, "--server", server)
    assert code == 2 and out == []
    assert len(err) == 1
    assert err[0].startswith(f"antrea-flow observe: cannot reach the flow API at {server} (")
    assert "apiBindAddress" in err[0] and err[0].endswith(PORT_FORWARD)


def test_a_server_url_that_is_not_http_is_refused(capsys):
    code, _, err = observe(capsys, "--server", "ftp://127.0.0.1:10349")
    assert code == 2
    assert err == [
        "antrea-flow observe: --server: 'ftp://127.0.0.1:10349' is not valid; expected "
        "http://HOST:PORT"
    ]


class _Answering(BaseHTTPRequestHandler):
    """Answers every request with `status` and `body` (and no length: the body ends when the
    connection closes, as a follow stream's does), and keeps the paths asked for."""

    status = 200
    body = b""
    paths: list[str] = []
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self.paths.append(self.path)
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def answering():
    """answering(status, body) -> (the URL of a server that answers so, the paths asked)."""
    servers = []

    def start(status: int, body: bytes) -> tuple[str, list[str]]:
        handler = type("Handler", (_Answering,), {"status": status, "body": body, "paths": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", handler.paths

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def refusing(answering, status: int, error: str) -> tuple[str, list[str]]:
    return answering(status, json.dumps({"error": error}).encode())


def test_a_400_from_the_server_names_the_flag(capsys, answering):
    url, paths = refusing(answering, 400, "pod: 'x' is not valid; expected [NAMESPACE/]NAME-PREFIX")
    code, out, err = observe(capsys, "--server", url, "--pod", "x", "--verdict", "DROPPED")
    assert code == 2 and out == []
    assert err == ["antrea-flow observe: --pod: 'x' is not valid; expected [NAMESPACE/]NAME-PREFIX"]
    (path,) = paths
    assert path.startswith("/api/v1/flows?")
    assert "pod=x" in path and "verdict=DROPPED" in path and "last=20" in path


def test_a_401_from_the_server_points_at_the_token(capsys, answering):
    url, _ = refusing(answering, 401, "this API needs its token: Authorization: Bearer ...")
    code, _, err = observe(capsys, "--server", url)
    assert code == 2
    assert err == [
        f"antrea-flow observe: {url}: this API needs its token: Authorization: Bearer ... "
        "(--token, or ANTREA_FLOW_API_TOKEN)"
    ]


def test_another_http_error_names_the_server_and_the_status(capsys, answering):
    url, _ = refusing(answering, 503, "more than 128 clients")
    code, _, err = observe(capsys, "--server", url)
    assert code == 2
    assert err == [f"antrea-flow observe: {url}: HTTP 503: more than 128 clients"]


def test_server_records_and_cut_off_messages(capsys, answering):
    cut = {"error": "cut off: this stream fell 5 records behind the 10-record window", "lost": 5}
    body = b"".join(
        json.dumps(x).encode() + b"\n" for x in ({"flow": numbered(1)}, {"flow": numbered(2)}, cut)
    )
    url, _ = answering(200, body[:-1] + b"\n\n")  # and a keep-alive
    code, out, err = observe(capsys, "--server", url, "-o", "json")
    assert code == 0 and ports(out) == [1, 2]
    assert err == [f"antrea-flow observe: {cut['error']}"]


def test_a_stream_that_ends_mid_record_is_not_a_traceback(capsys, answering):
    whole = json.dumps({"flow": numbered(1)}) + "\n"
    url, _ = answering(200, (whole + whole[:40]).encode())
    code, out, err = observe(capsys, "--server", url, "-o", "json", "-f")
    assert ports(out) == [1]
    assert len(err) == 1 and code in (0, 2)


# -- following a file, in a subprocess ------------------------------------------------------


class Lines:
    """The lines a process writes to stdout, read by a thread into a queue."""

    def __init__(self, stream):
        self.queue: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.queue.put(line)
        self.queue.put(b"")  # the end

    def next(self) -> dict:
        try:
            line = self.queue.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no line within {WAIT}s") from None
        assert line, "the process ended"
        return json.loads(line)


@pytest.fixture
def follow(tmp_path):
    """follow(path, *flags) -> Lines of `antrea-flow observe --file PATH -f -o json FLAGS`,
    a subprocess terminated at teardown."""
    processes = []
    script = Path(sys.executable).with_name("antrea-flow")

    def start(path: Path, *flags: str) -> Lines:
        process = subprocess.Popen(
            [str(script), "observe", "--file", str(path), "-f", "-o", "json", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        processes.append(process)
        return Lines(process.stdout)

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def test_follow_prints_records_appended_to_the_file(tmp_path, follow):
    path = write_jsonl(tmp_path / "f.jsonl", [numbered(0), numbered(1)])
    lines = follow(path, "--last", "1")
    assert lines.next() == numbered(1)
    append(path, json.dumps(numbered(2)) + "\n" + json.dumps(numbered(3)) + "\n")
    assert lines.next() == numbered(2)
    assert lines.next() == numbered(3)
    # a line written in two parts is printed once it is whole
    text = json.dumps(numbered(4))
    append(path, text[:20])
    append(path, text[20:] + "\n")
    assert lines.next() == numbered(4)


def test_follow_prints_only_matching_records(tmp_path, follow):
    dropped = {"ingressNetworkPolicyRuleAction": 2}
    path = write_jsonl(tmp_path / "f.jsonl", [numbered(0, **dropped), numbered(1)])
    lines = follow(path, "--verdict", "DROPPED", "--last", "1")
    assert lines.next()["sourceTransportPort"] == 40000  # it has read the file
    append(path, json.dumps(numbered(1)) + "\n")  # allowed
    append(path, json.dumps(numbered(2, **dropped)) + "\n")
    assert lines.next()["sourceTransportPort"] == 40002


def test_follow_reads_a_truncated_file_again(tmp_path, follow):
    path = write_jsonl(tmp_path / "f.jsonl", [numbered(i) for i in range(3)])
    lines = follow(path, "--last", "3")
    assert [lines.next()["sourceTransportPort"] for _ in range(3)] == [40000, 40001, 40002]
    write_jsonl(path, [numbered(7)])  # truncated in place, shorter than what was read
    assert lines.next() == numbered(7)


def test_follow_reads_a_replaced_file(tmp_path, follow):
    path = write_jsonl(tmp_path / "f.jsonl", [numbered(i) for i in range(3)])
    lines = follow(path, "--last", "3")
    assert [lines.next()["sourceTransportPort"] for _ in range(3)] == [40000, 40001, 40002]
    os.replace(write_jsonl(tmp_path / "new.jsonl", [numbered(7)]), path)
    assert lines.next() == numbered(7)
