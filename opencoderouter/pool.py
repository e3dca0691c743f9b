"""The pool of persistent connections to backends: idle ones kept per backend, new ones made as needed.

An idle connection is closed after ``idle_timeout`` (4 s by default), long before a backend would
drop it (OpenCode keeps idle connections for more than 25 s), so a request does not land on a
connection the backend is closing; if one does anyway, the forwarder retries an idempotent request.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConnector, IReactorTCP, IReactorTime, ITCPTransport
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure

from .upstream import BackendConnection


class ConnectionAttempt(ClientFactory):
    """Makes one BackendConnection and reports it (or the failure) once."""

    noisy = False

    def __init__(self, pool: BackendPool, address: str, port: int, ready: Callable[[BackendConnection], None],
                 failed: Callable[[Failure], None]) -> None:
        self.pool = pool
        self.address = address
        self.port = port
        self.ready = ready
        self.failed = failed
        self.connector: IConnector | None = None
        self.cancelled = False

    def buildProtocol(self, addr: object) -> BackendConnection:
        """The connection (reported ready once TCP is up)."""
        protocol = _ReportingConnection(self.pool, self.address, self.port, self)
        return protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        """Refused, unreachable or timed out."""
        if not self.cancelled:
            self.failed(reason)

    def cancel(self) -> None:
        """Stop connecting (the client went away, or the backend timeout passed)."""
        self.cancelled = True
        if self.connector is not None:
            self.connector.stopConnecting()


class _ReportingConnection(BackendConnection):
    """A new connection that tells its factory when it is up."""

    def __init__(self, pool: BackendPool, address: str, port: int, factory: ConnectionAttempt) -> None:
        super().__init__(pool, port, address)
        self._factory = factory

    def connectionMade(self) -> None:
        """Up: hand it to whoever asked (unless they no longer want it)."""
        if ITCPTransport.providedBy(self.transport):
            self.connection().setTcpNoDelay(True)
        if self._factory.cancelled:
            self.abort()
            return
        self._factory.ready(self)


class BackendPool:
    """Idle persistent connections per backend port; new ones made as needed."""

    def __init__(self, reactor: IReactorTCP, clock: IReactorTime, idle_timeout: float = 4.0,
                 connect_timeout: float = 5.0, per_backend: int = 128) -> None:
        self.reactor = reactor
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.per_backend = per_backend
        self._idle: dict[tuple[str, int], list[BackendConnection]] = {}

    def acquire(self, address: str, port: int, ready: Callable[[BackendConnection], None],
                failed: Callable[[Failure], None], fresh: bool = False) -> ConnectionAttempt | None:
        """Call ``ready`` with a connection to ``address:port`` (an idle one at once, else a new one).

        Returns the connection attempt (to cancel) when one had to be made.
        """
        idle = self._idle.get((address, port))
        if idle and not fresh:
            connection = idle.pop()
            connection._cancel_idle()
            ready(connection)
            return None
        attempt = ConnectionAttempt(self, address, port, ready, failed)
        attempt.connector = self.reactor.connectTCP(address, port, attempt, timeout=self.connect_timeout)
        return attempt

    def release(self, connection: BackendConnection) -> None:
        """A connection finished an exchange cleanly: keep it for the next request to that backend."""
        idle = self._idle.setdefault((connection.address, connection.port), [])
        if len(idle) >= self.per_backend:
            connection.abort()
            return
        idle.append(connection)
        connection.idle(self.clock, self.idle_timeout)

    def forget(self, connection: BackendConnection) -> None:
        """A connection closed."""
        idle = self._idle.get((connection.address, connection.port))
        if idle and connection in idle:
            idle.remove(connection)

    def idle_count(self, port: int | None = None, address: str = "127.0.0.1") -> int:
        """Idle connections (to one backend port, or to all)."""
        if port is not None:
            return len(self._idle.get((address, port), ()))
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> Deferred[None]:
        """Close every idle connection (the router is stopping); fires once they are closed."""
        closing = []
        for idle in list(self._idle.values()):
            for connection in list(idle):
                closing.append(connection.when_closed())
                connection.abort()
        self._idle.clear()
        return defer.gatherResults(closing).addCallback(lambda _: None)
