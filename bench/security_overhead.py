"""CPU cost per request of the guard (RouterSite, RouterChannel, GuardedRoot), in process, no sockets.

Feeds keep-alive requests for a tiny resource through a plain twisted.web Site, a RouterSite with the
guard (route decision, host allow-list, origin check, head limits and deadline) and the same with token auth, and
prints the CPU time per request (min and median of 7 runs). Run: python bench/security_overhead.py
"""

from __future__ import annotations

import time

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Site

from opencoderouter.auth import Authentication, Authenticator
from opencoderouter.channel import RouterSite
from opencoderouter.guard import Guard, GuardedRoot
from opencoderouter.hosts import HostPolicy
from opencoderouter.registry import Registry
from opencoderouter.routing import Router, RouterResource

TOKEN = b"t" * 32


class Hello(Resource):
    """The cheapest possible answer, so that the overhead shows."""

    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return b"ok"


def per_request(site: Site, count: int, extra_headers: bytes = b"") -> float:
    """CPU microseconds per request over one keep-alive connection."""
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 2),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    channel.makeConnection(transport)
    request = (b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: bench\r\nAccept: */*\r\n"
               + extra_headers + b"\r\n")
    began = time.process_time()
    for _ in range(count):
        channel.dataReceived(request)
        transport.clear()
    elapsed = time.process_time() - began
    channel.connectionLost(None)
    return elapsed / count * 1e6


def main() -> None:
    """Print the figures."""
    hosts = HostPolicy(lambda name: None, clock=reactor)
    router = Router(Registry(reactor, 30), hosts)

    def guarded(authenticator: Authenticator) -> RouterSite:
        root = RouterResource(router, lambda route: Hello(), own_routes={b"api": Hello()}, dashboard=Hello())
        guard = Guard(hosts, Authentication(reactor, authenticator))
        return RouterSite(GuardedRoot(root, guard), router=router, reactor=reactor)

    sites = {
        "plain Site": (Site(Hello(), reactor=reactor), b""),
        "RouterSite, auth off": (guarded(Authenticator()), b""),
        "RouterSite, Bearer token": (guarded(Authenticator(TOKEN, clock=reactor)),
                                     b"Authorization: Bearer " + TOKEN + b"\r\n"),
    }
    results: dict[str, list[float]] = {name: [] for name in sites}
    for _ in range(7):
        for name, (site, headers) in sites.items():
            results[name].append(per_request(site, 4000, headers))
    for name, values in results.items():
        values.sort()
        print(f"{name:28s} min {values[0]:6.1f} us/request, median {values[3]:6.1f} us/request")


if __name__ == "__main__":
    main()
