"""The benchmark's backend: the fake OpenCode server plus a 1 MiB answer and time-stamped events.

One process can serve several ports (one project folder each), so "50 backends" costs one
Python process instead of fifty:

    python bench/backend.py --root /tmp/x --ports 30000,30001 [--heartbeat 10]

Extra endpoints (the router sees an ordinary OpenCode server on every port):
- ``GET /bench/1mb``: 1 MiB of bytes with a Content-Length (the "large response").
- ``POST /bench/emit``: sends one ``bench.stamp`` event to every open ``/event`` stream of that
  port, each carrying ``time.monotonic_ns()`` taken just before its own write, so a client on the
  same machine can measure backend write -> client read (the clock is system-wide).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.web.iweb import IRequest

from opencoderouter.testing import FakeOpenCode

ONE_MIB = b"x" * (1 << 20)


class BenchOpenCode(FakeOpenCode):
    """FakeOpenCode with the benchmark's extra endpoints."""

    def __init__(self, directory: str, **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self.route("GET", "/bench/1mb", self._one_mib)
        self.route("POST", "/bench/emit", self._emit)

    def _one_mib(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"application/octet-stream")
        return ONE_MIB

    def _emit(self, request: IRequest) -> bytes:
        self.emit_stamp()
        request.setResponseCode(204)
        return b""

    def emit_stamp(self) -> None:
        """One event to every stream, each stamped with the monotonic clock just before its write."""
        for request, _wrapped in list(self.streams):
            stamp = time.monotonic_ns()
            # The same JSON layout as json.dumps, built directly: cheap enough for 1,000 writes.
            request.write(b'data: {"id": "evt_b%d", "type": "bench.stamp", "properties": {"t": %d}}\n\n'
                          % (stamp, stamp))


def main(argv: list[str] | None = None) -> int:
    """Listen on every ``--ports`` port, print one ``listening`` line each, then ``READY <monotonic_ns>``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder under which each port gets a project folder")
    parser.add_argument("--ports", required=True, help="comma-separated ports")
    parser.add_argument("--name", default="bench", help="project folder name prefix")
    parser.add_argument("--heartbeat", type=float, default=10.0)
    parser.add_argument("--git", action="store_true",
                        help="make each project folder a git project (the Go router slugs non-git ones all 'global')")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    ports = [int(p) for p in args.ports.split(",") if p]
    for index, port in enumerate(ports):
        name = args.name if len(ports) == 1 else f"{args.name}{index:02d}"
        directory = os.path.realpath(os.path.join(args.root, name))
        os.makedirs(os.path.join(directory, ".git") if args.git else directory, exist_ok=True)
        address = BenchOpenCode(directory, heartbeat=args.heartbeat).listen(reactor, port, "127.0.0.1").getHost()
        assert isinstance(address, IPv4Address)
        print(f"opencode server listening on http://127.0.0.1:{address.port}", flush=True)
    print(f"READY {time.monotonic_ns()}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
