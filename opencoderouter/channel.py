"""The router's HTTP channel: limits on what clients send, the route decided once, WebSocket hand-over.

:class:`RouterChannel` is twisted.web's ``HTTPChannel`` with three additions:

- **Limits** (:class:`Limits`): a URL longer than ``max_url`` gets 414, too many or too large
  header lines 431, a body above ``max_body`` for the router's own endpoints 413 (JSON, then the
  connection closes), and a client has ``header_timeout`` to send a whole request head — counted
  from the connection's start or the end of the previous response, stopped once the head is
  complete, so event streams and WebSockets are never cut (HTTPChannel's own ``timeOut`` is an
  idle timeout reset by every byte, which a client sending one byte every few seconds never trips).
- **The route**: when a request head is complete the channel asks the :class:`~.routing.Router`
  where it goes and stores the :class:`~.routing.Route` on the :class:`RouterRequest`; the body
  limit, the guard and the root resource all read that one value.
- **Hand-over** (:meth:`RouterChannel.hand_over`): after a backend's ``101 Switching Protocols``
  the connection stops carrying HTTP. The channel's :attr:`~RouterChannel.state` becomes
  ``SPLICED`` and every byte (including any the client sent after its request head, which the
  channel holds while a request is answered) goes to the splice protocol.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IDelayedCall, IProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from .responses import PHRASES, error_body, json_bytes
from .routing import Route, Router, is_navigation

log = Logger()

#: Bytes a client may send after a request head while its answer is pending, before reading pauses.
_HELD_LIMIT = 65536


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may send."""

    max_url: int = 8192
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body: int = 1 << 20
    header_timeout: float = 20.0


class ChannelState(enum.Enum):
    """What a client connection carries now."""

    #: HTTP requests.
    HTTP = "http"
    #: A resource answered ``101 Switching Protocols`` itself: no more request heads, no timeouts.
    SWITCHED = "switched"
    #: Handed over to a splice (:meth:`RouterChannel.hand_over`): every byte goes to that protocol.
    SPLICED = "spliced"


def server_request(request: IRequest) -> server.Request:
    """``request`` as the ``server.Request`` twisted.web hands resources.

    ``IRequest`` does not declare ``notifyFinish``, ``registerProducer``, ``code`` and the rest that
    every request a Site makes has; this says so once instead of at every use.
    """
    return cast(server.Request, request)


class RouterRequest(server.Request):
    """A request that carries the routing decision made for it, and whether the guard authenticated it."""

    #: Where the request goes, decided once when its head was complete.
    route: Route | None = None
    #: True once the router's own authentication accepted this request's credentials.
    authenticated: bool = False
    _body_received = 0

    def handleContentChunk(self, data: bytes) -> None:
        """Count the body for the router's own endpoints as it arrives (413 past the limit)."""
        channel = self.channel
        if isinstance(channel, RouterChannel) and self.route is not None and not self.route.to_backend:
            self._body_received += len(data)
            if self._body_received > channel.limits.max_body:
                channel.refuse_large_body()
                return
        super().handleContentChunk(data)


class RouterChannel(HTTPChannel):
    """An HTTPChannel with limits, the route decided per request, and an explicit hand-over state."""

    limits = Limits()
    router: Router | None = None
    #: What the connection carries (see :class:`ChannelState`).
    state = ChannelState.HTTP
    #: ``http`` or ``https``, decided once per connection (``isSecure`` adapts interfaces: slow).
    scheme = b"http"
    #: The address the connection arrived on (a Host naming it is one of the router's own).
    local_host: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self._head_call: IDelayedCall | None = None
        self._in_head = False
        self._head_bytes = 0
        self._head_lines = 0
        self._head_seen = False
        self._refused = False
        self._request_line: list[bytes] = []
        #: A request's answer is pending (its head and body were received).
        self._answering = False
        #: Bytes received while an answer is pending (the next pipelined request, or WebSocket data).
        self._held: list[bytes] = []
        self._held_size = 0
        self._spliced_to: IProtocol | None = None

    # -- connection ------------------------------------------------------------------------------
    def connectionMade(self) -> None:
        """Start the head deadline for the first request."""
        # Twisted checks the whole head against this; ours is stricter and answers 431 first.
        self.totalHeadersSize = self.limits.max_url + self.limits.max_header_bytes + 1024
        self.maxHeaders = self.limits.max_headers + 1
        self.MAX_LENGTH = max(self.limits.max_url + 64, self.limits.max_header_bytes)
        super().connectionMade()
        from twisted.internet.interfaces import ISSLTransport

        assert self.transport is not None
        self.scheme = b"https" if ISSLTransport.providedBy(self.transport) else b"http"
        self.local_host = getattr(self.transport.getHost(), "host", None)
        self._start_head_deadline()

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the client: to the splice once handed over, else HTTP (a head starts its deadline)."""
        if self._spliced_to is not None:
            self._spliced_to.dataReceived(data)
            return
        if self._refused:
            return
        if self.line_mode and not self._answering:
            self._start_head_deadline()
            if data.strip(b"\r\n"):
                self._head_seen = True
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """Cancel the deadline; a splice hears of the close first."""
        self._stop_head_deadline()
        spliced, self._spliced_to = self._spliced_to, None
        if spliced is not None:
            try:
                spliced.connectionLost(reason)
            finally:
                # The request ends as usual (its notifyFinish fires, the channel forgets it).
                super().connectionLost(reason)
            return
        super().connectionLost(reason)

    # -- the WebSocket hand-over ---------------------------------------------------------------------
    def hand_over(self, protocol: IProtocol) -> None:
        """Give the connection to ``protocol`` (after a 101): held and later bytes go to it, never to HTTP."""
        assert self.transport is not None, "hand-over of a disconnected channel"
        self.state = ChannelState.SPLICED
        self._stop_head_deadline()
        self.setTimeout(None)
        held, self._held, self._held_size = b"".join(self._held), [], 0
        connection = self.connection()
        # The channel was the transport's producer (and may have paused it for pipelined bytes).
        connection.unregisterProducer()
        self._spliced_to = protocol
        protocol.makeConnection(connection)
        if held:
            protocol.dataReceived(held)
        connection.resumeProducing()

    def connection(self) -> FileDescriptor:
        """The client connection: a TCP/UNIX transport, producer and consumer (``ITransport`` says less)."""
        assert self.transport is not None
        return cast(FileDescriptor, self.transport)

    # -- the head deadline -----------------------------------------------------------------------------
    def _start_head_deadline(self) -> None:
        if self._head_call is None and self.limits.header_timeout > 0:
            self._head_seen = False
            self._head_call = self.callLater(self.limits.header_timeout, self._head_too_slow)

    def _stop_head_deadline(self) -> None:
        if self._head_call is not None:
            if self._head_call.active():
                self._head_call.cancel()
            self._head_call = None

    def _head_too_slow(self) -> None:
        self._head_call = None
        if self._refused or self.transport is None or self.state is not ChannelState.HTTP:
            return
        peer = self.transport.getPeer()
        if self._head_seen or self._in_head:
            log.info("dropping {peer}: request head not complete after {limit:g}s", peer=str(peer),
                     limit=self.limits.header_timeout)
            self._refuse(408, "request_timeout", "the request head took too long to arrive")
        else:
            # An idle connection (nothing of a new request sent): close quietly, as keep-alive ends.
            self._refused = True
            self.transport.loseConnection()

    # -- request heads ------------------------------------------------------------------------------
    def lineReceived(self, line: bytes) -> None:
        """Check the request line's URL length and the headers' size and count."""
        if self._refused:
            return
        if not self._in_head:
            if line:
                self._in_head = True
                self._head_bytes = 0
                self._head_lines = 0
                self._request_line = line.split(b" ")
                if len(self._request_line) >= 2 and len(self._request_line[1]) > self.limits.max_url:
                    self._refuse(414, "uri_too_long", f"the URL is longer than {self.limits.max_url} bytes")
                    return
        elif line:
            self._head_bytes += len(line) + 2
            self._head_lines += 1
            if self._head_bytes > self.limits.max_header_bytes or self._head_lines > self.limits.max_headers:
                self._refuse(
                    431,
                    "request_header_fields_too_large",
                    f"send at most {self.limits.max_headers} header lines and {self.limits.max_header_bytes} bytes",
                )
                return
        else:
            self._in_head = False
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """One line longer than any limit: 414 for a request line, else 431."""
        if not self._in_head:
            self._refuse(414, "uri_too_long", f"the URL is longer than {self.limits.max_url} bytes")
        else:
            self._refuse(431, "request_header_fields_too_large",
                         f"a header line is longer than {self.limits.max_header_bytes} bytes")

    def allHeadersReceived(self) -> None:
        """The head is complete: stop the deadline, decide the route, refuse a large body for our own endpoints."""
        self._stop_head_deadline()
        request = self.requests[-1]
        route = self._route_for(request)
        if isinstance(request, RouterRequest):
            request.route = route
        if route is not None and not route.to_backend and self.length is not None and (
            self.length > self.limits.max_body
        ):
            self.refuse_large_body()
            return
        super().allHeadersReceived()

    def _route_for(self, request: server.Request) -> Route | None:
        if self.router is None or len(self._request_line) < 2:
            return None
        headers = request.requestHeaders
        host = headers.getRawHeaders(b"host", [None])[0]
        navigating = is_navigation(self._request_line[0], headers.getRawHeaders(b"sec-fetch-mode", [None])[0],
                                   headers.getRawHeaders(b"accept", [None])[0])
        return self.router.classify(host, self._request_line[1], self.local_host, navigating)

    def refuse_large_body(self) -> None:
        """413: the body for one of the router's own endpoints is larger than ``max_body``."""
        self._refuse(413, "content_too_large", f"the router's own endpoints take at most {self.limits.max_body} bytes")

    # -- bodies and answers ---------------------------------------------------------------------------
    def rawDataReceived(self, data: bytes) -> None:
        """Hold bytes that arrive while an answer is pending; drop a refused request's body."""
        if self._refused:
            return
        if self._answering:
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size > _HELD_LIMIT and self.transport is not None:
                self.connection().pauseProducing()  # requestDone resumes it
            return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        """A refused request is never handed to the resources."""
        if self._refused:
            return
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request: server.Request) -> None:
        """After an answer: back to reading heads (held bytes first), under a fresh head deadline."""
        if getattr(request, "code", None) == 101 and self.state is ChannelState.HTTP:
            # Switched protocols (a resource of our own did it): no more request heads on this connection.
            self.state = ChannelState.SWITCHED
        self._answering = False
        held, self._held, self._held_size = b"".join(self._held), [], 0
        super().requestDone(request)
        if self.state is not ChannelState.HTTP:
            self.setTimeout(None)  # nor by HTTPChannel's idle timeout, which requestDone re-armed
            return
        if self.transport is None or self.connection().disconnecting or not self.persistent:
            return
        if held:
            self.dataReceived(held)
        if self.line_mode and not self._answering and not self._refused:
            self._start_head_deadline()

    def _refuse(self, code: int, error: str, message: str) -> None:
        """Answer with a JSON error and close, ignoring anything else the client sends."""
        self._refused = True
        self._stop_head_deadline()
        body = json_bytes(error_body(error, message))
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (code, PHRASES[code], len(body))
        )
        assert self.transport is not None
        self.transport.write(head + body)
        self.loseConnection()


class RouterSite(server.Site):
    """The router's Site: RouterChannels with its limits and router, RouterRequests, no access log."""

    # Twisted types ``protocol`` as a factory of its private _GenericHTTPChannelProtocol wrapper.
    protocol = RouterChannel  # type: ignore[assignment]
    requestFactory = RouterRequest
    noisy = False

    def __init__(self, resource: IResource, router: Router | None = None, limits: Limits = Limits(),
                 **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.router = router
        self.limits = limits

    def buildProtocol(self, addr: Any) -> Any:
        """A RouterChannel carrying this site's limits and router."""
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        channel.router = self.router
        return channel

    def log(self, request: http.Request) -> None:
        """No access log line per request: the metrics count requests instead."""
