"""``--metrics-port``: a Prometheus ``/metrics`` endpoint on a thread of the service's process.

Each server has its own registry: the collectors it is given plus the process's own metrics
(``process_resident_memory_bytes``, CPU seconds, open files; prometheus_client's ProcessCollector).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import ProcessCollector, start_http_server
from prometheus_client.registry import Collector, CollectorRegistry

from lorafleet.transport import topology
from lorafleet.transport.base import Transport

log = logging.getLogger(__name__)

#: How long a scrape waits for the broker's answer on the dead-letter queue's depth.
DEAD_LETTER_TIMEOUT_S = 5.0


class MetricsServer:
    """``/metrics`` of ``registry`` on ``port`` (all interfaces), until :meth:`close`."""

    def __init__(self, port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> None:
        self.registry = registry
        self._server: Any
        self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        log.info("metrics: serving /metrics on %s:%d", addr, port)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def metrics_registry(*collectors: Collector) -> CollectorRegistry:
    """A registry of ``collectors`` and this process's metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


class DeadLetterDepth:
    """The depth of the broker's dead-letter queue, asked on one thread of its own (a transport makes
    one connection per calling thread; scrapes come on a new thread each)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-dlq")

    def __call__(self) -> int:
        future = self._executor.submit(self.transport.queue_depth, topology.DEAD_LETTER_QUEUE)
        return future.result(timeout=DEAD_LETTER_TIMEOUT_S)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
