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

    def __init__(self, reactor: Any, **_options: Any) -> None:
        # Options of the router's own factory (e.g. backend_timeout) do not apply to the stock proxy.
        self.reactor = reactor

    def __call__(self, backend: Any, path: bytes, prefix: bytes, mode: str) -> Any:
        """A stock reverse proxy to ``backend`` for ``path`` (query dropped: render re-adds it)."""
        return _Forward("127.0.0.1", backend.port, path.partition(b"?")[0], self.reactor)

    def close(self) -> Any:
        """Nothing is cached."""
        return defer.succeed(None)


opencoderouter.tap.BackendProxyFactory = StockProxyFactory  # type: ignore[attr-defined,misc]
