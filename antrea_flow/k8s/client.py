"""The connection to the Kubernetes API server, and what its failures mean to an operator.

A component reaches the API with the kubeconfig that its config file names
(`clientConnection.kubeconfig`, Antrea's key), or else with the Pod's service account when
it runs in a cluster (`KUBERNETES_SERVICE_HOST` set). The `kubernetes` client does the
requests (authentication, TLS, retries); this module only builds it and explains errors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from ..configfile import ConfigError

if TYPE_CHECKING:  # the client is imported only by components that use the API
    from kubernetes.client import ApiClient

# Per request: time to connect, and the longest silence of an answer that is not a watch.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0


@dataclass(frozen=True)
class ApiConnection:
    """A client of one API server, with what to call it in messages."""

    client: ApiClient
    server: str  # https://10.96.0.1:443
    origin: str  # where the credentials come from: "kubeconfig /path", "service account"


def api_connection(
    kubeconfig: str, key: str = "clientConnection.kubeconfig"
) -> ApiConnection | None:
    """The API connection a component has: from `kubeconfig` when set, else in-cluster when
    running in a Pod, else None. A kubeconfig that cannot be used is a ConfigError naming
    `key`."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    if kubeconfig:
        try:
            # The client's own words for an unreadable file or one that is not a mapping
            # ("no configuration found", a TypeError) say too little.
            with open(kubeconfig, "rb") as f:
                document = yaml.safe_load(f)
            if not isinstance(document, dict):
                raise ValueError(f"not a kubeconfig: a YAML {type(document).__name__}")
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        except (
            ConfigException, OSError, ValueError, TypeError, KeyError, AttributeError,
            yaml.YAMLError,
        ) as exc:  # fmt: skip
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(
                f"{key}: {kubeconfig!r} cannot be used: {' '.join(reason.split())}; expected a "
                "kubeconfig file (kubectl's format) with a current context that names a server "
                "and credentials"
            ) from None
        origin = f"kubeconfig {kubeconfig}"
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException as exc:
            raise ConfigError(
                f"running in a Pod (KUBERNETES_SERVICE_HOST is set) but the service account "
                f"cannot be used: {exc}; set {key} to a kubeconfig instead"
            ) from None
        origin = "the Pod's service account"
    else:
        return None
    # Every watch holds a connection of its own while lists and gets share the rest.
    configuration.connection_pool_maxsize = 16
    return ApiConnection(client.ApiClient(configuration), configuration.host, origin)


@dataclass(frozen=True, slots=True)
class ApiFailure:
    """A failed request, as a metric label and a sentence for the log."""

    reason: str  # unreachable, unauthorized, forbidden, not_found, gone, error
    message: str
    status: int | None = None


def explain(
    exc: BaseException, connection: ApiConnection, verb: str, resource: str, group: str = ""
) -> ApiFailure:
    """What a failed `verb` (get, list, watch, create, update) of `resource` means."""
    from kubernetes.client.exceptions import ApiException

    where = f"kubernetes API server {connection.server}"
    what = f"{verb} {resource}" + (f" ({group})" if group else "")
    if not isinstance(exc, ApiException):
        reason = _network_reason(exc)
        return ApiFailure("unreachable", f"{where} is unreachable ({reason}) to {what}")
    status = exc.status
    detail = _status_message(exc)
    if status == 401:
        return ApiFailure(
            "unauthorized",
            f"{where} refused the credentials of {connection.origin} (401 Unauthorized) to "
            f"{what}: the token or client certificate is wrong or expired",
            status,
        )
    if status == 403:
        return ApiFailure(
            "forbidden",
            f"{where} forbids {what} (403 Forbidden: {detail}): the RBAC role of "
            f"{connection.origin} needs verb {verb!r} on resource {resource!r} in API group "
            f"{group!r} (see build/yamls/)",
            status,
        )
    if status == 404:
        return ApiFailure(
            "not_found", f"{where} has no {resource} ({group or 'core'}): {detail}", 404
        )
    if status == 410:
        return ApiFailure("gone", f"{where}: the resource version to {what} is too old", 410)
    return ApiFailure("error", f"{where} failed to {what}: {status} {detail}", status)


def _status_message(exc: Any) -> str:
    """The `message` of the API's Status body, or the HTTP reason."""
    try:
        body = json.loads(exc.body or "")
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except (ValueError, TypeError):
        pass
    return str(exc.reason or "")


def _network_reason(exc: BaseException) -> str:
    """The innermost cause of a failed connection, in a few words."""
    seen = set()
    while True:
        seen.add(id(exc))
        inner = getattr(exc, "reason", None)
        if isinstance(inner, BaseException) and id(inner) not in seen:
            exc = inner
            continue
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, BaseException) and id(cause) not in seen:
            exc = cause
            continue
        break
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).split(": ")[-1].strip() or type(exc).__name__
    return text[:200]
