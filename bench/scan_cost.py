"""Time full scans of a port range with the router's own Scanner, in this process.

    python bench/scan_cost.py --start 40000 --end 41000 --repeat 3

Prints one JSON object: wall and CPU seconds per scan (median of ``--repeat``), backends found,
for the normal mode (listening sockets from /proc/net/tcp, then probes) and for the fallback
that probes every port (what the router does where /proc is unreadable, and what the Go router
does every 5 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from twisted.internet import defer, task


async def _scan_times(reactor: Any, start: int, end: int, repeat: int, probe_all: bool) -> dict[str, Any]:
    from opencoderouter.listeners import list_listeners
    from opencoderouter.loopback_http import loopback_agent, probe_client
    from opencoderouter.registry import Registry
    from opencoderouter.scanner import Prober, Scanner

    registry = Registry(reactor, stale_after=30.0)
    prober = Prober(probe_client(loopback_agent(reactor, 0.8)), reactor, timeout=0.8)
    listing = (lambda s, e: None) if probe_all else list_listeners
    scanner = Scanner(registry, prober, reactor, port_range=(start, end), interval=5.0, concurrency=20,
                      list_listeners=listing)
    walls, cpus = [], []
    for _ in range(repeat):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        await scanner.scan()
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
            "wall_all": walls, "found": len(registry)}


async def _main(reactor: Any, start: int, end: int, repeat: int) -> None:
    result: dict[str, Any] = {"ports": end - start + 1}
    for mode, probe_all in (("proc_listing", False), ("probe_every_port", True)):
        try:
            result[mode] = await _scan_times(reactor, start, end, repeat, probe_all)
        except Exception as error:  # the scanner's API may change; report rather than crash the run
            result[mode] = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(result), flush=True)


def main() -> int:
    """Run the scans on the real reactor and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--end", type=int, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(_main(reactor, args.start, args.end, args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
