"""WebSockets through the router: the upgrade request on its own backend connection, then a splice.

OpenCode's terminal (``/pty/{id}/connect``) is a WebSocket. The upgrade request goes to the backend
over a fresh TCP connection (outside the HTTP pool) with the rewritten head. A ``101`` is relayed
verbatim and the client's connection is handed over (:meth:`~.channel.RouterChannel.hand_over`):
from then on bytes are spliced both ways, each side's writes pausing the other side's reads when
its buffer fills, and each side is closed when the other closes. Any other answer is relayed as
an ordinary response and the backend connection dropped.

Private Twisted API: ``twisted.web.http._ChunkedTransferDecoder`` and ``_IdentityTransferDecoder``
decode a non-101 answer's body (checked by ``tests/test_twisted_internals.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

from .channel import RouterChannel
from .forwarding import NO_BODY_CODES, Forwarder, describe_failure, error_answer
from .headers import HOP_BY_HOP, channel_scheme, copy_response_headers, forward_request_headers

#: A WebSocket backend must send its response head within this many bytes.
_MAX_UPGRADE_HEAD = 65536


class Upgrade(enum.Enum):
    """Where one forwarded upgrade stands."""

    CONNECTING = "connecting"
    WAITING = "waiting"
    TIMED_OUT = "timed_out"
    SPLICED = "spliced"
    RELAYING = "relaying"
    DONE = "done"
    CLIENT_GONE = "client_gone"


def take_over(request: IRequest, protocol: Protocol) -> ITransport:
    """Hand the client's connection to ``protocol`` (after a 101); returns the client transport."""
    channel = request.channel
    if not isinstance(channel, RouterChannel):
        raise TypeError("a WebSocket splice needs the router's own channel")
    channel.hand_over(protocol)
    assert channel.transport is not None
    return channel.transport


def forward_upgrade(forwarder: Forwarder, request: IRequest, port: int, name: str, target: bytes,
                    prefix: bytes) -> None:
    """Forward a WebSocket upgrade request; splice on 101, relay any other answer."""
    _UpgradeExchange(forwarder, request, port, name).start(target, prefix)


class _ClientSide(Protocol):
    """The client's half of a splice: bytes go to the backend; closing closes the backend."""

    def __init__(self, backend: _UpgradeProtocol) -> None:
        self.backend = backend

    def dataReceived(self, data: bytes) -> None:
        """Client → backend."""
        self.backend.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """The client closed: close the backend too."""
        self.backend.transport.loseConnection()


class _UpgradeProtocol(Protocol):
    """The backend's half: sends the upgrade request, reads the answer, then splices or relays."""

    def __init__(self, exchange: _UpgradeExchange, head: bytes) -> None:
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

    def __init__(self, proxy: Forwarder, request: IRequest, port: int, name: str) -> None:
        self.proxy = proxy
        self.request = request
        self.port = port
        self.name = name
        self.state = Upgrade.CONNECTING
        self.backend: _UpgradeProtocol | None = None
        self.connecting: Deferred[Any] | None = None
        self.timer: Any = None

    def start(self, target: bytes, prefix: bytes) -> None:
        """Connect to the backend and send the upgrade request."""
        request = self.request
        headers = forward_request_headers(request, self.port, prefix, channel_scheme(request), upgrade=True)
        lines = [request.method + b" " + target + b" HTTP/1.1\r\n"]
        for name, values in headers.getAllRawHeaders():
            lines.extend(name + b": " + value + b"\r\n" for value in values)
        lines.append(b"\r\n")
        self.backend = _UpgradeProtocol(self, b"".join(lines))
        self.timer = self.proxy.reactor.callLater(self.proxy.timeout, self.timed_out)
        request.notifyFinish().addErrback(self.client_gone)
        self.connecting = self.proxy.endpoint(self.port).connect(_QuietOneShot(self.backend))
        self.connecting.addCallbacks(self.connected, self.connect_failed)

    def connected(self, protocol: Any) -> None:
        """TCP is up; the head is on its way."""
        self.connecting = None
        if self.state is Upgrade.CONNECTING:
            self.state = Upgrade.WAITING

    def connect_failed(self, reason: Failure) -> None:
        """The backend refused (502) or did not accept in time (504)."""
        self.connecting = None
        if self.state in (Upgrade.CLIENT_GONE, Upgrade.DONE):
            return
        if self.state is Upgrade.TIMED_OUT:
            self._fail(504, "gateway_timeout", f"did not accept the connection within {self.proxy.timeout:g}s")
        else:
            self.state = Upgrade.DONE
            message = describe_failure(reason, self.name, self.port)
            self.proxy.note_error(self.port, message)
            self._cancel_timer()
            error_answer(self.request, 502, "bad_gateway", message, self.name)

    def timed_out(self) -> None:
        """No answer head within the bound."""
        self.timer = None
        if self.state is Upgrade.CONNECTING and self.connecting is not None:
            self.state = Upgrade.TIMED_OUT
            self.connecting.cancel()
        elif self.state is Upgrade.WAITING:
            self.state = Upgrade.DONE
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
        error_answer(self.request, code, error, message, self.name)

    def _fail(self, code: int, error: str, what: str) -> None:
        self.state = Upgrade.DONE
        self._cancel_timer()
        self._error(code, error, what)

    def bad_answer(self, what: str) -> None:
        """The backend's answer was unusable."""
        if self.state in (Upgrade.CONNECTING, Upgrade.WAITING):
            self._fail(502, "bad_gateway", what)

    def got_head(self, backend: _UpgradeProtocol, head: bytes, rest: bytes) -> None:
        """The backend answered: 101 → splice, anything else → relay as a normal response."""
        if self.state not in (Upgrade.CONNECTING, Upgrade.WAITING):
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
        self.state = Upgrade.SPLICED
        client = take_over(self.request, _ClientSide(backend))
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
        self.state = Upgrade.RELAYING
        chunked = b"chunked" in b",".join(conn_headers.getRawHeaders(b"transfer-encoding", [])).lower()
        lengths = conn_headers.getRawHeaders(b"content-length")
        write = request.write
        if code in NO_BODY_CODES or (100 <= code < 200):
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
        if self.state is not Upgrade.RELAYING:
            return
        self.state = Upgrade.DONE
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
        state, self.state = self.state, Upgrade.CLIENT_GONE
        self._cancel_timer()
        if state is Upgrade.CONNECTING and self.connecting is not None:
            self.connecting.cancel()
        elif state in (Upgrade.WAITING, Upgrade.RELAYING, Upgrade.SPLICED):
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

    def noMoreData(self) -> None:  # noqa: N802 - the transfer decoders' name
        """The close is the end."""


