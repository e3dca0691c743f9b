"""CPU cost of the dashboard feed and of /metrics, in process, no sockets.

- fan-out: one registry change sent to N open /api/events streams (JSON per stream, since each
  stream's URLs use the Host its client used);
- snapshot: a new stream's first event with B backends;
- scrape: one GET /metrics with B backends and S slugs' worth of proxy series.

Prints the min and median of 7 runs. Run: python bench/dashboard_cost.py
"""

from __future__ import annotations

import statistics
import time

from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from opencoderouter.events import EventStream
from opencoderouter.metrics import RouterMetrics
from opencoderouter.registry import Registry, Sighting


class _StreamRequest(DummyRequest):
    """A DummyRequest that keeps its push producer (as a channel does) and drops what is written."""

    producer = None

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        pass


def _registry(backends: int) -> tuple[Clock, Registry]:
    clock = Clock()
    registry = Registry(clock, stale_after=30)
    registry.record_scan([Sighting(30000 + i, f"/home/alice/project-{i}", "1.18.33", None) for i in range(backends)])
    return clock, registry


def _runs(measure: object, repeat: int = 7) -> str:
    times = [measure() for _ in range(repeat)]  # type: ignore[operator]
    return f"min {min(times) * 1e6:8.1f} us   median {statistics.median(times) * 1e6:8.1f} us"


def fan_out(streams: int, events: int = 200) -> float:
    """CPU seconds to send one change to ``streams`` dashboards."""
    clock, registry = _registry(10)
    stream = EventStream(registry, clock)
    for _ in range(streams):
        request = _StreamRequest([b""])
        request.requestHeaders.setRawHeaders(b"host", [b"localhost:8080"])
        stream.render(request)
    began = time.process_time()
    for i in range(events):
        registry.record_scan([Sighting(31000 + (i % 2), "/home/alice/flapping", "1.18.33", None)], complete=False)
    return (time.process_time() - began) / events


def snapshot(backends: int) -> float:
    """CPU seconds to open one stream (its snapshot) with ``backends`` backends."""
    clock, registry = _registry(backends)
    stream = EventStream(registry, clock, max_streams=10_000)
    began = time.process_time()
    for _ in range(20):
        stream.render(_StreamRequest([b""]))
    return (time.process_time() - began) / 20


def scrape(backends: int, slugs: int) -> float:
    """CPU seconds for one /metrics rendering."""
    _, registry = _registry(backends)
    metrics = RouterMetrics(registry)
    for i in range(slugs):
        for mode in ("host", "path"):
            metrics.proxy_meter(f"project-{i}", mode).finished(200, 0.01, 1000, 10)
    began = time.process_time()
    for _ in range(20):
        metrics.render()
    return (time.process_time() - began) / 20


def main() -> None:
    """Print every figure."""
    for streams in (1, 10, 100):
        print(f"fan-out of one change to {streams:3d} streams: {_runs(lambda streams=streams: fan_out(streams))}")
    for backends in (10, 100, 500):
        print(f"snapshot with {backends:3d} backends:           {_runs(lambda backends=backends: snapshot(backends))}")
    for backends, slugs in ((10, 10), (100, 100), (200, 200)):
        print(f"/metrics with {backends:3d} backends, {slugs:3d} slugs: {_runs(lambda backends=backends, slugs=slugs: scrape(backends, slugs))}")


if __name__ == "__main__":
    main()
