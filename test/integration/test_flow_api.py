"""The flow API over real sockets on 127.0.0.1: the latest records, filters, errors that name
the parameter, the token, follow streams (NDJSON and server-sent events), slow readers cut
off and counted while the writer never waits, `antrea-flow observe --server`, and the API of
a running Aggregator fed through its intake and export path."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from antrea_flow import cli
from antrea_flow.aggregator import streams as streams_module
from antrea_flow.aggregator.api import FlowApi
from antrea_flow.aggregator.config import load_aggregator_config
from antrea_flow.aggregator.service import Aggregator
from antrea_flow.aggregator.window import FlowWindow
from antrea_flow.ipfix.address import parse_address
from antrea_flow.ipfix.antrea import exporter_templates
from antrea_flow.ipfix.collecting import Peer
from antrea_flow.ipfix.messages import DataSet, Message

from .ipfixkit import WAIT, Clock, api_aggregator_conf, eventually, free_port

NOW = 1_796_676_700.0
PREFIX = "antrea_flow_aggregator_"


def numbered(i: int, **fields: Any) -> dict[str, Any]:
    """Record number `i` (its source port 40000 + i), ended at NOW - 60 + i/1000, allowed
    unless `fields` say otherwise."""
    record = {
        "flowEndSeconds": int(NOW - 60), "flowEndMilliseconds": int((NOW - 60) * 1000) + i,
        "sourceIPv4Address": "10.10.1.2", "destinationIPv4Address": "10.10.1.3",
        "sourceTransportPort": 40000 + i, "destinationTransportPort": 8080,
        "protocolIdentifier": 6, "flowType": 2,
        "sourcePodNamespace": "frontend", "sourcePodName": "client-1", "sourceNodeName": "node-1",
        "destinationPodNamespace": "backend", "destinationPodName": "web-1",
        "destinationNodeName": "node-2", "octetDeltaCount": 100, "reverseOctetDeltaCount": 10,
        "ingressNetworkPolicyRuleAction": 1, "egressNetworkPolicyRuleAction": 0,
    }  # fmt: skip
    record.update(fields)
    return record


DROPPED = {"ingressNetworkPolicyRuleAction": 2}
REJECTED = {"ingressNetworkPolicyRuleAction": 3}


def number(record: dict[str, Any]) -> int:
    return record["sourceTransportPort"] - 40000


def publish(window: FlowWindow, records) -> None:
    for record in records:
        window.append(record)
    window.published()


@pytest.fixture
def serve() -> Iterator[Any]:
    """serve(capacity=1000, token="") -> a started FlowApi (clock NOW) over a new window;
    every API is stopped at teardown."""
    started: list[FlowApi] = []

    def start(capacity: int = 1000, token: str = "") -> FlowApi:
        address = parse_address("127.0.0.1:0", default_protocol="tcp", listen=True)
        api = FlowApi(address, FlowWindow(capacity), token, clock=lambda: NOW)
        api.start()
        started.append(api)
        return api

    yield start
    for api in started:
        api.stop()


def request(
    api: FlowApi, target: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPResponse, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=WAIT)
    try:
        connection.request(method, target, headers=headers or {})
        response = connection.getresponse()
        return response.status, response, response.read()
    finally:
        connection.close()


def flows(api: FlowApi, query: str = "") -> list[int]:
    """The numbers of the records GET /api/v1/flows?QUERY answers, in order."""
    status, response, body = request(api, f"/api/v1/flows?{query}")
    assert status == 200, body
    assert response.getheader("Content-Type") == "application/x-ndjson"
    return [number(json.loads(line)["flow"]) for line in body.splitlines()]


def error(api: FlowApi, target: str, status: int = 400, **kwargs: Any) -> str:
    got, response, body = request(api, target, **kwargs)
    assert got == status, body
    assert response.getheader("Content-Type") == "application/json"
    return json.loads(body)["error"]


def samples(api: FlowApi) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in api.metrics(PREFIX)
        for sample in family.samples
    }


def cut_off(api: FlowApi) -> dict[str, float]:
    got = samples(api)
    return {
        reason: got[(PREFIX + "api_streams_cut_off_total", frozenset({("reason", reason)}))]
        for reason in ("window", "send_timeout")
    }


def until(predicate, what: str) -> None:
    """Wait for `predicate()`, failing with `what` after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"not within {WAIT}s: {what}"
        time.sleep(0.005)


def open_streams(api: FlowApi) -> float:
    return samples(api)[(PREFIX + "api_follow_streams", frozenset())]


class Stream:
    """A follow request on a raw socket, read only when the test says so."""

    def __init__(self, api: FlowApi, target: str, headers: dict[str, str] | None = None,
                 rcvbuf: int = 0):  # fmt: skip
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(WAIT)
        self.sock.connect(("127.0.0.1", api.port))
        lines = [f"GET {target} HTTP/1.1", "Host: test"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.file = self.sock.makefile("rb")

    def head(self) -> tuple[int, dict[str, str]]:
        status = int(self.file.readline().split()[1])
        headers = {}
        while (line := self.file.readline().strip()) != b"":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        return status, headers

    def line(self) -> bytes:
        line = self.file.readline()
        assert line, "the stream ended"
        return line

    def flow(self) -> dict[str, Any]:
        return json.loads(self.line())["flow"]

    def event(self) -> dict[str, str]:
        """One server-sent event's fields."""
        fields = {}
        while (line := self.line().rstrip(b"\n")) != b"":
            name, _, value = line.decode().partition(": ")
            fields[name] = value
        return fields

    def rest(self) -> list[bytes]:
        """Every line until the server closes the connection."""
        return self.file.read().splitlines()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def streams() -> Iterator[Any]:
    opened: list[Stream] = []

    def open_stream(*args: Any, **kwargs: Any) -> Stream:
        stream = Stream(*args, **kwargs)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.close()


# -- the latest records ----------------------------------------------------------------------


def test_last_n_are_the_newest_in_order_oldest_first(serve):
    api = serve()
    publish(api.window, [numbered(i) for i in range(30)])
    assert flows(api, "last=5") == [25, 26, 27, 28, 29]
    assert flows(api) == list(range(10, 30))  # 20 by default
    assert flows(api, "last=0") == []
    assert flows(api, "last=1000") == list(range(30))


def test_each_line_is_the_record_under_flow(serve):
    api = serve()
    publish(api.window, [numbered(0)])
    status, _, body = request(api, "/api/v1/flows")
    assert status == 200
    assert [json.loads(line) for line in body.splitlines()] == [{"flow": numbered(0)}]


def test_last_counts_only_what_the_window_still_holds(serve):
    api = serve(capacity=10)
    publish(api.window, [numbered(i) for i in range(25)])
    assert flows(api, "last=100") == list(range(15, 25))


def test_filters_as_query_parameters(serve):
    api = serve()
    publish(
        api.window,
        [numbered(i, **(DROPPED if i % 5 == 0 else REJECTED if i % 7 == 0 else {}))
         for i in range(30)],
    )  # fmt: skip
    assert flows(api, "verdict=DROPPED&last=100") == [0, 5, 10, 15, 20, 25]
    # last applies to the matching records
    assert flows(api, "verdict=dropped&last=2") == [20, 25]
    # a parameter twice: either; different parameters: both
    assert flows(api, "verdict=DROPPED&verdict=REJECTED&last=100") == [
        0, 5, 7, 10, 14, 15, 20, 21, 25, 28,
    ]  # fmt: skip
    assert flows(api, "verdict=DROPPED&from-port=40010") == [10]
    assert flows(api, "pod=backend/web&to-port=8080&last=3") == [27, 28, 29]
    assert flows(api, "pod=web&namespace=frontend") == []


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("verdict=foo", "verdict: 'foo' is not valid; expected ALLOWED, DROPPED or REJECTED"),
        ("port=70000", "port: '70000' is not valid; expected a port number 0-65535"),
        ("ip=10.0.0.300", "ip: '10.0.0.300' is not valid; expected an IP address or CIDR, e.g. "
         "10.10.1.2 or 10.10.0.0/16"),
        ("since=yesterday", "since: 'yesterday' is not valid; expected a duration ago such as "
         '"5m" or "1h30m", or a time such as 2026-12-07T10:00:00Z'),
        ("last=-1", "last: '-1' is not valid; expected a number of records 0-1000000 (0: none "
         "of the past)"),
        ("last=many", "last: 'many' is not valid; expected a number of records 0-1000000 (0: "
         "none of the past)"),
        ("follow=maybe", "follow: 'maybe' is not valid; expected true or false"),
        ("format=xml", "format: 'xml' is not valid; expected ndjson or sse"),
    ],
)  # fmt: skip
def test_a_bad_value_is_a_400_naming_the_parameter(serve, query, message):
    api = serve()
    assert error(api, f"/api/v1/flows?{query}") == message


def test_an_unknown_parameter_is_a_400_naming_it_and_the_nearest(serve):
    api = serve()
    message = error(api, "/api/v1/flows?verdikt=DROPPED")
    assert message.startswith("verdikt: 'DROPPED' is not valid; expected one of the parameters ")
    assert message.endswith("(did you mean 'verdict'?)")
    assert "from-pod" in message and "follow" in message
    assert error(api, "/api/v1/graph?bye=pod").endswith("(did you mean 'by'?)")
    assert error(api, "/api/v1/throughput?stepp=10s").endswith("(did you mean 'step'?)")
    assert error(api, "/api/v1/status?x=1") == (
        "x: '1' is not valid; expected one of the parameters none"
    )


def test_errors_are_counted_by_status(serve):
    api = serve()
    error(api, "/api/v1/flows?verdict=foo")
    error(api, "/api/v1/flows?nope=1")
    flows(api)
    got = samples(api)
    assert got[(PREFIX + "api_requests_total", frozenset({("code", "400")}))] == 2
    assert got[(PREFIX + "api_requests_total", frozenset({("code", "200")}))] == 1


def test_an_unknown_path_is_a_404(serve):
    api = serve()
    assert "no such path '/api/v2/flows'" in error(api, "/api/v2/flows", status=404)


def test_with_a_token_every_request_needs_it(serve):
    api = serve(token="s3cret")
    publish(api.window, [numbered(0)])
    needs = "this API needs its token: Authorization: Bearer ..."
    assert error(api, "/api/v1/flows", status=401) == needs
    assert error(api, "/api/v1/status", status=401) == needs
    wrong = {"Authorization": "Bearer s3cre"}
    assert error(api, "/api/v1/flows", status=401, headers=wrong) == needs
    assert error(api, "/api/v1/flows?access_token=nope", status=401) == needs
    status, _, body = request(api, "/api/v1/flows", headers={"Authorization": "Bearer s3cret"})
    assert status == 200 and number(json.loads(body)["flow"]) == 0
    # the UI's form: in the query, and not an unknown parameter
    assert flows(api, "access_token=s3cret&verdict=ALLOWED") == [0]
    status, _, _ = request(api, "/api/v1/status?access_token=s3cret")
    assert status == 200
    _, response, _ = request(api, "/api/v1/flows")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="antrea-flow"'


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_the_api_is_read_only(serve, method):
    api = serve()
    message = error(api, "/api/v1/flows", status=405, method=method)
    assert message == "the flow API is read-only: use GET"


def test_a_refused_post_with_a_body_leaves_the_connection_usable(serve):
    api = serve()
    publish(api.window, [numbered(0)])
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=WAIT)
    try:
        connection.request("POST", "/api/v1/flows", body=b'{"verdict": "DROPPED"}')
        response = connection.getresponse()
        response.read()
        assert response.status == 405
        connection.request("GET", "/api/v1/flows")
        response = connection.getresponse()
        assert response.status == 200
        assert number(json.loads(response.read())["flow"]) == 0
    finally:
        connection.close()


# -- graph, throughput, status -----------------------------------------------------------------


def test_graph_of_the_matching_records_of_the_last_five_minutes(serve):
    api = serve()
    old = numbered(9, flowEndMilliseconds=int((NOW - 600) * 1000), destinationPodName="db")
    publish(api.window, [numbered(0), numbered(1, **DROPPED), old])
    status, _, body = request(api, "/api/v1/graph?by=pod")
    assert status == 200
    graph = json.loads(body)
    assert graph["by"] == "pod"
    (edge,) = graph["edges"]  # not the one of ten minutes ago
    assert (edge["source"], edge["target"]) == ("frontend/client-1", "backend/web-1")
    assert (edge["connections"], edge["allowed"], edge["dropped"], edge["bytes"]) == (2, 1, 1, 220)
    _, _, body = request(api, "/api/v1/graph?by=pod&since=15m&verdict=ALLOWED")
    assert {e["target"] for e in json.loads(body)["edges"]} == {"backend/web-1", "backend/db"}
    assert error(api, "/api/v1/graph?by=everything") == (
        "by: 'everything' is not valid; expected workload, pod, namespace, service, node, policy"
    )


def test_throughput_per_node_and_step(serve):
    api = serve()
    publish(api.window, [numbered(0), numbered(1)])
    status, _, body = request(api, "/api/v1/throughput?since=2m&step=30s")
    assert status == 200
    result = json.loads(body)
    assert result["start"] == NOW - 120 and result["step"] == 30
    assert len(result["times"]) == 5
    tx = {n["node"]: n["tx"] for n in result["nodes"]}
    assert tx["node-1"][2] == 2 * 100 * 8 / 30  # both records ended a minute ago
    assert tx["node-2"][2] == 2 * 10 * 8 / 30
    assert error(api, "/api/v1/throughput?step=0.5s").startswith("step: '0.5s' is not valid")
    assert "at most 10000 steps" in error(api, "/api/v1/throughput?since=10000h&step=1s")
    assert (
        error(api, "/api/v1/throughput?until=1h")
        == "until: '1h' is not valid; expected a time after `since`"
    )


def test_status(serve):
    api = serve(capacity=10)
    publish(api.window, [numbered(i) for i in range(12)])
    status, _, body = request(api, "/api/v1/status")
    assert status == 200
    got = json.loads(body)
    assert got["window"] == {"capacity": 10, "records": 10}
    assert (got["exported"], got["followStreams"], got["cutOff"]) == (12, 0, {})


# -- follow streams ----------------------------------------------------------------------------


def test_follow_streams_records_appended_after_connecting_and_only_matching_ones(serve, streams):
    api = serve()
    publish(api.window, [numbered(0, **DROPPED)])  # before: not sent (last=0 when following)
    stream = streams(api, "/api/v1/flows?follow=true&verdict=DROPPED")
    status, headers = stream.head()
    assert status == 200 and headers["content-type"] == "application/x-ndjson"
    publish(api.window, [numbered(1), numbered(2, **DROPPED), numbered(3, **REJECTED)])
    assert number(stream.flow()) == 2
    publish(api.window, [numbered(4), numbered(5, **DROPPED)])
    assert number(stream.flow()) == 5
    assert open_streams(api) == 1
    stream.close()

    def ended() -> bool:  # a client gone is noticed when the stream next writes
        publish(api.window, [numbered(6, **DROPPED)])
        return open_streams(api) == 0

    until(ended, "the stream's end noticed")


def test_a_filtered_stream_reads_past_many_records_it_does_not_want(serve, streams):
    """More non-matching records than one read takes, then a match, in one publish: the
    match comes at once, not at the next publish."""
    api = serve(capacity=50_000)
    stream = streams(api, "/api/v1/flows?follow=true&verdict=DROPPED")
    stream.head()
    until(lambda: open_streams(api) == 1, "the stream open")
    # 40,000 records, 157 reads: served back to back they take well under a second; a pump
    # waiting for its next tick between reads takes longer than this liveness bound.
    stream.sock.settimeout(WAIT / 3)
    publish(api.window, [*(numbered(i) for i in range(40_000)), numbered(40_000, **DROPPED)])
    assert number(stream.flow()) == 40_000


def test_follow_with_last_sends_the_past_first(serve, streams):
    api = serve()
    publish(api.window, [numbered(i) for i in range(5)])
    stream = streams(api, "/api/v1/flows?follow=1&last=2")
    assert stream.head()[0] == 200
    assert [number(stream.flow()) for _ in range(2)] == [3, 4]
    publish(api.window, [numbered(5)])
    assert number(stream.flow()) == 5


def test_follow_streams_end_when_the_api_stops(serve, streams):
    api = serve()
    stream = streams(api, "/api/v1/flows?follow=true")
    assert stream.head()[0] == 200
    until(lambda: open_streams(api) == 1, "the stream open")
    api.stop()
    assert stream.rest() == []
    until(lambda: open_streams(api) == 0, "the stream closed")


def test_server_sent_events_with_ids_and_resuming_from_last_event_id(serve, streams):
    api = serve()
    publish(api.window, [numbered(0)])
    first = streams(api, "/api/v1/flows?follow=true&format=sse&last=1")
    status, headers = first.head()
    assert status == 200 and headers["content-type"] == "text/event-stream"
    event = first.event()
    assert event["id"] == "0" and number(json.loads(event["data"])["flow"]) == 0
    publish(api.window, [numbered(1)])
    event = first.event()
    assert event["id"] == "1" and json.loads(event["data"]) == {"flow": numbered(1)}
    first.close()
    publish(api.window, [numbered(2), numbered(3)])  # while it was away
    # An EventSource reconnecting: from the record after the last it saw, past `last`.
    again = streams(
        api, "/api/v1/flows?follow=true&format=sse&last=100", headers={"Last-Event-ID": "1"}
    )
    assert again.head()[0] == 200
    assert [again.event()["id"] for _ in range(2)] == ["2", "3"]
    publish(api.window, [numbered(4)])
    assert again.event()["id"] == "4"


def test_accept_event_stream_chooses_server_sent_events(serve, streams):
    api = serve()
    publish(api.window, [numbered(0)])
    stream = streams(api, "/api/v1/flows?follow=true&last=1", {"Accept": "text/event-stream"})
    assert stream.head()[1]["content-type"] == "text/event-stream"
    assert stream.event()["id"] == "0"
    status, response, body = request(
        api, "/api/v1/flows?last=1", headers={"Accept": "text/event-stream"}
    )
    assert (
        body
        == b'id: 0\ndata: {"flow":'
        + json.dumps(numbered(0), separators=(",", ":")).encode()
        + b"}\n\n"
    )
    # An explicit format wins over the Accept header.
    _, response, body = request(
        api, "/api/v1/flows?last=1&format=ndjson", headers={"Accept": "text/event-stream"}
    )
    assert response.headers["Content-Type"] == "application/x-ndjson"
    assert number(json.loads(body)["flow"]) == 0


def test_a_stream_a_whole_window_behind_gets_the_cut_off_line(serve, streams):
    api = serve(capacity=10)
    stream = streams(api, "/api/v1/flows?follow=true")
    assert stream.head()[0] == 200
    until(lambda: open_streams(api) == 1, "the stream open")
    # far more than the window, in one go: the stream's thread cannot keep up
    publish(api.window, ({"n": i} for i in range(20_000)))
    lines = stream.rest()  # it is cut off: the server closes the connection
    assert lines, "the stream ended without a word"
    message = json.loads(lines[-1])
    assert set(message) == {"error", "lost"} and message["lost"] > 0
    assert message["error"].startswith(f"cut off: this stream fell {message['lost']} records")
    assert "10-record window" in message["error"]
    received = [json.loads(line)["flow"]["n"] for line in lines[:-1]]
    assert len(received) + message["lost"] <= 20_000
    assert received == sorted(received)
    until(lambda: cut_off(api)["window"] == 1, "the cut-off counted")
    until(lambda: open_streams(api) == 0, "the stream closed")


def test_a_cut_off_server_sent_event_stream_gets_an_error_event(serve, streams):
    api = serve(capacity=10)
    stream = streams(api, "/api/v1/flows?follow=true&format=sse")
    assert stream.head()[0] == 200
    until(lambda: open_streams(api) == 1, "the stream open")
    publish(api.window, ({"n": i} for i in range(20_000)))
    lines = stream.rest()
    assert lines[-3:-1] == [b"event: error", lines[-2]] and lines[-2].startswith(b"data: ")
    assert json.loads(lines[-2][len(b"data: ") :])["lost"] > 0


def test_a_client_that_reads_nothing_is_cut_off_and_counted(serve, streams, monkeypatch):
    """It connects, then does not read while more than a window of records comes: when it
    reads again it finds the cut-off line, or the connection closed."""
    monkeypatch.setattr(streams_module, "SEND_TIMEOUT", 1.0)
    api = serve(capacity=2_000)
    stream = streams(api, "/api/v1/flows?follow=true", rcvbuf=4096)
    until(lambda: open_streams(api) == 1, "the stream open")
    padding = "x" * 2_000
    total = 0
    for batch in range(10):  # 10 x 1000 records of 2 kB: more than any socket buffer holds
        publish(api.window, (numbered(batch * 1000 + i, pad=padding) for i in range(1000)))
        total += 1000
    until(lambda: sum(cut_off(api).values()) == 1, "the slow stream cut off")
    until(lambda: open_streams(api) == 0, "the stream closed")
    assert stream.head()[0] == 200
    *whole, last = stream.rest()
    assert all(line.startswith(b'{"flow":') for line in whole) and len(whole) < total
    # the cut-off line; or the connection closed, maybe in the middle of a record
    if last.startswith(b'{"error"'):
        assert json.loads(last)["lost"] > 0
    else:
        assert last[:8] == b'{"flow":'[: len(last)]


def test_a_client_that_takes_nothing_for_the_send_timeout_is_cut_off(serve, streams, monkeypatch):
    """The window holds everything (no record is lost), but the client's socket is full for
    SEND_TIMEOUT: the stream is closed and counted as send_timeout."""
    monkeypatch.setattr(streams_module, "SEND_TIMEOUT", 0.5)
    api = serve(capacity=20_000)
    stream = streams(api, "/api/v1/flows?follow=true", rcvbuf=4096)
    until(lambda: open_streams(api) == 1, "the stream open")
    padding = "x" * 2_000
    publish(api.window, (numbered(i, pad=padding) for i in range(15_000)))  # 30 MB
    until(lambda: cut_off(api) == {"window": 0, "send_timeout": 1}, "the stalled stream cut off")
    until(lambda: open_streams(api) == 0, "the stream closed")
    assert stream.head()[0] == 200
    lines = stream.rest()
    # Whole records in order; the write that timed out may have sent part of a line.
    whole = [number(json.loads(line)["flow"]) for line in lines[:-1]]
    assert 0 < len(whole) < 15_000 and whole == list(range(len(whole)))


def test_appending_never_waits_for_idle_follow_clients(serve, streams, monkeypatch):
    monkeypatch.setattr(streams_module, "SEND_TIMEOUT", 1.0)
    api = serve(capacity=1_000)
    idle = [streams(api, "/api/v1/flows?follow=true", rcvbuf=4096) for _ in range(20)]
    until(lambda: open_streams(api) == 20, "20 streams open")
    window = api.window
    for i in range(100_000):
        window.append({"n": i, "pad": "x" * 50})
        if i % 1_000 == 999:
            window.published()
    assert window.next_seq == 100_000 and len(window) == 1_000
    until(lambda: sum(cut_off(api).values()) == 20, "every idle stream cut off")
    until(lambda: open_streams(api) == 0, "every stream closed")
    for stream in idle:
        lines = stream.rest()
        assert 0 < len(lines) < 100_000
        if lines[-1].startswith(b'{"error"'):
            assert json.loads(lines[-1])["lost"] > 0
    # the API still answers
    status, _, body = request(api, "/api/v1/flows?last=2")
    assert status == 200
    assert [json.loads(line)["flow"]["n"] for line in body.splitlines()] == [99_998, 99_999]


# -- antrea-flow observe --server --------------------------------------------------------------


def test_observe_server_prints_the_matching_records(serve, capsys):
    api = serve()
    publish(api.window, [numbered(i, **(DROPPED if i % 3 == 0 else {})) for i in range(40)])
    url = f"http://127.0.0.1:{api.port}"
    code = cli.main(["observe", "--server", url, "--verdict", "DROPPED", "-o", "json"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert [json.loads(line) for line in out.splitlines()] == [
        numbered(i, **DROPPED) for i in range(0, 40, 3)
    ]
    code = cli.main(["observe", "--server", url + "/", "--last", "2", "--to-port", "8080"])
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[1].endswith(
        ": frontend/client-1:40039 -> backend/web-1:8080 TCP inter-node DROPPED by ingress "
        "K8s NetworkPolicy default deny (tx 0 B, rx 0 B)"
    )


def test_observe_server_with_a_token(serve, capsys, monkeypatch):
    api = serve(token="s3cret")
    publish(api.window, [numbered(0)])
    url = f"http://127.0.0.1:{api.port}"
    monkeypatch.delenv("ANTREA_FLOW_API_TOKEN", raising=False)
    assert cli.main(["observe", "--server", url]) == 2
    assert capsys.readouterr().err == (
        f"antrea-flow observe: {url}: this API needs its token: Authorization: Bearer ... "
        "(--token, or ANTREA_FLOW_API_TOKEN)\n"
    )
    assert cli.main(["observe", "--server", url, "--token", "s3cret", "-o", "json"]) == 0
    assert [number(json.loads(x)) for x in capsys.readouterr().out.splitlines()] == [0]
    monkeypatch.setenv("ANTREA_FLOW_API_TOKEN", "s3cret")
    assert cli.main(["observe", "--server", url, "-o", "json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


# -- a running Aggregator ----------------------------------------------------------------------


def agent_record(octets: int, end: int) -> dict[str, Any]:
    """An intra-node record (exported without waiting for a peer) with these totals."""
    template = exporter_templates()[0]
    record = dict(zip(template.keys, template.values_from({}), strict=True))
    record.update(
        sourceIPv4Address="10.10.1.5", destinationIPv4Address="10.10.1.6",
        protocolIdentifier=6, sourceTransportPort=40000, destinationTransportPort=8080,
        flowStartSeconds=900, flowEndSeconds=end, flowEndReason=2,
        packetTotalCount=octets // 100, packetDeltaCount=octets // 100,
        octetTotalCount=octets, octetDeltaCount=octets, flowType=1,
        sourcePodName="client", sourcePodNamespace="frontend", sourceNodeName="node-1",
        destinationPodName="server", destinationPodNamespace="frontend",
        destinationNodeName="node-1",
    )  # fmt: skip
    return record


def aggregator_conf(tmp_path, api_port: int) -> Path:
    return api_aggregator_conf(
        tmp_path, api_port, "flowExportInterval: 60s\napiWindowRecords: 100\n"
    )


def test_a_running_aggregator_serves_what_it_exports(tmp_path):
    api_port = free_port()
    clock = Clock(1000.0)
    aggregator = Aggregator(
        load_aggregator_config(aggregator_conf(tmp_path, api_port)), clock=clock
    )
    peer = Peer("192.168.77.101", 50001, "tcp", 1)
    template = exporter_templates()[0]
    url = f"http://127.0.0.1:{api_port}"

    def intake(record: dict[str, Any]) -> None:
        message = Message(export_time=0, sequence_number=0, observation_domain_id=11,
                          data_sets=[DataSet(template, [record])])  # fmt: skip
        aggregator._intake(peer, message)

    def get_flows() -> list[dict[str, Any]]:
        connection = http.client.HTTPConnection("127.0.0.1", api_port, timeout=WAIT)
        try:
            connection.request("GET", "/api/v1/flows")
            response = connection.getresponse()
            assert response.status == 200
            return [json.loads(line)["flow"] for line in response.read().splitlines()]
        finally:
            connection.close()

    def follow() -> tuple[socket.socket, Any]:
        sock = socket.create_connection(("127.0.0.1", api_port), timeout=WAIT)
        sock.sendall(b"GET /api/v1/flows?follow=true HTTP/1.1\r\nHost: test\r\n\r\n")
        reader = sock.makefile("rb")
        while reader.readline().strip():  # the status line and headers
            pass
        return sock, reader

    async def scenario() -> tuple[list, list, list]:
        stop = asyncio.Event()
        task = asyncio.create_task(aggregator.run(stop))
        try:
            await eventually(lambda: aggregator.listening, "the aggregator listening")
            sock, reader = await asyncio.to_thread(follow)
            intake(agent_record(1000, 990))
            assert aggregator.export_due() == 1
            first = await asyncio.to_thread(reader.readline)
            clock.now += 60  # the next export of the same flow
            intake(agent_record(1500, 1050))
            assert aggregator.export_due() == 1
            second = await asyncio.to_thread(reader.readline)
            listed = await asyncio.to_thread(get_flows)
        finally:
            stop.set()
            await task
        # stopping the aggregator ends the follow stream
        after = await asyncio.to_thread(reader.read)
        reader.close()
        sock.close()
        return [json.loads(first)["flow"], json.loads(second)["flow"]], listed, after

    followed, listed, after = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert listed == followed
    assert [r["octetDeltaCount"] for r in listed] == [1000, 500]
    assert [r["octetTotalCount"] for r in listed] == [1000, 1500]
    assert all(r["sourcePodName"] == "client" and r["flowType"] == 1 for r in listed)
    assert listed[0]["originalExporterIPv4Address"] == "192.168.77.101"
    assert after == b""
    with pytest.raises(OSError):
        get_flows()  # the API stopped with the aggregator
    assert url.endswith(str(api_port))


def test_an_api_address_in_use_leaves_the_aggregator_running(tmp_path, caplog):
    """The API is a view of the records, not their path: the intake opens without it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        aggregator = Aggregator(load_aggregator_config(aggregator_conf(tmp_path, port)))

        async def scenario() -> tuple[bool, object]:
            stop = asyncio.Event()
            task = asyncio.create_task(aggregator.run(stop))
            try:
                await eventually(lambda: aggregator.listening, "the aggregator listening")
                return aggregator.listening, aggregator.flow_api
            finally:
                stop.set()
                await task

        listening, flow_api = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert listening and flow_api is None
    assert (
        f"apiBindAddress '127.0.0.1:{port}': cannot listen: Address already in use; running "
        "without the flow API and UI"
    ) in caplog.text


def test_a_follow_client_that_goes_is_let_go_without_a_record_or_keep_alive(serve, streams):
    api = serve()
    stream = streams(api, "/api/v1/flows?follow=true")
    stream.head()
    until(lambda: open_streams(api) == 1, "the stream open")
    stream.close()
    deadline = time.monotonic() + streams_module.KEEPALIVE / 3  # well before a keep-alive
    while open_streams(api) != 0:
        assert time.monotonic() < deadline, "the stream outlived its client"
        time.sleep(0.01)
