"""The flow aggregator's certificates: created on first start, kept and reused after.

Without the Kubernetes API the directory holds `ca.crt` and `ca.key` (the CA), `server.crt`
and `server.key` (the aggregator's), and `tls.crt` and `tls.key`: the client certificate
for agents. `ca.crt`, `tls.crt` and `tls.key` are the keys of Antrea's `flow-aggregator-ca`
ConfigMap and `flow-aggregator-client-tls` Secret, so agents point `tlsCertDir` at a copy
of them. With the API, the CA and the client certificate live in the API (k8s/credentials)
and the directory holds only the server's certificate and the CAs it trusts.
A certificate is issued again when it is missing, expires within 30 days, is not signed by
the CA, or (the server's) does not name every address agents may use.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from .certificates import CA_FILE, CERT_FILE, KEY_FILE, CertificateAuthority, IssuedCertificate

log = logging.getLogger(__name__)

CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True, slots=True)
class AggregatorCertificates:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / CA_FILE

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT_FILE

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY_FILE

    @property
    def client_cert(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def client_key(self) -> Path:
        return self.directory / KEY_FILE


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _load_certificate(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def usable(
    cert: x509.Certificate | None,
    ca: CertificateAuthority,
    names=(),
    addresses=(),
    *,
    now: datetime.datetime | None = None,
    renew_before: datetime.timedelta = RENEW_BEFORE,
) -> bool:
    """`cert` is signed by `ca`, names `names` and `addresses`, and is not due for renewal."""
    if cert is None or cert.issuer != ca.certificate.subject:
        return False
    now = now or datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc - now < renew_before:
        return False
    try:
        cert.verify_directly_issued_by(ca.certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if not names and not addresses:
        return True
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have_names = set(san.get_values_for_type(x509.DNSName))
    have_addresses = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    return (
        set(names) <= have_names
        and {str(ipaddress.ip_address(a)) for a in addresses} <= have_addresses
    )


def key_matches(cert: x509.Certificate | None, key_pem: bytes) -> bool:
    """The PEM private key belongs to `cert`."""
    if cert is None:
        return False
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def ensure_aggregator_certificates(
    directory: str | os.PathLike,
    names: list[str],
    addresses: list[str],
    authority: CertificateAuthority | None = None,
    trusted: bytes = b"",
) -> AggregatorCertificates:
    """Create or refresh the certificates in `directory` for a server known as `names`
    (DNS) and `addresses` (IPs). With `authority` (a CA kept elsewhere) only the server's
    certificate is made here, signed by it, and `ca.crt` holds `trusted`: the CAs whose
    client certificates the server accepts."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    files = AggregatorCertificates(path)
    if authority is not None:
        if _read(files.ca) != trusted:
            _write(files.ca, trusted)
        _ensure_server(files, authority, names, addresses)
        return files
    ca = None
    if files.ca.exists() and (path / CA_KEY_FILE).exists():
        try:
            ca = CertificateAuthority.load(files.ca.read_bytes(), (path / CA_KEY_FILE).read_bytes())
        except (OSError, ValueError):
            log.warning("the CA in %s cannot be read; creating a new one", path)
    if ca is None or not usable(ca.certificate, ca):
        ca = CertificateAuthority.create("flow-aggregator-ca")
        _write(files.ca, ca.certificate_pem)
        _write(path / CA_KEY_FILE, ca.private_key_pem, private=True)
        log.info("created a CA in %s", path)
    _ensure_server(files, ca, names, addresses)
    client = _load_certificate(files.client_cert)
    if not (usable(client, ca) and key_matches(client, _read(files.client_key))):
        _save(ca.issue("flow-exporter", client=True), files.client_cert, files.client_key)
        log.info("issued the agents' client certificate (%s, %s)", CERT_FILE, KEY_FILE)
    return files


def _ensure_server(
    files: AggregatorCertificates, ca: CertificateAuthority, names: list[str], addresses: list[str]
) -> None:
    server = _load_certificate(files.server_cert)
    if not (usable(server, ca, names, addresses) and key_matches(server, _read(files.server_key))):
        _save(
            ca.issue(names[0], names, addresses, server=True), files.server_cert, files.server_key
        )
        log.info("issued the server certificate for %s", ", ".join(names + addresses))


def _save(issued: IssuedCertificate, cert_path: Path, key_path: Path) -> None:
    _write(key_path, issued.private_key_pem, private=True)
    _write(cert_path, issued.certificate.public_bytes(serialization.Encoding.PEM))
