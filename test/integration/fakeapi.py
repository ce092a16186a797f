"""A Kubernetes API server at the HTTP level, for the real `kubernetes` client.

What the metadata source and the certificate hand-off use, as the API server does it:
lists with a resourceVersion, `limit`/`continue` pages and field selectors; watches as
chunked streams of JSON lines from a resourceVersion, with BOOKMARK events, a 410 ERROR
event once the version is compacted away, and an end after `timeoutSeconds`; ConfigMaps and
Secrets by name (get, create, update with optimistic concurrency); bearer tokens (401) and
per-verb denials (403, with the API server's Status message); resources it does not serve
(404, as for CRDs that are not installed). Tests can drop every watch stream, stop the
server and start it again on the same port, and read the log of requests (verb, resource,
namespace, name), which the RBAC test checks against the manifests.
"""

from __future__ import annotations

import bisect
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

TOKEN = "fake-api-token"
USER = "system:serviceaccount:kube-system:antrea-flow-agent"

# Collections by the URL path after /api/v1 or /apis/<group>/<version>:
# (path, kind, apiVersion, namespaced)
COLLECTIONS = {
    "pods": ("Pod", "v1", True),
    "nodes": ("Node", "v1", False),
    "services": ("Service", "v1", True),
    "namespaces": ("Namespace", "v1", False),
    "configmaps": ("ConfigMap", "v1", True),
    "secrets": ("Secret", "v1", True),
    "networkpolicies.networking.k8s.io": ("NetworkPolicy", "networking.k8s.io/v1", True),
    "clusternetworkpolicies.crd.antrea.io": (
        "ClusterNetworkPolicy",
        "crd.antrea.io/v1beta1",
        False,
    ),
    "networkpolicies.crd.antrea.io": ("NetworkPolicy", "crd.antrea.io/v1beta1", True),
}
CRDS = ("clusternetworkpolicies.crd.antrea.io", "networkpolicies.crd.antrea.io")
_BY_KIND = {(kind, api_version): name for name, (kind, api_version, _) in COLLECTIONS.items()}


def collection_of(obj: dict[str, Any]) -> str:
    return _BY_KIND[(obj["kind"], obj.get("apiVersion", "v1"))]


@dataclass(frozen=True)
class Request:
    """One request as RBAC sees it."""

    method: str
    verb: str  # get, list, watch, create, update
    resource: str  # pods, networkpolicies.networking.k8s.io, ...
    namespace: str
    name: str
    status: int
    version: int = 0  # the resourceVersion a watch started from
    user: str = ""  # whose token it carried


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip


class FakeApiServer:
    """The API server; objects are added with `put`/`delete`, which watchers see as events.
    Its state is guarded by one condition variable (the handler threads and the test's)."""

    def __init__(self, port: int = 0, *, served: Iterable[str] = tuple(COLLECTIONS)):
        self.port = port
        self.served = set(served)
        self.tokens = {TOKEN: USER}  # bearer token -> user
        self.denied: set[tuple[str, str]] = set()  # (verb, resource) answered 403
        self.bookmark_interval = 0.2
        self.max_watch_seconds: float | None = None  # shortens every watch
        self.page_limit_cap: int | None = None
        self.requests: list[Request] = []
        self.watch_count = 0  # watch streams opened
        # (verb, resource) -> what to do first, once: another client's write, say
        self._before: dict[tuple[str, str], Callable[[], None]] = {}
        self._cond = threading.Condition()
        self._version = 100
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            name: {} for name in COLLECTIONS
        }
        self._events: list[tuple[int, str, str, dict[str, Any]]] = []
        self._compacted = 0  # versions up to this one can no longer be watched from
        self._generation = 0  # bumped by drop_watches(): streams of older ones break
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeApiServer:
        handler = type("Handler", (_Handler,), {"api": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="fake-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and break every stream (the port is free to start again)."""
        if self._httpd is not None:
            self.drop_watches()
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Path, token: str = TOKEN) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "agent", "user": {"token": token}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
                    "current-context": "fake",
                }
            )
        )
        return path

    # -- objects ----------------------------------------------------------------------------

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (ADDED or MODIFIED for watchers); the stored copy."""
        with self._cond:
            return self._put(collection_of(obj), json.loads(json.dumps(obj)))

    def put_all(self, objects: Iterable[dict[str, Any]]) -> None:
        with self._cond:
            for obj in objects:
                self._put(collection_of(obj), json.loads(json.dumps(obj)))

    def delete(self, obj: dict[str, Any]) -> None:
        with self._cond:
            collection = collection_of(obj)
            meta = obj["metadata"]
            stored = self._objects[collection].pop((meta.get("namespace", ""), meta["name"]), None)
            if stored is not None:
                self._version += 1
                gone = json.loads(json.dumps(stored))
                gone["metadata"]["resourceVersion"] = str(self._version)
                self._events.append((self._version, collection, "DELETED", gone))
                self._cond.notify_all()

    def get(self, collection: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            return self._objects[collection].get((namespace, name))

    def objects(self, collection: str) -> list[dict[str, Any]]:
        with self._cond:
            return list(self._objects[collection].values())

    @property
    def version(self) -> int:
        with self._cond:
            return self._version

    def compact(self) -> None:
        """Forget the event history: a watch from an older version gets 410 Gone."""
        with self._cond:
            self._compacted = self._version
            self._events.clear()
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Break every open watch stream (the connection closes mid-stream)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def _put(self, collection: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", ""), meta["name"])
        kind, api_version, _ = COLLECTIONS[collection]
        obj.setdefault("kind", kind)
        obj.setdefault("apiVersion", api_version)
        self._version += 1
        meta["resourceVersion"] = str(self._version)
        meta.setdefault("uid", f"uid-{self._version}")
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        event = "MODIFIED" if key in self._objects[collection] else "ADDED"
        self._objects[collection][key] = obj
        self._events.append((self._version, collection, event, obj))
        self._cond.notify_all()
        return obj

    # -- requests (handler threads) -------------------------------------------------------

    def _log(self, request: Request) -> None:
        with self._cond:
            self.requests.append(request)

    def before(self, verb: str, resource: str, action: Callable[[], None]) -> None:
        """Run `action` once, just before the next `verb` of `resource` is answered."""
        with self._cond:
            self._before[(verb, resource)] = action

    def _run_before(self, request: Request) -> None:
        with self._cond:
            action = self._before.pop((request.verb, request.resource), None)
        if action is not None:
            action()

    def requests_of(self, verb: str | None = None, resource: str | None = None) -> list[Request]:
        with self._cond:
            return [
                r
                for r in self.requests
                if (verb is None or r.verb == verb) and (resource is None or r.resource == resource)
            ]


def _matches(obj: dict[str, Any], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        field, _, value = term.partition("=")
        node: Any = obj
        for part in field.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if (node or "") != value:
            return False
    return True


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    # -- routing ----------------------------------------------------------------------------

    def _route(self) -> tuple[str, str, str, dict[str, str]] | None:
        """(resource, namespace, name, query) of the URL, or None for an unknown path."""
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = [p for p in url.path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            rest, group = parts[2:], ""
        elif len(parts) >= 3 and parts[0] == "apis":
            rest, group = parts[3:], parts[1]
        else:
            return None
        namespace = ""
        if len(rest) >= 2 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 2:
            return None
        resource = rest[0] + (f".{group}" if group else "")
        return resource, namespace, rest[1] if len(rest) == 2 else "", query

    def _answer(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, request: Request | None) -> bool:
        """401/403/404 answers; True when one was sent."""
        api = self.api
        if self._user() is None:
            self._finish(request, 401, _status(401, "Unauthorized", "Unauthorized"))
            return True
        if request is None:
            self._answer(404, _status(404, "NotFound", "the server could not find the resource"))
            return True
        if request.resource not in api.served:
            self._finish(request, 404, _status(404, "NotFound", "the server could not find "
                                                "the requested resource"))  # fmt: skip
            return True
        api._run_before(request)
        if (request.verb, request.resource) in api.denied:
            plural, _, group = request.resource.partition(".")
            scope = (f'in the namespace "{request.namespace}"' if request.namespace
                     else "at the cluster scope")  # fmt: skip
            who, verb = self._user(), request.verb
            message = (f'{plural} is forbidden: User "{who}" cannot {verb} resource '
                       f'"{plural}" in API group "{group}" {scope}')  # fmt: skip
            self._finish(request, 403, _status(403, "Forbidden", message))
            return True
        return False

    def _user(self) -> str | None:
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        return self.api.tokens.get(token)

    def _finish(self, request: Request | None, code: int, body: dict[str, Any]) -> None:
        if request is not None:
            self.api._log(Request(request.method, request.verb, request.resource,
                                  request.namespace, request.name, code, 0,
                                  self._user() or ""))  # fmt: skip
        self._answer(code, body)

    def _request(self, verb_for_get: str | None = None) -> tuple[Request | None, dict[str, str]]:
        route = self._route()
        if route is None:
            return None, {}
        resource, namespace, name, query = route
        method = self.command
        if method == "GET":
            verb = "get" if name else ("watch" if query.get("watch") == "true" else "list")
        elif method == "POST":
            verb = "create"
        elif method == "PUT":
            verb = "update"
        else:
            verb = method.lower()
        return Request(method, verb, resource, namespace, name, 0), query

    # -- verbs --------------------------------------------------------------------------------

    def _discovery(self) -> dict[str, Any] | None:
        """What kubectl asks first: the API's groups and resources (only what is served)."""
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        served = [(n, *COLLECTIONS[n]) for n in sorted(self.api.served)]
        groups = sorted({v.rpartition("/")[0]: v for _, _, v, _ in served if "/" in v}.items())
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": v, "version": v.partition("/")[2]}],
                 "preferredVersion": {"groupVersion": v, "version": v.partition("/")[2]}}
                for g, v in groups]}  # fmt: skip
        for group_version in ["v1"] + [v for _, v in groups]:
            prefix = "/api/" if group_version == "v1" else "/apis/"
            if path == prefix + group_version:
                return {"kind": "APIResourceList", "apiVersion": "v1",
                        "groupVersion": group_version, "resources": [
                            {"name": n.partition(".")[0], "singularName": "", "namespaced": ns,
                             "kind": kind, "verbs": ["get", "list", "watch"]}
                            for n, kind, v, ns in served if v == group_version]}  # fmt: skip
        return None

    def do_GET(self) -> None:
        discovery = self._discovery() if self._user() is not None else None
        if discovery is not None:
            self._answer(200, discovery)
            return
        request, query = self._request()
        if self._refuse(request):
            return
        assert request is not None
        if request.verb == "get":
            obj = self.api.get(request.resource, request.namespace, request.name)
            if obj is None:
                plural = request.resource.partition(".")[0]
                self._finish(request, 404, _status(404, "NotFound",
                             f'{plural} "{request.name}" not found'))  # fmt: skip
            else:
                self._finish(request, 200, obj)
        elif request.verb == "list":
            self._list(request, query)
        else:
            self.api._log(Request(request.method, "watch", request.resource, request.namespace,
                                  "", 200, int(query.get("resourceVersion") or 0),
                                  self._user() or ""))  # fmt: skip
            self._watch(request, query)

    def _list(self, request: Request, query: dict[str, str]) -> None:
        api = self.api
        with api._cond:
            items = [
                o
                for (ns, _), o in sorted(api._objects[request.resource].items())
                if (not request.namespace or ns == request.namespace)
                and _matches(o, query.get("fieldSelector", ""))
            ]
            version = str(api._version)
        kind, api_version, _ = COLLECTIONS[request.resource]
        start = int(query.get("continue") or 0)
        limit = int(query.get("limit") or 0) or len(items)
        if api.page_limit_cap:
            limit = min(limit, api.page_limit_cap)
        page = items[start : start + limit]
        metadata: dict[str, Any] = {"resourceVersion": version}
        if start + limit < len(items):
            metadata["continue"] = str(start + limit)
        body = {
            "kind": f"{kind}List",
            "apiVersion": api_version,
            "metadata": metadata,
            # As the API server does: list items carry neither kind nor apiVersion.
            "items": [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                      for o in page],
        }  # fmt: skip
        self._finish(request, 200, body)

    def _chunk(self, line: dict[str, Any]) -> None:
        data = json.dumps(line).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, request: Request, query: dict[str, str]) -> None:
        api = self.api
        since = int(query.get("resourceVersion") or 0)
        seconds = float(query.get("timeoutSeconds") or 1800)
        if api.max_watch_seconds is not None:
            seconds = min(seconds, api.max_watch_seconds)
        deadline = time.monotonic() + seconds
        bookmarks = query.get("allowWatchBookmarks") == "true"
        selector = query.get("fieldSelector", "")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with api._cond:
            api.watch_count += 1
            generation = api._generation
            gone = since < api._compacted
        try:
            if gone:
                expired = _status(410, "Expired", f"too old resource version: {since}")
                self._chunk({"type": "ERROR", "object": expired})
            else:
                self._stream(request, since, deadline, bookmarks, selector, generation)
                if self._broken:
                    # Mid-stream, without the last chunk: the client sees a broken stream.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    _broken = False

    def _stream(self, request, since, deadline, bookmarks, selector, generation) -> None:
        api = self.api
        next_bookmark = time.monotonic() + api.bookmark_interval
        while True:
            with api._cond:
                while True:
                    if api._generation != generation:
                        self._broken = True
                        return
                    if since < api._compacted:  # fell behind a compaction: as etcd does
                        self._chunk({"type": "ERROR", "object": _status(
                            410, "Expired", f"too old resource version: {since}")})  # fmt: skip
                        return
                    first = bisect.bisect_right(api._events, since, key=lambda e: e[0])
                    pending = [e for e in api._events[first:] if e[1] == request.resource]
                    now = time.monotonic()
                    if pending or now >= deadline or (bookmarks and now >= next_bookmark):
                        break
                    api._cond.wait(min(deadline, next_bookmark if bookmarks else deadline) - now)
                version = api._version
            for rv, _, kind, obj in pending:
                since = rv
                namespace = obj["metadata"].get("namespace", "")
                if request.namespace and namespace != request.namespace:
                    continue
                if selector and not _matches(obj, selector):
                    continue
                self._chunk({"type": kind, "object": obj})
            if time.monotonic() >= deadline:
                return
            if bookmarks and time.monotonic() >= next_bookmark:
                kind, api_version, _ = COLLECTIONS[request.resource]
                self._chunk({"type": "BOOKMARK", "object": {
                    "kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": str(max(since, version))}}})  # fmt: skip
                since = max(since, version)
                next_bookmark = time.monotonic() + api.bookmark_interval

    def _write(self) -> tuple[Request, dict[str, Any]] | None:
        """A create or update and its body (always read, so the connection stays usable);
        None when it was refused and answered."""
        request, _ = self._request()
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if self._refuse(request):
            return None
        assert request is not None
        return request, body

    def do_POST(self) -> None:
        write = self._write()
        if write is None:
            return
        request, body = write
        api = self.api
        name = body.get("metadata", {}).get("name", "")
        request = Request(request.method, "create", request.resource, request.namespace, name, 0)
        with api._cond:
            if (request.namespace, name) in api._objects[request.resource]:
                plural = request.resource.partition(".")[0]
                self._finish(request, 409, _status(409, "AlreadyExists",
                             f'{plural} "{name}" already exists'))  # fmt: skip
                return
            body.setdefault("metadata", {})["namespace"] = request.namespace
            stored = api._put(request.resource, body)
        self._finish(request, 201, stored)

    def do_PUT(self) -> None:
        write = self._write()
        if write is None:
            return
        request, body = write
        api = self.api
        with api._cond:
            current = api._objects[request.resource].get((request.namespace, request.name))
            if current is None:
                self._finish(request, 404, _status(404, "NotFound", f'"{request.name}" not found'))
                return
            expected = body.get("metadata", {}).get("resourceVersion")
            if expected and expected != current["metadata"]["resourceVersion"]:
                message = "the object has been modified; please apply your changes to the latest"
                self._finish(request, 409, _status(409, "Conflict", message))
                return
            body.setdefault("metadata", {})["namespace"] = request.namespace
            stored = api._put(request.resource, body)
        self._finish(request, 200, stored)
