"""The `antrea-flow collector` command as a subprocess: one JSON object (or text line) per
record on stdout, clean exit on SIGTERM/SIGINT, one-line errors for bad arguments."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from antrea_flow.ipfix.address import TransportAddress

from .ipfixkit import (
    V4,
    V6,
    WAIT,
    exporting,
    free_port,
    make_record,
    run,
    template_id_of,
)

ACCEPTED_FORM = "<HOST>:<PORT>[:<PROTO>]"


def command() -> list[str]:
    script = Path(sys.executable).parent / "antrea-flow"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "antrea_flow.cli"]


@dataclass
class Collector:
    process: asyncio.subprocess.Process
    stderr_lines: list[str] = field(default_factory=list)

    async def read_lines(self, count: int) -> list[str]:
        lines = []
        for _ in range(count):
            line = await asyncio.wait_for(self.process.stdout.readline(), WAIT)
            assert line, f"stdout ended early; stderr: {''.join(self.stderr_lines)}"
            lines.append(line.decode())
        return lines

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), WAIT)


@contextlib.asynccontextmanager
async def collector_process(*args: str) -> AsyncIterator[Collector]:
    process = await asyncio.create_subprocess_exec(
        *command(),
        "collector",
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    collector = Collector(process)
    ready = asyncio.Event()

    async def drain_stderr() -> None:
        while line := await process.stderr.readline():
            collector.stderr_lines.append(line.decode())
            if "collecting IPFIX on" in line.decode():
                ready.set()

    reader = asyncio.create_task(drain_stderr())
    try:
        waiters = [asyncio.create_task(ready.wait()), asyncio.create_task(process.wait())]
        try:
            await asyncio.wait(waiters, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        assert ready.is_set(), f"collector did not start: {''.join(collector.stderr_lines)}"
        yield collector
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reader, 5)


def tls_args(tls) -> list[str]:
    s = tls.server
    return ["--ca", str(s.ca), "--cert", str(s.cert), "--key", str(s.key)]


def expected_row(record: dict, host: str, domain: int) -> dict:
    key = "exporterIPv6Address" if ":" in host else "exporterIPv4Address"
    return {
        key: host,
        "observationDomainId": domain,
        "templateId": template_id_of(record),
        **record,
    }


@pytest.mark.parametrize(
    ("protocol", "host"),
    [("tcp", "127.0.0.1"), ("udp", "127.0.0.1"), ("tls", "127.0.0.1"), ("tcp", "::1")],
)
def test_json_output_one_object_per_record(protocol, host, tls_material):
    records = {i: make_record(i) for i in range(1, 41)}
    assert {template_id_of(r) for r in records.values()} == {V4, V6}
    port = free_port(socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM, host)
    bracketed = f"[{host}]" if ":" in host else host
    args = ["--address", f"{bracketed}:{port}:{protocol}", "--output", "json"]
    if protocol == "tls":
        args += tls_args(tls_material)

    async def scenario():
        async with collector_process(*args) as collector:
            address = TransportAddress(host, port, protocol)
            async with exporting(address, tls=tls_material, domain=77) as exporter:
                for record in records.values():
                    assert exporter.add_mapping(template_id_of(record), record)
                lines = await collector.read_lines(len(records))
            code = await collector.stop()
            rest = await asyncio.wait_for(collector.process.stdout.read(), WAIT)
            return lines, code, rest, collector.stderr_lines

    lines, code, rest, stderr = run(scenario())
    assert code == 0, "".join(stderr)
    assert rest == b"", "records printed twice or partial lines"
    rows = [json.loads(line) for line in lines]
    assert all(line.endswith("\n") and "\n" not in line[:-1] for line in lines)
    got = {row["octetDeltaCount"]: row for row in rows}
    assert len(got) == len(records)
    for counter, record in records.items():
        assert got[counter] == expected_row(record, host, 77)
    for row in rows:
        # Integers are JSON numbers, addresses are strings.
        assert type(row["reversePacketTotalCount"]) is int
        assert type(row["flowStartSeconds"]) is int
        address_key = "sourceIPv4Address" if row["templateId"] == V4 else "sourceIPv6Address"
        assert isinstance(row[address_key], str)
    assert any("collector stopped: 40 records" in line for line in stderr), "".join(stderr)


def test_text_output_and_sigint(tls_material):
    records = {i: make_record(i) for i in range(1, 11)}
    port = free_port()

    async def scenario():
        address_arg = f"127.0.0.1:{port}:tcp"
        async with collector_process("--address", address_arg, "--output", "text") as collector:
            address = TransportAddress("127.0.0.1", port, "tcp")
            async with exporting(address, domain=5) as exporter:
                for record in records.values():
                    assert exporter.add_mapping(template_id_of(record), record)
                lines = await collector.read_lines(len(records))
            code = await collector.stop(signal.SIGINT)
            return lines, code

    lines, code = run(scenario())
    assert code == 0
    for line in lines:
        pairs = dict(token.split("=", 1) for token in line.split())
        record = records[int(pairs["octetDeltaCount"])]
        expected = expected_row(record, "127.0.0.1", 5)
        assert list(pairs) == list(expected)  # IE names in template order, metadata first
        # make_record's strings hold no spaces, so every value reads back as printed.
        assert pairs == {k: str(v) for k, v in expected.items()}


BAD_ADDRESSES = ["1.2.3.4", "[::1:4739", "host:99999", "host:4739:sctp"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command(), "collector", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_bad_address_exits_with_a_one_line_error(address):
    result = run_cli("--address", address)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert ACCEPTED_FORM in lines[0]
    assert repr(address) in lines[0] or address in lines[0]


def test_tls_without_certificates_exits_naming_the_missing_flags():
    result = run_cli("--address", f"127.0.0.1:{free_port()}:tls")
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert "--ca" in line and "--cert" in line and "--key" in line


def test_port_in_use_exits_with_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--address", f"127.0.0.1:{port}:tcp")
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert str(port) in line and "in use" in line
