"""An in-memory router in front of an in-memory backend, for the forwarding and metrics tests.

The client side is a real RouterSite/RouterChannel on a StringTransport; the backend side is each
connection attempt the forwarder makes on a MemoryReactorClock, completed by the test with
:meth:`Harness.accept` and answered with raw bytes. Time moves only with ``harness.reactor.advance``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource

from opencoderouter.channel import RouterSite
from opencoderouter.forwarding import BackendCredentials, Forwarder
from opencoderouter.metrics import RouterMetrics
from opencoderouter.proxy import BackendResource
from opencoderouter.registry import Backend
from opencoderouter.upstream import BackendConnection


class _Root(Resource):
    """Sends every request to the backend as path mode ``/alpha`` would (the prefix already stripped)."""

    def __init__(self, harness: Harness) -> None:
        super().__init__()
        self.harness = harness

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:
        harness = self.harness
        return BackendResource("127.0.0.1", 4321, request.uri, forwarder=harness.forwarder,
                               target=harness.forwarder.target(harness.backend), prefix=b"/alpha")


class Harness:
    """One client connection to a RouterSite whose resources forward to backend port 4321."""

    def __init__(self, timeout: float = 5.0, locked: bool = False, metrics: RouterMetrics | None = None) -> None:
        self.reactor = MemoryReactorClock()
        credentials = BackendCredentials("opencode", "pw", may_inject=True)
        self.forwarder = Forwarder(self.reactor, backend_timeout=timeout, connect_timeout=1.0, credentials=credentials,
                                   metrics=metrics)
        self.backend = Backend(slug="alpha", project_path="/p/alpha", port=4321, version="1", owner=None,
                               first_seen=0, last_seen=0, locked=locked, router_credentials=locked)
        self.site = RouterSite(_Root(self), reactor=self.reactor)
        self.client, self.client_transport = self.connect_client()
        self.backends: list[tuple[BackendConnection, StringTransport]] = []

    def connect_client(self) -> tuple[Any, StringTransport]:
        client = self.site.buildProtocol(IPv4Address("TCP", "192.168.1.1", 5555))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.168.1.1", 5555),
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        client.makeConnection(transport)
        return client, transport

    def send(self, raw: bytes) -> None:
        self.client.dataReceived(raw)

    def get(self, path: bytes = b"/x", headers: bytes = b"") -> None:
        self.send(b"GET " + path + b" HTTP/1.1\r\nHost: router:8080\r\n" + headers + b"\r\n")

    def accept(self, transport: StringTransport | None = None) -> tuple[BackendConnection, StringTransport]:
        """Complete the newest connection attempt to the backend."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[len(self.backends)]
        assert (host, port) == ("127.0.0.1", 4321)
        protocol = factory.buildProtocol(None)
        transport = transport or StringTransport()
        protocol.makeConnection(transport)
        self.backends.append((protocol, transport))
        return protocol, transport

    def answer(self, raw: bytes, index: int = -1) -> None:
        self.backends[index][0].dataReceived(raw)

    def out(self) -> bytes:
        return self.client_transport.value()
