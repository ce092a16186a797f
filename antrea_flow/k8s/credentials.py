"""The certificate hand-off through the Kubernetes API, with Antrea's object names.

The aggregator keeps its CA in Secret `flow-aggregator-ca-tls` (so that a restart or a
second replica reuses it instead of rotating it under running agents), publishes the CAs
agents must trust in ConfigMap `flow-aggregator-ca` (key `ca.crt`) and the agents' client
certificate in Secret `flow-aggregator-client-tls` (`tls.crt`, `tls.key`); agents GET those
two. Writes are optimistic: a create that finds the object, or an update that finds it
changed, reads it again and goes with what another replica wrote if it will do.

A CA is replaced 90 days before it expires. Its successor signs the new client and server
certificates, while the ConfigMap keeps the old CA beside the new one until it expires:
agents that still hold the old client certificate are accepted, and an agent that does not
trust the new server certificate yet fetches the ConfigMap again and does.
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from ..tls.certificates import CA_FILE, CERT_FILE, KEY_FILE, CertificateAuthority
from ..tls.provision import key_matches, usable
from .client import CONNECT_TIMEOUT, READ_TIMEOUT, ApiConnection, explain

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "flow-aggregator"
CA_CONFIGMAP = "flow-aggregator-ca"  # ca.crt: the CAs agents trust
CLIENT_SECRET = "flow-aggregator-client-tls"  # tls.crt, tls.key: the agents' certificate
CA_SECRET = "flow-aggregator-ca-tls"  # tls.crt, tls.key: the aggregator's CA
LABELS = {"app": "flow-aggregator"}
CA_RENEW_BEFORE = datetime.timedelta(days=90)
_ATTEMPTS = 3
_TIMEOUT = (CONNECT_TIMEOUT, READ_TIMEOUT)


def aggregator_namespace() -> str:
    """The aggregator's namespace: its Pod's (`POD_NAMESPACE`), or Antrea's default."""
    return os.environ.get("POD_NAMESPACE") or DEFAULT_NAMESPACE


class CredentialsError(Exception):
    """The hand-off failed; the message says what and where, in one line."""


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """What an agent needs for mutual TLS: the CAs to trust, its certificate and key."""

    ca: bytes
    certificate: bytes
    key: bytes


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _core(connection: ApiConnection) -> Any:
    from kubernetes import client

    return client.CoreV1Api(connection.client)


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


def fetch_client_credentials(
    connection: ApiConnection, namespace: str = DEFAULT_NAMESPACE
) -> ClientCredentials:
    """GET ConfigMap `flow-aggregator-ca` and Secret `flow-aggregator-client-tls` (blocking)."""
    core = _core(connection)
    try:
        config_map = core.read_namespaced_config_map(
            CA_CONFIGMAP, namespace, _request_timeout=_TIMEOUT
        )
    except Exception as exc:
        raise _fetch_error(exc, connection, "configmaps", namespace, CA_CONFIGMAP) from None
    try:
        secret = core.read_namespaced_secret(CLIENT_SECRET, namespace, _request_timeout=_TIMEOUT)
    except Exception as exc:
        raise _fetch_error(exc, connection, "secrets", namespace, CLIENT_SECRET) from None
    data = secret.data or {}
    ca = ((config_map.data or {}).get(CA_FILE) or "").encode()
    certificate = base64.b64decode(data.get(CERT_FILE) or "")
    key = base64.b64decode(data.get(KEY_FILE) or "")
    missing = [
        name
        for name, value in (
            (f"ConfigMap {namespace}/{CA_CONFIGMAP} key {CA_FILE}", ca),
            (f"Secret {namespace}/{CLIENT_SECRET} key {CERT_FILE}", certificate),
            (f"Secret {namespace}/{CLIENT_SECRET} key {KEY_FILE}", key),
        )
        if not value
    ]
    if missing:
        raise CredentialsError(f"{', '.join(missing)} is empty: the flow aggregator writes them")
    return ClientCredentials(ca, certificate, key)


def _fetch_error(
    exc: BaseException, connection: ApiConnection, resource: str, namespace: str, name: str
) -> CredentialsError:
    if _status(exc) == 404:
        kind = "ConfigMap" if resource == "configmaps" else "Secret"
        return CredentialsError(
            f"{kind} {namespace}/{name} does not exist yet on {connection.server}: the flow "
            "aggregator creates it when it starts (kubectl apply -f "
            "build/yamls/flow-aggregator.yml)"
        )
    return CredentialsError(explain(exc, connection, "get", f"{resource}/{name}").message)


@dataclass(frozen=True, slots=True)
class AggregatorCredentials:
    """The aggregator's CA, and the CAs its server accepts clients of (PEM bundle)."""

    authority: CertificateAuthority
    trusted: bytes


class ClusterCertificates:
    """Keeps the CA Secret, the client Secret and the CA ConfigMap right (blocking calls:
    the aggregator runs `sync` in an executor, one call at a time)."""

    def __init__(
        self,
        connection: ApiConnection,
        namespace: str,
        *,
        now: Callable[[], datetime.datetime] = _utcnow,
    ):
        self.connection = connection
        self.namespace = namespace
        self.now = now
        self._core = _core(connection)

    def sync(self) -> AggregatorCredentials:
        """Reuse or replace the CA, then make the client Secret and the ConfigMap agree
        with it. Raises CredentialsError."""
        authority = self._authority()
        trusted = self._publish_trusted(authority)
        self._client_secret(authority)
        return AggregatorCredentials(authority, trusted)

    # -- the three objects -----------------------------------------------------------------

    def _authority(self) -> CertificateAuthority:
        for _ in range(_ATTEMPTS):
            current, version = self._read_secret(CA_SECRET)
            authority = _load_authority(current)
            if authority is not None and usable(
                authority.certificate, authority, now=self.now(), renew_before=CA_RENEW_BEFORE
            ):
                return authority
            fresh = CertificateAuthority.create("flow-aggregator-ca", now=self.now)
            body = {CERT_FILE: fresh.certificate_pem, KEY_FILE: fresh.private_key_pem}
            if self._write_secret(CA_SECRET, body, version):
                log.info(
                    "%s the flow aggregator's CA in Secret %s/%s (valid until %s)",
                    "replaced" if current else "created",
                    self.namespace,
                    CA_SECRET,
                    fresh.certificate.not_valid_after_utc.date(),
                )
                return fresh
        raise CredentialsError(
            f"Secret {self.namespace}/{CA_SECRET} kept changing under this aggregator "
            f"({_ATTEMPTS} attempts): another replica is writing it"
        )

    def _publish_trusted(self, authority: CertificateAuthority) -> bytes:
        """ConfigMap ca.crt: this CA first, then earlier CAs it holds that have not expired."""
        for _ in range(_ATTEMPTS):
            data, version = self._read_config_map()
            kept = [authority.certificate]
            for cert in _certificates(data.get(CA_FILE, "").encode()):
                if cert.not_valid_after_utc > self.now() and cert not in kept:
                    kept.append(cert)
            bundle = b"".join(_pem(cert) for cert in kept)
            if data.get(CA_FILE, "").encode() == bundle:
                return bundle
            if self._write_config_map(bundle, version):
                log.info(
                    "published %d CA certificate(s) in ConfigMap %s/%s",
                    len(kept),
                    self.namespace,
                    CA_CONFIGMAP,
                )
                return bundle
        raise CredentialsError(
            f"ConfigMap {self.namespace}/{CA_CONFIGMAP} kept changing ({_ATTEMPTS} attempts)"
        )

    def _client_secret(self, authority: CertificateAuthority) -> None:
        for _ in range(_ATTEMPTS):
            current, version = self._read_secret(CLIENT_SECRET)
            cert = _first_certificate(current.get(CERT_FILE, b""))
            if usable(cert, authority, now=self.now()) and key_matches(
                cert, current.get(KEY_FILE, b"")
            ):
                return
            issued = authority.issue("flow-exporter", client=True, now=self.now)
            body = {CERT_FILE: issued.certificate_pem, KEY_FILE: issued.private_key_pem}
            if self._write_secret(CLIENT_SECRET, body, version):
                log.info(
                    "issued the agents' client certificate in Secret %s/%s",
                    self.namespace,
                    CLIENT_SECRET,
                )
                return
        raise CredentialsError(
            f"Secret {self.namespace}/{CLIENT_SECRET} kept changing ({_ATTEMPTS} attempts)"
        )

    # -- API calls -----------------------------------------------------------------------

    def _fail(self, exc: BaseException, verb: str, resource: str) -> CredentialsError:
        return CredentialsError(explain(exc, self.connection, verb, resource).message)

    def _read_secret(self, name: str) -> tuple[dict[str, bytes], str | None]:
        """(data, resourceVersion); ({}, None) when it does not exist."""
        try:
            secret = self._core.read_namespaced_secret(
                name, self.namespace, _request_timeout=_TIMEOUT
            )
        except Exception as exc:
            if _status(exc) == 404:
                return {}, None
            raise self._fail(exc, "get", f"secrets/{name}") from None
        data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        return data, secret.metadata.resource_version

    def _write_secret(self, name: str, data: dict[str, bytes], version: str | None) -> bool:
        """Create (version None) or update the Secret; False when another writer was first."""
        from kubernetes import client

        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=name, namespace=self.namespace, labels=LABELS, resource_version=version
            ),
            type="kubernetes.io/tls",
            data={k: base64.b64encode(v).decode() for k, v in data.items()},
        )
        return self._write(
            "secrets/" + name,
            version,
            lambda: self._core.create_namespaced_secret(
                self.namespace, body, _request_timeout=_TIMEOUT
            ),
            lambda: self._core.replace_namespaced_secret(
                name, self.namespace, body, _request_timeout=_TIMEOUT
            ),
        )

    def _read_config_map(self) -> tuple[dict[str, str], str | None]:
        try:
            config_map = self._core.read_namespaced_config_map(
                CA_CONFIGMAP, self.namespace, _request_timeout=_TIMEOUT
            )
        except Exception as exc:
            if _status(exc) == 404:
                return {}, None
            raise self._fail(exc, "get", f"configmaps/{CA_CONFIGMAP}") from None
        return dict(config_map.data or {}), config_map.metadata.resource_version

    def _write_config_map(self, bundle: bytes, version: str | None) -> bool:
        from kubernetes import client

        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name=CA_CONFIGMAP, namespace=self.namespace, labels=LABELS, resource_version=version
            ),
            data={CA_FILE: bundle.decode()},
        )
        return self._write(
            "configmaps/" + CA_CONFIGMAP,
            version,
            lambda: self._core.create_namespaced_config_map(
                self.namespace, body, _request_timeout=_TIMEOUT
            ),
            lambda: self._core.replace_namespaced_config_map(
                CA_CONFIGMAP, self.namespace, body, _request_timeout=_TIMEOUT
            ),
        )

    def _write(
        self,
        resource: str,
        version: str | None,
        create: Callable[[], Any],
        update: Callable[[], Any],
    ) -> bool:
        try:
            (create if version is None else update)()
        except Exception as exc:
            if _status(exc) == 409:  # AlreadyExists or Conflict: read again
                return False
            raise self._fail(exc, "create" if version is None else "update", resource) from None
        return True


def _load_authority(data: dict[str, bytes]) -> CertificateAuthority | None:
    try:
        return CertificateAuthority.load(data[CERT_FILE], data[KEY_FILE])
    except (KeyError, ValueError, TypeError):
        return None


def _certificates(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem) if pem.strip() else []
    except ValueError:
        return []


def _first_certificate(pem: bytes) -> x509.Certificate | None:
    certificates = _certificates(pem)
    return certificates[0] if certificates else None


def _pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)
