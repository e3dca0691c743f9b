"""Proxy overhead: wrk through the router vs straight to a fake backend, with CPU per request.

    PYTHONPATH=. python bench/proxy_overhead.py [--seconds 5] [--path /global/health]

Prints, for 1/16/64 connections, requests/s direct and through the router (path mode), their ratio,
the added median latency, and the router's user+system CPU time per request (less sensitive to
other load on the machine than throughput).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import FakeOpenCodeProcess, RouterProcess, free_port_block, http_json, wait_for  # noqa: E402


def cpu_ticks(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def _found(pattern: str, text: str) -> re.Match[str]:
    """The match of ``pattern`` in wrk's output; a clear error when wrk printed something else."""
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"no {pattern!r} in wrk's output:\n{text}")
    return match


def wrk(url: str, connections: int, seconds: float) -> tuple[float, float, int]:
    """(requests/s, median latency in ms, requests) from one wrk run."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency", url], capture_output=True, text=True, check=True
    ).stdout
    rps = float(_found(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(_found(r"(\d+) requests in", out).group(1))
    p50, unit = _found(r"50%\s+([\d.]+)(us|ms|s)", out).groups()
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return rps, float(p50) * scale, requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--path", default="/global/health")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="ocr-proxy-bench-"))
    block = free_port_block(2)
    (root / "bench").mkdir()
    backend = FakeOpenCodeProcess(root / "bench", port=block)
    router = RouterProcess("--scan-start", str(block), "--scan-end", str(block + 1), "--scan-interval", "60s")
    try:
        wait_for(lambda: http_json(router.url + "/api/backends"), timeout=15, what="router to find the backend")
        print(f"{'conns':>5} {'direct rps':>11} {'router rps':>11} {'ratio':>6} {'added p50 ms':>13} {'router CPU us/req':>18}")
        for connections in (1, 16, 64):
            direct_rps, direct_p50, _ = wrk(f"http://127.0.0.1:{backend.port}{args.path}", connections, args.seconds)
            user0, system0 = cpu_ticks(router.process.pid)
            router_rps, router_p50, requests = wrk(f"{router.url}/bench{args.path}", connections, args.seconds)
            user1, system1 = cpu_ticks(router.process.pid)
            tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
            cpu = ((user1 - user0) + (system1 - system0)) * tick_us / max(requests, 1)
            print(f"{connections:>5} {direct_rps:>11.0f} {router_rps:>11.0f} {router_rps / direct_rps:>6.2f} "
                  f"{router_p50 - direct_p50:>13.2f} {cpu:>18.0f}")
    finally:
        router.stop()
        backend.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
