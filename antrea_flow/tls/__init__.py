"""Certificates (a CA, and server and client certificates it signs) and TLS contexts."""

from .certificates import CertificateAuthority, IssuedCertificate, write_pem_files
from .contexts import (
    TLSFileError,
    check_pem_files,
    client_context,
    client_context_from_pem,
    server_context,
)

__all__ = [
    "CertificateAuthority",
    "IssuedCertificate",
    "TLSFileError",
    "check_pem_files",
    "client_context",
    "client_context_from_pem",
    "server_context",
    "write_pem_files",
]
