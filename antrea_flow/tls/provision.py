"""The flow aggregator's certificates: created on first start, kept and reused after.

The directory holds `ca.crt` and `ca.key` (the CA), `server.crt` and `server.key` (the
aggregator's), and `tls.crt` and `tls.key`: the client certificate for agents. `ca.crt`,
`tls.crt` and `tls.key` are the keys of Antrea's `flow-aggregator-ca` ConfigMap and
`flow-aggregator-client-tls` Secret, so agents point `tlsCertDir` at a copy of them.
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


def _usable(
    cert: x509.Certificate | None, ca: CertificateAuthority, names=(), addresses=()
) -> bool:
    if cert is None or cert.issuer != ca.certificate.subject:
        return False
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
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


def _key_matches(cert: x509.Certificate | None, key_path: Path) -> bool:
    if cert is None:
        return False
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def ensure_aggregator_certificates(
    directory: str | os.PathLike, names: list[str], addresses: list[str]
) -> AggregatorCertificates:
    """Create or refresh the certificates in `directory` for a server known as `names`
    (DNS) and `addresses` (IPs)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    files = AggregatorCertificates(path)
    ca = None
    if files.ca.exists() and (path / CA_KEY_FILE).exists():
        try:
            ca = CertificateAuthority.load(files.ca.read_bytes(), (path / CA_KEY_FILE).read_bytes())
        except (OSError, ValueError):
            log.warning("the CA in %s cannot be read; creating a new one", path)
    if ca is None or not _usable(ca.certificate, ca):
        ca = CertificateAuthority.create("flow-aggregator-ca")
        _write(files.ca, ca.certificate_pem)
        _write(path / CA_KEY_FILE, ca.private_key_pem, private=True)
        log.info("created a CA in %s", path)
    server = _load_certificate(files.server_cert)
    if not (_usable(server, ca, names, addresses) and _key_matches(server, files.server_key)):
        _save(
            ca.issue(names[0], names, addresses, server=True), files.server_cert, files.server_key
        )
        log.info("issued the server certificate for %s", ", ".join(names + addresses))
    client = _load_certificate(files.client_cert)
    if not (_usable(client, ca) and _key_matches(client, files.client_key)):
        _save(ca.issue("flow-exporter", client=True), files.client_cert, files.client_key)
        log.info("issued the agents' client certificate (%s, %s)", CERT_FILE, KEY_FILE)
    return files


def _save(issued: IssuedCertificate, cert_path: Path, key_path: Path) -> None:
    _write(key_path, issued.private_key_pem, private=True)
    _write(cert_path, issued.certificate.public_bytes(serialization.Encoding.PEM))
