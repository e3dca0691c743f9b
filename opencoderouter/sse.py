"""Reading Server-Sent Events (OpenCode's ``/global/event`` and ``/event``), incrementally.

:class:`SSEReader` is fed whatever bytes arrive, in pieces of any size, and hands on each event's
``data`` as bytes once the blank line that ends it has come. One event larger than
``max_event_bytes`` is counted before it ends, so it is never held whole. What a stream that breaks
the rules costs is the reader's policy: *strict* (the agent watcher, which does not trust a backend)
raises :class:`StreamError` on an oversized event or a line that is not SSE at all, and the reader
is then of no further use; *lenient* (``opencoderouter-dispatch``, which must not lose its session's
stream) skips an oversized event whole, ignores a line that is not SSE, and goes on. OpenCode sends
only ``data:`` lines and blank lines; ``event:``, ``id:``, ``retry:`` and comments are allowed and
ignored. :class:`EventStreamBody` is a response body protocol (``IResponse.deliverBody``) around a
strict reader.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: Field lines the SSE format defines (and ``:`` comments); anything else is not an event stream.
_FIELDS = (b"data", b"event", b"id", b"retry")


class StreamError(Exception):
    """The stream broke the rules: an event over the size cap, or bytes that are not SSE."""


class SSEReader:
    """Splits a byte stream into events and calls ``on_data(data)`` with each one's ``data`` lines joined.

    ``strict`` (the default) raises :class:`StreamError` when the stream breaks the rules; without
    it, an oversized event is dropped whole (up to the blank line that ends it) and a line that is
    not SSE is ignored, and reading goes on.
    """

    def __init__(self, on_data: Callable[[bytes], None], max_event_bytes: int, strict: bool = True) -> None:
        self._on_data = on_data
        self._max = max_event_bytes
        self.strict = strict
        #: Bytes of an unfinished line (kept as pieces: a big line arrives in many reads).
        self._partial: list[bytes] = []
        self._partial_size = 0
        #: The data lines of the event being read, and their total size.
        self._data: list[bytes] = []
        self._size = 0
        #: Lenient only: the rest of an oversized event is being dropped, up to its blank line.
        self._skipping = False
        #: While skipping: the current line has begun (so its end is not a blank line).
        self._mid_line = False

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the stream; strict, raises :class:`StreamError` when the stream breaks the rules."""
        if b"\n" not in data:
            self._unfinished(data)
            return
        if self._partial:
            self._partial.append(data)
            data = b"".join(self._partial)
            self._partial, self._partial_size = [], 0
        lines = data.split(b"\n")
        rest = lines.pop()
        for line in lines:
            self._line(line[:-1] if line.endswith(b"\r") else line)
        if rest:
            self._unfinished(rest)

    def _unfinished(self, piece: bytes) -> None:
        """Keep ``piece`` of a line not ended yet (dropped, while skipping)."""
        if self._skipping:
            self._mid_line = self._mid_line or bool(piece)
            return
        self._partial.append(piece)
        self._partial_size += len(piece)
        if self._partial_size + self._size > self._max:
            self._oversized(mid_line=True)

    def _line(self, line: bytes) -> None:
        if self._skipping:
            if not line and not self._mid_line:
                self._skipping = False
            self._mid_line = False
            return
        if not line:
            if self._data:
                data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                self._data, self._size = [], 0
                self._on_data(data)
            return
        if line.startswith(b"data:"):
            value = line[6:] if line[5:6] == b" " else line[5:]
            self._size += len(value) + 1
            if self._size > self._max:
                self._oversized(mid_line=False)
            else:
                self._data.append(value)
            return
        if line.startswith(b":"):
            return
        name = line.split(b":", 1)[0]
        if name not in _FIELDS and self.strict:
            raise StreamError("a line that is not server-sent events")

    def _oversized(self, mid_line: bool) -> None:
        """The event being read is over the cap: strict, refuse the stream; lenient, drop the event."""
        if self.strict:
            raise StreamError(f"an event larger than {self._max} bytes")
        self._partial, self._partial_size, self._data, self._size = [], 0, [], 0
        self._skipping, self._mid_line = True, mid_line


class EventStreamBody(Protocol):
    """A streamed response body read as server-sent events: ``on_data`` per event, ``on_broken``, ``on_lost``.

    A stream that breaks the rules calls ``on_broken(reason)`` once and is read no further (its
    owner closes it). A busy stream (a turn's text deltas, one small write each) is read in batches:
    after a read that came soon after the previous one, reading pauses for ``batch`` seconds and the
    kernel gathers what arrives meanwhile, so dozens of deltas a second cost a few wake-ups, not
    dozens. A quiet stream is read at once: a permission asked during a quiet spell is seen at once.
    ``closed`` fires when the connection is gone, after ``on_lost(reason)``.
    """

    def __init__(self, on_data: Callable[[bytes], None], on_broken: Callable[[str], None],
                 on_lost: Callable[[Failure], None], max_event_bytes: int, clock: IReactorTime,
                 batch: float = 0.0) -> None:
        self.reader = SSEReader(on_data, max_event_bytes)
        self.on_broken = on_broken
        self.on_lost = on_lost
        self.clock = clock
        self.batch = batch
        self.closed: Deferred[None] = Deferred()
        self.broken = False
        self._last_read = float("-inf")
        self._resume: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        """Feed the reader; a stream that breaks the rules is reported once and read no further."""
        if self.broken:
            return
        now = self.clock.seconds()
        if now - self._last_read < self.batch and self._resume is None and self.transport is not None:
            IPushProducer(self.transport).pauseProducing()
            self._resume = self.clock.callLater(self.batch, self._read_again)
        self._last_read = now
        try:
            self.reader.feed(data)
        except StreamError as error:
            self.broken = True
            self.on_broken(str(error))
        except Exception:
            self.broken = True
            log.failure("an event of a followed stream could not be handled")
            self.on_broken("an event the router could not handle")

    def _read_again(self) -> None:
        self._resume = None
        if self.transport is not None and not self.closed.called:
            IPushProducer(self.transport).resumeProducing()

    def _cancel_resume(self) -> None:
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None

    def close(self) -> None:
        """Drop the connection (``closed`` fires when it is gone)."""
        self._cancel_resume()
        if self.transport is not None and not self.closed.called:
            IPushProducer(self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Report the end; fire ``closed``."""
        self._cancel_resume()
        try:
            self.on_lost(reason)
        finally:
            if not self.closed.called:
                self.closed.callback(None)
