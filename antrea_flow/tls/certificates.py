"""A certificate authority and the server and client certificates it signs.

File names follow Antrea: the `flow-aggregator-ca` ConfigMap holds `ca.crt`, the
`flow-aggregator-client-tls` Secret holds `tls.crt` and `tls.key`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"

# Certificates are valid from a little before "now" so that peers with a slightly slow
# clock accept them.
_CLOCK_SKEW = datetime.timedelta(minutes=5)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # ECDSA P-256: a handshake costs a fraction of RSA-2048's, which matters when a
    # hundred agents reconnect to one aggregator at once.
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def private_key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(
        cls,
        common_name: str = "antrea-flow-ca",
        valid_days: int = 365,
        now: Callable[[], datetime.datetime] = _utcnow,
    ) -> CertificateAuthority:
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        start = now() - _CLOCK_SKEW
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @classmethod
    def load(cls, certificate_pem: bytes, private_key_pem: bytes) -> CertificateAuthority:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(
                f"the CA's private key is {type(key).__name__}, expected an elliptic-curve key"
            )
        return cls(certificate, key)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def private_key_pem(self) -> bytes:
        return IssuedCertificate(self.certificate, self.private_key).private_key_pem

    def issue(
        self,
        common_name: str,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        *,
        server: bool = False,
        client: bool = False,
        valid_days: int = 365,
        now: Callable[[], datetime.datetime] = _utcnow,
    ) -> IssuedCertificate:
        """A certificate for `common_name` with DNS and IP subject alternative names."""
        if not (server or client):
            raise ValueError("a certificate must be for a server, a client or both")
        key = _new_key()
        alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        start = now() - _CLOCK_SKEW
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key()),
                critical=False,
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        return IssuedCertificate(builder.sign(self.private_key, hashes.SHA256()), key)


def write_pem_files(
    directory: str | os.PathLike, ca: CertificateAuthority, issued: IssuedCertificate
) -> tuple[Path, Path, Path]:
    """Write ca.crt, tls.crt and tls.key (mode 0600) into `directory`; their paths."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = path / CA_FILE, path / CERT_FILE, path / KEY_FILE
    ca_file.write_bytes(ca.certificate_pem)
    cert_file.write_bytes(issued.certificate_pem)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(issued.private_key_pem)
    return ca_file, cert_file, key_file
