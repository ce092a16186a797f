"""Certificates (a CA, and server and client certificates it signs) and TLS contexts."""

from .certificates import CertificateAuthority, IssuedCertificate, write_pem_files
from .contexts import client_context, server_context

__all__ = [
    "CertificateAuthority",
    "IssuedCertificate",
    "client_context",
    "server_context",
    "write_pem_files",
]
