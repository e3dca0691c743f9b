"""WebSockets through the router: after the backend's ``101``, the two connections are spliced.

OpenCode's terminal (``/pty/{id}/connect``) is a WebSocket. The upgrade request is forwarded like
any other (:mod:`.forwarding`), on a fresh backend connection that never returns to the pool. A
``101`` is relayed verbatim and the client's connection handed over
(:meth:`~.channel.RouterChannel.hand_over`): from then on bytes go both ways unchanged, each side's
writes pausing the other side's reads when its buffer fills, and each side is closed when the other
closes. Any other answer is relayed as an ordinary response.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.server import Request

from .channel import RouterChannel
from .upstream import BackendConnection
from .write_now import write_now


class _ClientSide(Protocol):
    """The client's half of a splice: bytes go to the backend; closing closes the backend."""

    def __init__(self, backend: BackendConnection) -> None:
        self.backend = backend

    def dataReceived(self, data: bytes) -> None:
        """Client → backend."""
        write_now(self.backend.connection(), data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """The client closed: close the backend too."""
        if self.backend.transport is not None:
            self.backend.connection().loseConnection()


def splice(request: Request, backend: BackendConnection, first: bytes) -> None:
    """Hand the client's connection over to a splice with ``backend``; ``first`` (the 101 and after) goes first."""
    channel = request.channel
    if not isinstance(channel, RouterChannel):
        raise TypeError("a WebSocket splice needs the router's own channel")
    channel.hand_over(_ClientSide(backend))
    client = channel.connection()
    backend.splice = lambda data: write_now(client, data)
    backend.splice_lost = client.loseConnection
    write_now(client, first)
    # Each side's writes pause the other side's reads when its buffer fills.
    client.registerProducer(backend.connection(), True)
    backend.connection().registerProducer(client, True)
