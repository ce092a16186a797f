"""SSL contexts for mutual TLS between exporters and collectors (TLS 1.2 at least)."""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization


class TLSFileError(ValueError):
    """A CA, certificate or key file that a context cannot use; the message names it."""


def check_pem_files(ca: str, cert: str, key: str, labels: tuple[str, str, str] | None = None):
    """Check the files a context will load, naming the one at fault (OpenSSL's errors name
    neither file nor role: a key that does not match the certificate is only
    "KEY_VALUES_MISMATCH"). `labels` name the files in messages (default: their paths)."""
    ca_label, cert_label, key_label = labels or (ca, cert, key)

    def read(label: str, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise TLSFileError(f"{label}: cannot read: {exc.strerror}") from None

    def certificates(label: str, pem: bytes) -> list[x509.Certificate]:
        try:
            return x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise TLSFileError(f"{label}: not a PEM certificate") from None

    ca_pem, cert_pem, key_pem = read(ca_label, ca), read(cert_label, cert), read(key_label, key)
    certificates(ca_label, ca_pem)
    own = certificates(cert_label, cert_pem)[0]  # any further certificates are its chain
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise TLSFileError(f"{key_label}: not an unencrypted PEM private key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private_key.public_key().public_bytes(*spki) != own.public_key().public_bytes(*spki):
        raise TLSFileError(f"{key_label} does not match the certificate in {cert_label}")


def server_context(
    cert_file: str | os.PathLike, key_file: str | os.PathLike, ca_file: str | os.PathLike
) -> ssl.SSLContext:
    """A collector's context: presents its certificate, requires a client certificate
    signed by the CA in `ca_file`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    context.load_verify_locations(cafile=ca_file)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca_file: str | os.PathLike,
    cert_file: str | os.PathLike | None = None,
    key_file: str | os.PathLike | None = None,
) -> ssl.SSLContext:
    """An exporter's context: verifies the collector against `ca_file` (and its name), and
    presents a client certificate when one is given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=ca_file)
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def client_context_from_pem(
    ca: bytes, cert: bytes, key: bytes, labels: tuple[str, str, str]
) -> ssl.SSLContext:
    """An exporter's context from PEM data (fetched, not read from files); `labels` name
    the three in messages. The key passes through a private temporary directory, as the
    ssl module loads keys only from files."""
    with tempfile.TemporaryDirectory(prefix="antrea-flow-tls-") as directory:
        paths = [Path(directory) / name for name in ("ca.crt", "tls.crt", "tls.key")]
        for path, data in zip(paths, (ca, cert, key), strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ca_file, cert_file, key_file = (str(p) for p in paths)
        check_pem_files(ca_file, cert_file, key_file, labels)
        return client_context(ca_file, cert_file, key_file)
