"""Forwarding to backends: HTTP/1.1 over a persistent pool, streaming both ways, 502/504 as JSON.

Twisted's stock ``ReverseProxyResource`` speaks HTTP/1.0 with a new connection per request, never
tells the backend that the client went away, answers 501 on a refused connection and collapses
duplicate headers. The :class:`Forwarder` forwards through one shared ``Agent`` + ``HTTPConnectionPool``:

- request bodies: twisted.web has already spooled the body (to a temporary file above 100 kB) when
  ``render`` runs; ``_SpooledBody`` streams it from there with the backend's backpressure;
- responses: ``_BodyRelay`` writes each chunk to the client as it arrives and registers the backend
  connection as the client's producer, so a slow client pauses the backend;
- a client disconnect closes the backend connection at once; a backend that dies mid-response
  closes the client connection (no clean end of the chunked body);
- ``Upgrade: websocket`` requests are forwarded by :mod:`.websocket` (it uses this pool's endpoints).

Private Twisted APIs (each needed because Agent offers no public hook; all of them are checked by
``tests/test_twisted_internals.py`` so a Twisted upgrade that changes them fails loudly):
``_newclient.HTTP11ClientProtocol`` and its ``_parser.connHeaders`` (the backend's ``Connection``
header, to drop the headers it names), ``client._HTTP11ClientFactory`` and ``pool._factory`` (to
build those protocols and keep the pool from logging every connection), and
``Agent._requestWithEndpoint`` (to skip re-parsing the URI per request).
"""

from __future__ import annotations

import base64
import enum
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    PotentialDataLoss,
    ResponseDone,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IRequest, IResponse
from zope.interface import implementer

from .headers import channel_scheme, copy_response_headers, forward_request_headers
from .registry import Backend
from .responses import error_body, json_bytes

log = Logger()

NO_BODY_CODES = (204, 304)
_READ_SIZE = 65536


class Exchange(enum.Enum):
    """Where one forwarded request stands."""

    WAITING = "waiting"
    STREAMING = "streaming"
    DONE = "done"
    TIMED_OUT = "timed_out"
    CLIENT_GONE = "client_gone"


def error_answer(request: IRequest, code: int, error: str, message: str, backend: str) -> None:
    """Answer ``request`` with a JSON error (headers not yet sent), replacing any headers set so far."""
    body = json_bytes(error_body(error, backend=backend, message=message))
    request.setResponseCode(code)
    request.responseHeaders = Headers(
        {b"content-type": [b"application/json"], b"cache-control": [b"no-store"],
         b"content-length": [b"%d" % len(body)]}
    )
    connection = request.getHeader(b"connection")
    if connection and b"close" in connection.lower():
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
    request.write(body)
    request.finish()


def describe_failure(reason: Failure, name: str, port: int) -> str:
    """A sentence saying why a backend gave no response."""
    where = f"backend {name} on 127.0.0.1:{port}"
    if reason.check(ConnectionRefusedError):
        return f"{where} refused the connection (is it still running?)"
    if reason.check(ConnectError):
        return f"{where} could not be reached: {reason.getErrorMessage()}"
    inner = getattr(reason.value, "reasons", None)
    if inner:
        details = "; ".join(f.getErrorMessage() or f.type.__name__ for f in inner)
        return f"{where} closed the connection without a valid response ({details})"
    return f"{where} failed: {reason.getErrorMessage() or reason.type.__name__}"


# -- the HTTP client ----------------------------------------------------------------------------


class _CapturingClientProtocol(HTTP11ClientProtocol):
    """Fires with (response, its connection headers), so ``Connection: X`` can strip X from it."""

    def request(self, request: Any) -> Deferred[Any]:
        """Issue ``request``; the result is (response, connection headers) (Agent passes it through)."""
        result = super().request(request)
        parser = getattr(self, "_parser", None)
        if parser is not None:

            def attach(response: Any) -> Any:
                return response, parser.connHeaders

            result.addCallback(attach)
        return result


class _ProxyClientFactory(_HTTP11ClientFactory):
    """Builds capturing protocols and logs nothing per backend connection."""

    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        """A capturing HTTP/1.1 client protocol."""
        return _CapturingClientProtocol(self._quiescentCallback)


def backend_pool(reactor: Any, idle_timeout: float = 4.0, per_backend: int = 128) -> HTTPConnectionPool:
    """A persistent pool whose idle connections close long before a backend drops them (OpenCode: > 25 s)."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _ProxyClientFactory
    pool.cachedConnectionTimeout = idle_timeout
    pool.maxPersistentPerHost = per_backend
    return pool


class _BackendAgent(Agent):
    """An Agent for ``127.0.0.1:port`` targets with endpoints and URIs cached per port."""

    def __init__(self, reactor: Any, pool: HTTPConnectionPool, connect_timeout: float) -> None:
        super().__init__(reactor, connectTimeout=connect_timeout, pool=pool)
        self._reactor_tcp = reactor
        self._connect_timeout = connect_timeout
        self._targets: dict[int, tuple[tuple[bytes, bytes, int], TCP4ClientEndpoint, URI]] = {}

    def endpoint(self, port: int) -> TCP4ClientEndpoint:
        """The (cached) endpoint for a backend port."""
        return self._target(port)[1]

    def _target(self, port: int) -> tuple[tuple[bytes, bytes, int], TCP4ClientEndpoint, URI]:
        target = self._targets.get(port)
        if target is None:
            endpoint = TCP4ClientEndpoint(self._reactor_tcp, "127.0.0.1", port, timeout=self._connect_timeout)
            uri = URI.fromBytes(b"http://127.0.0.1:%d/" % port)
            target = self._targets[port] = ((b"http", b"127.0.0.1", port), endpoint, uri)
        return target

    def forward(
        self, port: int, method: bytes, target: bytes, headers: Headers, body: IBodyProducer | None
    ) -> Deferred[tuple[IResponse, Headers]]:
        """Send one request (``target`` validated, ``headers`` with Host); fires with (response, connection headers)."""
        key, endpoint, uri = self._target(port)
        # Agent.request would re-parse the URI and build a new endpoint for every request.
        return self._requestWithEndpoint(key, endpoint, method, uri, headers, body, target)


# -- request body ---------------------------------------------------------------------------------


@implementer(IBodyProducer, IPushProducer)
class _SpooledBody:
    """Streams a request body twisted.web already received (memory or temp file) to the backend."""

    def __init__(self, source: Any, length: int, progress: Callable[[], None]) -> None:
        self.length = length
        self._source = source
        self._progress = progress
        self._consumer: Any = None
        self._done: Deferred[None] | None = None
        self._paused = False
        self._pumping = False

    @classmethod
    def of(cls, request: IRequest, progress: Callable[[], None]) -> _SpooledBody | None:
        """A producer for the request's body, or None when it has none."""
        content = request.content
        if content is None:
            return None
        position = content.tell()
        length = content.seek(0, 2) - position
        content.seek(position)
        if length <= 0:
            return None
        return cls(content, length, progress)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        """Start writing to ``consumer`` (the backend connection registers us as its producer)."""
        self._consumer = consumer
        done = self._done = Deferred(lambda _: self.stopProducing())
        self._pump()
        return done

    def _pump(self) -> None:
        # The consumer pauses us from inside write() once its buffer is full; resumeProducing
        # brings us back here when it drained.
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._paused and self._done is not None:
                data = self._source.read(_READ_SIZE)
                if not data:
                    done, self._done = self._done, None
                    done.callback(None)
                    return
                self._consumer.write(data)
                self._progress()
        except Exception:
            done, self._done = self._done, None
            if done is not None:
                done.errback(Failure())
        finally:
            self._pumping = False

    def pauseProducing(self) -> None:
        """The backend is not reading: stop."""
        self._paused = True

    def resumeProducing(self) -> None:
        """The backend drained its buffer: continue."""
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        """Abandon the body (the request was cancelled or failed)."""
        self._done = None


# -- one forwarded request ----------------------------------------------------------------------


class _BodyRelay(Protocol):
    """Writes the backend's response body to the client as it arrives."""

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange

    def connectionMade(self) -> None:
        """A slow client pauses the backend connection through this producer."""
        self.exchange.body_started(self.transport)

    def dataReceived(self, data: bytes) -> None:
        """Pass each chunk on at once (SSE events must not wait)."""
        self.exchange.request.write(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """The body ended: cleanly, or truncated."""
        self.exchange.body_ended(reason)


class _Discard(Protocol):
    """Takes a response body nobody wants and closes its connection."""

    def connectionMade(self) -> None:
        """Close the backend connection rather than read the body."""
        self.transport.stopProducing()


class _Exchange:
    """One request forwarded to a backend and its response relayed back."""

    __slots__ = ("proxy", "request", "port", "name", "pending", "timer", "body_transport", "state")

    def __init__(self, proxy: Forwarder, request: IRequest, port: int, name: str) -> None:
        self.proxy = proxy
        self.request = request
        self.port = port
        self.name = name
        self.pending: Deferred[tuple[IResponse, Headers]] | None = None
        self.timer: Any = None
        self.body_transport: Any = None
        self.state = Exchange.WAITING

    def start(self, target: bytes, prefix: bytes) -> None:
        """Send the request; the answer arrives in ``got_response`` or ``failed``."""
        request = self.request
        headers = forward_request_headers(request, self.port, prefix, channel_scheme(request))
        body = _SpooledBody.of(request, self.progress)
        self.timer = self.proxy.reactor.callLater(self.proxy.timeout, self.timed_out)
        request.notifyFinish().addErrback(self.client_gone)
        try:
            pending = self.proxy.agent.forward(self.port, request.method, target, headers, body)
        except ValueError as error:  # an unusable method token
            self.timer.cancel()
            self.state = Exchange.DONE
            error_answer(request, 400, "bad_request", str(error), self.name)
            return
        self.pending = pending
        pending.addCallbacks(self.got_response, self.failed)

    def progress(self) -> None:
        """The backend accepted more of the request body: it is alive, restart the header bound."""
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.proxy.timeout)

    def timed_out(self) -> None:
        """No response headers within the bound."""
        self.timer = None
        if self.state is Exchange.WAITING and self.pending is not None:
            self.state = Exchange.TIMED_OUT
            self.pending.cancel()

    def got_response(self, answer: tuple[Any, Headers]) -> None:
        """Relay the status and headers, then stream the body."""
        response, conn_headers = answer
        self.pending = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        request = self.request
        if self.state is not Exchange.WAITING:
            # Cannot happen through the Agent (cancelling fails the Deferred at once); be safe anyway.
            response.deliverBody(_Discard())
            return
        self.state = Exchange.STREAMING
        request.setResponseCode(response.code, response.phrase)
        copy_response_headers(response.headers, conn_headers, request)
        if request.method == b"HEAD":
            # For HEAD the backend's Content-Length describes the body it would send: keep it.
            lengths = response.headers.getRawHeaders(b"content-length")
            if lengths:
                request.responseHeaders._rawHeaders[b"Content-Length"] = list(lengths)
        elif isinstance(response.length, int) and response.code not in NO_BODY_CODES:
            request.responseHeaders._rawHeaders[b"Content-Length"] = [b"%d" % response.length]
        response.deliverBody(_BodyRelay(self))

    def body_started(self, transport: Any) -> None:
        """Let the client's connection pause and resume the backend's."""
        self.body_transport = transport
        self.request.registerProducer(transport, True)

    def body_ended(self, reason: Failure) -> None:
        """Finish the client's response, or close its connection if the body was cut short."""
        self.body_transport = None
        if self.state is not Exchange.STREAMING:
            return
        self.state = Exchange.DONE
        request = self.request
        request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
        else:
            # Closing (rather than ending the chunked body) tells the client the body is incomplete.
            request.loseConnection()

    def failed(self, reason: Failure) -> None:
        """No response: 504 after the bound, 502 otherwise (unless the client already left)."""
        self.pending = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        state, self.state = self.state, Exchange.DONE
        if state is Exchange.CLIENT_GONE:
            return
        if state is Exchange.TIMED_OUT:
            message = (
                f"backend {self.name} on 127.0.0.1:{self.port} sent no response headers "
                f"within {self.proxy.timeout:g}s"
            )
            self.proxy.note_error(self.port, message)
            error_answer(self.request, 504, "gateway_timeout", message, self.name)
            return
        message = describe_failure(reason, self.name, self.port)
        self.proxy.note_error(self.port, message)
        error_answer(self.request, 502, "bad_gateway", message, self.name)

    def client_gone(self, reason: Failure) -> None:
        """The client disconnected: abort the backend request at once."""
        state, self.state = self.state, Exchange.CLIENT_GONE
        if state is Exchange.WAITING and self.pending is not None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.pending.cancel()
        elif state is Exchange.STREAMING and self.body_transport is not None:
            # The channel already dropped its producer with the connection; just close the backend.
            self.body_transport.stopProducing()


# -- backend credentials (OPENCODE_SERVER_PASSWORD) ---------------------------------------------


class BackendCredentials:
    """The password of our own password-protected OpenCode servers, and when to use it."""

    def __init__(self, username: str = "opencode", password: str | None = None, may_inject: bool = False) -> None:
        self.username = username
        self.password = password
        #: Adding our password to forwarded requests is safe only when the router itself is
        #: protected (its own auth, or loopback only); otherwise anyone on the LAN would get in.
        self.may_inject = may_inject

    def probe_header(self) -> bytes | None:
        """The Authorization value the scanner sends to our own locked servers, or None."""
        if self.password is None:
            return None
        return basic_header(self.username, self.password)

    def credentials_for(self, backend: Backend) -> bytes | None:
        """The Authorization value to add when forwarding to ``backend``, or None to leave the client's."""
        if self.password is None or not self.may_inject:
            return None
        if not backend.locked or not backend.router_credentials:
            return None
        return basic_header(self.username, self.password)


def basic_header(username: str, password: str) -> bytes:
    """``Basic base64(user:password)``."""
    return b"Basic " + base64.b64encode(f"{username}:{password}".encode())


class Forwarder:
    """What every forwarded request shares: the reactor, the pool, the bounds, the backend password."""

    def __init__(
        self,
        reactor: Any,
        backend_timeout: float = 30.0,
        idle_timeout: float = 4.0,
        connect_timeout: float = 5.0,
        credentials: BackendCredentials | None = None,
    ) -> None:
        self.reactor = reactor
        self.timeout = backend_timeout
        self.connect_timeout = connect_timeout
        self.pool = backend_pool(reactor, idle_timeout=idle_timeout)
        self.agent = _BackendAgent(reactor, self.pool, connect_timeout)
        self.credentials = credentials or BackendCredentials()
        self._last_logged: dict[int, float] = {}

    def endpoint(self, port: int) -> TCP4ClientEndpoint:
        """The endpoint of a backend port (for connections outside the pool: WebSockets)."""
        return self.agent.endpoint(port)

    def add_credentials(self, request: IRequest, backend: Backend) -> None:
        """Put our password on a request for one of our own locked backends (when that is safe)."""
        authorization = self.credentials.credentials_for(backend)
        if authorization is not None:
            request.requestHeaders.setRawHeaders(b"authorization", [authorization])

    def forward(self, request: IRequest, port: int, name: str, target: bytes, prefix: bytes) -> None:
        """Send ``request`` to the backend on ``port`` as ``target``; its answer is relayed to the client."""
        _Exchange(self, request, port, name).start(target, prefix)

    def note_error(self, port: int, message: str) -> None:
        """Log a backend failure, at most once per backend every 10 s (a dead backend is hammered)."""
        now = time.monotonic()
        if now - self._last_logged.get(port, -1e9) >= 10.0:
            self._last_logged[port] = now
            log.warn("{message}", message=message)

    def close(self) -> Deferred[None]:
        """Close the cached idle backend connections; fires when they are closed."""
        return self.pool.closeCachedConnections()
