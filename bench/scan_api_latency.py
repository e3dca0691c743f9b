"""How fast the router's API answers while a full scan probes every port of a 1,001-port range.

    python bench/scan_api_latency.py --start 20000 --end 21000 [--seconds 3] [--backends 2]

The router's web server and its scanner share one reactor. Where there is no socket table (not
Linux) every full scan probes every port, so a scan must never keep the reactor from answering.
This script serves the router's API in-process, has a client in a child process time
``GET /health`` for ``--seconds`` with nothing else running (the baseline), then again while full
scans of the range run back to back (the fallback that probes every port), with ``--backends``
bench backends and one never-answering listener in the range (so each scan also waits out one
probe timeout). Prints one JSON object: latency p50 / p95 / max in ms for both windows, and the
scans' own wall time. (tests/test_scanner.py checks that the API answers during a scan at all;
how fast it answers is measured here.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutput

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Backend, child_env, percentile  # noqa: E402

#: The client, in its own process so that it never shares the router's reactor.
MEASURE_API = """
import json, sys, time, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
latencies, deadline = [], time.monotonic() + seconds
while time.monotonic() < deadline:
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=5) as response:
        response.read()
    latencies.append(time.perf_counter() - began)
print(json.dumps(latencies))
"""


class _Silent(Protocol):
    """Accepts and never answers: each probe of it lasts the whole probe timeout."""


def _latency_summary(latencies: list[float]) -> dict[str, float]:
    return {"p50_ms": 1000 * percentile(latencies, 0.50), "p95_ms": 1000 * percentile(latencies, 0.95),
            "max_ms": 1000 * max(latencies, default=float("nan")), "n": len(latencies)}


async def _measure(url: str, seconds: float) -> list[float]:
    output = await getProcessOutput(sys.executable, ["-c", MEASURE_API, url, str(seconds)], env=child_env())
    return json.loads(output)


async def _main(reactor: Any, start: int, end: int, seconds: float, backends: int) -> None:
    from twisted.web.server import Site

    from opencoderouter.api import RouterAPI
    from opencoderouter.loopback_http import loopback_agent, probe_client
    from opencoderouter.registry import Registry
    from opencoderouter.scanner import Prober, Scanner

    ports = [start + (i + 1) * (end - start) // (backends + 1) for i in range(backends)]
    workdir = Path(tempfile.mkdtemp(prefix="scan-api-"))
    backend = Backend(workdir, ports, name="scan-api") if ports else None
    silent = reactor.listenTCP(end, Factory.forProtocol(_Silent), interface="127.0.0.1")
    registry = Registry(reactor, stale_after=30.0)
    prober = Prober(probe_client(loopback_agent(reactor, 0.8)), reactor, timeout=0.8)
    scanner = Scanner(registry, prober, reactor, port_range=(start, end), interval=60.0, concurrency=20,
                      quick_interval=0, list_listeners=lambda s, e: None)
    api = reactor.listenTCP(0, Site(RouterAPI(registry).resource()), interface="127.0.0.1")
    url = f"http://127.0.0.1:{api.getHost().port}/health"
    result: dict[str, Any] = {"ports": end - start + 1, "backends": backends}
    try:
        result["baseline"] = _latency_summary(await _measure(url, seconds))
        measuring = defer.ensureDeferred(_measure(url, seconds))
        scan_walls = []
        while not measuring.called:  # scan back to back for as long as the client measures
            began = time.perf_counter()
            await scanner.scan()
            scan_walls.append(time.perf_counter() - began)
        result["during_scans"] = _latency_summary(await measuring)
        result["scans"] = len(scan_walls)
        result["scan_wall_s"] = statistics.median(scan_walls)
        result["found"] = len(registry)
    finally:
        await api.stopListening()
        await silent.stopListening()
        if backend is not None:
            backend.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result), flush=True)


def main() -> int:
    """Measure on the real reactor and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--end", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--backends", type=int, default=2)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(_main(reactor, args.start, args.end, args.seconds,
                                                          args.backends)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
