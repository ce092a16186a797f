"""`antrea-flow collector` start-up errors, run in-process: each is one line on stderr that
names the flag at fault and its value, with exit status 2 like any other usage error.

Records on stdout and clean exits are tested on a subprocess in
test/integration/test_collector_cli.py."""

from __future__ import annotations

import socket

import pytest

from antrea_flow import cli

TLS_FLAGS = ("--ca", "--cert", "--key")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collector_error(capsys, *args: str) -> str:
    """Run `antrea-flow collector ARGS`, which must fail at start-up; its one stderr line."""
    code = cli.main(["collector", *args])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def tls_files(tls) -> dict[str, str]:
    s = tls.server
    return {"--ca": str(s.ca), "--cert": str(s.cert), "--key": str(s.key)}


def tls_error(capsys, files: dict[str, str]) -> str:
    args = ["--address", f"127.0.0.1:{free_port()}:tls"]
    for flag, path in files.items():
        args += [flag, path]
    return collector_error(capsys, *args)


def names_only(line: str, *flags: str) -> None:
    """The error names `flags` and no other TLS flag (OpenSSL's reasons name no file)."""
    for flag in TLS_FLAGS:
        assert (flag in line) == (flag in flags), line


@pytest.mark.parametrize("flag", TLS_FLAGS)
@pytest.mark.parametrize(("kind", "reason"), [("missing", "No such file"), ("dir", "directory")])
def test_unreadable_tls_file_names_its_flag(capsys, tls_material, tmp_path, flag, kind, reason):
    bad = tmp_path / "nowhere" / "file.pem"
    if kind == "dir":
        bad = tmp_path
    line = tls_error(capsys, {**tls_files(tls_material), flag: str(bad)})
    assert f"{flag} {bad}" in line
    assert reason in line
    names_only(line, flag)


@pytest.mark.parametrize(
    ("flag", "content", "expected"),
    [
        ("--ca", "key", "not a PEM certificate"),
        ("--cert", "key", "not a PEM certificate"),
        ("--key", "cert", "not an unencrypted PEM private key"),
        ("--ca", b"", "not a PEM certificate"),
        ("--key", b"junk\n", "not an unencrypted PEM private key"),
    ],
    ids=["ca-is-a-key", "cert-is-a-key", "key-is-a-certificate", "empty-ca", "junk-key"],
)
def test_tls_file_of_the_wrong_kind_names_its_flag(
    capsys, tls_material, tmp_path, flag, content, expected
):
    files = tls_files(tls_material)
    if isinstance(content, bytes):
        bad = tmp_path / "bad.pem"
        bad.write_bytes(content)
        files[flag] = str(bad)
    else:
        files[flag] = files[f"--{content}"]
    line = tls_error(capsys, files)
    assert f"{flag} {files[flag]}: {expected}" in line
    names_only(line, flag)


def test_key_that_does_not_match_the_certificate_names_cert_and_key(capsys, tls_material):
    files = {**tls_files(tls_material), "--key": str(tls_material.client.key)}
    line = tls_error(capsys, files)
    assert (
        f"--key {files['--key']} does not match the certificate in --cert {files['--cert']}" in line
    )
    names_only(line, "--cert", "--key")


@pytest.mark.timeout(20)  # before the check, the collector started and ran until killed
@pytest.mark.parametrize(
    "address", ["127.0.0.1:{port}:tcp", "127.0.0.1:{port}:udp", "127.0.0.1:{port}"]
)
@pytest.mark.parametrize("flag", TLS_FLAGS)
def test_tls_files_with_a_tcp_or_udp_address_are_refused(capsys, address, flag):
    address = address.format(port=free_port())
    line = collector_error(capsys, "--address", address, flag, "/nonexistent")
    assert f"--address {address}" in line
    assert f"{flag} /nonexistent" in line
    assert "--ca/--cert/--key need a tls address" in line


def test_unresolvable_host_names_the_address(capsys):
    address = f"nosuchhost.invalid:{free_port()}"
    line = collector_error(capsys, "--address", address)
    assert line.startswith(f"antrea-flow collector: --address {address}: cannot resolve"), line
    assert "'nosuchhost.invalid'" in line


@pytest.mark.parametrize(
    ("protocol", "kind"), [("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)]
)
def test_port_in_use_names_the_address(capsys, protocol, kind):
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}:{protocol}"
        line = collector_error(capsys, "--address", address)
    assert (
        line == f"antrea-flow collector: --address {address}: cannot listen: Address already in use"
    )


def test_host_that_is_not_local_names_the_address(capsys):
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never an address of this machine.
    address = f"192.0.2.1:{free_port()}"
    line = collector_error(capsys, "--address", address)
    assert line.startswith(f"antrea-flow collector: --address {address}: cannot listen: "), line
    assert "not an address of this host" in line
