"""SSL contexts for mutual TLS between exporters and collectors (TLS 1.2 at least)."""

from __future__ import annotations

import os
import ssl


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
