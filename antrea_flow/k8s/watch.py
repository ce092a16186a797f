"""The Kubernetes API as a metadata source: each kind listed, then watched from that list's
resourceVersion (with bookmarks), each in a thread of its own.

A watch thread owns only its HTTP stream, its resourceVersion and its backoff: everything
it learns (objects, events, failures) it hands to the event loop that owns the store, in
order and at most every 10 ms while it comes, so the store, the counters and the sync
state change on that loop only. On `410 Gone` a kind
is listed again and replaces what the store held of it; a dropped stream is watched again
after a backoff; while the server cannot be reached the store keeps what it has.

The client's own `Watch` helper is not used: it turns every object into the client's
model classes (about a millisecond per Pod, far more than the rest of the work), and its
raw mode cannot read the watch's ERROR events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..metrics import counter, gauge, labelled_counter, labelled_gauge
from .client import CONNECT_TIMEOUT, READ_TIMEOUT, ApiConnection, ApiFailure, explain
from .stores import MetadataStore, object_key

log = logging.getLogger(__name__)

LIST_PAGE = 500  # objects per list request (a large cluster's Pods in several answers)
# The server ends each watch after this long (client-go picks 5 to 10 minutes at random so
# that watches of many clients do not all start again at once); a stream silent for longer
# than that plus the read slack is dead.
WATCH_SECONDS = (300, 600)
WATCH_READ_SLACK = 60.0
OPTIONAL_RETRY = 300.0  # how often an absent CRD is looked for again
# What a watch thread hands over waits this long for what follows it: under churn the loop
# then wakes about a hundred times a second, not once per event.
HANDOFF_DELAY = 0.01
DEFAULT_SYNC_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Resource:
    """One kind of object a component watches."""

    kind: str
    plural: str
    group: str = ""  # "" for the core API
    version: str = "v1"
    field_selector: str = ""
    optional: bool = False  # a CRD the cluster may not have installed
    lister: str = ""  # the CoreV1Api / NetworkingV1Api method (CRDs use CustomObjectsApi)

    @property
    def label(self) -> str:
        """`pods`, `networkpolicies.networking.k8s.io`: the resource as RBAC names it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def list_function(self, connection: ApiConnection) -> Callable[..., Any]:
        from kubernetes import client

        if not self.lister:
            api = client.CustomObjectsApi(connection.client)
            return functools.partial(
                api.list_cluster_custom_object, self.group, self.version, self.plural
            )
        api_class = client.NetworkingV1Api if self.group else client.CoreV1Api
        return getattr(api_class(connection.client), self.lister)


NODES = Resource("Node", "nodes", lister="list_node")
SERVICES = Resource("Service", "services", lister="list_service_for_all_namespaces")
PODS = Resource("Pod", "pods", lister="list_pod_for_all_namespaces")
NETWORK_POLICIES = Resource(
    "NetworkPolicy",
    "networkpolicies",
    group="networking.k8s.io",
    lister="list_network_policy_for_all_namespaces",
)
ANTREA_CLUSTER_POLICIES = Resource(
    "ClusterNetworkPolicy", "clusternetworkpolicies", "crd.antrea.io", "v1beta1", optional=True
)
ANTREA_POLICIES = Resource(
    "NetworkPolicy", "networkpolicies", "crd.antrea.io", "v1beta1", optional=True
)
# The aggregator completes records of any Pod, and names Services and Nodes.
AGGREGATOR_RESOURCES = (PODS, NODES, SERVICES)


def agent_resources(node_name: str) -> tuple[Resource, ...]:
    """What an agent watches: Nodes (pod CIDRs, for flowType), Services, the Pods of its
    own Node, and the policies whose rules conntrack labels name."""
    own_pods = Resource(
        "Pod", "pods", field_selector=f"spec.nodeName={node_name}", lister=PODS.lister
    )
    return (
        NODES,
        SERVICES,
        own_pods,
        NETWORK_POLICIES,
        ANTREA_CLUSTER_POLICIES,
        ANTREA_POLICIES,
    )


class Gone(Exception):
    """The resourceVersion is too old (410): list again."""


@dataclass(slots=True)
class SourceStats:
    """Counters of an ApiSource, written on its loop."""

    events: dict[str, int] = field(default_factory=dict)  # by resource label
    relists: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # by ApiFailure.reason
    outages: int = 0


class ApiSource:
    """Keeps a MetadataStore equal to what the API server holds of `resources`.

    Owned by the event loop `start` is called on: the store, `stats` and the sync state
    change there only (each watch thread hands its results over in order, through a queue
    the loop drains). `stop` ends the threads.
    """

    def __init__(
        self,
        connection: ApiConnection,
        resources: tuple[Resource, ...],
        store: MetadataStore,
        *,
        backoff: tuple[float, float] = (1.0, 30.0),
        watch_seconds: tuple[int, int] = WATCH_SECONDS,
        optional_retry: float = OPTIONAL_RETRY,
    ):
        self.connection = connection
        self.resources = resources
        self.store = store
        self.stats = SourceStats()
        self.outage_since: float | None = None  # monotonic time the server went away
        self._backoff = backoff
        self._watch_seconds = watch_seconds
        self._optional_retry = optional_retry
        self._watches: list[_Watch] = []
        self._unsynced = {r.label for r in resources}
        self._synced: asyncio.Event | None = None
        self._logged: set[tuple[str, str]] = set()  # failures logged until the next success
        self._started = 0.0

    # -- lifecycle (on the owner loop) ---------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._synced = asyncio.Event()
        self._started = time.monotonic()
        for resource in self.resources:
            watch = _Watch(self, resource, loop)
            self._watches.append(watch)
            watch.thread.start()

    @property
    def synced(self) -> bool:
        return not self._unsynced

    async def wait_synced(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the first list of every kind; whether it came.
        Either way the watches go on: what comes later is applied when it comes."""
        assert self._synced is not None, "start() first"
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            log.warning(
                "kubernetes API %s: no complete list of %s within %gs; going on with what is "
                "known (records are enriched as the metadata arrives)",
                self.connection.server,
                ", ".join(sorted(self._unsynced)),
                timeout,
            )
            return False
        return True

    async def stop(self) -> None:
        for watch in self._watches:
            watch.stop()
        loop = asyncio.get_running_loop()
        for watch in self._watches:
            await loop.run_in_executor(None, watch.thread.join, 10.0)
        self._watches = []

    # -- what the watch threads hand over (on the owner loop) ------------------------------

    def _listed(self, resource: Resource, objects: list[dict[str, Any]], seen: set | None) -> None:
        """One page of a list; with the last one, `seen` holds the keys of every page, and
        what the store has of this kind beyond them is gone."""
        self.store.apply(("ADDED", obj) for obj in objects)
        if seen is not None:
            self.store.remove_absent({(resource.group, resource.kind)}, seen)
            self._recovered(resource)
            self._mark_synced(resource)

    def _applied(self, resource: Resource, events: list[tuple[str, dict[str, Any]]]) -> None:
        self.store.apply(events)
        label = resource.label
        self.stats.events[label] = self.stats.events.get(label, 0) + len(events)

    def _watching(self, resource: Resource) -> None:
        self._recovered(resource)

    def _dropped(self, resource: Resource, reason: str) -> None:
        stats = self.stats
        stats.failures["stream_dropped"] = stats.failures.get("stream_dropped", 0) + 1
        log.debug(
            "kubernetes API: the watch of %s broke (%s); watching again", resource.label, reason
        )

    def _relisting(self, resource: Resource) -> None:
        label = resource.label
        self.stats.relists[label] = self.stats.relists.get(label, 0) + 1
        log.info("kubernetes API: the watch of %s expired (410 Gone); listing again", label)

    def _absent(self, resource: Resource) -> None:
        """An optional kind the server does not serve: synced, empty."""
        key = ("absent", resource.group)  # said once for all of Antrea's
        if key not in self._logged:
            self._logged.add(key)
            log.info(
                "Antrea-native policies are not available: %s does not serve %s/%s %s (Antrea's "
                "CRDs are not installed); records name Kubernetes NetworkPolicies only",
                self.connection.server,
                resource.group,
                resource.version,
                resource.plural,
            )
        self.store.replace([], kinds={(resource.group, resource.kind)})
        self._mark_synced(resource)

    def _mark_synced(self, resource: Resource) -> None:
        if resource.label in self._unsynced:
            self._unsynced.discard(resource.label)
            if not self._unsynced:
                self._announce_sync()

    def _failed(self, resource: Resource, failure: ApiFailure) -> None:
        stats = self.stats
        stats.failures[failure.reason] = stats.failures.get(failure.reason, 0) + 1
        if failure.reason == "unreachable":
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                stats.outages += 1
                log.warning("%s; keeping the last metadata and retrying", failure.message)
            return
        key = (failure.reason, resource.label)
        if key not in self._logged:
            self._logged.add(key)
            log.error("%s; retrying", failure.message)

    def _recovered(self, resource: Resource) -> None:
        """A request of `resource` succeeded: the server is back, and a failure of this
        resource is worth a line again if it comes back."""
        if self.outage_since is not None:
            log.info(
                "kubernetes API server %s is reachable again after %.0fs",
                self.connection.server,
                time.monotonic() - self.outage_since,
            )
            self.outage_since = None
        self._logged = {k for k in self._logged if k[0] == "absent" or k[1] != resource.label}

    def _announce_sync(self) -> None:
        assert self._synced is not None
        self._synced.set()
        counts = self.store.counts
        log.info(
            "kubernetes API %s (%s): synced in %.1fs: %d nodes, %d pod IPs, %d service ports, "
            "%d policy rules",
            self.connection.server,
            self.connection.origin,
            time.monotonic() - self._started,
            counts.nodes,
            counts.pod_ips,
            counts.services,
            counts.rules,
        )


def metadata_metrics(prefix: str, store: MetadataStore, source: ApiSource | None):
    """Families of the metadata a component holds and of its API source (on the owner)."""
    counts = store.counts
    yield labelled_gauge(
        f"{prefix}metadata_entries",
        "Lookup entries the metadata store holds, by index.",
        "index",
        {"nodes": counts.nodes, "pod_ips": counts.pod_ips,
         "service_ports": counts.services, "policy_rules": counts.rules},
    )  # fmt: skip
    if source is None:
        return
    stats = source.stats
    yield gauge(
        f"{prefix}kubernetes_synced",
        "1 once every watched kind has been listed completely.",
        float(source.synced),
    )
    yield gauge(
        f"{prefix}kubernetes_api_reachable",
        "0 while the Kubernetes API server cannot be reached (the metadata stays as it was).",
        float(source.outage_since is None),
    )
    yield counter(
        f"{prefix}kubernetes_api_outages_total",
        "Times the Kubernetes API server became unreachable.",
        stats.outages,
    )
    yield labelled_counter(
        f"{prefix}kubernetes_api_failures_total",
        "Failed list or watch requests, by reason.",
        "reason",
        dict(stats.failures),
        always=("unreachable", "unauthorized", "forbidden", "stream_dropped"),
    )
    yield labelled_counter(
        f"{prefix}kubernetes_watch_events_total",
        "Watch events applied to the metadata store, by resource.",
        "resource",
        dict(stats.events),
    )
    yield labelled_counter(
        f"{prefix}kubernetes_relists_total",
        "Lists made again because a watch's resourceVersion had expired (410 Gone).",
        "resource",
        dict(stats.relists),
    )


class _Watch:
    """The thread that lists and watches one resource for an ApiSource.

    It hands its results to the loop in order through `_handed`, a queue this thread appends
    to and the loop drains (`_drain`, scheduled once per HANDOFF_DELAY while results come).
    """

    def __init__(self, source: ApiSource, resource: Resource, loop: asyncio.AbstractEventLoop):
        self.source = source
        self.resource = resource
        self._loop = loop
        self._handed: collections.deque[tuple[Callable[..., None], tuple]] = collections.deque()
        self._drain_due = False  # set by this thread, cleared by the loop
        self._list = resource.list_function(source.connection)
        self._stopping = threading.Event()
        self._response: Any = None
        self._verb = "list"  # of the request under way, for messages
        self.thread = threading.Thread(
            target=self._run, name=f"k8s-watch-{resource.label}", daemon=True
        )

    def stop(self) -> None:
        self._stopping.set()
        response = self._response
        if response is not None:
            # The thread is blocked reading the stream: end that read now.
            sock = getattr(getattr(response, "connection", None), "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _hand(self, method: Callable[..., None], *args: Any) -> None:
        """Have the loop call `method(*args)`, after what was handed before."""
        if self._stopping.is_set():
            return
        self._handed.append((method, args))
        if not self._drain_due:
            self._drain_due = True
            try:
                self._loop.call_soon_threadsafe(self._loop.call_later, HANDOFF_DELAY, self._drain)
            except RuntimeError:  # the loop has closed
                self._stopping.set()

    def _drain(self) -> None:
        """On the loop: everything handed so far, in order. The flag is cleared first, so a
        result appended after the last one taken here schedules a drain of its own."""
        self._drain_due = False
        handed = self._handed
        while handed:
            method, args = handed.popleft()
            method(*args)

    def _run(self) -> None:
        initial, most = self.source._backoff
        backoff = initial
        version: str | None = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self._list_all()
                    if version is None:  # an optional kind the server does not have
                        self._stopping.wait(self.source._optional_retry)
                        continue
                version = self._watch(version)
                backoff = initial
                continue
            except Gone:
                self._hand(self.source._relisting, self.resource)
                version = None
                continue
            except _Dropped as exc:
                if self._stopping.is_set():
                    break
                self._hand(self.source._dropped, self.resource, str(exc.__cause__ or exc))
            except Exception as exc:  # every failure is reported and retried
                if self._stopping.is_set():
                    break
                failure = explain(
                    exc,
                    self.source.connection,
                    self._verb,
                    self.resource.plural,
                    self.resource.group,
                )
                if failure.reason == "gone":
                    self._hand(self.source._relisting, self.resource)
                    version = None
                    continue
                self._hand(self.source._failed, self.resource, failure)
            self._stopping.wait(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, most)

    def _list_all(self) -> str | None:
        """List every object in pages, handing each to the loop; the list's version (None
        for an optional kind the server does not serve)."""
        from kubernetes.client.exceptions import ApiException

        self._verb = "list"
        token: str | None = None
        seen: set = set()
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_PAGE}
            if token:
                kwargs["_continue"] = token
            if self.resource.field_selector:
                kwargs["field_selector"] = self.resource.field_selector
            try:
                body = self._request(**kwargs)
            except ApiException as exc:
                if exc.status == 404 and self.resource.optional:
                    self._hand(self.source._absent, self.resource)
                    return None
                if exc.status == 410 and token:
                    token = None  # the continue token expired: start the list again
                    seen = set()
                    continue
                raise
            metadata = body.get("metadata") or {}
            token = metadata.get("continue") or None
            items = body.get("items") or []
            kind, api_version = self.resource.kind, body.get("apiVersion", "")
            for item in items:  # list items omit their kind
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", _item_api_version(api_version, self.resource))
                seen.add(object_key(item))
            self._hand(self.source._listed, self.resource, items, None if token else seen)
            if token is None:
                return str(metadata.get("resourceVersion") or "")

    def _request(self, **kwargs: Any) -> dict[str, Any]:
        response = self._list(
            _preload_content=False, _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), **kwargs
        )
        try:
            return json.loads(response.data)
        finally:
            response.release_conn()

    def _watch(self, version: str) -> str:
        """Follow the watch from `version` until the server ends it; the last version seen.
        Raises Gone when the server no longer has `version`."""
        self._verb = "watch"
        seconds = random.randint(*self.source._watch_seconds)
        kwargs: dict[str, Any] = {
            "watch": True,
            "allow_watch_bookmarks": True,
            "resource_version": version,
            "timeout_seconds": seconds,
        }
        if self.resource.field_selector:
            kwargs["field_selector"] = self.resource.field_selector
        response = self._list(
            _preload_content=False,
            _request_timeout=(CONNECT_TIMEOUT, seconds + WATCH_READ_SLACK),
            **kwargs,
        )
        self._response = response
        try:
            if self._stopping.is_set():  # stop() came before the stream could be cut
                return version
            self._hand(self.source._watching, self.resource)
            for lines in _lines(response):
                events = []
                for line in lines:
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            raise Gone()
                        raise _api_exception(obj)
                    new_version = (obj.get("metadata") or {}).get("resourceVersion")
                    if new_version:
                        version = new_version
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        events.append((kind, obj))
                if events:
                    self._hand(self.source._applied, self.resource, events)
            return version
        except Gone:
            raise
        except Exception as exc:
            if getattr(exc, "status", None) is not None:  # an ERROR event: the server's word
                raise
            raise _Dropped(version) from exc  # a broken connection or a garbled stream
        finally:
            self._response = None
            response.release_conn()


class _Dropped(Exception):
    """The watch stream broke; its argument is the last version seen."""


def _api_exception(status: dict[str, Any]) -> Exception:
    """An ERROR event other than 410, as the client would raise it for that status."""
    from kubernetes.client.exceptions import ApiException

    exc = ApiException(status=status.get("code"), reason=status.get("reason"))
    exc.body = json.dumps(status)
    return exc


def _item_api_version(list_api_version: str, resource: Resource) -> str:
    if list_api_version:
        return list_api_version
    return f"{resource.group}/{resource.version}" if resource.group else resource.version


def _lines(response: Any) -> Iterator[list[bytes]]:
    """The complete lines of a streamed answer, as they arrive (one list per read)."""
    rest = b""
    for chunk in response.stream(amt=None, decode_content=True):
        data = rest + chunk
        *lines, rest = data.split(b"\n")
        complete = [line for line in lines if line.strip()]
        if complete:
            yield complete
    if rest.strip():
        yield [rest]
