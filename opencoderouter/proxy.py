"""Forwarding to backends: HTTP/1.1 over a persistent pool, streaming both ways, WebSocket splice.

Twisted's stock ``ReverseProxyResource`` speaks HTTP/1.0 with a new connection per request, never
tells the backend that the client went away, answers 501 on a refused connection and collapses
duplicate headers. ``BackendResource`` keeps its constructor (host, port, path) but forwards through
one shared ``Agent`` + ``HTTPConnectionPool``:

- request bodies: twisted.web has already spooled the body (to a temporary file above 100 kB) when
  ``render`` runs; ``_SpooledBody`` streams it from there with the backend's backpressure;
- responses: ``_BodyRelay`` writes each chunk to the client as it arrives and registers the backend
  connection as the client's producer, so a slow client pauses the backend;
- a client disconnect closes the backend connection at once; a backend that dies mid-response
  closes the client connection (no clean end of the chunked body);
- ``Upgrade: websocket`` requests get a raw TCP connection to the backend; after its ``101`` the
  two sockets are spliced until either side closes.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.internet.interfaces import IPushProducer, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
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
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from .registry import Backend

log = Logger()

#: Headers that describe one connection, not the message (RFC 9110 7.6.1), never forwarded as is.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
#: Request headers the proxy writes itself (or must drop because the body was already received).
_REQUEST_OWN = frozenset(
    {
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-prefix",
    }
)
_REQUEST_SKIP = HOP_BY_HOP | _REQUEST_OWN
_RESPONSE_SKIP = HOP_BY_HOP | {b"content-length"}
#: What the HTTP/1.1 client accepts in a request target (visible ASCII); anything else is a 400.
_VALID_TARGET = re.compile(rb"\A/[\x21-\x7e]*\Z")
_NO_BODY_CODES = (204, 304)
#: A WebSocket backend must send its response head within this many bytes.
_MAX_UPGRADE_HEAD = 65536
_READ_SIZE = 65536


# -- header rewriting ------------------------------------------------------------------------


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Lower-cased header names listed in ``Connection`` (they are hop-by-hop too)."""
    values = headers.getRawHeaders(b"connection")
    if not values:
        return frozenset()
    return frozenset(token.strip().lower() for value in values for token in value.split(b","))


def _client_ip(request: IRequest) -> bytes:
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    return host.encode("ascii", "replace") if host else b"unknown"


def _scheme(request: IRequest) -> bytes:
    """``http`` or ``https``, worked out once per connection (isSecure adapts interfaces: slow)."""
    channel = request.channel
    scheme = getattr(channel, "_ocr_scheme", None)
    if scheme is None:
        scheme = b"https" if request.isSecure() else b"http"
        try:
            channel._ocr_scheme = scheme
        except AttributeError:
            pass
    return scheme


def forward_request_headers(request: IRequest, port: int, prefix: bytes, upgrade: bool = False) -> Headers:
    """The headers to send to the backend: end-to-end ones kept (duplicates too), ours added."""
    source = request.requestHeaders
    named = _connection_tokens(source)
    headers = Headers()
    raw = headers._rawHeaders  # names are already canonical: copy without re-encoding them
    for name, values in source._rawHeaders.items():
        lower = name.lower()
        if lower in _REQUEST_SKIP or lower in named or lower.startswith(b"proxy-"):
            continue
        raw[name] = list(values)
    raw[b"Host"] = [b"127.0.0.1:%d" % port]
    forwarded_for = source.getRawHeaders(b"x-forwarded-for")
    client = _client_ip(request)
    raw[b"X-Forwarded-For"] = [b", ".join([*forwarded_for, client]) if forwarded_for else client]
    raw[b"X-Forwarded-Proto"] = [_scheme(request)]
    original_host = source.getRawHeaders(b"host")
    if original_host:
        raw[b"X-Forwarded-Host"] = [original_host[-1]]
    if prefix:
        raw[b"X-Forwarded-Prefix"] = [prefix]
    if upgrade:
        raw[b"Connection"] = [b"Upgrade"]
        raw[b"Upgrade"] = [b"websocket"]
    return headers


def copy_response_headers(source: Headers, conn_headers: Headers | None, request: IRequest) -> None:
    """Put the backend's end-to-end response headers on ``request`` (duplicates kept)."""
    named = _connection_tokens(conn_headers) if conn_headers is not None else frozenset()
    target = request.responseHeaders._rawHeaders
    # twisted.web set these before rendering; the backend's own (if any) replace them.
    target.pop(b"Server", None)
    for name, values in source._rawHeaders.items():
        lower = name.lower()
        if lower in _RESPONSE_SKIP or lower in named or lower.startswith(b"proxy-"):
            continue
        target[name] = list(values)


def is_websocket_upgrade(request: IRequest) -> bool:
    """True for an HTTP/1.1 ``GET`` asking to switch to the WebSocket protocol."""
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade")
    if not upgrade or request.method != b"GET" or request.clientproto != b"HTTP/1.1":
        return False
    tokens = {token.strip().lower() for value in upgrade for token in value.split(b",")}
    return b"websocket" in tokens and b"upgrade" in _connection_tokens(request.requestHeaders)


def _error_json(request: IRequest, code: int, error: str, message: str, backend: str) -> None:
    """Answer ``request`` with a JSON error (headers not yet sent)."""
    body = json.dumps({"error": error, "backend": backend, "message": message}).encode() + b"\n"
    request.setResponseCode(code)
    request.responseHeaders = Headers(
        {b"content-type": [b"application/json"], b"cache-control": [b"no-store"],
         b"content-length": [b"%d" % len(body)]}
    )
    if request.getHeader(b"connection") and b"close" in request.getHeader(b"connection").lower():
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
    request.write(body)
    request.finish()


# -- the HTTP client ----------------------------------------------------------------------------


class _CapturingClientProtocol(HTTP11ClientProtocol):
    """Keeps each response's connection headers so ``Connection: X`` can strip X from it."""

    def request(self, request: Any) -> Deferred[IResponse]:
        """Issue ``request`` and attach the parser's connection headers to the response."""
        result = super().request(request)
        parser = getattr(self, "_parser", None)
        if parser is not None:

            def attach(response: Any) -> Any:
                response.conn_headers = parser.connHeaders
                return response

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
    ) -> Deferred[IResponse]:
        """Send one request (``target`` already validated, ``headers`` with Host) to a backend."""
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
    def of(cls, request: IRequest, progress: Callable[[], None]) -> "_SpooledBody | None":
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

    def __init__(self, exchange: "_Exchange") -> None:
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

    def __init__(self, proxy: "_Forwarder", request: IRequest, port: int, name: str) -> None:
        self.proxy = proxy
        self.request = request
        self.port = port
        self.name = name
        self.pending: Deferred[IResponse] | None = None
        self.timer: Any = None
        self.body_transport: Any = None
        #: waiting → streaming → done; client_gone when the client left first.
        self.state = "waiting"

    def start(self, target: bytes, prefix: bytes) -> None:
        """Send the request; the answer arrives in ``got_response`` or ``failed``."""
        request = self.request
        headers = forward_request_headers(request, self.port, prefix)
        body = _SpooledBody.of(request, self.progress)
        self.timer = self.proxy.reactor.callLater(self.proxy.timeout, self.timed_out)
        request.notifyFinish().addErrback(self.client_gone)
        try:
            pending = self.proxy.agent.forward(self.port, request.method, target, headers, body)
        except ValueError as error:  # an unusable method token
            self.timer.cancel()
            self.state = "done"
            _error_json(request, 400, "bad_request", str(error), self.name)
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
        if self.state == "waiting" and self.pending is not None:
            self.state = "timed_out"
            self.pending.cancel()

    def got_response(self, response: Any) -> None:
        """Relay the status and headers, then stream the body."""
        self.pending = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        request = self.request
        if self.state != "waiting":
            # Cannot happen through the Agent (cancelling fails the Deferred at once); be safe anyway.
            response.deliverBody(_Discard())
            return
        self.state = "streaming"
        request.setResponseCode(response.code, response.phrase)
        copy_response_headers(response.headers, getattr(response, "conn_headers", None), request)
        if request.method == b"HEAD":
            # For HEAD the backend's Content-Length describes the body it would send: keep it.
            lengths = response.headers.getRawHeaders(b"content-length")
            if lengths:
                request.responseHeaders._rawHeaders[b"Content-Length"] = list(lengths)
        elif isinstance(response.length, int) and response.code not in _NO_BODY_CODES:
            request.responseHeaders._rawHeaders[b"Content-Length"] = [b"%d" % response.length]
        response.deliverBody(_BodyRelay(self))

    def body_started(self, transport: Any) -> None:
        """Let the client's connection pause and resume the backend's."""
        self.body_transport = transport
        self.request.registerProducer(transport, True)

    def body_ended(self, reason: Failure) -> None:
        """Finish the client's response, or close its connection if the body was cut short."""
        self.body_transport = None
        if self.state != "streaming":
            return
        self.state = "done"
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
        state, self.state = self.state, "done"
        if state == "client_gone":
            return
        if state == "timed_out":
            message = (
                f"backend {self.name} on 127.0.0.1:{self.port} sent no response headers "
                f"within {self.proxy.timeout:g}s"
            )
            self.proxy.note_error(self.port, message)
            _error_json(self.request, 504, "gateway_timeout", message, self.name)
            return
        message = _describe_failure(reason, self.name, self.port)
        self.proxy.note_error(self.port, message)
        _error_json(self.request, 502, "bad_gateway", message, self.name)

    def client_gone(self, reason: Failure) -> None:
        """The client disconnected: abort the backend request at once."""
        state, self.state = self.state, "client_gone"
        if state == "waiting" and self.pending is not None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.pending.cancel()
        elif state == "streaming" and self.body_transport is not None:
            # The channel already dropped its producer with the connection; just close the backend.
            self.body_transport.stopProducing()


def _describe_failure(reason: Failure, name: str, port: int) -> str:
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


# -- WebSocket upgrade and splice ---------------------------------------------------------------


def take_over_transport(request: IRequest, protocol: Any) -> ITransport:
    """Detach the client's connection from twisted.web and give it to ``protocol``.

    After a ``101 Switching Protocols`` the connection no longer carries HTTP. This is what
    Twisted's own WebSocket server does (``HTTPChannel._protocolUpgradeForWebsockets``), plus the
    two things it leaves out: bytes the client sent after its request head, and the channel's
    registration (and possible pause) as the transport's producer.
    """
    channel = request.channel
    transport = channel.transport
    buffered = b"".join(channel._dataBuffer)
    channel._dataBuffer = []
    channel.setTimeout(None)
    transport.unregisterProducer()
    original_lost = channel.connectionLost

    def connection_lost(reason: Failure) -> None:
        try:
            protocol.connectionLost(reason)
        finally:
            # Let the request end as usual (its notifyFinish fires, the channel forgets it).
            original_lost(reason)

    channel.dataReceived = protocol.dataReceived
    channel.connectionLost = connection_lost
    protocol.makeConnection(transport)
    if buffered:
        protocol.dataReceived(buffered)
    transport.resumeProducing()
    return transport


class _ClientSide(Protocol):
    """The client's half of a splice: bytes go to the backend; closing closes the backend."""

    def __init__(self, backend: "_UpgradeProtocol") -> None:
        self.backend = backend

    def dataReceived(self, data: bytes) -> None:
        """Client → backend."""
        self.backend.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """The client closed: close the backend too."""
        self.backend.transport.loseConnection()


class _UpgradeProtocol(Protocol):
    """The backend's half: sends the upgrade request, reads the answer, then splices or relays."""

    def __init__(self, exchange: "_UpgradeExchange", head: bytes) -> None:
        self.exchange = exchange
        self.head = head
        self.buffer = b""
        self.mode = "head"
        self.client: ITransport | None = None
        self.decoder: Any = None

    def connectionMade(self) -> None:
        """Send the rewritten request head."""
        self.transport.setTcpNoDelay(True)
        self.transport.write(self.head)

    def dataReceived(self, data: bytes) -> None:
        """Head first; then raw bytes for the client (101) or a response body (anything else)."""
        if self.mode == "splice":
            self.client.write(data)  # type: ignore[union-attr]
        elif self.mode == "body":
            self.decoder.dataReceived(data)
        elif self.mode == "head":
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_UPGRADE_HEAD:
                    self.mode = "closed"
                    self.transport.abortConnection()
                    self.exchange.bad_answer("sent an oversized response head")
                return
            head, rest = self.buffer[: end + 4], self.buffer[end + 4 :]
            self.buffer = b""
            self.exchange.got_head(self, head, rest)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """The backend closed (or the connection failed)."""
        mode, self.mode = self.mode, "closed"
        if mode == "splice" and self.client is not None:
            self.client.loseConnection()
        elif mode == "body":
            try:
                self.decoder.noMoreData()
            except Exception:
                self.exchange.body_ended(clean=False)
            else:
                self.exchange.body_ended(clean=True)
        elif mode == "head":
            self.exchange.bad_answer("closed the connection before answering the upgrade")


class _UpgradeExchange:
    """A WebSocket upgrade forwarded to a backend: splice on 101, else relay the answer."""

    def __init__(self, proxy: "_Forwarder", request: IRequest, port: int, name: str) -> None:
        self.proxy = proxy
        self.request = request
        self.port = port
        self.name = name
        self.state = "connecting"
        self.backend: _UpgradeProtocol | None = None
        self.connecting: Deferred[Any] | None = None
        self.timer: Any = None

    def start(self, target: bytes, prefix: bytes) -> None:
        """Connect to the backend and send the upgrade request."""
        request = self.request
        headers = forward_request_headers(request, self.port, prefix, upgrade=True)
        lines = [request.method + b" " + target + b" HTTP/1.1\r\n"]
        for name, values in headers.getAllRawHeaders():
            lines.extend(name + b": " + value + b"\r\n" for value in values)
        lines.append(b"\r\n")
        self.backend = _UpgradeProtocol(self, b"".join(lines))
        self.timer = self.proxy.reactor.callLater(self.proxy.timeout, self.timed_out)
        request.notifyFinish().addErrback(self.client_gone)
        self.connecting = self.proxy.agent.endpoint(self.port).connect(_QuietOneShot(self.backend))
        self.connecting.addCallbacks(self.connected, self.connect_failed)

    def connected(self, protocol: Any) -> None:
        """TCP is up; the head is on its way."""
        self.connecting = None
        if self.state == "connecting":
            self.state = "waiting"

    def connect_failed(self, reason: Failure) -> None:
        """The backend refused (502) or did not accept in time (504)."""
        self.connecting = None
        if self.state in ("client_gone", "done"):
            return
        if self.state == "timed_out":
            self._fail(504, "gateway_timeout", f"did not accept the connection within {self.proxy.timeout:g}s")
        else:
            self.state = "done"
            message = _describe_failure(reason, self.name, self.port)
            self.proxy.note_error(self.port, message)
            self._cancel_timer()
            _error_json(self.request, 502, "bad_gateway", message, self.name)

    def timed_out(self) -> None:
        """No answer head within the bound."""
        self.timer = None
        if self.state == "connecting" and self.connecting is not None:
            self.state = "timed_out"
            self.connecting.cancel()
        elif self.state == "waiting":
            self.state = "done"
            self._close_backend()
            self._error(504, "gateway_timeout", f"sent no response within {self.proxy.timeout:g}s")

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _close_backend(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.mode = "closed"
            self.backend.transport.abortConnection()

    def _error(self, code: int, error: str, what: str) -> None:
        message = f"backend {self.name} on 127.0.0.1:{self.port} {what}"
        self.proxy.note_error(self.port, message)
        _error_json(self.request, code, error, message, self.name)

    def _fail(self, code: int, error: str, what: str) -> None:
        self.state = "done"
        self._cancel_timer()
        self._error(code, error, what)

    def bad_answer(self, what: str) -> None:
        """The backend's answer was unusable."""
        if self.state in ("connecting", "waiting"):
            self._fail(502, "bad_gateway", what)

    def got_head(self, backend: _UpgradeProtocol, head: bytes, rest: bytes) -> None:
        """The backend answered: 101 → splice, anything else → relay as a normal response."""
        if self.state not in ("connecting", "waiting"):
            backend.mode = "closed"
            backend.transport.abortConnection()
            return
        self._cancel_timer()
        status_line, _, header_block = head[:-4].partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        try:
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                raise ValueError(status_line)
            code = int(parts[1])
        except ValueError:
            backend.mode = "closed"
            backend.transport.abortConnection()
            self._fail(502, "bad_gateway", "sent an invalid response to the upgrade request")
            return
        if code == 101:
            self.splice(backend, head, rest)
        else:
            self.relay(backend, code, parts[2] if len(parts) > 2 else b"", header_block, rest)

    def splice(self, backend: _UpgradeProtocol, head: bytes, rest: bytes) -> None:
        """Hand the client's connection to the splice and relay the backend's 101 verbatim."""
        self.state = "spliced"
        client = take_over_transport(self.request, _ClientSide(backend))
        backend.client = client
        backend.mode = "splice"
        client.write(head + rest)
        # Each side's writes pause the other side's reads when its buffer fills.
        client.registerProducer(backend.transport, True)
        backend.transport.registerProducer(client, True)

    def relay(self, backend: _UpgradeProtocol, code: int, phrase: bytes, header_block: bytes, rest: bytes) -> None:
        """A non-101 answer: pass it on as an ordinary response, then drop the backend connection."""
        request = self.request
        headers = Headers()
        conn_headers = Headers()
        for line in header_block.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon or not name.strip():
                continue
            name = name.strip()
            target = conn_headers if name.lower() in HOP_BY_HOP or name.lower() == b"content-length" else headers
            target.addRawHeader(name, value.strip())
        request.setResponseCode(code, phrase)
        copy_response_headers(headers, conn_headers, request)
        self.state = "relaying"
        chunked = b"chunked" in b",".join(conn_headers.getRawHeaders(b"transfer-encoding", [])).lower()
        lengths = conn_headers.getRawHeaders(b"content-length")
        write = request.write
        if code in _NO_BODY_CODES or (100 <= code < 200):
            self.body_ended(clean=True)
            return
        if chunked:
            backend.decoder = http._ChunkedTransferDecoder(write, lambda extra: self.body_ended(clean=True))
        elif lengths and lengths[0].strip().isdigit():
            length = int(lengths[0])
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % length])
            if length == 0:
                self.body_ended(clean=True)
                return
            backend.decoder = http._IdentityTransferDecoder(length, write, lambda extra: self.body_ended(clean=True))
        else:
            backend.decoder = _UntilClose(write)
        backend.mode = "body"
        request.registerProducer(backend.transport, True)
        if rest:
            backend.decoder.dataReceived(rest)

    def body_ended(self, clean: bool) -> None:
        """The relayed body is complete (or cut short): finish the client's response."""
        if self.state != "relaying":
            return
        self.state = "done"
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        if self.backend is not None and self.backend.mode != "closed":
            self.backend.mode = "closed"
            self.backend.transport.loseConnection()
        if clean:
            request.finish()
        else:
            request.loseConnection()

    def client_gone(self, reason: Failure) -> None:
        """The client left: close the backend side, whatever stage we are at."""
        state, self.state = self.state, "client_gone"
        self._cancel_timer()
        if state == "connecting" and self.connecting is not None:
            self.connecting.cancel()
        elif state in ("waiting", "relaying", "spliced"):
            if self.backend is not None and self.backend.transport is not None:
                self.backend.transport.loseConnection()


class _QuietOneShot(Factory):
    """Hands out one prepared protocol, without a log line per connection."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        """The prepared protocol."""
        return self.protocol_instance


class _UntilClose:
    """A body that ends when the backend closes the connection."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write = write

    def dataReceived(self, data: bytes) -> None:
        """Pass the bytes on."""
        self.write(data)

    def noMoreData(self) -> None:
        """The close is the end."""


# -- the resource and its factory --------------------------------------------------------------


class _Forwarder:
    """What every forwarded request shares: reactor, agent, pool, the header bound, error log."""

    def __init__(self, reactor: Any, timeout: float, pool: HTTPConnectionPool, connect_timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.pool = pool
        self.agent = _BackendAgent(reactor, pool, connect_timeout)
        self._last_logged: dict[int, float] = {}

    def note_error(self, port: int, message: str) -> None:
        """Log a backend failure, at most once per backend every 10 s (a dead backend is hammered)."""
        now = time.monotonic()
        if now - self._last_logged.get(port, -1e9) >= 10.0:
            self._last_logged[port] = now
            log.warn("{message}", message=message)


class BackendResource(ReverseProxyResource):
    """Forwards one request to ``host:port`` + ``path`` (Twisted's constructor, a real transport)."""

    isLeaf = True

    def __init__(
        self,
        host: str,
        port: int,
        path: bytes,
        reactor: Any = None,
        *,
        forwarder: _Forwarder | None = None,
        prefix: bytes = b"",
        name: str | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        # ReverseProxyResource.__init__ also runs Resource.__init__.
        super().__init__(host, port, path, reactor)
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError(f"backends listen on 127.0.0.1, not {host!r}")
        self.forwarder = forwarder or _Forwarder(reactor, 30.0, backend_pool(reactor), 5.0)
        self.prefix = prefix
        self.name = name or str(port)

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        """A leaf: the whole remaining path is already in ``self.path``."""
        return self

    def render(self, request: IRequest) -> Any:
        """Forward the request; the response is written when the backend answers."""
        target = self.path
        if not _VALID_TARGET.match(target):
            _error_json(
                request, 400, "bad_request",
                f"request target {target[:200]!r} is not an origin-form path of visible ASCII", self.name,
            )
            return NOT_DONE_YET
        # Responses carry the backend's headers only: no text/html default, no Twisted Server header.
        request.defaultContentType = None
        if is_websocket_upgrade(request):
            _UpgradeExchange(self.forwarder, request, self.port, self.name).start(target, self.prefix)
        else:
            _Exchange(self.forwarder, request, self.port, self.name).start(target, self.prefix)
        return NOT_DONE_YET


class BackendProxyFactory:
    """Builds the per-request forwarding resource for a backend; owns the shared connection pool."""

    def __init__(
        self,
        reactor: Any,
        backend_timeout: float = 30.0,
        idle_timeout: float = 4.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.reactor = reactor
        self.pool = backend_pool(reactor, idle_timeout=idle_timeout)
        self.forwarder = _Forwarder(reactor, backend_timeout, self.pool, connect_timeout)

    def __call__(self, backend: Backend, path: bytes, prefix: bytes, mode: str) -> IResource:
        """The resource forwarding ``path`` (with query) to ``backend``; ``prefix`` was stripped."""
        return BackendResource(
            "127.0.0.1", backend.port, path, self.reactor,
            forwarder=self.forwarder, prefix=prefix if mode == "path" else b"", name=backend.slug,
        )

    def close(self) -> Deferred[None]:
        """Close the cached idle backend connections; fires when they are closed."""
        return self.pool.closeCachedConnections()


__all__ = [
    "BackendProxyFactory",
    "BackendResource",
    "HOP_BY_HOP",
    "backend_pool",
    "forward_request_headers",
    "is_websocket_upgrade",
    "take_over_transport",
]
