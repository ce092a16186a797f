"""The aggregator's certificate directory: created once, reused, reissued when needed."""

from __future__ import annotations

import ipaddress
import socket
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from antrea_flow.tls import CertificateAuthority, client_context, server_context
from antrea_flow.tls.provision import ensure_aggregator_certificates

NAMES = ["flow-aggregator.flow-aggregator.svc", "localhost"]
ADDRESSES = ["127.0.0.1", "::1"]
FILES = ("ca.crt", "ca.key", "server.crt", "server.key", "tls.crt", "tls.key")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in FILES}


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(path: Path) -> tuple[set[str], set[str]]:
    san = load_cert(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        set(san.get_values_for_type(x509.DNSName)),
        {str(a) for a in san.get_values_for_type(x509.IPAddress)},
    )


def load_ca(directory: Path) -> CertificateAuthority:
    return CertificateAuthority.load(
        (directory / "ca.crt").read_bytes(), (directory / "ca.key").read_bytes()
    )


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def test_creates_every_file_with_private_keys_0600(tmp_path):
    directory = tmp_path / "certs"
    files = ensure_aggregator_certificates(directory, NAMES, ADDRESSES)
    for name in FILES:
        assert (directory / name).is_file(), name
    for name in ("ca.key", "server.key", "tls.key"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    assert files.ca == directory / "ca.crt"
    assert files.server_cert == directory / "server.crt"
    assert files.server_key == directory / "server.key"
    assert files.client_cert == directory / "tls.crt"
    assert files.client_key == directory / "tls.key"
    ca = load_ca(directory)
    for name in ("server.crt", "tls.crt"):
        load_cert(directory / name).verify_directly_issued_by(ca.certificate)


def test_server_certificate_has_the_dns_and_ip_sans(tmp_path):
    files = ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    names, addresses = sans(files.server_cert)
    assert set(NAMES) <= names
    assert {str(ipaddress.ip_address(a)) for a in ADDRESSES} <= addresses


def test_second_call_reuses_everything(tmp_path):
    ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    before = snapshot(tmp_path)
    ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    assert snapshot(tmp_path) == before
    # a subset of the names is already covered
    ensure_aggregator_certificates(tmp_path, NAMES[:1], ADDRESSES[:1])
    assert snapshot(tmp_path) == before


def test_a_new_name_reissues_only_the_server_certificate(tmp_path):
    ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    before = snapshot(tmp_path)
    ensure_aggregator_certificates(tmp_path, [*NAMES, "fa.example.com"], [*ADDRESSES, "10.96.5.5"])
    after = snapshot(tmp_path)
    for name in ("ca.crt", "ca.key", "tls.crt", "tls.key"):
        assert after[name] == before[name], name
    assert after["server.crt"] != before["server.crt"]
    assert after["server.key"] != before["server.key"]
    names, addresses = sans(tmp_path / "server.crt")
    assert "fa.example.com" in names and "10.96.5.5" in addresses
    assert set(NAMES) <= names


@pytest.mark.parametrize(
    ("names", "addresses"),
    [([*NAMES, "fa.example.com"], ADDRESSES), (NAMES, [*ADDRESSES, "fd00:96::5"])],
    ids=["dns_name", "ip_address"],
)
def test_any_missing_san_reissues_the_server_certificate(tmp_path, names, addresses):
    ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    before = snapshot(tmp_path)["server.crt"]
    ensure_aggregator_certificates(tmp_path, names, addresses)
    assert (tmp_path / "server.crt").read_bytes() != before
    have_names, have_addresses = sans(tmp_path / "server.crt")
    assert set(names) <= have_names
    assert {str(ipaddress.ip_address(a)) for a in addresses} <= have_addresses


@pytest.mark.parametrize(("cert", "key"), [("server.crt", "server.key"), ("tls.crt", "tls.key")])
def test_a_certificate_expiring_within_30_days_is_reissued(tmp_path, cert, key):
    ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    ca = load_ca(tmp_path)
    short = ca.issue(NAMES[0], NAMES, ADDRESSES, server=True, client=True, valid_days=10)
    write(tmp_path / cert, short.certificate_pem)
    write(tmp_path / key, short.private_key_pem)
    before = snapshot(tmp_path)
    ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    after = snapshot(tmp_path)
    assert after[cert] != before[cert]
    renewed = load_cert(tmp_path / cert)
    assert (renewed.not_valid_after_utc - renewed.not_valid_before_utc).days > 30
    assert after["ca.crt"] == before["ca.crt"]
    other = "tls.crt" if cert == "server.crt" else "server.crt"
    assert after[other] == before[other]


@pytest.mark.parametrize(("cert", "key"), [("server.crt", "server.key"), ("tls.crt", "tls.key")])
def test_a_certificate_signed_by_another_ca_is_reissued(tmp_path, cert, key):
    ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    # same subject name as ours, different key: only the signature tells them apart
    other = CertificateAuthority.create("flow-aggregator-ca")
    foreign = other.issue(NAMES[0], NAMES, ADDRESSES, server=True, client=True)
    write(tmp_path / cert, foreign.certificate_pem)
    write(tmp_path / key, foreign.private_key_pem)
    ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    load_cert(tmp_path / cert).verify_directly_issued_by(load_ca(tmp_path).certificate)


def test_an_expiring_ca_is_replaced_with_everything_it_signed(tmp_path):
    ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    old = CertificateAuthority.create("flow-aggregator-ca", valid_days=10)
    write(tmp_path / "ca.crt", old.certificate_pem)
    write(tmp_path / "ca.key", old.private_key_pem)
    before = snapshot(tmp_path)
    ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    after = snapshot(tmp_path)
    assert after["ca.crt"] != before["ca.crt"]
    ca = load_ca(tmp_path)
    for name in ("server.crt", "tls.crt"):
        load_cert(tmp_path / name).verify_directly_issued_by(ca.certificate)


@pytest.mark.parametrize("key", ["server.key", "tls.key"])
def test_a_missing_private_key_gets_its_certificate_reissued(tmp_path, key):
    """A certificate without its key is of no use: the server could not start, or agents
    could not present the client certificate."""
    ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    (tmp_path / key).unlink()
    files = ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    assert (tmp_path / key).is_file()
    server_context(files.server_cert, files.server_key, files.ca)
    client_context(files.ca, files.client_cert, files.client_key)


def test_mutual_tls_handshake_with_the_issued_files(tmp_path):
    files = ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    server_ctx = server_context(files.server_cert, files.server_key, files.ca)
    client_ctx = client_context(files.ca, files.client_cert, files.client_key)
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)
    result: dict[str, object] = {}

    def serve():
        try:
            with server_ctx.wrap_socket(left, server_side=True) as tls:
                result["peer"] = tls.getpeercert()
                tls.sendall(tls.recv(5))
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(right, server_hostname=NAMES[0]) as tls:
            tls.sendall(b"hello")
            assert tls.recv(5) == b"hello"
            server_cert = tls.getpeercert()
    finally:
        thread.join(10)
    assert "error" not in result, result.get("error")
    assert ("DNS", NAMES[0]) in server_cert["subjectAltName"]
    assert result["peer"], "the server saw the client certificate"


def test_the_server_refuses_a_client_of_another_ca(tmp_path):
    import ssl

    files = ensure_aggregator_certificates(tmp_path, NAMES, ADDRESSES)
    rogue_dir = tmp_path / "rogue"
    rogue_dir.mkdir()
    other = CertificateAuthority.create("flow-aggregator-ca")
    rogue = other.issue("intruder", client=True)
    write(rogue_dir / "tls.crt", rogue.certificate_pem)
    write(rogue_dir / "tls.key", rogue.private_key_pem)
    server_ctx = server_context(files.server_cert, files.server_key, files.ca)
    client_ctx = client_context(files.ca, rogue_dir / "tls.crt", rogue_dir / "tls.key")
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)
    result: dict[str, object] = {}

    def serve():
        try:
            with server_ctx.wrap_socket(left, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            result["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with (
            pytest.raises((ssl.SSLError, OSError)),
            client_ctx.wrap_socket(right, server_hostname=NAMES[0]) as tls,
        ):
            tls.sendall(b"x")
            tls.recv(1)  # TLS 1.3: the refusal arrives after the client's handshake
    finally:
        right.close()
        thread.join(10)
    assert isinstance(result.get("error"), ssl.SSLError)
