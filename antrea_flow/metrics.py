"""A Prometheus endpoint per process, on its own registry (no global state), which also
answers the liveness and readiness probes (`/livez`, `/readyz`).

The endpoint serves scrapes from its own thread, while the state it reports belongs to the
component's event loop. So a scrape never reads that state itself: `OwnerCollector` has the
loop build the metric families (the loop's snapshot of its own counters, handed over as a
finished list) and serves the last snapshot if the loop does not answer in time. State of
other threads reaches the families through the snapshots those threads publish.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import cannot_listen
from .ipfix.address import TransportAddress

log = logging.getLogger(__name__)


class OwnerCollector(Collector):
    """Builds metric families at scrape time, on the thread that owns the state they read.

    `produce` runs on the owner's event loop once `bind` named it (before that, and for a
    scrape made on the loop itself, it runs in place). A scrape waits up to `timeout` for the
    loop and otherwise serves the families of the last scrape that it answered.
    """

    def __init__(self, produce: Callable[[], Iterable[Metric]], timeout: float = 2.0):
        self._produce = produce
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._last: list[Metric] = []

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on, build the families on `loop` (call this from the loop's thread)."""
        self._loop = loop
        self._thread = threading.get_ident()

    def collect(self) -> Iterable[Metric]:
        loop = self._loop
        if loop is None or self._thread == threading.get_ident() or loop.is_closed():
            return list(self._produce())
        future: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def build() -> None:
            if not future.cancelled():
                try:
                    future.set_result(list(self._produce()))
                except Exception as exc:  # the scrape reports it
                    future.set_exception(exc)

        try:
            loop.call_soon_threadsafe(build)
            self._last = future.result(self._timeout)
        except RuntimeError:  # the loop closed in between
            pass
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.warning("the event loop did not answer a metrics scrape within %ss", self._timeout)
        return self._last


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def labelled_gauge(name: str, documentation: str, label: str, values: dict) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items(), key=lambda kv: str(kv[0])):
        family.add_metric([str(key)], value)
    return family


def labelled_counter(
    name: str, documentation: str, label: str, values: dict, always: Iterable[str] = ()
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key in always:
        values.setdefault(key, 0)
    for key, value in sorted(values.items(), key=lambda kv: str(kv[0])):
        family.add_metric([str(key)], value)
    return family


class Health:
    """Answers the probes from the HTTP thread by asking the owner's event loop: alive when
    the loop runs a callback within `timeout` seconds, ready when `ready()` (run on the
    loop) says so as well."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        ready: Callable[[], bool] | None = None,
        timeout: float = 5.0,
    ):
        self._loop = loop
        self._ready = ready
        self._timeout = timeout

    def check(self, readiness: bool) -> tuple[bool, str]:
        future: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def probe() -> None:
            if not future.cancelled():
                future.set_result(self._ready() if readiness and self._ready else True)

        try:
            self._loop.call_soon_threadsafe(probe)
            ok = future.result(self._timeout)
        except RuntimeError:
            return False, "stopped"
        except concurrent.futures.TimeoutError:
            future.cancel()
            return False, f"the event loop did not answer within {self._timeout:g}s"
        return ok, "ok" if ok else "not ready"


async def run_until_signalled(
    run: Callable[[asyncio.Event], Awaitable[None]],
    registry: CollectorRegistry,
    address: TransportAddress | None,
    ready: Callable[[], bool] | None = None,
) -> None:
    """Run a component until SIGINT or SIGTERM, with its metrics and probe endpoint when
    configured (`ready` decides /readyz, on the loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = None
    if address is not None:
        try:
            server = serve(registry, address, Health(loop, ready))[0]
        except OSError as exc:
            setting = f"metricsBindAddress {address.host_port!r}"
            raise cannot_listen(setting, address.host, exc) from None
    try:
        await run(stop)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
        pass


def serve(
    registry: CollectorRegistry, address: TransportAddress, health: Health | None = None
) -> tuple[WSGIServer, threading.Thread]:
    """Start the HTTP endpoint (in a daemon thread): /metrics, and /livez, /readyz when
    `health` is given; (server, thread) for shutdown."""
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if health is not None and path in ("/livez", "/healthz", "/readyz"):
            ok, text = health.check(readiness=path == "/readyz")
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{text}\n".encode()]
        return metrics(environ, start_response)

    host = address.host or "0.0.0.0"
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server_class = type("Server", (_Server,), {"address_family": family})
    server: WSGIServer = make_server(
        str(sockaddr[0]), address.port, app, server_class, _QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("metrics on http://%s/metrics", address.host_port)
    return server, thread
