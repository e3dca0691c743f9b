"""Baseline only (``run.py --stock-proxy``): run the router with Twisted's stock ReverseProxyResource.

Imported before twistd starts; it swaps the proxy factory that ``opencoderouter.tap.makeService``
wires in for one that forwards each request with a plain ``ReverseProxyResource`` (HTTP/1.0 to the
backend, a new connection per request): the "stock ReverseProxyResource" reference of issue 9, so
a run can compare the router's own proxy with it on the same machine.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.web.proxy import ReverseProxyResource

import opencoderouter.tap


class _Forward(ReverseProxyResource):
    """Forwards the raw path; ReverseProxyResource appends the request's query itself."""

    isLeaf = True


class StockProxyFactory:
    """Same call signature as the router's proxy factory."""

    def __init__(self, forwarder: Any) -> None:
        # The router's forwarder (pool, timeouts, credentials) does not apply to the stock proxy.
        self.reactor = forwarder.reactor

    def __call__(self, route: Any) -> Any:
        """A stock reverse proxy to the route's backend (query dropped: render re-adds it)."""
        return _Forward("127.0.0.1", route.backend.port, route.target.partition(b"?")[0], self.reactor)

    def close(self) -> Any:
        """Nothing is cached."""
        return defer.succeed(None)


opencoderouter.tap.BackendProxyFactory = StockProxyFactory  # type: ignore[assignment,misc]
