"""A fake OpenCode server with extra endpoints the proxy tests drive (test-only).

    python -m tests.proxy_backend serve --port N [--heartbeat S]

Besides everything ``FakeOpenCode`` answers (added with its ``route``, so matched first):
- ``/echo...`` (any method): JSON with the method, raw URI, raw headers in order and the body's size and
  SHA-256; ``?set=Name:Value`` (repeatable) adds response headers, ``?status=N`` sets the status.
- ``/cookies``: two ``Set-Cookie`` headers. ``/gzip``: a fixed gzip body when the client accepts gzip.
- ``/download?size=N[&chunked=1]``: N deterministic bytes, produced only as fast as the client reads.
- ``/upload``: hashes the request body (read in chunks) and answers its size and SHA-256.
- ``/hang``: never answers. ``/ticks?interval=S``: an SSE stream of ``{"t": send time, "n": i}``.
- ``/lockstep/{name}``: an SSE stream that writes event 0 at once and event n+1 only when
  ``/lockstep/{name}/next`` is requested (answers ``{"n": n+1}``, 404 without such a stream).
- ``/__stats``: open event streams and PTY connections.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import time
from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IPushProducer
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from opencoderouter.testing import FakeOpenCode, main, opencode_json

GZIP_PLAIN = json.dumps({"items": [{"id": i, "text": "lorem ipsum " * 8} for i in range(200)]}).encode()
GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)


def pattern(offset: int, size: int) -> bytes:
    """Deterministic download bytes: the 256-byte ramp repeated, starting at ``offset``."""
    ramp = bytes(range(256)) * 257
    start = offset % 256
    out = bytearray()
    while len(out) < size:
        out += ramp[start : start + min(65536, size - len(out))]
        start = 0
    return bytes(out)


@implementer(IPushProducer)
class _Download:
    """Writes ``size`` bytes in 64 kB pieces, pausing whenever the connection's buffer is full."""

    def __init__(self, request: Request, size: int) -> None:
        self.request = request
        self.remaining = size
        self.sent = 0
        self.paused = False
        self.stopped = False
        self.chunk = pattern(0, 65536)

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.remaining > 0:
            piece = self.chunk[: min(65536, self.remaining)]
            self.remaining -= len(piece)
            self.sent += len(piece)
            self.request.write(piece)
        if self.remaining == 0 and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.stopped = True


class ProxyTestBackend(FakeOpenCode):
    """FakeOpenCode plus the endpoints above (every method, matched before the fake's own)."""

    def __init__(self, directory: str, **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self.route(None, "/echo*", self._echo)
        self.route(None, "/cookies", self._cookies)
        self.route(None, "/gzip", self._gzip)
        self.route(None, "/download", self._download)
        self.route(None, "/upload", self._upload)
        self.route(None, "/hang", lambda request: NOT_DONE_YET)
        self.route(None, "/ticks", self._ticks)
        self.route(None, "/lockstep/{name}/next", self._lockstep_next)
        self.route(None, "/lockstep/{name}", self._lockstep)
        self.route(None, "/__stats", self._stats)
        self.lockstep: dict[str, tuple[Request, list[int]]] = {}

    def _cookies(self, request: IRequest) -> bytes:
        request.responseHeaders.addRawHeader(b"set-cookie", b"a=1; Path=/")
        request.responseHeaders.addRawHeader(b"set-cookie", b"b=2; Path=/; HttpOnly")
        request.setHeader(b"content-type", b"text/plain")
        return b"two cookies\n"

    def _gzip(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if b"gzip" in (request.getHeader(b"accept-encoding") or b""):
            request.setHeader(b"content-encoding", b"gzip")
            return GZIP_BODY
        return GZIP_PLAIN

    def _download(self, request: Request) -> int:
        size = int((request.args.get(b"size") or [b"0"])[0])
        request.setHeader(b"content-type", b"application/octet-stream")
        if not request.args.get(b"chunked"):
            request.setHeader(b"content-length", b"%d" % size)
        _Download(request, size).start()
        return NOT_DONE_YET

    def _upload(self, request: IRequest) -> bytes:
        digest = hashlib.sha256()
        size = 0
        while True:
            piece = request.content.read(65536)
            if not piece:
                break
            size += len(piece)
            digest.update(piece)
        return opencode_json(request, {"size": size, "sha256": digest.hexdigest()})

    def _stats(self, request: IRequest) -> bytes:
        return opencode_json(request, {"streams": len(self.streams), "ptys": sum(len(c) for c in self.ptys.values())})

    def _echo(self, request: IRequest) -> bytes:
        body = request.content.read()
        headers = [[name.decode("latin-1"), value.decode("latin-1")]
                   for name, values in request.requestHeaders.getAllRawHeaders() for value in values]
        for item in request.args.get(b"set", []):
            name, _, value = item.partition(b":")
            request.responseHeaders.addRawHeader(name.strip(), value.strip())
        if request.args.get(b"status"):
            request.setResponseCode(int(request.args[b"status"][0]))
        request.setHeader(b"content-type", b"application/json")
        payload = {
            "method": request.method.decode("latin-1"),
            "uri": request.uri.decode("latin-1"),
            "headers": headers,
            "body_size": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        return json.dumps(payload).encode()

    def _ticks(self, request: Request) -> int:
        interval = float((request.args.get(b"interval") or [b"0.1"])[0])
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        counter = iter(range(10**9))

        def tick() -> None:
            request.write(b"data: " + json.dumps({"t": time.time(), "n": next(counter)}).encode() + b"\n\n")

        loop = task.LoopingCall(tick)
        loop.clock = self.clock
        request.notifyFinish().addBoth(lambda _: loop.stop() if loop.running else None)
        loop.start(interval, now=True)
        return NOT_DONE_YET

    def _lockstep(self, request: Request, name: str) -> int:
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        self.lockstep[name] = (request, [0])
        request.notifyFinish().addBoth(lambda _: self.lockstep.pop(name, None))
        self._lockstep_write(name)
        return NOT_DONE_YET

    def _lockstep_next(self, request: IRequest, name: str) -> bytes:
        if name not in self.lockstep:
            return opencode_json(request, {"error": f"no lock-step stream {name!r}"}, 404)
        return opencode_json(request, {"n": self._lockstep_write(name)})

    def _lockstep_write(self, name: str) -> int:
        stream, counter = self.lockstep[name]
        n = counter[0]
        counter[0] += 1
        stream.write(b"data: " + json.dumps({"n": n}).encode() + b"\n\n")
        return n


if __name__ == "__main__":
    sys.exit(main(server_class=ProxyTestBackend))
