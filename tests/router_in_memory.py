"""The router exactly as ``makeService`` builds it, on a MemoryReactorClock: no process, no socket, no real time.

    router = InMemoryRouter("--header-timeout", "2s")
    client = router.connect()
    client.send(b"GET /api/health HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n")
    assert client.status() == 200
    router.reactor.advance(2)        # time moves only when the test says so

Clients talk to the RouterSite the web service listens with (its RouterChannel, limits, guard and
routes), each on its own StringTransport from 127.0.0.1. The scan range is port 1, so no backend is
found; tests that need one use a router subprocess (tests/support.py).
"""

from __future__ import annotations

import re
from itertools import count

from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.http import HTTPChannel

from opencoderouter.config import Options
from opencoderouter.tap import makeService

PORT = 8080
_STATUS = re.compile(rb"\AHTTP/1\.[01] (\d{3}) ")


class Client:
    """One client connection to the in-memory router."""

    def __init__(self, channel: HTTPChannel, transport: StringTransport) -> None:
        self.channel = channel
        self.transport = transport

    def send(self, data: bytes) -> None:
        """Bytes from the client."""
        self.channel.dataReceived(data)

    def get(self, path: str, *headers: str) -> None:
        """Send a GET for ``path`` with Host ``localhost:8080`` and ``headers`` (``"Name: value"``)."""
        lines = [f"GET {path} HTTP/1.1", f"Host: localhost:{PORT}", *headers, "", ""]
        self.send("\r\n".join(lines).encode())

    def received(self) -> bytes:
        """Everything the router wrote to this client so far."""
        return self.transport.value()

    def status(self) -> int | None:
        """The status code of the first answer, or None while there is none."""
        found = _STATUS.match(self.received())
        return int(found.group(1)) if found else None

    @property
    def closed(self) -> bool:
        """True once the router has closed (or is closing) the connection."""
        return bool(self.transport.disconnecting)


class InMemoryRouter:
    """``makeService`` with these extra flags, started on a MemoryReactorClock."""

    def __init__(self, *flags: str) -> None:
        self.reactor = MemoryReactorClock()
        options = Options()
        options.parseOptions(["--port", str(PORT), "--hostname", "127.0.0.1", "--mdns=false",
                              "--scan-start", "1", "--scan-end", "1", *flags])
        self.service: MultiService = makeService(options, reactor=self.reactor)
        self.service.startService()
        [(_port, self.site, _backlog, _interface)] = self.reactor.tcpServers
        self._peer_ports = count(40000)

    def connect(self) -> Client:
        """A new client connection from 127.0.0.1."""
        peer = IPv4Address("TCP", "127.0.0.1", next(self._peer_ports))
        channel = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", PORT))
        channel.makeConnection(transport)
        return Client(channel, transport)

    def advance_until(self, done: Client, step: float = 0.05, limit: float = 60.0) -> float:
        """Move the clock in ``step`` s steps until ``done`` has an answer or is closed; returns the time it took."""
        began = self.reactor.seconds()
        while done.status() is None and not done.closed:
            if self.reactor.seconds() - began > limit:
                raise AssertionError(f"no answer within {limit} s of the router's clock")
            self.reactor.advance(step)
        return self.reactor.seconds() - began

    def stop(self) -> None:
        """Stop the services (their Deferreds fire at once on this reactor)."""
        self.service.stopService()
