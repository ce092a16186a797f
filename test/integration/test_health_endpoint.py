"""The probes beside /metrics: /livez answers from the owner's event loop, /readyz asks the
component, and a stuck loop is not alive."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry

from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.metrics import Health, serve

from .ipfixkit import free_port


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_liveness_and_readiness_come_from_the_loop():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ready = [False]
        port = free_port()
        server, _ = serve(
            CollectorRegistry(),
            TransportAddress("127.0.0.1", port, "tcp"),
            Health(loop, lambda: ready[0], timeout=0.5),
        )
        base = f"http://127.0.0.1:{port}"
        try:
            assert await asyncio.to_thread(get, base + "/livez") == (200, "ok\n")
            assert await asyncio.to_thread(get, base + "/readyz") == (503, "not ready\n")
            ready[0] = True
            assert await asyncio.to_thread(get, base + "/readyz") == (200, "ok\n")
            code, text = await asyncio.to_thread(get, base + "/metrics")
            assert code == 200 and "python_gc" not in text  # its own registry only
            # A loop that does not run callbacks is not alive: a probe made while this
            # coroutine keeps the loop in a blocking call (it cannot answer before it ends).
            answers: list[tuple[int, str]] = []
            prober = threading.Thread(target=lambda: answers.append(get(base + "/livez")))
            prober.start()
            time.sleep(3.0)
            prober.join()
            code, text = answers[0]
            assert code == 503 and "did not answer within 0.5s" in text
        finally:
            server.shutdown()
            server.server_close()

    asyncio.run(scenario())
