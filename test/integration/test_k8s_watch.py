"""The Kubernetes API metadata source: the real `kubernetes` client against a fake API
server at the HTTP level (list, chunked watch, bookmarks, 410 Gone, dropped streams, 401,
403, a server down at start, CRDs not installed). After each scenario the store holds
exactly the server's objects."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from antrea_flow.k8s.client import api_connection
from antrea_flow.k8s.stores import MetadataStore, pack_ip
from antrea_flow.k8s.watch import AGGREGATOR_RESOURCES, ApiSource, agent_resources

from .fakeapi import COLLECTIONS, CRDS, FakeApiServer
from .ipfixkit import free_port

WAIT = 15.0


def pod(name: str, ip: str, node: str = "node-1", namespace: str = "default", **labels: str):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": {"nodeName": node},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def node(name: str, cidr: str, address: str):
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": address}]},
    }


def service(name: str, ip: str, port: int, namespace: str = "default"):
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": port}]},
    }


def policy(name: str, rule_id: int, api_version="networking.k8s.io/v1", kind="NetworkPolicy"):
    meta: dict[str, Any] = {"name": name, "annotations": {
        "antrea-flow.io/rule-ids": f'{{"ingress": [{rule_id}]}}'}}  # fmt: skip
    if kind == "NetworkPolicy":
        meta["namespace"] = "default"
    return {"apiVersion": api_version, "kind": kind, "metadata": meta,
            "spec": {"ingress": [{"action": "Allow", "name": "r"}]}}  # fmt: skip


CLUSTER = [
    node("node-1", "10.10.1.0/24", "192.168.77.11"),
    node("node-2", "10.10.2.0/24", "192.168.77.12"),
    pod("web-1", "10.10.1.6", app="web"),
    pod("web-2", "10.10.2.6", node="node-2", app="web"),
    pod("client", "10.10.1.5", namespace="frontend"),
    service("web", "10.96.0.10", 80),
    policy("allow-web", 101),
    policy("acnp", 301, "crd.antrea.io/v1beta1", "ClusterNetworkPolicy"),
]


def expected(objects: list[dict[str, Any]], kinds: set[str]) -> dict[str, Any]:
    """What a store fed exactly `objects` (of these kinds) answers."""
    store = MetadataStore()
    store.replace([o for o in objects if o["kind"] in kinds])
    return snapshot(store)


def snapshot(store: MetadataStore) -> dict[str, Any]:
    """Every lookup the store answers for a living object (run on the store's owner)."""
    return {
        "nodes": dict(store.nodes_by_name),
        "pods": {ip: [life.info for life in lives if life.ended is None]
                 for ip, lives in store.pods_by_ip.items()
                 if any(life.ended is None for life in lives)},
        "services": dict(store.services),
        "rules": dict(store.rules),
    }  # fmt: skip


class SourceHarness:
    """An ApiSource on an event loop of its own thread (the store's owner); the test reads
    the store through that loop."""

    def __init__(self, kubeconfig: Path, resources, **options: Any):
        self.connection = api_connection(str(kubeconfig))
        assert self.connection is not None
        self.store = MetadataStore()
        self.source = ApiSource(self.connection, resources, self.store, **options)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> SourceHarness:
        self.thread.start()
        self.call(self.source.start)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.source.stop(), self.loop).result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        async def run() -> Any:
            return function(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(WAIT)

    def snapshot(self) -> dict[str, Any]:
        return self.call(snapshot, self.store)

    def wait(self, predicate: Callable[[], Any], what: str) -> Any:
        import time

        deadline = time.monotonic() + WAIT
        while True:
            value = self.call(predicate)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {WAIT}s: {what}")
            time.sleep(0.02)

    def wait_equal(self, objects: list[dict[str, Any]], kinds: set[str]) -> None:
        want = expected(objects, kinds)
        self.wait(lambda: snapshot(self.store) == want, f"the store equals the server's {kinds}")

    def synced(self, timeout: float = WAIT) -> bool:
        return asyncio.run_coroutine_threadsafe(self.source.wait_synced(timeout), self.loop).result(
            timeout + 5
        )


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        server.put_all(CLUSTER)
        yield server


AGGREGATOR_KINDS = {"Pod", "Node", "Service"}
AGENT_KINDS = {"Pod", "Node", "Service", "NetworkPolicy", "ClusterNetworkPolicy"}


def test_list_in_pages_then_watch_events_keep_the_store_equal_to_the_server(api, tmp_path):
    api.page_limit_cap = 2  # two pages of three Pods: a continue token
    with SourceHarness(api.kubeconfig(tmp_path / "kubeconfig"), AGGREGATOR_RESOURCES) as h:
        assert h.synced()
        h.wait_equal(api_objects(api), AGGREGATOR_KINDS)
        assert len(api.requests_of("list", "pods")) == 2

        api.put(pod("web-3", "10.10.2.7", node="node-2", app="web"))
        api.put(pod("web-1", "10.10.1.16", app="web", tier="new"))  # new IP and labels
        api.delete(pod("client", "10.10.1.5", namespace="frontend"))
        api.put(service("db", "10.96.0.20", 5432))
        api.put(node("node-3", "10.10.3.0/24", "192.168.77.13"))
        h.wait_equal(api_objects(api), AGGREGATOR_KINDS)
        # The Pod that went, and web-1's old IP, still resolve for late records.
        assert h.call(h.store.pod, pack_ip("10.10.1.5")).name == "client"
        assert h.call(h.store.pod, pack_ip("10.10.1.6")).name == "web-1"
        stats = h.source.stats
        assert stats.events["pods"] == 3 and stats.events["services"] == 1
        assert len(api.requests_of("list", "pods")) == 2  # no relist


def api_objects(api: FakeApiServer) -> list[dict[str, Any]]:
    return [o for name in COLLECTIONS if name in api.served for o in api.objects(name)]


def test_the_agent_watches_only_its_nodes_pods_and_the_policies(api, tmp_path):
    with SourceHarness(api.kubeconfig(tmp_path / "kubeconfig"), agent_resources("node-1")) as h:
        assert h.synced()
        local = [o for o in api_objects(api) if o["kind"] != "Pod"
                 or o["spec"]["nodeName"] == "node-1"]  # fmt: skip
        h.wait_equal(local, AGENT_KINDS)
        assert h.call(h.store.pod, pack_ip("10.10.2.6")) is None  # node-2's
        assert h.call(h.store.rule, 301).policy_name == "acnp"
        api.put(pod("late", "10.10.1.9"))
        api.put(pod("elsewhere", "10.10.2.9", node="node-2"))
        h.wait(lambda: h.store.pod(pack_ip("10.10.1.9")), "the new local Pod")
        assert h.call(h.store.pod, pack_ip("10.10.2.9")) is None
    pods = api.requests_of(resource="pods")
    assert pods and all(r.verb in ("list", "watch") for r in pods)


def test_bookmarks_let_a_watch_resume_without_a_relist(api, tmp_path):
    api.max_watch_seconds = 0.3  # every watch ends soon; each resumes where it was
    with SourceHarness(api.kubeconfig(tmp_path / "kubeconfig"), AGGREGATOR_RESOURCES) as h:
        assert h.synced()
        h.wait(lambda: api.watch_count >= 9, "every kind watched three times")
        # Services moved the version on; the bookmarks carry the other watches past it.
        for i in range(20):
            api.put(service(f"s{i}", f"10.96.1.{i}", 80))
        version = api.version
        h.wait(
            lambda: all(any(r.version >= version for r in api.requests_of("watch", kind))
                        for kind in ("pods", "nodes", "services")),
            "every kind watched again from a version after the Services",
        )  # fmt: skip
        api.compact()  # a watch from any version before now would be 410
        watches = api.watch_count
        h.wait(lambda: api.watch_count >= watches + 3, "more watches")
        api.put(pod("after", "10.10.1.30"))
        h.wait_equal(api_objects(api), AGGREGATOR_KINDS)
    assert len(api.requests_of("list", "pods")) == 1
    assert h.source.stats.relists.get("pods", 0) == 0


def test_410_gone_relists_and_removes_what_disappeared(api, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="antrea_flow.k8s.watch")
    with SourceHarness(api.kubeconfig(tmp_path / "kubeconfig"), AGGREGATOR_RESOURCES,
                       backoff=(0.05, 0.2)) as h:  # fmt: skip
        assert h.synced()
        h.wait_equal(api_objects(api), AGGREGATOR_KINDS)
        h.wait(lambda: api.watch_count == 3, "every kind watched")
        api.bookmark_interval = 3600  # no bookmark saves the watches this time
        api.drop_watches()  # while they are away:
        api.delete(pod("web-2", "10.10.2.6", node="node-2"))
        api.put(pod("new", "10.10.2.8", node="node-2"))
        api.compact()  # ... and their versions are compacted away
        h.wait(lambda: h.source.stats.relists.get("pods"), "a relist of Pods")
        h.wait_equal(api_objects(api), AGGREGATOR_KINDS)
    assert len(api.requests_of("list", "pods")) == 2
    assert any("410 Gone" in r.getMessage() for r in caplog.records)


def test_a_dropped_stream_is_watched_again_after_a_backoff(api, tmp_path):
    with SourceHarness(api.kubeconfig(tmp_path / "kubeconfig"), AGGREGATOR_RESOURCES,
                       backoff=(0.05, 0.2)) as h:  # fmt: skip
        assert h.synced()
        h.wait(lambda: api.watch_count == 3, "every kind watched")
        api.drop_watches()
        h.wait(lambda: api.watch_count >= 6, "every kind watched again")
        api.put(pod("after-drop", "10.10.1.40"))
        h.wait_equal(api_objects(api), AGGREGATOR_KINDS)
        assert h.source.stats.failures["stream_dropped"] >= 3
    assert len(api.requests_of("list", "pods")) == 1  # resumed from its version


def test_a_server_down_at_start_is_an_outage_logged_once_then_synced(tmp_path, caplog):
    port = free_port()
    server = FakeApiServer(port)
    kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
    caplog.set_level(logging.INFO, logger="antrea_flow.k8s.watch")
    harness = SourceHarness(kubeconfig, AGGREGATOR_RESOURCES, backoff=(0.05, 0.1))
    try:
        with harness as h:
            assert h.synced(timeout=0.5) is False  # start-up goes on without it
            h.wait(lambda: h.source.stats.failures.get("unreachable", 0) >= 6, "failures")
            server.start()
            server.put_all(CLUSTER)
            assert h.synced()
            h.wait_equal(api_objects(server), AGGREGATOR_KINDS)
            assert h.source.stats.outages == 1
    finally:
        server.stop()
    messages = [r.getMessage() for r in caplog.records]
    unreachable = [m for m in messages if "unreachable" in m]
    assert len(unreachable) == 1, unreachable
    assert f"127.0.0.1:{port}" in unreachable[0] and "keeping the last metadata" in unreachable[0]
    assert any("reachable again" in m for m in messages)
    assert any("no complete list" in m for m in messages)


def test_an_outage_keeps_the_last_state(api, tmp_path):
    with SourceHarness(api.kubeconfig(tmp_path / "kubeconfig"), AGGREGATOR_RESOURCES,
                       backoff=(0.05, 0.1)) as h:  # fmt: skip
        assert h.synced()
        h.wait_equal(api_objects(api), AGGREGATOR_KINDS)
        before = h.snapshot()
        api.stop()
        h.wait(lambda: h.source.stats.outages == 1, "the outage noticed")
        assert h.snapshot() == before


def test_401_is_one_line_naming_the_server_and_the_resource(api, tmp_path, caplog):
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig", token="wrong")
    with (
        caplog.at_level(logging.ERROR),
        SourceHarness(kubeconfig, AGGREGATOR_RESOURCES, backoff=(0.05, 0.1)) as h,
    ):
        h.wait(lambda: h.source.stats.failures.get("unauthorized", 0) >= 9, "retries")
    lines = [r.getMessage() for r in caplog.records if "401" in r.getMessage()]
    assert len(lines) == 3, lines  # one per resource, not one per retry
    pods = next(line for line in lines if "list pods" in line)
    assert api.url in pods and "credentials" in pods and "kubeconfig" in pods


def test_403_names_the_missing_verb_and_resource(api, tmp_path, caplog):
    api.denied.add(("watch", "pods"))
    with (
        caplog.at_level(logging.ERROR),
        SourceHarness(
            api.kubeconfig(tmp_path / "kubeconfig"), AGGREGATOR_RESOURCES, backoff=(0.05, 0.1)
        ) as h,
    ):
        assert h.synced()  # the list is allowed
        h.wait(lambda: h.source.stats.failures.get("forbidden", 0) >= 2, "retries")
    lines = [r.getMessage() for r in caplog.records if "403" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "verb 'watch' on resource 'pods'" in lines[0] and api.url in lines[0]
    assert 'cannot watch resource "pods"' in lines[0]  # the server's own words


def test_absent_antrea_crds_are_not_an_error(tmp_path, caplog):
    with FakeApiServer(served=[c for c in COLLECTIONS if c not in CRDS]) as api:
        api.put_all(o for o in CLUSTER if o["kind"] != "ClusterNetworkPolicy")
        with (
            caplog.at_level(logging.INFO),
            SourceHarness(api.kubeconfig(tmp_path / "kubeconfig"), agent_resources("node-1")) as h,
        ):
            assert h.synced()
            assert h.call(h.store.rule, 101).policy_name == "allow-web"
    notes = [
        r for r in caplog.records if "Antrea-native policies are not available" in r.getMessage()
    ]
    assert len(notes) == 1 and all(r.levelno == logging.INFO for r in notes)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
