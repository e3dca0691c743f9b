"""Forwarding one request to its backend and its response back, over the router's connection pool.

Per request the forwarder does what a proxy must and little else: it writes the rewritten request
head (what stays the same for a backend is built once, see :class:`BackendTarget`) and the body to
a pooled connection (:mod:`.upstream`), writes the backend's response head to the client itself,
and passes body bytes on as they arrive, with the client's connection pausing the backend's when
the client reads slowly. A chunked body (an SSE stream) keeps the backend's own chunk framing.

Guarantees: a client that goes away closes its backend connection at once; a backend that dies
mid-response ends the client's response visibly (its connection is closed: no final chunk, or
fewer bytes than ``Content-Length``); no response headers within ``--backend-timeout`` is a 504
(uploading the body counts as progress), a refused or broken backend a 502, both as JSON.
A request that fails on a reused connection before any answer byte, and may be repeated (an
idempotent method), is tried once more on a fresh connection.
"""

from __future__ import annotations

import base64
import enum
import re
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from .channel import server_request
from .headers import REQUEST_SKIP, RESPONSE_SKIP, channel_scheme, connection_tokens, end_to_end, forwarded_fields
from .metrics import ProxyMeter, RouterMetrics, stream_kind
from .pool import BackendPool, ConnectionAttempt
from .registry import Backend
from .responses import error_body, json_response
from .upstream import BackendConnection, Framing, ResponseHead
from .write_now import write_now

log = Logger()

#: A request method token (RFC 9110); anything else is a 400 before it reaches a backend.
_METHOD = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: Methods a client may expect to be repeated safely after a connection broke before any answer.
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
#: Bodies up to this size go out with the head in one write; larger ones stream from their spool file.
_INLINE_BODY = 65536


class Exchange(enum.Enum):
    """Where one forwarded request stands."""

    CONNECTING = "connecting"
    WAITING = "waiting"
    STREAMING = "streaming"
    SPLICED = "spliced"
    DONE = "done"
    CLIENT_GONE = "client_gone"


def basic_header(username: str, password: str) -> bytes:
    """``Basic base64(user:password)``."""
    return b"Basic " + base64.b64encode(f"{username}:{password}".encode())


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

    def header_for(self, backend: Backend) -> bytes | None:
        """The Authorization value that opens ``backend`` (one of our own locked servers our password
        opened), or None (an unlocked server, or one it does not open): the router's own requests use it."""
        if self.password is None or not backend.locked or not backend.router_credentials:
            return None
        return basic_header(self.username, self.password)

    def credentials_for(self, backend: Backend) -> bytes | None:
        """The Authorization value to add when forwarding to ``backend``, or None to leave the client's."""
        return self.header_for(backend) if self.may_inject else None


class BackendTarget:
    """What forwarding to one backend needs, computed when the backend appears or changes."""

    __slots__ = ("address", "port", "slug", "where", "host_line", "authorization", "meters")

    def __init__(self, backend: Backend, authorization: bytes | None, meters: dict[str, ProxyMeter] | None) -> None:
        self.address = backend.address
        self.port = backend.port
        self.slug = backend.slug
        #: ``backend SLUG on ADDRESS:PORT``: how error messages name it.
        self.where = f"backend {backend.slug} on {backend.endpoint}"
        self.host_line = b"Host: " + backend.endpoint.encode("ascii") + b"\r\n"
        #: Our password for one of our own locked backends (replaces the client's Authorization).
        self.authorization = authorization
        #: Metric children by routing mode (``host``/``path``).
        self.meters = meters


def error_answer(request: IRequest, code: int, error: str, message: str, backend: str) -> None:
    """Answer ``request`` with a JSON error (nothing sent yet), replacing any headers set so far."""
    server_request(request).responseHeaders = Headers()
    body = json_response(request, error_body(error, backend=backend, message=message), code)
    request.setHeader(b"content-length", b"%d" % len(body))
    connection = request.getHeader(b"connection")
    if connection and b"close" in connection.lower():
        request.setHeader(b"connection", b"close")
    request.write(body)
    request.finish()


def describe_failure(reason: Failure, where: str) -> str:
    """A sentence saying why a backend (``where``: ``backend SLUG on ADDRESS:PORT``) could not be reached."""
    if reason.check(ConnectionRefusedError):
        return f"{where} refused the connection (is it still running?)"
    if reason.check(ConnectError):
        return f"{where} could not be reached: {reason.getErrorMessage()}"
    return f"{where} failed: {reason.getErrorMessage() or type(reason.value).__name__}"


class Forwarder:
    """What every forwarded request shares: the pool, the bounds, the backend password, the metrics."""

    def __init__(
        self,
        reactor: Any,
        backend_timeout: float = 30.0,
        idle_timeout: float = 4.0,
        connect_timeout: float = 5.0,
        credentials: BackendCredentials | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.reactor = reactor
        self.timeout = backend_timeout
        self.pool = BackendPool(reactor, reactor, idle_timeout=idle_timeout, connect_timeout=connect_timeout)
        self.credentials = credentials or BackendCredentials()
        self.metrics = metrics
        self._targets: dict[tuple[object, ...], BackendTarget] = {}
        self._last_logged: dict[int, float] = {}

    def target(self, backend: Backend) -> BackendTarget:
        """The precomputed target of ``backend`` (made again only when what it depends on changes)."""
        key = (backend.slug, backend.address, backend.port, backend.locked, backend.router_credentials)
        target = self._targets.get(key)
        if target is None:
            if len(self._targets) > 4096:
                self._targets.clear()  # backends that changed port or went away; cheap to rebuild
            meters = None
            if self.metrics is not None:
                meters = {mode: self.metrics.proxy_meter(backend.slug, mode) for mode in ("host", "path")}
            target = self._targets[key] = BackendTarget(backend, self.credentials.credentials_for(backend), meters)
        return target

    def forward(self, request: IRequest, target: BackendTarget, path: bytes, prefix: bytes, mode: str,
                upgrade: bool = False) -> None:
        """Send ``request`` to the backend as ``path``; its answer is relayed to the client."""
        _Exchange(self, server_request(request), target, mode, upgrade).start(path, prefix)

    def note_error(self, port: int, message: str) -> None:
        """Log a backend failure, at most once per backend every 10 s (a dead backend is hammered)."""
        now = time.monotonic()
        if now - self._last_logged.get(port, -1e9) >= 10.0:
            self._last_logged[port] = now
            log.warn("{message}", message=message)

    def close(self) -> Deferred[None]:
        """Close the idle backend connections; fires when they are closed."""
        return self.pool.close()


class _Exchange:
    """One request forwarded to a backend, its response relayed back."""

    __slots__ = ("forwarder", "request", "target", "mode", "upgrade", "state", "connection", "attempt",
                 "timer", "head", "body", "body_file", "body_length", "retried", "began", "kind", "decode",
                 "client_chunks", "held", "client")

    def __init__(self, forwarder: Forwarder, request: Request, target: BackendTarget, mode: str,
                 upgrade: bool) -> None:
        self.forwarder = forwarder
        self.request = request
        self.target = target
        self.mode = mode
        self.upgrade = upgrade
        self.state = Exchange.CONNECTING
        self.connection: BackendConnection | None = None
        self.attempt: ConnectionAttempt | None = None
        self.timer: IDelayedCall | None = None
        self.head = b""
        self.body: bytes | None = None
        self.body_file: Any = None
        self.body_length = 0
        self.retried = False
        self.began = 0.0
        self.kind: str | None = None
        #: The client cannot take chunked framing (HTTP/1.0): chunked bodies are decoded for it.
        self.decode = False
        #: The client's body is chunked by twisted.web (a close-framed backend body to an HTTP/1.1 client).
        self.client_chunks = False
        #: The response head, held until the body bytes that came with it, to leave in one send.
        self.held = b""
        #: The client's transport, when body bytes go to it unchanged (else through ``request.write``).
        self.client: object | None = None

    # -- sending the request ------------------------------------------------------------------------
    def start(self, path: bytes, prefix: bytes) -> None:
        """Build the request head and body, get a connection, send."""
        request = self.request
        forwarder = self.forwarder
        self.began = forwarder.reactor.seconds()
        if forwarder.metrics is not None:
            self.kind = stream_kind(request)
            if self.kind is not None:
                forwarder.metrics.stream_opened(self.kind)
        request.notifyFinish().addBoth(self._client_finished)
        method = request.method
        if not _METHOD.match(method):
            self._answer_error(400, "bad_request", f"method {method[:40]!r} is not an HTTP method token")
            return
        content = request.content
        length = 0
        if content is not None:
            position = content.tell()
            length = content.seek(0, 2) - position
            content.seek(position)
        self.body_length = length
        if 0 < length <= _INLINE_BODY:
            assert content is not None
            self.body = content.read(length)
        elif length > _INLINE_BODY:
            self.body_file = content
        self.head = self._request_head(path, prefix, length)
        self.timer = forwarder.reactor.callLater(forwarder.timeout, self._timed_out)
        self._connect(fresh=self.upgrade)

    def _request_head(self, path: bytes, prefix: bytes, length: int) -> bytes:
        request, target = self.request, self.target
        parts = [request.method, b" ", path, b" HTTP/1.1\r\n", target.host_line]
        credentials = target.authorization
        scheme = channel_scheme(request)
        for name, values in end_to_end(request.requestHeaders, REQUEST_SKIP):
            lower = name.lower()
            if credentials is not None and lower == b"authorization":
                continue
            if lower == b"origin":
                values = [self._backend_origin(value, scheme) for value in values]
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        if credentials is not None:
            parts += (b"Authorization: ", credentials, b"\r\n")
        for name, value in forwarded_fields(request, scheme, prefix):
            parts += (name, b": ", value, b"\r\n")
        if length or request.method in (b"POST", b"PUT", b"PATCH"):
            parts.append(b"Content-Length: %d\r\n" % length)
        if self.upgrade:
            parts.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _backend_origin(self, origin: bytes, scheme: bytes) -> bytes:
        """A same-origin request's Origin, rewritten as the Host is (to the backend's own address).

        OpenCode refuses a terminal's connect-token and WebSocket when ``Origin``'s host differs
        from ``Host``; the router sends ``Host: 127.0.0.1:PORT``, so the page's own origin
        (``http://{slug}-{user}.localhost:8080``) is rewritten to match. Any other Origin (one
        allowed with ``--cors-origin``) is passed on as it is.
        """
        host = self.request.requestHeaders.getRawHeaders(b"host")
        if host and origin.strip().lower() == scheme + b"://" + host[-1].strip().lower():
            return b"http://" + self.target.host_line[6:-2]
        return origin

    def _connect(self, fresh: bool) -> None:
        self.state = Exchange.CONNECTING
        target = self.target
        self.attempt = self.forwarder.pool.acquire(target.address, target.port, self._connected, self._connect_failed,
                                                   fresh)

    def _connected(self, connection: BackendConnection) -> None:
        self.attempt = None
        if self.state is not Exchange.CONNECTING:
            connection.abort()
            return
        self.state = Exchange.WAITING
        self.connection = connection
        connection.send(self.head, self.body, self, head_request=self.request.method == b"HEAD",
                        upgrade=self.upgrade, body_file=self.body_file, body_length=self.body_length)

    def _connect_failed(self, reason: Failure) -> None:
        self.attempt = None
        if self.state is not Exchange.CONNECTING:
            return
        message = describe_failure(reason, self.target.where)
        self.forwarder.note_error(self.target.port, message)
        self._answer_error(502, "bad_gateway", message)

    def _timed_out(self) -> None:
        self.timer = None
        if self.state not in (Exchange.CONNECTING, Exchange.WAITING):
            return
        what = ("did not accept the connection" if self.state is Exchange.CONNECTING
                else "sent no response headers")
        self._drop_backend()
        message = f"{self.target.where} {what} within {self.forwarder.timeout:g}s"
        self.forwarder.note_error(self.target.port, message)
        self._answer_error(504, "gateway_timeout", message)

    def body_progress(self) -> None:
        """The backend took more of the request body: it is alive, restart the header bound."""
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.forwarder.timeout)

    # -- the response -----------------------------------------------------------------------------------
    def response_head(self, head: ResponseHead) -> None:
        """Write the status line and the end-to-end headers to the client; the body follows."""
        if self.state is not Exchange.WAITING:
            return
        self._cancel_timer()
        self.state = Exchange.STREAMING
        request = self.request
        request.setResponseCode(head.code, head.reason or None)
        request.startedWriting = 1  # the head is ours to write, exactly once
        channel = request.channel
        framing = head.framing
        version = request.clientproto if request.clientproto in (b"HTTP/1.0", b"HTTP/1.1") else b"HTTP/1.1"
        persistent = bool(getattr(channel, "persistent", False))
        parts = [version, b" %d " % head.code, head.reason, b"\r\n"]
        named = connection_tokens(head.connection)
        skip = RESPONSE_SKIP | named if named else RESPONSE_SKIP
        length_lines: list[bytes] = []
        for name, value in head.headers:
            lower = name.lower()
            if lower in skip or lower.startswith(b"proxy-"):
                if lower == b"content-length" and request.method == b"HEAD":
                    length_lines.append(value)  # the length of the body a GET would get: kept
                continue
            parts += (name, b": ", value, b"\r\n")
        if framing is Framing.NONE:
            if length_lines:
                parts += (b"Content-Length: ", length_lines[-1], b"\r\n")
        elif framing is Framing.LENGTH:
            parts.append(b"Content-Length: %d\r\n" % (head.length or 0))
        elif version == b"HTTP/1.1":
            if framing is Framing.CHUNKED:
                parts += (b"Transfer-Encoding: ", head.transfer_encoding or b"chunked", b"\r\n")
            else:
                # Ends when the backend closes: chunk it, so the client's connection can stay open.
                parts.append(b"Transfer-Encoding: chunked\r\n")
                self.client_chunks = True
                request.chunked = 1
        else:
            # An HTTP/1.0 client: the body ends when we close its connection; chunked bodies are decoded.
            self.decode = framing is Framing.CHUNKED
            persistent = False
            if channel is not None:
                channel.persistent = False
        if not persistent:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        assert channel is not None
        self.held = b"".join(parts)
        if not self.client_chunks:
            self.client = channel.transport
        connection = self.connection
        if connection is not None:
            if self.decode:
                connection.decode_chunks = True
            request.registerProducer(connection.connection(), True)

    def response_body(self, data: bytes) -> None:
        """Body bytes: on to the client as they came (with the held head, if it still waits)."""
        if self.state is not Exchange.STREAMING:
            return
        client = self.client
        if client is not None:
            request = self.request
            request.sentLength += len(data)
            held = self.held
            if held:
                self.held = b""
                data = held + data
            write_now(client, data)
        else:
            self.flush()
            self.request.write(data)

    def flush(self) -> None:
        """The backend's read is handed on: send the head if it still waits for body bytes."""
        held = self.held
        if held:
            self.held = b""
            write_now(self.request.channel.transport, held)

    def response_end(self) -> None:
        """The body is complete: finish the client's response."""
        if self.state is not Exchange.STREAMING:
            return
        self.flush()
        self.state = Exchange.DONE
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        self.connection = None
        request.finish()

    def response_failed(self, why: str, received_head: bool) -> None:
        """The backend broke off: 502 before the head, a visibly cut response after it."""
        connection, self.connection = self.connection, None
        if self.state is Exchange.WAITING and not received_head:
            if (connection is not None and connection.reused and connection.received == 0 and not self.retried
                    and self.request.method in _IDEMPOTENT and self.body_file is None):
                # A kept-alive connection the backend closed just as we used it: try once on a new one.
                self.retried = True
                self._connect(fresh=True)
                return
            self._cancel_timer()
            message = f"{self.target.where} {why}"
            self.forwarder.note_error(self.target.port, message)
            self._answer_error(502, "bad_gateway", message)
        elif self.state is Exchange.STREAMING:
            self.flush()
            self.state = Exchange.DONE
            request = self.request
            if request.producer is not None:
                request.unregisterProducer()
            self.forwarder.note_error(self.target.port, f"{self.target.where} {why}")
            # Closing (rather than ending the body) tells the client the response is incomplete.
            request.loseConnection()

    def switched(self, head: ResponseHead, rest: bytes) -> None:
        """A 101 to the upgrade: relay it verbatim and splice the two connections."""
        from .websocket import splice

        connection = self.connection
        if self.state is not Exchange.WAITING or connection is None:
            return
        self._cancel_timer()
        self.state = Exchange.SPLICED
        self.request.setResponseCode(101)
        splice(self.request, connection, head.raw + rest)

    # -- endings -----------------------------------------------------------------------------------------
    def _answer_error(self, code: int, error: str, message: str) -> None:
        self._cancel_timer()
        self.state = Exchange.DONE
        error_answer(self.request, code, error, message, self.target.slug)

    def _drop_backend(self) -> None:
        if self.attempt is not None:
            self.attempt.cancel()
            self.attempt = None
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abort()

    def _cancel_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _client_finished(self, result: object) -> None:
        """The client's response ended: cleanly, or the client went away (then the backend goes too)."""
        state = self.state
        if state is not Exchange.DONE:
            self.state = Exchange.CLIENT_GONE
            self._cancel_timer()
            self._drop_backend()
        metrics = self.forwarder.metrics
        if metrics is None:
            return
        if self.kind is not None:
            metrics.stream_closed(self.kind)
        meters = self.target.meters
        if meters is not None:
            request = self.request
            status = request.code if request.startedWriting else None
            meters[self.mode].finished(status, self.forwarder.reactor.seconds() - self.began,
                                       request.sentLength, self.body_length)
