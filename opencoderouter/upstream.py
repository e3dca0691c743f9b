"""A connection to a backend: the HTTP/1.1 client protocol the forwarder sends each request on.

A backend connection writes a request head the forwarder built (and the body), parses the response
head with httptools (llhttp, the C parser uvicorn uses: strict about framing, so a response with
both ``Content-Length`` and ``Transfer-Encoding``, a duplicate length or a malformed header is
refused), and then frames the body itself without copying it: bytes are handed on exactly as they
arrived, chunk framing included, so a chunked body (an SSE stream) is never de-chunked and
re-chunked. The framing scan only finds where the body ends: after a ``Content-Length``, at the
last chunk and its trailers, or when the backend closes.

Interim ``1xx`` answers (``100 Continue``, ``103``) are read and dropped; a ``101`` ends HTTP on
the connection (the WebSocket splice takes the socket). The pool that keeps these connections is
:mod:`.pool`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from typing import Protocol as TypingProtocol

import httptools
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Connection
from twisted.python.failure import Failure
from zope.interface import implementer

from .write_now import write_now

if TYPE_CHECKING:
    from .pool import BackendPool

#: A response head larger than this is refused (OpenCode's are well under 1 KiB).
MAX_HEAD = 65536
#: A chunk-size or trailer line longer than this is malformed.
_MAX_LINE = 4096
NO_BODY_CODES = (204, 304)


class Framing(enum.Enum):
    """How a response body ends."""

    #: No body at all (HEAD, 204, 304).
    NONE = "none"
    #: ``Content-Length`` bytes.
    LENGTH = "length"
    #: ``Transfer-Encoding: ..., chunked``: at the last chunk and its trailers.
    CHUNKED = "chunked"
    #: When the backend closes the connection.
    CLOSE = "close"


@dataclass(frozen=True)
class ResponseHead:
    """A backend's final response head, as it sent it."""

    code: int
    reason: bytes
    #: Header lines in order, names and values exactly as received.
    headers: tuple[tuple[bytes, bytes], ...]
    framing: Framing
    length: int | None
    #: ``Transfer-Encoding`` as received (for a chunked body passed through unchanged).
    transfer_encoding: bytes | None
    #: The values of its ``Connection`` headers (the header names they list are hop-by-hop too).
    connection: tuple[bytes, ...]
    #: The backend keeps the connection open after this response.
    keep_alive: bool
    #: The head's bytes exactly as received (a ``101`` is relayed verbatim).
    raw: bytes


class MalformedResponse(Exception):
    """The backend's answer is not valid HTTP/1.1 (or would let one response smuggle another)."""


class ResponseHandler(TypingProtocol):
    """What a backend connection reports one exchange's response to."""

    def response_head(self, head: ResponseHead) -> None:
        """The final response head arrived (the body follows)."""

    def response_body(self, data: bytes) -> None:
        """Body bytes, framed as the backend framed them (chunk lines included for a chunked body)."""

    def response_end(self) -> None:
        """The body is complete."""

    def response_failed(self, why: str, received_head: bool) -> None:
        """The response cannot be completed: the backend closed early or sent something malformed."""

    def switched(self, head: ResponseHead, rest: bytes) -> None:
        """A ``101`` to an upgrade request: the connection now carries the new protocol."""

    def body_progress(self) -> None:
        """The backend took more of the request body (it is alive)."""

    def flush(self) -> None:
        """The bytes of one read that came with the head are handed on: write what was held back."""


class _HeadParser:
    """httptools callbacks collecting one response head."""

    __slots__ = ("reason", "headers", "complete")

    def __init__(self) -> None:
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_head(raw: bytes, head_request: bool) -> ResponseHead:
    """Parse a complete response head (through its blank line) and decide how its body is framed."""
    collected = _HeadParser()
    parser = httptools.HttpResponseParser(collected)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass  # a 101: the callbacks already saw the whole head
    except httptools.HttpParserError as error:
        raise MalformedResponse(str(error) or type(error).__name__) from None
    if not collected.complete:
        raise MalformedResponse("the response head is incomplete")
    code = parser.get_status_code()
    transfer_encoding = length_header = None
    connection: list[bytes] = []
    for name, value in collected.headers:
        lower = name.lower()
        if lower == b"transfer-encoding":
            transfer_encoding = value if transfer_encoding is None else transfer_encoding + b", " + value
        elif lower == b"content-length":
            length_header = value
        elif lower == b"connection":
            connection.append(value)
    length: int | None = None
    if head_request or code in NO_BODY_CODES or 100 <= code < 200:
        framing = Framing.NONE
    elif transfer_encoding is not None:
        codings = [c.strip().lower() for c in transfer_encoding.split(b",")]
        framing = Framing.CHUNKED if codings[-1] == b"chunked" else Framing.CLOSE
    elif length_header is not None:
        framing, length = Framing.LENGTH, int(length_header)
    else:
        framing = Framing.CLOSE
    keep_alive = parser.should_keep_alive() and framing is not Framing.CLOSE
    return ResponseHead(code, collected.reason, tuple(collected.headers), framing, length,
                        transfer_encoding, tuple(connection), keep_alive, raw)


class _Stage(enum.Enum):
    IDLE = "idle"
    HEAD = "head"
    BODY = "body"
    SPLICED = "spliced"
    CLOSED = "closed"


class _ChunkStage(enum.Enum):
    SIZE = "size"
    DATA = "data"
    DATA_END = "data_end"
    TRAILER = "trailer"


class BackendConnection(Protocol):
    """One HTTP/1.1 connection to a backend, carrying one exchange at a time."""

    def __init__(self, pool: BackendPool | None, port: int, address: str = "127.0.0.1") -> None:
        self.pool = pool
        self.port = port
        self.address = address
        self.handler: ResponseHandler | None = None
        self.stage = _Stage.IDLE
        self.reused = False
        #: Bytes of the response received for the current exchange (a retry is safe only before any).
        self.received = 0
        self._buffer = b""
        self._head_request = False
        self._upgrade = False
        self._head: ResponseHead | None = None
        self._remaining = 0
        self._chunk_stage = _ChunkStage.SIZE
        self._idle_call: IDelayedCall | None = None
        self._body_source: _BodyWriter | None = None
        self._on_lost: list[Deferred[None]] = []

    # -- sending ------------------------------------------------------------------------------------
    def send(self, head: bytes, body: bytes | None, handler: ResponseHandler, head_request: bool = False,
             upgrade: bool = False, body_file: object | None = None, body_length: int = 0) -> None:
        """Write a request (head, then ``body`` or a spooled ``body_file``); its answer goes to ``handler``."""
        self._cancel_idle()
        self.handler = handler
        self.stage = _Stage.HEAD
        self.received = 0
        self._buffer = b""
        self._head_request = head_request
        self._upgrade = upgrade
        self._head = None
        self.decode_chunks = False
        transport = self.connection()
        # A slow client of the previous exchange may have left the connection paused.
        transport.resumeProducing()
        if body_file is not None:
            write_now(transport, head)
            self._body_source = _BodyWriter(body_file, self, handler.body_progress)
            transport.registerProducer(self._body_source, True)
            self._body_source.resumeProducing()
        else:
            write_now(transport, head + body if body else head)

    def connection(self) -> Connection:
        """The TCP transport (a producer and consumer; ``ITransport`` declares less)."""
        assert self.transport is not None
        return cast(Connection, self.transport)

    def abort(self) -> None:
        """Drop the connection now (the client went away, or a deadline passed)."""
        self.handler = None
        self.stage = _Stage.CLOSED
        if self.transport is not None:
            self.connection().abortConnection()

    # -- receiving ------------------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        """Response bytes: the head first, then the body as it arrives."""
        stage = self.stage
        if stage is _Stage.BODY:
            self._body(data)
        elif stage is _Stage.SPLICED:
            splice = self.splice
            if splice is not None:
                splice(data)
        elif stage is _Stage.HEAD:
            self.received += len(data)
            self._head_bytes(data)
        elif stage is _Stage.IDLE:
            # Nothing was asked: a backend talking out of turn cannot be trusted with the next request.
            self.abort()

    #: Where spliced bytes go (the client's transport write), once switched.
    splice: Callable[[bytes], None] | None = None
    #: Called when the backend closes a spliced connection.
    splice_lost: Callable[[], None] | None = None
    #: Hand on chunk payloads only (an HTTP/1.0 client cannot take chunk framing).
    decode_chunks = False

    def _head_bytes(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._fail("sent a response head larger than 64 KiB", False)
                    return
                self._buffer = buffer
                return
            raw, buffer = buffer[: end + 4], buffer[end + 4 :]
            try:
                head = parse_head(raw, self._head_request)
            except (MalformedResponse, ValueError) as error:
                self._fail(f"sent a malformed response ({error})", False)
                return
            if head.code == 101 and self._upgrade:
                self.stage = _Stage.SPLICED
                self._buffer = b""
                handler, self.handler = self.handler, None
                if handler is not None:
                    handler.switched(head, buffer)
                return
            if 100 <= head.code < 200:
                continue  # interim (100 Continue, 103 Early Hints): the final head follows
            break
        self._buffer = b""
        self._head = head
        self.stage = _Stage.BODY
        self._remaining = head.length or 0
        self._chunk_stage = _ChunkStage.SIZE
        handler = self.handler
        if handler is None:
            return
        handler.response_head(head)
        if head.framing is Framing.NONE or (head.framing is Framing.LENGTH and head.length == 0):
            self._end(buffer)
            return
        if buffer:
            self._body(buffer)
        if self.handler is handler:
            handler.flush()

    def _body(self, data: bytes) -> None:
        head = self._head
        assert head is not None
        framing = head.framing
        if framing is Framing.CHUNKED:
            self._chunks(data)
        elif framing is Framing.LENGTH:
            if len(data) < self._remaining:
                self._remaining -= len(data)
                self._deliver(data)
            else:
                piece, extra = data[: self._remaining], data[self._remaining :]
                self._remaining = 0
                self._deliver(piece)
                self._end(extra)
        elif framing is Framing.CLOSE:
            self._deliver(data)
        else:
            self._end(data)

    def _deliver(self, data: bytes) -> None:
        handler = self.handler
        if handler is not None and data:
            handler.response_body(data)

    def _chunks(self, data: bytes) -> None:
        """Find the end of a chunked body, handing its bytes on unchanged as they are scanned."""
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        position, size = 0, len(buffer)
        stage = self._chunk_stage
        payload: list[bytes] | None = [] if self.decode_chunks else None
        while position < size:
            if stage is _ChunkStage.DATA:
                take = min(self._remaining, size - position)
                if payload is not None:
                    payload.append(buffer[position : position + take])
                position += take
                self._remaining -= take
                if self._remaining:
                    break
                stage = _ChunkStage.DATA_END
            elif stage is _ChunkStage.DATA_END:
                if size - position < 2:
                    break
                if buffer[position : position + 2] != b"\r\n":
                    self._fail("sent a chunk without its closing CRLF", True)
                    return
                position += 2
                stage = _ChunkStage.SIZE
            else:
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    if size - position > _MAX_LINE:
                        self._fail("sent an overlong chunk-size line", True)
                        return
                    break
                line = buffer[position:end]
                position = end + 2
                if stage is _ChunkStage.TRAILER:
                    if line:
                        continue
                    # The last chunk and its trailers are complete.
                    self._chunk_stage = stage
                    self._deliver(b"".join(payload) if payload is not None else buffer[:position])
                    self._end(buffer[position:])
                    return
                digits = line.split(b";", 1)[0].strip()
                if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
                    self._fail(f"sent a malformed chunk size {line[:40]!r}", True)
                    return
                chunk = int(digits, 16)
                if chunk == 0:
                    stage = _ChunkStage.TRAILER
                else:
                    self._remaining = chunk
                    stage = _ChunkStage.DATA
        self._chunk_stage = stage
        if position < size:
            # A partial size line or CRLF: kept until the next bytes, and handed on with them.
            self._buffer = buffer[position:]
            buffer = buffer[:position]
        self._deliver(b"".join(payload) if payload is not None else buffer)

    def _end(self, extra: bytes) -> None:
        """The response is complete; the connection goes back to the pool if it can carry another."""
        head = self._head
        handler, self.handler = self.handler, None
        self.stage = _Stage.IDLE
        self._head = None
        reusable = (head is not None and head.keep_alive and not extra and self._body_source is None
                    and not self._upgrade)
        if handler is not None:
            handler.response_end()
        if reusable and self.pool is not None and self.transport is not None:
            self.pool.release(self)
        else:
            self.abort()

    def _fail(self, why: str, received_head: bool) -> None:
        handler = self.handler
        self.abort()
        if handler is not None:
            handler.response_failed(why, received_head)

    def when_closed(self) -> Deferred[None]:
        """Fires once the connection has closed."""
        if self.stage is _Stage.CLOSED and self.transport is None:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        self._on_lost.append(waiter)
        return waiter

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """The backend closed: the end of a close-framed body, otherwise a failure."""
        self._cancel_idle()
        waiters, self._on_lost = self._on_lost, []
        for waiter in waiters:
            waiter.callback(None)
        if self._body_source is not None:
            self._body_source.stopProducing()
            self._body_source = None
        stage, self.stage = self.stage, _Stage.CLOSED
        if self.pool is not None:
            self.pool.forget(self)
        if stage is _Stage.SPLICED and self.splice_lost is not None:
            self.splice_lost()
        handler, self.handler = self.handler, None
        if handler is None:
            return
        if stage is _Stage.BODY and self._head is not None and self._head.framing is Framing.CLOSE:
            handler.response_end()
        elif stage is _Stage.HEAD:
            handler.response_failed("closed the connection without a response", False)
        elif stage is _Stage.BODY:
            handler.response_failed("closed the connection in the middle of the response", True)

    # -- the request body -----------------------------------------------------------------------------
    def body_sent(self) -> None:
        """The spooled request body is all written."""
        source, self._body_source = self._body_source, None
        if source is not None and self.transport is not None:
            self.connection().unregisterProducer()

    # -- idling in the pool ---------------------------------------------------------------------------
    def idle(self, clock: IReactorTime, timeout: float) -> None:
        """Wait in the pool; close after ``timeout`` seconds unused (long before a backend would)."""
        self.reused = True
        self._idle_call = clock.callLater(timeout, self.abort)

    def _cancel_idle(self) -> None:
        call, self._idle_call = self._idle_call, None
        if call is not None and call.active():
            call.cancel()


@implementer(IPushProducer)
class _BodyWriter:
    """Streams a spooled request body (a file) to the backend with its backpressure."""

    def __init__(self, source: object, connection: BackendConnection, progress: Callable[[], None]) -> None:
        self._source = source
        self._connection = connection
        self._progress = progress
        self._paused = False
        self._done = False

    def resumeProducing(self) -> None:
        """The backend drained its buffer: write more."""
        self._paused = False
        while not self._paused and not self._done:
            data = self._source.read(65536)  # type: ignore[attr-defined]
            if not data:
                self._done = True
                self._connection.body_sent()
                return
            write_now(self._connection.connection(), data)
            self._progress()

    def pauseProducing(self) -> None:
        """The backend is not reading: stop."""
        self._paused = True

    def stopProducing(self) -> None:
        """The connection is gone."""
        self._done = True
