"""An incremental Server-Sent Events reader for streams the router follows (OpenCode's ``/global/event``).

It is fed whatever bytes arrive, in pieces of any size, and hands on each event's ``data`` as
bytes once the blank line that ends it has come. A backend is not trusted: one event larger
than ``max_event_bytes`` (counted before it ends, so it is never held whole) or a line that is
not SSE at all raises :class:`StreamError`, and the reader is then of no further use. OpenCode
sends only ``data:`` lines and blank lines; ``event:``, ``id:``, ``retry:`` and comments are
allowed and ignored.
"""

from __future__ import annotations

from collections.abc import Callable

#: Field lines the SSE format defines (and ``:`` comments); anything else is not an event stream.
_FIELDS = (b"data", b"event", b"id", b"retry")


class StreamError(Exception):
    """The stream broke the rules: an event over the size cap, or bytes that are not SSE."""


class SSEReader:
    """Splits a byte stream into events and calls ``on_data(data)`` with each one's ``data`` lines joined."""

    def __init__(self, on_data: Callable[[bytes], None], max_event_bytes: int) -> None:
        self._on_data = on_data
        self._max = max_event_bytes
        #: Bytes of an unfinished line (kept as pieces: a big line arrives in many reads).
        self._partial: list[bytes] = []
        self._partial_size = 0
        #: The data lines of the event being read, and their total size.
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the stream; raises :class:`StreamError` when the stream breaks the rules."""
        if b"\n" not in data:
            self._partial.append(data)
            self._partial_size += len(data)
            self._check_size(self._partial_size)
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
            self._partial.append(rest)
            self._partial_size = len(rest)
            self._check_size(self._partial_size)

    def _line(self, line: bytes) -> None:
        if not line:
            if self._data:
                data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                self._data, self._size = [], 0
                self._on_data(data)
            return
        if line.startswith(b"data:"):
            value = line[6:] if line[5:6] == b" " else line[5:]
            self._size += len(value) + 1
            self._check_size(0)
            self._data.append(value)
            return
        if line.startswith(b":"):
            return
        name = line.split(b":", 1)[0]
        if name not in _FIELDS:
            raise StreamError("a line that is not server-sent events")

    def _check_size(self, unfinished: int) -> None:
        """The event so far plus ``unfinished`` bytes of a line must fit the cap."""
        if unfinished + self._size > self._max:
            raise StreamError(f"an event larger than {self._max} bytes")
