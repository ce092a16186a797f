"""A Prometheus endpoint per process, on its own registry (no global state)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import cannot_listen
from .ipfix.address import TransportAddress

log = logging.getLogger(__name__)


class CallbackCollector(Collector):
    """Builds metric families at scrape time from the components' own counters."""

    def __init__(self, produce: Callable[[], Iterable[Metric]]):
        self._produce = produce

    def collect(self) -> Iterable[Metric]:
        return self._produce()


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def labelled_counter(
    name: str, documentation: str, label: str, values: dict, always: Iterable[str] = ()
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key in always:
        values.setdefault(key, 0)
    for key, value in sorted(values.items(), key=lambda kv: str(kv[0])):
        family.add_metric([str(key)], value)
    return family


async def run_until_signalled(
    run: Callable[[asyncio.Event], Awaitable[None]],
    registry: CollectorRegistry,
    address: TransportAddress | None,
) -> None:
    """Run a component until SIGINT or SIGTERM, with its metrics endpoint when configured."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = None
    if address is not None:
        try:
            server = serve(registry, address)[0]
        except OSError as exc:
            setting = f"metricsBindAddress {address.host_port!r}"
            raise cannot_listen(setting, address.host, exc) from None
    try:
        await run(stop)
    finally:
        if server is not None:
            server.shutdown()


def serve(registry: CollectorRegistry, address: TransportAddress) -> tuple[object, object]:
    """Start the HTTP endpoint (in a daemon thread); (server, thread) for shutdown."""
    server, thread = start_http_server(address.port, address.host or "0.0.0.0", registry)
    log.info("metrics on http://%s/metrics", address.host_port)
    return server, thread
